"""Reading WAL with pg_waldump on a real PostgreSQL: the true end of the WAL, committed
transactions and the relations they changed, and a zero-filled (preallocated) segment."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager

import psycopg
import pytest

from activities.postgres.ctl import PgCtl
from activities.postgres.lsn import int_to_lsn, lsn_to_int
from activities.postgres.wal import scan, segment_name, segment_size, waldump
from eagle_dr.config import PostgresConfig
from lab.scratch_postgres import scratch_connect, scratch_postgres

# Moved with EAGLE_DR_TEST_PORT_SHIFT (default 2000: 17960), like the other scratch servers.
PORT = 17960 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000


@pytest.fixture()
def node():
    with scratch_postgres(PORT, "wal") as n:
        yield n


def _conn():
    return scratch_connect(PORT)


def _wal(node) -> str:
    return str(node.data_dir / "pg_wal")


class _Fork:
    """A loser and a survivor given the same statements (the same files, as a standby's would
    be), with a connection to each; the test writes on either, then stops the loser to read it."""

    def __init__(self, node, loser, survivor):
        self.node, self.loser, self.survivor = node, loser, survivor
        self.cfg = PostgresConfig(port=PORT + 1, database="postgres", data_dir=str(node.data_dir),
                                  socket_dir=str(node.run_dir), bin_dir=node.cfg.bin_dir, os_user=node.user.name)
        self.survivor_cfg = PostgresConfig(port=PORT + 2, database="postgres")

    def start(self) -> str:
        """The fork: the loser's WAL position before its post-fork writes."""
        return self.loser.execute("select pg_current_wal_lsn()::text").fetchone()[0]

    def stop_loser(self) -> None:
        """Both connections closed (the survivor's too: the test reconnects if it needs it),
        then the loser stopped, as a failback finds it."""
        self.loser.close()
        self.survivor.close()
        self.node.stop("fast")

    def read(self, keys, since, ts, start, fork_time, spool_dir):
        from activities.postgres.divergence import ForkPoint, read_loser

        return read_loser(self.cfg, keys, since, ts,
                          fork=ForkPoint(new_timeline=2, old_timeline=1, fork_lsn=start, loser_timeline=1),
                          survivor=self.survivor_cfg, fork_time=fork_time, spool_dir=spool_dir)

    def read_and_apply(self, table: str, start: str, fork_time, spool_dir):
        """``table`` (key ``id``, stamped ``updated_at``) read from the stopped loser and its
        rows applied to the survivor, last write wins, in a session of the survivor's own
        settings: the read and the apply's summary."""
        from datetime import datetime, timedelta, timezone

        from activities.conflicts.apply import apply_resolutions
        from eagle_dr.config import TableConflictConfig

        got = self.read({table: ["id"]}, fork_time - timedelta(minutes=1), {table: "updated_at"}, start, fork_time,
                        spool_dir)
        with scratch_connect(PORT + 2, autocommit=False) as d:
            summary = apply_resolutions(d, table, TableConflictConfig(strategy="last-write-wins", key=["id"]),
                                        got.rows[table], [], "old", "new", {"new": 1, "old": 2}, fork_time,
                                        datetime.now(timezone.utc), f"wf-{table}", "run-1")
            d.commit()
        return got, summary


@contextmanager
def _forked_pair(ddl: list[str]):
    with scratch_postgres(PORT + 1, "wal-loser") as n, scratch_postgres(PORT + 2, "wal-survivor"):
        with scratch_connect(PORT + 1) as c, scratch_connect(PORT + 2) as d:
            for q in ddl:
                c.execute(q)
                d.execute(q)
            yield _Fork(n, c, d)


def test_scan_names_committed_changes_only(node):
    with _conn() as c:
        c.execute("create table t (id int primary key, v text)")
        c.execute("create table u (id int primary key, v text)")
        c.execute("create table never (id int primary key)")
        start = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        c.execute("insert into t values (1, 'a'), (2, 'b')")
        c.execute("update t set v = 'x' where id = 1")
        c.execute("delete from t where id = 2")
        with c.transaction():
            c.execute("insert into u values (5, 'q')")
            with c.transaction():  # a subtransaction: its rows carry the subxact's id
                c.execute("insert into u values (6, 'r')")
        sub_xmin = c.execute("select xmin::text::bigint from u where id = 6").fetchone()[0]
        c.execute("begin")
        c.execute("insert into never values (1)")
        c.execute("rollback")
        # COPY writes MULTI_INSERT records, many rows each: counted as rows, not records.
        c.execute("create table bulk (id int, v text)")
        start_bulk = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        with c.cursor().copy("copy bulk from stdin") as cp:
            for i in range(500):
                cp.write_row((i, "x"))
        files = {r: c.execute("select pg_relation_filenode(%s)", (r,)).fetchone()[0]
                 for r in ("t", "u", "never", "bulk")}
        db = c.execute("select oid from pg_database where datname = current_database()").fetchone()[0]
    found = scan(PgCtl(node.cfg), _wal(node), 1, start)
    by_file = {k[2]: v.ops for k, v in found.changes.items()}
    assert by_file[files["t"]] == {"insert": 2, "update": 1, "delete": 1}
    assert by_file[files["u"]] == {"insert": 2}
    assert by_file[files["bulk"]] == {"insert": 500}
    # Files made after the start are known as such (a plan never names them from another catalog).
    assert (1663, db, files["bulk"]) in found.created_files and (1663, db, files["t"]) not in found.created_files
    records = PgCtl(node.cfg)
    dump = waldump(records, _wal(node), 1, start_bulk, segment_size(records)).stdout
    assert 0 < dump.count("MULTI_INSERT") < 500  # the case counted: fewer records than rows
    assert files["never"] not in by_file  # rolled back: nothing of it is kept anywhere
    assert sub_xmin in found.xids
    assert lsn_to_int(found.end_lsn) > lsn_to_int(start)


