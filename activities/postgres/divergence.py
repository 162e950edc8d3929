"""What a diverged node (the loser) wrote that the survivor never got, found before anything
rewinds it away: the fork point from the timeline history files, the post-fork WAL
(the true RPO), and the post-fork rows themselves.

The loser may be on either side of the fork. After a failover the old primary stayed on
the old timeline and the survivor's history file names the fork. In a split brain the
promoted node can lose (the active region survives): then the loser's own history file
names it. Runs on the loser's worker, with the loser stopped.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import BaseModel

from activities.postgres.ctl import PgCtl
from activities.postgres.lsn import lsn_diff, lsn_to_int
from activities.postgres.wal import DEFAULT_TABLESPACE, commits_in_segment_before, current_timeline, scan, \
    segment_size
from activities.postgres.status import CURRENT_TIMELINE, connect
from eagle_dr.config import PostgresConfig


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


class LoserRows(BaseModel):
    rows: dict[str, list[dict]]
    keys: dict[str, set[tuple]]
    changed: list[ChangedRelation]
    # Configured table -> oid on the loser (None: the loser has no such table).
    oids: dict[str, int | None]


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


def _name_changes(conn: psycopg.Connection, loser: PostgresConfig, changes: dict) -> list[ChangedRelation]:
    """Name each changed relation file on the (isolated, read-only) loser. A TOAST table is
    reported as the table it belongs to; files of other databases are named there."""
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
                # Files of the default tablespace are looked up under 0 (pg_filenode_relation's rule).
                tbs = 0 if spc == DEFAULT_TABLESPACE else spc
                found = c.execute(sql.SQL(_RELATION).format(
                    sql.SQL("pg_filenode_relation({}, {})").format(sql.Literal(tbs), sql.Literal(node)))).fetchone()
            if found is None:
                what = f"relation oid {change.truncated_oid}" if change.truncated_oid is not None else \
                    f"relation file {spc}/{db}/{node}"
                _merge(named, ChangedRelation(name=f"{what}, gone since (dropped, truncated or rewritten)",
                                              database=database, kind="unknown", ops=change.ops))
                continue
            _, _, _, owner, schema, rel = found
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
               fork: ForkPoint | None = None) -> LoserRows:
    """Start the loser read-only on its socket only (no client can reach it) and read, per
    table (name -> key columns): the rows its post-fork transactions wrote, the rows stamped
    since ``since`` (JSON-safe dicts), and every key it holds (to find what it deleted); and
    name every relation its WAL shows changed after the fork. Stops it again.

    Rows are found by ``xmin``: the id of the transaction that wrote each row version, which
    the WAL lists for every transaction committed after the fork. That finds a post-fork
    change whatever the timestamp column says (an UPDATE that bypassed the trigger, a table
    without one); the timestamp test is kept beside it for changes made in transactions that
    began before the fork (in flight at the fork: their rows' stamps precede it)."""
    ctl = PgCtl(loser)
    committed_at: dict[int, datetime] = {}
    changes: dict = {}
    if fork is not None:
        found = scan(ctl, str(Path(loser.data_dir) / "pg_wal"), fork.loser_timeline or fork.old_timeline,
                     fork.fork_lsn)
        committed_at = {x: c.at for c in found.commits for x in (c.xid, *c.subxids)}
        changes = found.changes
    xids = sorted(committed_at)
    ctl.start_isolated()
    rows: dict[str, list[dict]] = {}
    keys: dict[str, set[tuple]] = {}
    oids: dict[str, int | None] = {}
    try:
        with psycopg.connect(host=loser.socket_dir, port=loser.port, dbname=loser.database, user=loser.user,
                             password=_password(loser), autocommit=True) as conn:
            for t, key in tables.items():
                ident = regclass_sql(t)
                oid = conn.execute(sql.SQL("select to_regclass({})::oid").format(
                    sql.Literal(ident.as_string(conn)))).fetchone()[0]
                oids[t] = oid
                if oid is None:
                    continue
                found_rows = conn.execute(sql.SQL(
                    "select x.xmin::text::bigint, row_to_json(x)::text from {} x "
                    "where {} > %s or x.xmin::text::bigint = any(%s)").format(
                        ident, sql.Identifier(ts_column[t])), (since, xids)).fetchall()
                # numeric stays Decimal: a float would not COPY back into a numeric column.
                rows[t] = [_stamped(json.loads(r[1], parse_float=Decimal), ts_column[t], committed_at.get(r[0]))
                           for r in found_rows]
                cols = sql.SQL(", ").join(sql.Identifier(k) for k in key)
                keys[t] = {tuple(r) for r in conn.execute(sql.SQL("select {} from {}").format(cols, ident)).fetchall()}
            changed = _name_changes(conn, loser, changes)
    finally:
        ctl.stop("fast")
    return LoserRows(rows=rows, keys=keys, changed=changed, oids=oids)


def _stamped(row: dict, ts_col: str, committed: datetime | None) -> dict:
    """A row written after the fork is at least as new as its commit: a stamp older than that
    (an UPDATE that bypassed the trigger, a client-supplied time) would make the conflict
    engine read the change as pre-fork and drop it. The commit time is the truth here."""
    if committed is None or ts_col not in row:
        return row
    raw = row[ts_col]
    try:
        stamp = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None or stamp < committed:
        row[ts_col] = committed.isoformat()
    return row


def _password(cfg: PostgresConfig) -> str | None:
    """The lab trusts its Unix socket; a production server may ask for the password there too."""
    return cfg.password.resolve() if cfg.password is not None else None
