"""What a diverged node (the loser) wrote that the survivor never got, found before anything
rewinds it away: the fork point from the timeline history files, the post-fork WAL
(the true RPO), and the post-fork rows themselves.

The loser may be on either side of the fork. After a failover the old primary stayed on
the old timeline and the survivor's history file names the fork. In a split brain the
promoted node can lose (the active region survives): then the loser's own history file
names it. Runs on the loser's worker, with the loser stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import psycopg
import structlog
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from activities.postgres.ctl import PgCtl
from activities.postgres.lsn import lsn_diff, lsn_to_int
from activities.postgres.missing_keys import keys_missing_there
from activities.postgres.output_styles import OUTPUT_STYLES, pin_output
from activities.postgres.row_spool import RowSpool
from activities.postgres.wal import DEFAULT_TABLESPACE, WalScan, commits_in_segment_before, current_timeline, \
    end_from, scan, segment_size
from activities.postgres.status import CURRENT_TIMELINE, connect
from activities.postgres.stopwatch import Stopwatch
from eagle_dr.config import PostgresConfig


log = structlog.get_logger(__name__)


class NoFork(RuntimeError):
    """The two nodes' timelines do not say where they diverged."""


class ForkPoint(BaseModel):
    new_timeline: int
    old_timeline: int
    fork_lsn: str
    # The timeline the loser wrote its post-fork WAL on (old_timeline after a failover).
    loser_timeline: int | None = None


class LostWal(BaseModel):
    """What the loser wrote after the fork: the true RPO of the failover or split."""

    fork_lsn: str
    end_lsn: str | None
    lost_bytes: int | None
    lost_commits: int
    first_lost_commit_at: datetime | None = None
    last_lost_commit_at: datetime | None = None
    last_commit_before_fork_at: datetime | None = None
    # Relation files the loser's committed post-fork transactions changed (named at reconcile).
    changed_relation_files: int | None = None


def _switchpoint(history: str, parent: int) -> str | None:
    """The LSN at which the history left timeline ``parent`` (lines: parent switchpoint reason)."""
    for line in history.splitlines():
        fields = line.split()
        if fields and not line.startswith("#") and int(fields[0]) == parent:
            return fields[1]
    return None


def fork_between(survivor: PostgresConfig, loser: PostgresConfig) -> ForkPoint:
    """Where the loser's history left the survivor's; the loser must be stopped (its control
    file then names its current timeline)."""
    loser_tli = current_timeline(PgCtl(loser))
    with connect(survivor) as conn:
        survivor_tli = conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]
        history = None
        if survivor_tli > loser_tli:
            history = conn.execute("select pg_read_file(%s)", (f"pg_wal/{survivor_tli:08X}.history",)).fetchone()[0]
    if survivor_tli == loser_tli:
        raise NoFork(f"both nodes are on timeline {survivor_tli}: the history files name no fork between them")
    if history is None:
        path = Path(loser.data_dir) / "pg_wal" / f"{loser_tli:08X}.history"
        history = path.read_text()
    lower, higher = min(survivor_tli, loser_tli), max(survivor_tli, loser_tli)
    lsn = _switchpoint(history, lower)
    if lsn is None:
        raise NoFork(f"timeline {higher}'s history does not descend from timeline {lower}: unrelated histories")
    return ForkPoint(new_timeline=higher, old_timeline=lower, fork_lsn=lsn, loser_timeline=loser_tli)


def lost_wal(loser: PostgresConfig, fork: ForkPoint) -> LostWal:
    """pg_waldump the stopped loser's WAL from the fork on (see shared lab notes, RPO)."""
    ctl = PgCtl(loser)
    wal = str(Path(loser.data_dir) / "pg_wal")
    tli = fork.loser_timeline or fork.old_timeline
    # A missing segment read as "0 commits" would let the rewind erase the loser's writes:
    # scan() raises unless it read to the true end of the WAL.
    found = scan(ctl, wal, tli, fork.fork_lsn)
    times = [c.at for c in found.commits]
    return LostWal(fork_lsn=fork.fork_lsn, end_lsn=found.end_lsn, lost_bytes=lsn_diff(found.end_lsn, fork.fork_lsn),
                   lost_commits=len(found.commits), first_lost_commit_at=times[0] if times else None,
                   last_lost_commit_at=times[-1] if times else None,
                   last_commit_before_fork_at=_last_commit_before(ctl, wal, tli, fork.old_timeline, fork.fork_lsn),
                   changed_relation_files=len(found.changes))