def test_zero_filled_segment_listed_first_is_the_end_not_an_error(node):
    """Preallocated segments are all zeros. pg_waldump given only a directory takes the
    segment size from the first file readdir lists, and fails on such a file."""
    with _conn() as c:
        c.execute("create table t (id int primary key)")
        start = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        c.execute("insert into t select generate_series(1, 1000)")
        current = c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    node.stop("immediate")
    wal = _wal(node)
    ctl = PgCtl(node.cfg)
    size = segment_size(ctl)
    nxt = int(current[16:], 16)
    # Zero-filled successors, as PostgreSQL preallocates them, until one is listed first.
    for i in range(1, 40):
        name = current[:16] + f"{nxt + i:08X}"
        with open(os.path.join(wal, name), "wb") as f:
            f.truncate(size)
        if next(n for n in os.listdir(wal) if len(n) == 24) == name:
            break
    else:
        pytest.skip("could not make a zero-filled segment come first in this directory's listing")
    plain = subprocess.run([ctl.tool("pg_waldump"), "-p", wal, "-t", "1", "-s", start], capture_output=True,
                           text=True)
    assert "header specifies 0 bytes" in plain.stderr  # the failure seen in the lab
    found = scan(ctl, wal, 1, start)
    assert found.commits and segment_name(1, lsn_to_int(found.end_lsn), size) <= current[:16] + f"{nxt + 1:08X}"


def test_read_loser_names_what_changed_and_finds_rows_by_their_writer(tmp_path):
    """On a stopped node: the relations post-fork transactions changed, named as the config
    would name them (a partition as its root, TOAST as its table), and rows found by xmin even
    when their timestamp did not move."""
    from datetime import datetime, timezone

    from activities.postgres.divergence import ForkPoint, read_loser
    from eagle_dr.config import PostgresConfig

    with scratch_postgres(PORT + 1, "wal-loser") as n:
        cfg = PostgresConfig(port=PORT + 1, database="postgres", data_dir=str(n.data_dir), socket_dir=str(n.run_dir),
                             bin_dir=n.cfg.bin_dir, os_user=n.user.name)
        with scratch_connect(PORT + 1) as c:
            c.execute("create table listed (id int primary key, v text, updated_at timestamptz not null "
                      "default '2000-01-01')")
            c.execute("create table parted (id int primary key, body text) partition by range (id)")
            c.execute("create table parted_1 partition of parted for values from (0) to (1000)")
            c.execute("create table big (id int primary key, doc text)")
            c.execute("insert into listed values (1, 'before')")
            start = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
            c.execute("update listed set v = 'after' where id = 1")  # updated_at stays in 2000
            c.execute("insert into parted values (7, 'p')")
            c.execute("insert into big select 1, string_agg(md5(g::text), '') from generate_series(1, 4000) g")
        n.stop("fast")
        got = read_loser(cfg, {"listed": ["id"]}, datetime(2999, 1, 1, tzinfo=timezone.utc),
                         {"listed": "updated_at"}, fork=ForkPoint(new_timeline=2, old_timeline=1, fork_lsn=start,
                                                                  loser_timeline=1), spool_dir=tmp_path / "spool")
    assert [r["v"] for r in got.rows["listed"]] == ["after"]
    # Stamped with its commit, not the stale year-2000 value the row carries.
    assert list(got.rows["listed"])[0]["updated_at"] > "2026"
    names = {c.name: c for c in got.changed if c.kind == "user"}
    assert set(names) == {"public.listed", "public.parted", "public.big"}, got.changed
    assert names["public.parted"].ops == {"insert": 1}
    assert got.oids["listed"] == names["public.listed"].oid


def test_a_table_or_partition_rewritten_on_the_survivor_marks_its_table_rewritten(tmp_path):
    """A partitioned table has no file of its own to compare: a migration on the survivor that
    rewrote one partition (new xmins on its every row) must still mark the table, or its rows
    there count as changed after the fork by their xmin alone."""
    from datetime import datetime, timedelta, timezone

    ddl = ["create table parted (id int primary key, body text, updated_at timestamptz not null default now())"
           " partition by range (id)",
           "create table parted_1 partition of parted for values from (0) to (1000)",
           "create table parted_2 partition of parted for values from (1000) to (2000)",
           "insert into parted (id, body) values (1, 'before'), (1001, 'before')",
           "create table plain (id int primary key, body text, updated_at timestamptz not null default now())",
           "insert into plain (id, body) values (1, 'before')",
           "create table grown (id int primary key, body text, updated_at timestamptz not null default now())"
           " partition by range (id)",
           "create table grown_1 partition of grown for values from (0) to (1000)",
           "insert into grown (id, body) values (1, 'before')"]
    files = "select relid::regclass::text, pg_relation_filenode(relid) from pg_partition_tree('parted')"
    with _forked_pair(ddl) as f:
        c, d = f.loser, f.survivor
        # Two fresh clusters given the same statements: the same files, as a standby's would be.
        assert c.execute(files).fetchall() == d.execute(files).fetchall()
        fork_time = datetime.now(timezone.utc)
        start = f.start()
        c.execute("update parted set body = 'after' where id = 1")
        c.execute("update plain set body = 'after' where id = 1")
        d.execute("vacuum full parted_2")
        d.execute("vacuum full plain")
        c.execute("update grown set body = 'after' where id = 1")
        # Next month's partition, made on the survivor only: no rewrite of anything.
        d.execute("create table grown_2 partition of grown for values from (1000) to (2000)")
        f.stop_loser()
        got = f.read({"parted": ["id"], "plain": ["id"], "grown": ["id"]}, fork_time - timedelta(minutes=1),
                     {"parted": "updated_at", "plain": "updated_at", "grown": "updated_at"}, start, fork_time,
                     tmp_path / "spool")
    assert [r["body"] for r in got.rows["parted"]] == ["after"]
    # A plain table too (pg_partition_tree gives it nothing); not one that only gained a partition.
    assert sorted(got.rewritten) == ["parted", "plain"]


ODD = "tab\there\nnewline \\ back\\"


def test_a_table_read_in_full_streams_its_rows_and_finds_deletions_on_the_survivor(tmp_path):
    """A table whose blocks cannot be trusted (the survivor rewrote it) is read in full: its
    rows go to the spool with their odd values intact (a tab and a newline in a text, an exact
    numeric, a composite key with a timestamp, a loser set to write dates day first), and the
    keys the loser deleted after the fork are found on the survivor by comparing every key
    there, not in the worker. A row the loser only updated, or the survivor added, is no
    deletion; nor is a key with a NULL part, or a non-ASCII key when the survivor's sessions
    use another encoding."""
    from datetime import datetime, timedelta, timezone
    from decimal import Decimal

    ddl = ["create table ev (k text, at timestamptz, amount numeric, body text,"
           " updated_at timestamptz not null default now(), primary key (k, at))",
           "insert into ev (k, at, amount, body, updated_at) select 'k' || g, '2026-03-04 00:00:00+00'::timestamptz"
           " + g * interval '1 second', g / 3.0, 'x', '2026-01-01' from generate_series(1, 500) g",
           "insert into ev (k, at, amount, body, updated_at) values ('café', '2026-03-04', 1, 'x', '2026-01-01')",
           # A unique key with a NULL part: NULL matches NULL, as the old comparison had it.
           "create table nk (a int, b int, v text, updated_at timestamptz not null default '2026-01-01',"
           " unique (a, b))",
           "insert into nk (a, b, v) values (1, null, 'x'), (1, null, 'y'), (2, 2, 'z')"]
    with _forked_pair(ddl) as f:
        c, d = f.loser, f.survivor
        fork_time = datetime.now(timezone.utc)
        start = f.start()
        c.execute("update ev set body = %s, amount = 1.50 where k = 'k7'", (ODD,))
        c.execute("delete from ev where k in ('k3', 'k400')")
        c.execute("delete from nk where a = 2")
        d.execute("insert into ev (k, at, amount, body) values ('new', now(), 1, 'survivor only')")
        d.execute("vacuum full ev")  # the survivor's blocks no longer match: a full read
        d.execute("vacuum full nk")
        # The survivor's sessions speak LATIN1: café's bytes from the loser must still be café.
        d.execute("alter role postgres set client_encoding = 'LATIN1'")
        # The loser's own output style (day first) must not reach the survivor's parser.
        c.execute("alter system set datestyle = 'SQL, DMY'")
        f.stop_loser()
        got = f.read({"ev": ["k", "at"], "nk": ["a", "b"]}, fork_time - timedelta(minutes=1),
                     {"ev": "updated_at", "nk": "updated_at"}, start, fork_time, tmp_path / "spool")
    assert got.reads["ev"].mode == "full", got.reads
    rows = list(got.rows["ev"])
    assert len(got.rows["ev"]) == 1 and [r["k"] for r in rows] == ["k7"]
    assert rows[0]["body"] == ODD and rows[0]["amount"] == Decimal("1.50")
    day = datetime(2026, 3, 4, tzinfo=timezone.utc)
    assert sorted(got.deleted["ev"]) == [("k3", day + timedelta(seconds=3)), ("k400", day + timedelta(seconds=400))]
    assert got.reads["nk"].mode == "full" and got.deleted["nk"] == [(2, 2)]
    assert len(list(tmp_path.joinpath("spool").iterdir())) == 2


def _insert_lsn(c: psycopg.Connection) -> int:
    return lsn_to_int(c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0])


def test_a_write_whose_record_crosses_into_the_reads_segment_is_followed_back(node):
    """The long transaction's last write before the fork's segment is a record that begins in
    the segment before and ends in it: the read, from the segment's start, skips its tail, so
    the earlier read must go on through it (ending at the segment boundary, it stopped before
    it: the table was in neither, and the transaction counted as placed)."""
    size = segment_size(PgCtl(node.cfg))
    with _conn() as c:
        c.execute("create table other (id int)")
        c.execute("create table batch (id int, v text)")
        batch = c.execute("select pg_relation_filenode('batch')").fetchone()[0]
        c.execute("checkpoint")  # a snapshot from before the batch began
        with scratch_connect(PORT, autocommit=False) as t:
            t.execute("insert into other values (1)")
            xid = int(t.execute("select pg_current_xact_id()::text").fetchone()[0])
            # Pad with logical messages to a few hundred bytes before a segment boundary, then
            # write a ~1.5 KB row: its record must cross the boundary.
            for _ in range(200):
                rem = size - _insert_lsn(c) % size
                if 300 <= rem <= 700:
                    break
                n = rem + 4000 if rem < 300 else max(1, min(rem - 500 - (60000 if rem > 200000 else 0), 4_000_000))
                c.execute("select pg_logical_emit_message(false, 'pad', repeat('x', %s))", (int(n * 0.99),))
            boundary = _insert_lsn(c) - _insert_lsn(c) % size + size
            t.execute("insert into batch values (1, (select string_agg(md5(g::text), '') from generate_series(1, 45) g))")
            crossed = _insert_lsn(c) > boundary
            c.execute("checkpoint")  # a snapshot in the fork's segment: the batch among the running
            start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            t.commit()
    if not crossed or lsn_to_int(start) // size != boundary // size:
        pytest.skip("the row's record did not land across the boundary")
    found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True)
    assert xid in found.unplaced_xids or batch in {k[2] for k in found.changes}
    assert batch in {k[2] for k in found.changes}


def test_a_segment_from_another_history_is_not_followed_back_into(tmp_path):
    """A segment before the read that is not the one that led to it (another history of the
    timeline, same name): nothing is taken from it, and the transaction stays unplaced."""
    import shutil

    from activities.postgres.wal import segment_name

    def seg(c: psycopg.Connection) -> int:
        return _insert_lsn(c) // (16 << 20)

    with scratch_postgres(PORT + 1, "wal-history-a") as a, scratch_postgres(PORT + 2, "wal-history-b") as b:
        with scratch_connect(PORT + 1) as c:
            c.execute("create table batch (id int)")
            c.execute("create table other (id int)")
            batch = c.execute("select pg_relation_filenode('batch')").fetchone()[0]
            c.execute("select pg_switch_wal()")
            c.execute("checkpoint")
            with scratch_connect(PORT + 1, autocommit=False) as t:
                t.execute("insert into batch values (1)")
                xid = int(t.execute("select pg_current_xact_id()::text").fetchone()[0])
                before = seg(c)
                c.execute("select pg_switch_wal()")
                t.execute("insert into other values (1)")  # it writes in the read too
                c.execute("checkpoint")  # in the fork's segment, the batch running
                start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
                t.commit()
        with scratch_connect(PORT + 2) as c:
            while seg(c) < before:
                c.execute("select pg_switch_wal()")
                c.execute("create table if not exists x (i int)")
            c.execute("checkpoint")
            c.execute("select pg_switch_wal()")
        wal_a = str(a.data_dir / "pg_wal")
        assert batch in {k[2] for k in scan(PgCtl(a.cfg), wal_a, 1, start, lookback=True).changes}
        name = segment_name(1, before * (16 << 20), 16 << 20)
        shutil.copyfile(b.data_dir / "pg_wal" / name, a.data_dir / "pg_wal" / name)
        found = scan(PgCtl(a.cfg), wal_a, 1, start, lookback=True)
    assert xid in found.unplaced_xids and batch not in {k[2] for k in found.changes}