def _last_commit_before(ctl: PgCtl, wal: str, tli: int, old_tli: int, fork_lsn: str, segments: int = 4
                        ) -> datetime | None:
    """The newest commit before the fork, looking back a few WAL segments (a fork right after
    a segment switch has none in its own). The fork's segment is read on the loser's timeline
    (a promoted loser's first segment there starts with a copy of the WAL up to the fork, the
    old one is renamed .partial); earlier segments belong to the old timeline."""
    size = segment_size(ctl)
    end = lsn_to_int(fork_lsn)
    seg = end - end % size
    for i in range(segments):
        if times := commits_in_segment_before(ctl, wal, tli if i == 0 else old_tli, seg, end, size):
            return times[-1].at
        if seg == 0:
            break
        end, seg = seg, seg - size
    return None


# How far before the last pre-fork commit extraction starts: a transaction that began
# earlier (its updated_at is its statement time) may still have committed after the fork.
EXTRACTION_MARGIN = timedelta(minutes=5)


class ChangedRelation(BaseModel):
    """A relation the loser's committed post-fork transactions changed, named on the loser."""

    name: str  # schema.table as the loser's catalog names it; a description when it cannot
    oid: int | None = None
    database: str | None = None
    # user | catalog | eagle_dr (our own bookkeeping) | unknown (its file is gone: dropped,
    # truncated or rewritten after the fork, so what it held cannot be read back)
    kind: str
    ops: dict[str, int] = {}

    def describe(self) -> str:
        where = f"{self.database}." if self.database else ""
        return f"{where}{self.name} ({', '.join(f'{k} {n}' for k, n in sorted(self.ops.items()))})"


class TableRead(BaseModel):
    """How one configured table's divergence was read on the loser."""

    # unchanged: the loser's WAL shows no post-fork change to it, nothing was read;
    # blocks: only the blocks its post-fork WAL touched were read (and the survivor's rows in
    # the blocks where it deleted or updated); full: every row (the old way), and why.
    mode: str
    blocks: int = 0
    why: str | None = None