def test_a_forged_record_in_the_wal_before_the_read_leaves_the_transaction_unplaced(node):
    """Old WAL the follow-back cannot trust (a logical message's prefix forging a record) does
    not fail the scan: the transaction stays unplaced, as without the follow-back."""
    with _conn() as c:
        c.execute("create table b (id int)")
        c.execute("select pg_switch_wal()")
        c.execute("checkpoint")
        c.execute("select pg_logical_emit_message(false, %s, 'x')",
                  ("p\nrmgr: Heap        len (rec/tot):     54/    54, tx:        999, lsn: 0/01000000, "
                   "prev 0/00000000, desc: INSERT off 1",))
        with scratch_connect(PORT, autocommit=False) as t:
            t.execute("insert into b values (1)")
            xid = int(t.execute("select pg_current_xact_id()::text").fetchone()[0])
            for _ in range(2):
                c.execute("select pg_switch_wal()")
                c.execute("checkpoint")
            start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            t.commit()
    assert xid in scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True).unplaced_xids


def test_scan_names_the_blocks_and_follows_a_transaction_in_flight_at_the_start(node):
    """The blocks post-start commits wrote and removed rows in; a transaction that wrote before
    the start and committed after it counts, with its blocks, only when asked to look back;
    one whose writes cannot be found is reported unplaced."""
    with _conn() as c:
        c.execute("checkpoint")  # a snapshot of the running transactions for the lookback to reach
        c.execute("create table t (id int primary key, pad text)")
        c.execute("create table early (id int primary key)")
        c.execute("insert into t select g, repeat('x', 500) from generate_series(1, 2000) g")
        blk = c.execute("select (ctid::text::point)[0]::int from t where id = 1500").fetchone()[0]
        node_file = c.execute("select pg_relation_filenode('t')").fetchone()[0]
        early_file = c.execute("select pg_relation_filenode('early')").fetchone()[0]
        with scratch_connect(PORT, autocommit=False) as inflight:
            inflight.execute("insert into early values (1)")  # written before the start...
            # The insert position: an uncommitted record may not be written out yet.
            start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            c.execute("delete from t where id = 1500")
            inflight.commit()  # ...committed after it
        end_blocks = c.execute("select pg_relation_size('t') / 8192").fetchone()[0]
    ctl = PgCtl(node.cfg)
    plain = scan(ctl, _wal(node), 1, start)
    assert early_file not in {k[2] for k in plain.changes}
    looked = scan(ctl, _wal(node), 1, start, lookback=True)
    t = next(v for k, v in looked.changes.items() if k[2] == node_file)
    assert t.ops == {"delete": 1} and t.removed_blocks == {blk} and t.blocks == {blk} and blk < end_blocks
    early = next(v for k, v in looked.changes.items() if k[2] == early_file)
    assert early.ops == {"in flight": 1} and early.blocks == {0}
    assert not looked.unplaced_xids
    # Looked back from a later start, the in-flight transaction's write is out of reach.
    assert plain.unplaced_xids  # its commit is all that follows the start


def test_a_transaction_running_before_the_read_is_followed_back_to_what_it_wrote(node, monkeypatch):
    """A long transaction (a batch job) wrote a table two segments before the fork's and
    committed after the fork. The read starts at the fork's segment, where every snapshot of the
    running transactions lists it: its writes are followed back until a snapshot that does not,
    so the table is named (a table nobody listed is then refused or reconciled, never lost to
    pg_rewind) and the transaction is placed. Out of reach, it stays unplaced and unnamed."""
    from activities.postgres import wal

    with _conn() as c:
        c.execute("create table batch (id int primary key)")
        batch = c.execute("select pg_relation_filenode('batch')").fetchone()[0]
        c.execute("checkpoint")  # a snapshot from before the batch began
        with scratch_connect(PORT, autocommit=False) as inflight:
            inflight.execute("insert into batch values (1)")
            xid = int(inflight.execute("select pg_current_xact_id()::text").fetchone()[0])
            for _ in range(2):
                c.execute("select pg_switch_wal()")
                c.execute("checkpoint")  # a snapshot in each later segment: xid among the running
            start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            inflight.commit()
    ctl = PgCtl(node.cfg)
    found = scan(ctl, _wal(node), 1, start, lookback=True)
    assert xid not in found.unplaced_xids
    assert next(v for k, v in found.changes.items() if k[2] == batch).ops == {"in flight": 1}
    monkeypatch.setattr(wal, "_FOLLOW_SEGMENTS", 0)
    short = scan(ctl, _wal(node), 1, start, lookback=True)
    assert xid in short.unplaced_xids
    assert batch not in {k[2] for k in short.changes}


def test_without_a_snapshot_in_reach_every_commit_after_the_start_is_unplaced(node, monkeypatch):
    """No RUNNING_XACTS found before the start within the lookback's reach: a transaction in
    flight at the start may have written anywhere before it, so no commit can be trusted to
    be placed (the caller then reads every table in full)."""
    from activities.postgres import wal

    monkeypatch.setattr(wal, "_LOOKBACK_SEGMENTS", 0)
    with _conn() as c:
        c.execute("create table if not exists late (id int primary key)")
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        c.execute("insert into late values (1)")
    found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True)
    assert found.commits and {c.xid for c in found.commits} <= found.unplaced_xids