class LoserRows(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    # Per table, its changed rows (dicts as the loser's row_to_json gives them, stamped), on
    # the worker's disk (row_spool.py); an empty list for a table read as unchanged.
    rows: dict[str, RowSpool | list]
    changed: list[ChangedRelation]
    # Configured table -> oid on the loser (None: the loser has no such table).
    oids: dict[str, int | None]
    # Keys the loser deleted after the fork (rows the survivor holds unchanged since before
    # it); only when read_loser was given the survivor.
    deleted: dict[str, list[tuple]] = {}
    reads: dict[str, TableRead] = {}
    # WAL the loser wrote while it was read (its end after minus before): pg_rewind copies
    # every block that WAL names, so anything but 0 would be reads inflating the rewind.
    read_wal_bytes: int | None = None
    read_in_recovery: bool | None = None
    # Where the read's time went (wal, start, read, stop, wal_after), seconds.
    seconds: dict[str, float] = {}
    # What this read's own WAL scan found after the fork: checked against the measured
    # divergence (two reads of one stopped node's WAL must agree, or rows could be missed).
    wal_commits: int | None = None
    wal_end_lsn: str | None = None
    # The survivor's rows with an xmin from this id on were written after the fork
    # (WalScan.xid_horizon); None: unknown, its changes are judged by their timestamps alone.
    survivor_xid_from: int | None = None
    # Tables whose file (or a partition's) differs between the loser and the survivor (equal up
    # to the fork under physical replication): one side rewrote it (ALTER TABLE ... TYPE, pg_repack),
    # which can give every row a new xmin, so xmins say nothing about the survivor's changes.
    rewritten: list[str] = []
    # Post-fork commits whose writes before the WAL in reach are unknown (WalScan.unplaced_xids):
    # listed tables are read in full for them; a table nobody listed cannot be named.
    unplaced_commits: int = 0


def regclass_sql(table: str) -> sql.Composable:
    """A configured name (``table`` or ``schema.table``, case kept) as a quoted identifier."""
    schema, _, name = table.rpartition(".")
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


# A relation as the config would name it: a TOAST table as the table it belongs to, a
# partition as its partitioned root (configured once, read through the root).
_RELATION = """
with r as (
    select c.oid, coalesce(t.oid, c.oid) as own from pg_class c
    left join pg_class t on t.reltoastrelid = c.oid
    where c.oid = {}
), root as (
    select r.oid, coalesce(pg_partition_root(r.own)::oid, r.own) as owner from r
)
select root.oid, n.nspname, c.relname, root.owner, n.nspname, c.relname
from root join pg_class c on c.oid = root.owner join pg_namespace n on n.oid = c.relnamespace
"""


class _File(NamedTuple):
    """A changed relation file of the loser's own database, as its catalog names it."""

    relation: sql.Composable  # the file's own relation (a partition, a TOAST table, the table)
    name: str
    relkind: str
    owner: int  # the configured table it counts for (the partition root, the TOAST owner)


def _file_relation(conn: psycopg.Connection, spc: int, node: int) -> tuple | None:
    """``_RELATION``'s row for the relation a file of this database now belongs to, or None."""
    # Files of the default tablespace are looked up under 0 (pg_filenode_relation's rule).
    tbs = 0 if spc == DEFAULT_TABLESPACE else spc
    return conn.execute(sql.SQL(_RELATION).format(
        sql.SQL("pg_filenode_relation({}, {})").format(sql.Literal(tbs), sql.Literal(node)))).fetchone()


def _name_changes(conn: psycopg.Connection, loser: PostgresConfig, changes: dict,
                  files: dict | None = None) -> list[ChangedRelation]:
    """Name each changed relation file on the (isolated, read-only) loser. A TOAST table is
    reported as the table it belongs to; files of other databases are named there. ``files``
    (when given) gets each changed file of this database, by its ``changes`` key."""
    here = conn.execute("select oid from pg_database where datname = current_database()").fetchone()[0]
    others: dict[int, psycopg.Connection] = {}
    named: dict[tuple[str | None, str], ChangedRelation] = {}
    try:
        for (spc, db, node), change in changes.items():
            database = None
            c = conn
            if db not in (0, here):
                row = conn.execute("select datname from pg_database where oid = %s", (db,)).fetchone()
                if row is None:
                    _merge(named, ChangedRelation(name=f"file {spc}/{db}/{node} of a dropped database", kind="unknown",
                                                  ops=change.ops))
                    continue
                database = row[0]
                if db not in others:
                    others[db] = psycopg.connect(host=loser.socket_dir, port=loser.port, dbname=database,
                                                 user=loser.user, password=_password(loser), autocommit=True)
                c = others[db]
            if change.truncated_oid is not None:
                found = c.execute(sql.SQL(_RELATION).format(sql.Literal(change.truncated_oid))).fetchone()
            else:
                found = _file_relation(c, spc, node)
            if found is None:
                what = f"relation oid {change.truncated_oid}" if change.truncated_oid is not None else \
                    f"relation file {spc}/{db}/{node}"
                _merge(named, ChangedRelation(name=f"{what}, gone since (dropped, truncated or rewritten)",
                                              database=database, kind="unknown", ops=change.ops))
                continue
            _, _, _, owner, schema, rel = found
            if files is not None and database is None:
                kind_, fschema, fname = c.execute(
                    "select c.relkind::text, n.nspname, c.relname from pg_class c "
                    "join pg_namespace n on n.oid = c.relnamespace where c.oid = %s", (found[0],)).fetchone()
                files[(spc, db, node)] = _File(sql.Identifier(fschema, fname), f"{fschema}.{fname}", kind_, owner)
            kind = "catalog" if owner < FIRST_NORMAL_OID else "eagle_dr" if schema == "eagle_dr" else "user"
            _merge(named, ChangedRelation(name=f"{schema}.{rel}", oid=owner, database=database, kind=kind,
                                          ops=change.ops))
    finally:
        for other in others.values():
            other.close()
    return sorted(named.values(), key=lambda r: (r.database or "", r.name))


# Objects with lower oids were made by initdb: the system catalogs.
FIRST_NORMAL_OID = 16384


def _merge(named: dict, rel: ChangedRelation) -> None:
    have = named.get((rel.database, rel.name))
    if have is None:
        named[(rel.database, rel.name)] = rel.model_copy(update={"ops": dict(rel.ops)})
        return
    for k, n in rel.ops.items():
        have.ops[k] = have.ops.get(k, 0) + n


def read_loser(loser: PostgresConfig, tables: dict[str, list[str]], since: datetime, ts_column: dict[str, str],
               fork: ForkPoint | None = None, survivor: PostgresConfig | None = None,
               fork_time: datetime | None = None, *, spool_dir: Path) -> LoserRows:
    """Start the loser read-only on its socket only (no client can reach it) and read, per
    table (name -> key columns), the rows its post-fork transactions wrote (JSON-safe dicts)
    and, given the survivor, the keys it deleted after the fork; name every relation its WAL
    shows changed after the fork. Stops it again.

    The cost follows the divergence, not the tables' size. The loser's post-fork WAL names,
    per relation file, the transactions and the blocks they wrote:
    - a table none of them touched is not read at all, on either side (the survivor's own
      changes to it stand: there is nothing of the loser's to reconcile);
    - rows: only those blocks are read (TID range scans) and a row counts when its ``xmin``
      is one of those transactions. That finds a post-fork change whatever the timestamp
      column says (an UPDATE that bypassed the trigger, a table without one). Transactions in
      flight at the fork (commit after it, rows before) are followed back through the fork's
      segment (``scan(lookback=True)``);
    - deletions: a row version both nodes held at the fork sits in the same block of the same
      file on both (physical replication). The loser removed it with a DELETE (or UPDATE) record
      naming that block, so the survivor's unchanged pre-fork rows in those blocks are the only
      candidates, each looked up on the loser by its key.
    Why the WAL and not a trigger-kept tombstone table plus a timestamp index: it needs no
    schema change on the application's tables (nothing to install, nothing a deploy can drop
    or a bulk load can bypass), it is already read for the RPO, and xmin is exact where a
    timestamp is only as good as the trigger that kept it.

    A table falls back to reading every row and key (as before) when the blocks cannot be
    trusted: it was truncated after the fork, the survivor rewrote its file (VACUUM FULL,
    CLUSTER: another relfilenode, rows moved), or a post-fork commit's changes could not be
    placed in the WAL read (a transaction in flight at the fork whose writes precede the
    fork's segment). It stays exact; only slower, and the result says which tables and why.

    The loser is read while it is held as a standby of nothing (fence_stop): in recovery
    PostgreSQL sets hint bits without dirtying the page and writes no WAL, prunes nothing, so
    these reads add no block to what pg_rewind copies. ``read_wal_bytes`` measures it.

    The rows stream through COPY into a spool file per table under ``spool_dir`` (the caller
    keeps it until the rows are applied), and a table read in full has its keys compared
    with the survivor's there, in a temp table: the worker holds neither, however large the
    divergence or the table."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    ctl = PgCtl(loser)
    took = Stopwatch(digits=3)
    wal_dir = str(Path(loser.data_dir) / "pg_wal")
    tli = (fork.loser_timeline or fork.old_timeline) if fork is not None else None
    committed_at: dict[int, datetime] = {}
    changes: dict = {}
    found = None
    if fork is not None:
        found = scan(ctl, wal_dir, tli, fork.fork_lsn, lookback=True)
        committed_at = {x: c.at for c in found.commits for x in (c.xid, *c.subxids)}
        changes = found.changes
    xids = sorted(committed_at)
    horizon = found.xid_horizon if found is not None else None
    took.lap("wal")
    ctl.start_isolated()
    took.lap("start")
    rows: dict[str, RowSpool | list] = {}
    oids: dict[str, int | None] = {}
    deleted: dict[str, list[tuple]] = {}
    reads: dict[str, TableRead] = {}
    files: dict = {}
    refiled: list[str] = []  # LoserRows.rewritten
    try:
        with psycopg.connect(host=loser.socket_dir, port=loser.port, dbname=loser.database, user=loser.user,
                             password=_password(loser), autocommit=True) as conn, \
                _maybe_connect(survivor) as surv:
            # The rows' text forms inside their JSON (a daterange, an interval) as pg_dump
            # writes them, whatever the loser's own settings; the apply reads them back under
            # the same (RowSpool.settings). JSON itself writes dates in ISO 8601 regardless.
            pin_output(conn, local=False)
            # The survivor's key values go to the loser as parameters (deletions in blocks): a
            # type psycopg hands over as text must be written alike on both.
            if surv is not None:
                pin_output(surv, local=False)
            in_recovery = conn.execute("select pg_is_in_recovery()").fetchone()[0]
            changed = _name_changes(conn, loser, changes, files)
            truncated = {c.oid for c in changed if "truncate" in c.ops}
            rewritten = _rewritten_on_loser(conn, found.created_files if found is not None else set())
            for oid_, name in rewritten.items():
                if not any(c.oid == oid_ for c in changed):
                    changed.append(ChangedRelation(name=name, oid=oid_, kind="user", ops={"rewrite": 1}))
            for t, key in tables.items():
                ident = regclass_sql(t)
                oid = conn.execute(sql.SQL("select to_regclass({})::oid").format(
                    sql.Literal(ident.as_string(conn)))).fetchone()[0]
                oids[t] = oid
                if oid is None:
                    continue
                mine = {k: f for k, f in files.items() if f.owner == oid}
                why = _full_read_reason(found, oid in truncated) or (
                    "its file was created on the loser after the fork (TRUNCATE, or a rewrite: VACUUM FULL, CLUSTER, "
                    "ALTER TABLE): its blocks say nothing of the rows it held" if oid in rewritten else None)
                if why is None and not mine:
                    rows[t], deleted[t], reads[t] = [], [], TableRead(mode="unchanged")
                    continue
                if surv is not None and _refiled(_files_of(conn, ident), _files_of(surv, ident)):
                    refiled.append(t)
                heaps = [(f, changes[k]) for k, f in mine.items() if f.relkind == "r"]
                if why is None and surv is not None:
                    why = _rewritten_on_survivor(surv, heaps)
                ts = ts_column[t]
                rows[t] = got = RowSpool(spool_dir / f"{len(rows)}.rows", ts, settings=OUTPUT_STYLES)
                if why is not None:
                    spool_rows(conn, got, sql.SQL("select x.xmin::text::bigint, {} from {} x "
                                                  "where {} > %s or x.xmin::text::bigint = any(%s)").format(
                        row_json(conn, ident), ident, sql.Identifier(ts)), [since, xids], committed_at)
                    got.close()
                    if surv is not None:
                        deleted[t] = _deleted_full(conn, surv, ident, key, ts, fork_time)
                    reads[t] = TableRead(mode="full", why=why)
                    continue
                for f, rc in heaps:
                    for query, args in _block_queries(f.relation, sql.SQL("x.xmin::text::bigint, {}").format(
                                                          row_json(conn, f.relation)),
                                                      rc.blocks, sql.SQL("x.xmin::text::bigint = any(%s)"), [xids]):
                        spool_rows(conn, got, query, args, committed_at)
                got.close()
                if surv is not None:
                    deleted[t] = _deleted_in_blocks(conn, surv, ident, heaps, key, ts_column[t], fork_time)
                reads[t] = TableRead(mode="blocks", blocks=sum(len(rc.blocks | rc.removed_blocks) for _, rc in heaps))
        took.lap("read")
    finally:
        ctl.stop("fast")
    took.lap("stop")
    read_wal = None
    if found is not None:
        # What the isolated start, the reads and the stop added to the loser's WAL.
        seg = segment_size(ctl)
        after = end_from(ctl, wal_dir, tli, found.end_lsn, seg)
        read_wal = lsn_diff(after, found.end_lsn) if after is not None else None
        took.lap("wal_after")
    log.info("divergence read", seconds=took.laps, reads={t: r.mode for t, r in reads.items()},
             read_wal_bytes=read_wal, in_recovery=in_recovery)
    return LoserRows(rows=rows, changed=changed, oids=oids, deleted=deleted, reads=reads,
                     read_wal_bytes=read_wal, read_in_recovery=in_recovery, seconds=took.laps,
                     wal_commits=len(found.commits) if found is not None else None,
                     unplaced_commits=len(found.unplaced_xids) if found is not None else 0,
                     wal_end_lsn=found.end_lsn if found is not None else None,
                     survivor_xid_from=horizon, rewritten=refiled)


@contextmanager
def _maybe_connect(cfg: PostgresConfig | None):
    if cfg is None:
        yield None
        return
    with connect(cfg, 10) as conn:
        yield conn


def _full_read_reason(found: WalScan | None, truncated: bool) -> str | None:
    """Why the loser's WAL cannot tell which blocks to read, if it cannot."""
    if found is None:
        return "no fork given: the WAL was not read"
    if truncated:
        return "truncated on the loser after the fork"
    if found.unplaced_xids:
        return (f"{len(found.unplaced_xids)} transactions committed after the fork could not be traced in the WAL "
                "read (running since before the WAL in reach, or no snapshot of the running transactions in reach)")
    return None


def _rewritten_on_loser(conn: psycopg.Connection, created: set[tuple[int, int, int]]) -> dict[int, str]:
    """User tables (oid -> name) of this database whose file now is one the loser created after
    the fork. Below wal_level logical a TRUNCATE logs no record of its own, only the new file:
    a truncated table with no row written since showed no changed block, read as unchanged,
    and the loser's TRUNCATE was dropped without a word. A file created and then dropped
    (an aborted TRUNCATE, a table dropped since) names nothing and is left out."""
    here = conn.execute("select oid from pg_database where datname = current_database()").fetchone()[0]
    out: dict[int, str] = {}
    for spc, db, node in sorted(created):
        if db != here:
            continue
        found = _file_relation(conn, spc, node)
        if found is None or found[3] < FIRST_NORMAL_OID or found[4] == "eagle_dr":
            continue
        # A table's heap or its TOAST table (named as the table); not an index, a sequence or a
        # materialized view, whose files a TRUNCATE, a RESTART or a REFRESH also renews.
        kind = conn.execute("select relkind::text from pg_class where oid = %s", (found[0],)).fetchone()[0]
        if kind in ("r", "t"):
            out[found[3]] = f"{found[4]}.{found[5]}"
    return out


def _filenode(conn: psycopg.Connection, ident: sql.Composable) -> int | None:
    return conn.execute(sql.SQL("select pg_relation_filenode(to_regclass({}))").format(
        sql.Literal(ident.as_string(conn)))).fetchone()[0]


def _files_of(conn: psycopg.Connection, ident: sql.Composable) -> dict[str, int | None]:
    """The table's file and each of its partitions', by name: a partitioned table has none of
    its own, and a partition rewritten on one side is as telling as the table."""
    name = sql.Literal(ident.as_string(conn))
    # pg_partition_tree gives nothing for a table that is not partitioned: the table itself too.
    return dict(conn.execute(sql.SQL("select relid::regclass::text, pg_relation_filenode(relid) from"
                                     " (select to_regclass({0}) as relid union select relid"
                                     "  from pg_partition_tree(to_regclass({0}))) t where relid is not null").format(
        name)).fetchall())


def _refiled(loser: dict[str, int | None], survivor: dict[str, int | None]) -> bool:
    """A file both sides have under one name but with another number: rewritten on one side.
    A partition only one side has (made or dropped since the fork: pg_partman, retention) is
    no rewrite: its rows' xmins are the side's own, which the xmin rule reads right."""
    return any(loser[n] != survivor[n] for n in loser.keys() & survivor.keys())


def _rewritten_on_survivor(surv: psycopg.Connection, heaps) -> str | None:
    """A heap file the survivor no longer has under the same relfilenode was rewritten there
    (VACUUM FULL, CLUSTER, a table rewrite): its rows moved, the loser's block numbers mean
    nothing on it."""
    for f, rc in heaps:
        theirs = _filenode(surv, f.relation)
        if theirs != rc.relfilenode:
            return f"{f.name} has another file on the survivor ({theirs} != {rc.relfilenode}): rewritten since the fork"
    return None


# Contiguous block runs per TID range scan, and range scans per statement.
_RANGES_PER_QUERY = 200


def _in_blocks(conn: psycopg.Connection, relation: sql.Composable, cols: sql.Composable, blocks: set[int],
               where: sql.Composable, params: list) -> list[tuple]:
    """``cols`` of the rows of ``relation`` (that file only: ONLY) in ``blocks`` that satisfy
    ``where``: a TID range scan per run of contiguous blocks, so only those blocks are read."""
    out: list[tuple] = []
    for query, args in _block_queries(relation, cols, blocks, where, params):
        out += conn.execute(query, args).fetchall()
    return out


def _block_queries(relation: sql.Composable, cols: sql.Composable, blocks: set[int], where: sql.Composable,
                   params: list) -> Iterator[tuple[sql.Composable, list]]:
    """The statements (and their parameters) that read ``blocks`` for ``_in_blocks``."""
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    for i in range(0, len(runs), _RANGES_PER_QUERY):
        chunk = runs[i:i + _RANGES_PER_QUERY]
        one = sql.SQL("select {} from only {} x where x.ctid >= %s::tid and x.ctid < %s::tid and {}").format(
            cols, relation, where)
        args: list = []
        for lo, hi in chunk:
            args += [f"({lo},0)", f"({hi},0)", *params]
        yield sql.SQL(" union all ").join([one] * len(chunk)), args


# Columns whose type (or its element, or a domain's base) has a cast of its own to json or
# jsonb, other than json and jsonb themselves: hstore, and what an extension adds so.
_OWN_JSON = """
select a.attname, exists (
    select from pg_cast c where c.casttarget in ('json'::regtype, 'jsonb'::regtype)
        and c.castsource in (t.oid, t.typelem, t.typbasetype)
        and c.castsource not in ('json'::regtype, 'jsonb'::regtype))
from pg_attribute a join pg_type t on t.oid = a.atttypid
where a.attrelid = to_regclass(%s) and a.attnum > 0 and not a.attisdropped order by a.attnum"""


def row_json(conn: psycopg.Connection, relation: sql.Composable, columns: list[str] | None = None) -> sql.Composable:
    """The row ``x`` of ``relation`` as json, as the apply's ``json_populate_record`` reads it
    back: ``row_to_json(x.*)``, except that a column whose type has its own cast to json goes
    as its text. row_to_json writes an hstore as an object, which hstore's input (the one
    json_populate_record calls for a column not of a json type) refuses: a failback of a
    table with one failed on every retry. ``columns``: only those (a key), in that order."""
    own = [name for name, special in conn.cursor().execute(_OWN_JSON, (relation.as_string(conn),)).fetchall()
           if special]
    # x.*, never a bare x: a column named x (or r below) would be read before the row.
    if not own and columns is None:
        return sql.SQL("row_to_json(x.*)")
    if columns is None:
        columns = [n for (n,) in conn.cursor().execute(
            "select attname from pg_attribute where attrelid = to_regclass(%s) and attnum > 0"
            " and not attisdropped order by attnum", (relation.as_string(conn),)).fetchall()]
    return sql.SQL("(select row_to_json(r.*) from (select {}) r)").format(sql.SQL(", ").join(
        sql.SQL("x.{0}::text as {0}" if n in own else "x.{0}").format(sql.Identifier(n)) for n in columns))


def spool_rows(conn: psycopg.Connection, spool: RowSpool, query: sql.Composable, args: list | None,
               committed_at: dict[int, datetime]) -> None:
    """``query``'s rows (the writer's xid as bigint, the row as json) into ``spool`` through
    COPY: one row in memory at a time (a fetchall held them all, and a run of contiguous blocks
    is one range however long). Its timestamp column comes as JSON text too (ISO 8601 whatever
    the loser's DateStyle), for the spool to compare with the commit time."""
    wrapped = sql.SQL("copy (select s.xid, s.j::text, s.j ->> {} from ({}) s (xid, j)) to stdout").format(
        sql.Literal(spool.ts_column), query)
    with conn.cursor() as cur, cur.copy(wrapped, args) as copy:
        copy.set_types(["int8", "text", "text"])
        for xid, row_json, stamp in copy.rows():
            spool.add(row_json, stamp, committed_at.get(xid))


def _pre_fork(surv: psycopg.Connection, ts_col: str, fork_time: datetime) -> tuple[sql.Composable, list]:
    """Survivor rows unchanged since before the fork (a condition on ``x`` and its parameters).
    A row stamped before the fork may still have committed after it (a transaction in flight
    at the fork): the loser never had it, and it is no deletion. With track_commit_timestamp
    the commit time tells; without it, rows are judged by their timestamp alone."""
    cond = sql.SQL("x.{} <= %s").format(sql.Identifier(ts_col))
    if surv.execute("select current_setting('track_commit_timestamp') = 'on'").fetchone()[0]:
        return cond + sql.SQL(" and coalesce(pg_xact_commit_timestamp(x.xmin), '-infinity') <= %s"), \
            [fork_time, fork_time]
    return cond, [fork_time]


def _deleted_full(loser: psycopg.Connection, surv: psycopg.Connection, ident: sql.Composable, key: list[str],
                  ts_col: str, fork_time: datetime) -> list[tuple]:
    """Rows the survivor has unchanged since before the fork but the loser lacks, compared on
    the survivor (missing_keys.py): the table's keys never sit in the worker's memory (they
    did, with the survivor's, as two Python sets)."""
    cols = sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(k)) for k in key)
    bare = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    cond, params = _pre_fork(surv, ts_col, fork_time)
    return keys_missing_there(surv, sql.SQL("select {} from {} x where {}").format(cols, ident, cond), params,
                              loser, sql.SQL("select {} from {}").format(bare, ident), ident, key)


def _deleted_in_blocks(loser: psycopg.Connection, surv: psycopg.Connection, ident: sql.Composable, heaps,
                       key: list[str], ts_col: str, fork_time: datetime) -> list[tuple]:
    """The survivor's pre-fork rows in the blocks where the loser deleted or updated after the
    fork (same file, same blocks: checked by _rewritten_on_survivor), that the loser lacks."""
    cols = sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(k)) for k in key)
    cond, params = _pre_fork(surv, ts_col, fork_time)
    candidates: list[tuple] = []
    for f, rc in heaps:
        if rc.removed_blocks:
            candidates += [tuple(r) for r in _in_blocks(surv, f.relation, cols, rc.removed_blocks, cond, params)]
    if not candidates:
        return []
    present: set[tuple] = set()
    bare = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(key)))
    for i in range(0, len(candidates), 1000):
        chunk = candidates[i:i + 1000]
        # Each value sits next to its column, so it takes the column's type.
        present |= {tuple(r) for r in loser.execute(sql.SQL("select {} from {} where ({}) in ({})").format(
            bare, ident, bare, sql.SQL(", ").join([one] * len(chunk))), [v for k in chunk for v in k]).fetchall()}
    return [k for k in candidates if k not in present]


def _password(cfg: PostgresConfig) -> str | None:
    """The lab trusts its Unix socket; a production server may ask for the password there too."""
    return cfg.password.resolve() if cfg.password is not None else None