def test_a_quiet_snapshot_before_the_start_is_reached(node, monkeypatch):
    """A RUNNING_XACTS logged with no transaction running prints no "xacts:" list at all; it
    is a snapshot all the same, and a commit wholly after the start is placed. The CI run
    that missed it read every table in full in a quiet lab (and said so)."""
    from activities.postgres import wal

    monkeypatch.setattr(wal, "_LOOKBACK_SEGMENTS", 1)  # no earlier segment: the start's holds the quiet one
    with _conn() as c:
        c.execute("create table if not exists quiet (id int primary key)")
        c.execute("select pg_switch_wal()")
        c.execute("checkpoint")  # nothing running: "RUNNING_XACTS nextXid N ... oldestRunningXid N"
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        c.execute("insert into quiet values (1)")
    found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True)
    assert found.commits and not found.unplaced_xids, found.unplaced_xids


def test_a_lookback_never_crosses_into_a_segment_from_another_history_of_the_timeline(node):
    """Timeline numbers are reused (a node rewound and promoted again gets the same one), so the
    segment before a fork's may be left from another history of the same timeline and system:
    valid on its own, it does not chain into the fork's segment, and pg_waldump read through
    it stops at the broken prev-link just past the fork. Such a read must not replace the
    fork's own: the commit after the fork is still found (a split brain once lost a row so:
    measured one commit, read none)."""
    ctl = PgCtl(node.cfg)
    seg = segment_size(ctl)
    with _conn() as c:
        c.execute("create table t (id int primary key, v text)")
        c.execute("select pg_switch_wal()")
    ctl.stop("fast")
    # The twin: a cold copy (same system id, same timeline) that writes its own history.
    twin_dir = node.data_dir.parent / "twin"
    subprocess.run(["cp", "-a", str(node.data_dir), str(twin_dir)], check=True)
    twin = PgCtl(node.cfg.model_copy(update={"data_dir": str(twin_dir), "port": PORT + 1}))
    twin.start()
    try:
        with psycopg.connect(host=node.cfg.socket_dir, port=PORT + 1, user="postgres", dbname="postgres",
                             autocommit=True) as c:
            c.execute("insert into t select g, repeat('y', 200) from generate_series(1, 50) g")
            c.execute("checkpoint")  # a RUNNING_XACTS in the twin's segment: the lookback stops there
            twin_seg = segment_name(1, lsn_to_int(c.execute("select pg_current_wal_lsn()::text").fetchone()[0]), seg)
            c.execute("select pg_switch_wal()")
    finally:
        twin.stop("fast")
    ctl.start()
    with _conn() as c:
        c.execute("insert into t values (0, 'mine')")
        here = lsn_to_int(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
        assert segment_name(1, here, seg) == twin_seg
        c.execute("select pg_switch_wal()")
        at = lsn_to_int(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
        fork = int_to_lsn(at - at % seg)  # a segment boundary, as a promotion after a switch leaves it
        c.execute("insert into t values (1000, 'after the fork')")
        xid = int(c.execute("select xmin::text::bigint from t where id = 1000").fetchone()[0])
    ctl.stop("fast")
    # The stale segment of the other history, where the node's own one was.
    os.replace(twin_dir / "pg_wal" / twin_seg, node.data_dir / "pg_wal" / twin_seg)
    plain = scan(ctl, _wal(node), 1, fork)
    looked = scan(ctl, _wal(node), 1, fork, lookback=True)
    assert xid in {c.xid for c in plain.commits}
    assert {c.xid for c in looked.commits} == {c.xid for c in plain.commits}, (plain.commits, looked.commits)
    assert looked.end_lsn == plain.end_lsn
    # Not found placed through the foreign segment: unplaced, so the caller reads in full.
    assert xid in looked.unplaced_xids


def test_reconcile_refuses_a_read_that_disagrees_with_the_measured_divergence():
    """Defence behind the lookback fix: the measure and the read scan the same stopped WAL,
    so fewer commits read, or an earlier end, is a read that missed writes; nothing may be
    applied (and so nothing rewound) on it."""
    from temporalio.exceptions import ApplicationError

    from activities.failback import _agrees
    from activities.postgres.divergence import LoserRows, LostWal

    lost = LostWal(fork_lsn="0/4000000", end_lsn="0/4000200", lost_bytes=512, lost_commits=1)

    def read(commits, end):
        return LoserRows(rows={}, keys={}, changed=[], oids={}, wal_commits=commits, wal_end_lsn=end)

    _agrees("us-west-2", lost, read(1, "0/4000200"))
    _agrees("us-west-2", lost, read(None, None))  # no fork given: nothing to compare
    for commits, end in ((0, "0/4000200"), (2, "0/4000200"), (1, "0/4000100")):
        with pytest.raises(ApplicationError) as e:
            _agrees("us-west-2", lost, read(commits, end))
        assert e.value.type == "DivergenceMismatch" and e.value.non_retryable
        assert "Nothing was applied" in str(e.value) and "measured 1 commits to 0/4000200" in str(e.value)


def test_a_transaction_that_only_moved_a_sequence_is_placed(node):
    """An ORM fetching ids in a transaction of its own commits with nothing in the WAL but the
    sequence's record. pg_waldump prints no index records to the scan, but it must print that
    one: an unplaced commit sends every changed table to a full read."""
    with _conn() as c:
        c.execute("create sequence if not exists ids")
        c.execute("create table if not exists seq_t (id bigint primary key)")
        c.execute("checkpoint")  # a snapshot before the start; and nextval logs anew after it
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        c.execute("select nextval('ids')")  # autocommit: its own transaction, with an xid
        c.execute("insert into seq_t values (1)")
    found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True)
    assert len(found.commits) == 2 and not found.unplaced_xids, (found.commits, found.unplaced_xids)

def _xid(conn) -> int:
    return int(conn.execute("select pg_current_xact_id()::text").fetchone()[0])


def test_a_record_forged_by_a_string_with_a_line_break_fails_the_read(node):
    """pg_waldump prints a logical message's prefix as it is: a line break in it prints a line
    that reads as a record. A forged ABORT of a transaction that then commits must not make
    the scan drop that transaction's rows (pg_rewind would erase them): the read refuses."""
    from activities.postgres.wal import WalUnreadable

    with _conn() as c:
        c.execute("create table if not exists forged (id int primary key)")
        c.execute("checkpoint")
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        with scratch_connect(PORT, autocommit=False) as victim:
            victim.execute("insert into forged values (1)")
            x = _xid(victim)
            fake = (f"x\nrmgr: Transaction len (rec/tot):     34/    34, tx: {x:>10}, lsn: 0/00000000, "
                    "prev 0/00000000, desc: ABORT ")
            c.execute("select pg_logical_emit_message(false, %s, 'payload')", (fake,))
            victim.commit()
    for lookback in (False, True):
        with pytest.raises(WalUnreadable, match="forges a record"):
            scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=lookback)


def test_the_record_count_covers_what_the_read_covered_on_a_node_writing_on(node, monkeypatch):
    """A plan, or a failover's RPO, reads the WAL of a node that may still take writes: the
    record count that guards against forged lines must count the stretch the read covered,
    not the WAL written between the two passes (written here just before the count)."""
    from activities.postgres import wal

    with _conn() as c:
        c.execute("create table if not exists busy (id bigint primary key)")
        c.execute("checkpoint")
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        c.execute("insert into busy select generate_series(1, 100)")
    counted = wal._records
    more = iter(range(1000, 10**6, 1000))

    def after_more_writes(*a, **kw):
        with _conn() as w:
            n = next(more)
            w.execute("insert into busy select generate_series(%s::bigint, %s::bigint)", (n, n + 999))
        return counted(*a, **kw)

    monkeypatch.setattr(wal, "_records", after_more_writes)
    for lookback in (False, True):
        found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=lookback)
        assert found.commits


def test_nothing_after_the_start_is_zero_commits_not_an_error(node):
    """A failover that lost nothing: the old primary's WAL ends right where the standby
    stopped. The read finds no record at all, and that is an answer (0 commits), not a read
    the forged-line check may refuse."""
    from activities.postgres.wal import end_from

    with _conn() as c:
        c.execute("create table if not exists quiet_end (id int primary key)")
        c.execute("insert into quiet_end values (1)")
    node.stop("fast")
    ctl = PgCtl(node.cfg)
    end = end_from(ctl, _wal(node), 1, "0/1000000", segment_size(ctl))
    found = scan(ctl, _wal(node), 1, end)
    assert found.commits == [] and found.end_lsn == end

def test_a_string_in_another_encoding_does_not_break_the_read(node):
    """pg_waldump prints user strings in their database's encoding: a logical message's prefix
    from a SQL_ASCII database need not be UTF-8. The read goes on (the string is never parsed)."""
    with _conn() as c:
        c.execute("create database ascii_db encoding 'SQL_ASCII' lc_collate 'C' lc_ctype 'C' template template0")
        c.execute("checkpoint")
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
    with scratch_connect(PORT, dbname="ascii_db") as a:
        a.execute("create table t (id int primary key)")
        a.execute("select pg_logical_emit_message(true, convert_from('\\xe9e9'::bytea, 'SQL_ASCII'), 'x')")
        a.execute("insert into t values (1)")
    found = scan(PgCtl(node.cfg), _wal(node), 1, start)
    assert len(found.commits) >= 2, found.commits

def test_a_two_phase_commit_counts_under_the_prepared_xid(node):
    """COMMIT PREPARED is logged with tx 0 and names the prepared transaction's xid in its
    description: its rows (xmin = that xid) must be among the commits and the changes."""
    with _conn() as c:
        c.execute("alter system set max_prepared_transactions = 4")
    node.stop("fast")
    node.start()
    with _conn() as c:
        c.execute("create table if not exists twopc (id int primary key)")
        c.execute("checkpoint")
        filenode = c.execute("select pg_relation_filenode('twopc')").fetchone()[0]
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        c.execute("begin")
        c.execute("insert into twopc values (1)")
        x = _xid(c)
        c.execute("prepare transaction 'g1'")
        c.execute("commit prepared 'g1'")
        c.execute("begin")
        c.execute("insert into twopc values (2)")
        c.execute("prepare transaction 'g2'")
        c.execute("rollback prepared 'g2'")
    for lookback in (False, True):
        found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=lookback)
        assert [c.xid for c in found.commits] == [x], found.commits
        change = next(rc for rc in found.changes.values() if rc.relfilenode == filenode)
        assert change.ops == {"insert": 1}, change


def test_without_a_snapshot_in_reach_the_lookback_still_names_what_an_in_flight_transaction_wrote(
        node, monkeypatch):
    """No snapshot within reach: every commit is unplaced, and the relations a transaction in
    flight at the start wrote in earlier segments are still named (a table nobody listed is
    refused by its name); the read goes as far back as reach allows."""
    from activities.postgres import wal

    with _conn() as c:
        for t in ("early", "mid", "late", "other"):
            c.execute(f"create table if not exists {t} (id int primary key)")
        c.execute("select pg_switch_wal()")
        c.execute("checkpoint")  # a snapshot: in the segment before the in-flight writes
        nodes = {t: c.execute("select pg_relation_filenode(%s::regclass)", (t,)).fetchone()[0]
                 for t in ("early", "mid", "late")}
        with scratch_connect(PORT, autocommit=False) as inflight:
            c.execute("select pg_switch_wal()")
            inflight.execute("insert into early values (1)")
            c.execute("select pg_switch_wal()")
            inflight.execute("insert into mid values (1)")
            c.execute("select pg_switch_wal()")
            c.execute("insert into other values (1)")
            start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            inflight.execute("insert into late values (1)")
            inflight.commit()
    monkeypatch.setattr(wal, "_LOOKBACK_SEGMENTS", 3)  # the start's segment and two before: no snapshot
    found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True)
    assert found.commits and {c.xid for c in found.commits} <= found.unplaced_xids
    named = {rc.relfilenode for rc in found.changes.values()}
    assert {nodes["early"], nodes["mid"], nodes["late"]} <= named, (nodes, named)

def _line(rmgr: str, xid: int, lsn: str, desc: str) -> str:
    return (f"rmgr: {rmgr:<11} len (rec/tot):     59/    59, tx: {xid:>10}, lsn: {lsn}, prev 0/00000000, "
            f"desc: {desc}")


def test_the_reader_keeps_per_transaction_state_only_until_the_transaction_ends():
    """What bounds a long divergence's read to flat memory: a transaction's changes wait only
    until its commit (then they join the relation's) or its abort (then they go). A lookback's
    ASSIGNMENT record before the start names a running transaction's subxacts: it ends nothing,
    so what that transaction wrote before the start still counts when it commits after it."""
    from activities.postgres.wal import _Reader

    insert = "INSERT off 3 flags 0x08, blkref #0: rel 1663/5/16384 blk {}"
    r = _Reader(first=0x2000, lookback=True)
    for line in [
        _line("Heap", 700, "0/00001000", insert.format(1)),  # in flight at the start (0/2000)
        _line("Transaction", 700, "0/00001100", "ASSIGNMENT xtop 700: subxacts: 701"),
        _line("Heap", 710, "0/00001200", insert.format(2)),
        _line("Transaction", 710, "0/00001300", "COMMIT 2026-12-04 10:00:00.000001 UTC"),  # before the start
        _line("Heap", 720, "0/00002100", insert.format(3)),
        _line("Transaction", 720, "0/00002200", "ABORT 2026-12-04 10:00:01.000001 UTC"),
        _line("Heap", 701, "0/00002300", insert.format(4)),
        _line("Transaction", 700, "0/00002400", "COMMIT 2026-12-04 10:00:02.000001 UTC; subxacts: 701"),
        _line("Heap", 730, "0/00002500", insert.format(5)),  # still running at the end
    ]:
        r.feed(line)
    assert set(r.pending) == {730}, r.pending
    scanned = r.result("0/2000", "0/2600", reached=True)
    assert [c.xid for c in scanned.commits] == [700]
    change = scanned.changes[(1663, 5, 16384)]
    assert change.blocks == {1, 4} and change.ops == {"insert": 1}, change


def test_a_hung_pg_waldump_is_killed_and_the_read_refused(node, monkeypatch):
    """pg_waldump that stops printing (a read hung on its storage) is killed after the idle
    bound, and the scan refuses the read (no end of WAL) instead of hanging: the activities
    heartbeat from their own thread, so nothing else would end it before its start-to-close
    timeout. What it printed before it hung is not taken for the whole, and a pipe that stays
    open after the kill is not waited for."""
    from activities.postgres import wal
    from activities.postgres.wal import WalUnreadable

    with _conn() as c:
        start = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
    monkeypatch.setattr(wal, "_IDLE_TIMEOUT_S", 0.5)
    # A real first line, then silence. Not exec'd: the sleep, a child the kill does not reach,
    # keeps the pipe open after it, as a tool stuck in uninterruptible I/O would; the read must
    # not wait for the pipe to close.
    line = "rmgr: Transaction len (rec/tot):     34/    34, tx:        777, lsn: 0/01000028, prev 0/01000000, " \
           "desc: COMMIT 2026-12-04 10:00:00.000000 UTC"
    monkeypatch.setattr(wal, "_argv", lambda *a, **k: ["sh", "-c", f"echo '{line}'; sleep 20; true"])
    with pytest.raises(WalUnreadable) as e:
        scan(PgCtl(node.cfg), _wal(node), 1, start)
    assert "sh killed: no output" in str(e.value), e.value


def test_the_xid_horizon_is_one_past_the_newest_id_before_the_start_across_wraparound(node):
    """The horizon is what tells a survivor's post-fork rows by their xmin: one past the newest
    transaction id the WAL before the start names, in PostgreSQL's circular order (numerically
    smaller after the wrap), never a reserved id; ids after the start do not move it."""
    from psycopg import sql

    from activities.postgres.wal import _Reader, xmin_from

    insert = "INSERT off 3 flags 0x08, blkref #0: rel 1663/5/16384 blk 1"
    r = _Reader(first=0x2000, lookback=True)
    for line in [
        _line("Heap", 4294967290, "0/00001000", insert),
        _line("Heap", 4294967295, "0/00001100", insert),
        _line("Heap", 4294967293, "0/00001200", insert),  # older, written later
        _line("Heap", 9000, "0/00002100", insert),  # after the start
    ]:
        r.feed(line)
    assert r.result("0/2000", "0/2200", reached=True).xid_horizon == 3  # 2^32 - 1 + 1 wraps; 0-2 are reserved
    r = _Reader(first=0x2000, lookback=True)
    for line in [_line("Heap", 4294967295, "0/00001000", insert), _line("Heap", 4, "0/00001100", insert)]:
        r.feed(line)
    assert r.result("0/2000", "0/2200", reached=True).xid_horizon == 5
    # A snapshot's latestCompletedXid counts (a commit before the WAL read), and a COMMIT
    # PREPARED's xid (its record's own tx is 0); without a snapshot reached: unknown.
    for named, want in [
        (_line("Standby", 0, "0/00001100", "RUNNING_XACTS nextXid 61 latestCompletedXid 57 oldestRunningXid 40; "
                                           "1 xacts: 40"), 58),
        # Listed running, yet its commit may be written already (in a segment before the read).
        (_line("Standby", 0, "0/00001100", "RUNNING_XACTS nextXid 66 latestCompletedXid 57 oldestRunningXid 40; "
                                           "2 xacts: 40 65"), 66),
        (_line("Transaction", 0, "0/00001200", "COMMIT_PREPARED 59: 2026-12-04 10:00:00.000001 UTC"), 60),
    ]:
        r = _Reader(first=0x2000, lookback=True)
        for line in [_line("Heap", 40, "0/00001000", insert), named]:
            r.feed(line)
        assert r.result("0/2000", "0/2200", reached=True).xid_horizon == want, named
        assert r.result("0/2000", "0/2200", reached=False).xid_horizon is None
    # Nothing read before the start: unknown, not a guess.
    assert _Reader(first=0x2000, lookback=True).result("0/2000", "0/2200", reached=True).xid_horizon is None
    # The SQL twin, on a real server's arithmetic: from the horizon on, modulo 2^32; reserved never.
    with _conn() as c:
        for xmin, horizon, after in [(5, 5, True), (4, 5, False), (7, 4294967295, True), (4294967290, 3, False),
                                     (2, 3, False), (2**31 + 10, 10, False), (2**31 + 9, 10, True)]:
            got = c.execute(sql.SQL("select {}").format(
                xmin_from(sql.SQL("{}::text::xid").format(sql.Literal(str(xmin))), horizon))).fetchone()[0]
            assert got is after, (xmin, horizon)
        # Bounded by the next id: a frozen row's original xmin far "after" the horizon in the
        # circular order (a cluster 2^31 ids old) is not taken for a post-fork write. (An xid8
        # next id, as pg_current_snapshot gives it, epoch included.)
        for xmin, horizon, before, after in [(100, 50, 2**32 + 80, False), (60, 50, 2**32 + 80, True),
                                             (79, 50, 80, True), (80, 50, 80, False), (3, 4294967290, 10, True),
                                             (4294967291, 4294967290, 10, True), (11, 4294967290, 10, False)]:
            got = c.execute(sql.SQL("select {}").format(xmin_from(
                sql.SQL("{}::text::xid").format(sql.Literal(str(xmin))), horizon,
                sql.SQL("{}::text::xid8").format(sql.Literal(str(before)))))).fetchone()[0]
            assert got is after, (xmin, horizon, before)


def test_the_xid_horizon_counts_a_commit_made_before_the_wal_read(node):
    """Transaction a committed in an earlier segment than the lookback reads; only the snapshot
    of running transactions (its latestCompletedXid) names it. Its rows must be before the
    horizon, and the next transaction's at or after it."""
    with _conn() as c:
        c.execute("create table h (id int)")
        c.execute("insert into h values (1)")
        a = int(c.execute("select xmin::text from h where id = 1").fetchone()[0])
        c.execute("select pg_switch_wal()")
        c.execute("checkpoint")  # a snapshot, in the new segment, that names a as completed
        start = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
        c.execute("insert into h values (2)")
        b = int(c.execute("select xmin::text from h where id = 2").fetchone()[0])
    found = scan(PgCtl(node.cfg), _wal(node), 1, start, lookback=True)
    assert found.xid_horizon is not None and a < found.xid_horizon <= b, (a, found.xid_horizon, b)


def test_an_hstore_column_goes_through_the_spool_into_the_apply(tmp_path):
    """row_to_json writes an hstore (and an array of them) as JSON objects, which hstore's own
    input refuses when the apply reads the row back: the failback failed on every retry for a
    table with one. They travel as their text; a json column next to them stays JSON."""
    from datetime import datetime, timezone

    ddl = ["create extension if not exists hstore",
           "create table h (id int primary key, attrs hstore, tags hstore[], doc json,"
           " updated_at timestamptz not null default '2026-01-01')",
           "insert into h (id, attrs, tags, doc) values (1, 'a=>1', array['x=>y']::hstore[], '{\"k\": 1}')"]
    with _forked_pair(ddl) as f:
        c = f.loser
        fork_time = datetime.now(timezone.utc)
        start = f.start()
        c.execute("""update h set attrs = 'a=>2, "b c"=>"d\\\\e"', tags = array['p=>q', 'r=>s']::hstore[],"""
                  """ doc = '{"k": 2}' where id = 1""")
        want = c.execute("select attrs::text, tags::text, doc::text from h").fetchone()
        f.stop_loser()
        got, summary = f.read_and_apply("h", start, fork_time, tmp_path / "spool")
        assert got.reads["h"].mode == "blocks" and len(got.rows["h"]) == 1
        assert summary.updated == 1
        with scratch_connect(PORT + 2) as d:
            assert d.execute("select attrs::text, tags::text, doc::text from h").fetchone() == want


def test_text_inside_a_rows_json_reads_back_as_the_loser_wrote_it(tmp_path):
    """JSON writes a date in ISO 8601, but a daterange or an interval inside it as their text,
    in the session's DateStyle and IntervalStyle. A loser set to write dates day first and a
    survivor that reads them month first turned 13 March into an error (and 5 March into 3
    May): the loser's read now writes pg_dump's styles, and the apply reads under the same. A
    column named x, the read's own alias, comes through too."""
    from datetime import datetime, timezone

    ddl = ["create table s (id int primary key, span daterange, took interval, x int,"
           " updated_at timestamptz not null default '2026-01-01')",
           "insert into s (id, span, took, x) values (1, '[2026-03-05,2026-03-13)', '1 day', 1)"]
    with _forked_pair(ddl) as f:
        c, d = f.loser, f.survivor
        fork_time = datetime.now(timezone.utc)
        start = f.start()
        c.execute("update s set span = '[2026-03-05,2026-03-13)', took = '-1 day -02:03:04', x = 7 where id = 1")
        want = c.execute("select span::text, took::text, x from s").fetchone()
        c.execute("alter system set datestyle = 'SQL, DMY'")
        c.execute("alter system set intervalstyle = 'sql_standard'")
        d.execute("alter role postgres set datestyle = 'SQL, MDY'")
        f.stop_loser()
        got, summary = f.read_and_apply("s", start, fork_time, tmp_path / "spool")
        assert len(got.rows["s"]) == 1
        assert summary.updated == 1
        with scratch_connect(PORT + 2) as d:
            d.execute("set datestyle = 'ISO, YMD'")
            assert d.execute("select span::text, took::text, x from s").fetchone() == want


def test_a_full_disk_under_the_spool_fails_the_read_and_stops_the_loser(tmp_path):
    """The old primary's rows go to the worker's disk before anything is applied: a full disk
    there (the kernel's own ENOSPC, /dev/full) fails the read, which the activity reports as
    SpoolFull and retries, and the isolated loser is stopped again."""
    import errno
    from datetime import datetime, timedelta, timezone

    with _forked_pair(["create table f (id int primary key, v text, updated_at timestamptz not null"
                       " default '2026-01-01')", "insert into f (id, v) values (1, 'a')"]) as f:
        fork_time = datetime.now(timezone.utc)
        start = f.start()
        f.loser.execute("update f set v = 'b' where id = 1")
        f.stop_loser()
        (tmp_path / "spool").mkdir()
        (tmp_path / "spool" / "0.rows").symlink_to("/dev/full")
        with pytest.raises(OSError) as e:
            f.read({"f": ["id"]}, fork_time - timedelta(minutes=1), {"f": "updated_at"}, start, fork_time,
                   tmp_path / "spool")
        assert e.value.errno == errno.ENOSPC
        assert not f.node.running()
