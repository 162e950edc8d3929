"""Restore drill checks: is archiving healthy, are the backups fresh, and does a restored copy
hold the same data as the primary at the same point.

Comparing "the same point" honestly
-----------------------------------
A checksum taken on the primary at some moment and a restore replayed "to that moment" do not
describe the same data: a snapshot sees a transaction once it leaves the proc array, which is
after its commit record is in WAL, and commit order is not xid order, so neither a target LSN
nor a target xid read inside the snapshot reproduces it exactly. Under the sample app's steady
writes such a drill would fail (or pass) by luck.

So the point is made quiescent for a few milliseconds instead: one transaction takes SHARE
locks on every table checked (they conflict with every writer's ROW EXCLUSIVE, so in-flight
writers finish first and new ones wait), then, still holding them, takes its REPEATABLE READ
snapshot, exports it and writes a named restore point (pg_create_restore_point). Nothing can
commit into those tables between the snapshot and the restore point, so replaying to the
restore point gives exactly the snapshot's contents. A second session imports the exported
snapshot and the locking transaction commits at once: writers wait only for the lock round
trip, never for the checksums, which are computed afterwards in the imported snapshot.
(LOCK TABLE takes no snapshot: the snapshot is the first SELECT's, after the locks.)
A lock that cannot be had within ``lock_timeout`` (a long writer) fails the attempt, and
Temporal retries it; writers never queue behind the drill for longer than that.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.backup.catalog import Catalog, read_catalog
from activities.backup.pgbackrest import PgBackRestError, Stanza
from activities.backup.restore import connect_scratch, scratch_config
from activities.heartbeat import heartbeating
from activities.postgres.unlogged import unlogged_relations
from eagle_dr.config import EagleConfig, PostgresConfig

# Row text depends on these session settings: both sides use the same.
_SESSION = ("set TimeZone = 'UTC'", "set DateStyle = 'ISO, YMD'", "set IntervalStyle = 'postgres'",
            "set extra_float_digits = 1", "set bytea_output = 'hex'")

# Order-independent (no sort, one pass): the sum of each row's md5 cut to 64 bits, as numeric.
# (t.*)::text, never t::text: in a table with a column named t that was the column alone, and
# two copies differing anywhere else summed alike.
_CHECKSUM = ("select count(*), coalesce(sum(('x' || substr(md5((t.*)::text), 1, 16))::bit(64)::bigint::numeric), 0)::text "
             "from {} as t")

# Every permanent user table: regular tables and partitions (leaves), never a partitioned parent
# (its rows are its partitions'), never unlogged ones (not in WAL: empty in any restore; the
# mark names them as not restorable instead).
_USER_TABLES = """
select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind = 'r' and c.relpersistence = 'p'
  and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg\\_%'
order by 1, 2"""


class TableSum(BaseModel):
    table: str  # schema.name
    rows: int
    checksum: str


class ArchiverState(BaseModel):
    region: str
    at: datetime  # the server's clock
    archive_mode: str
    archive_timeout_seconds: float
    archived_count: int
    last_archived_wal: str | None = None
    last_archived_time: datetime | None = None
    failed_count: int
    last_failed_wal: str | None = None
    last_failed_time: datetime | None = None
    current_wal: str
    # WAL segments waiting for the archiver and how long the oldest has (None: not readable).
    ready_count: int | None = None
    oldest_ready_seconds: float | None = None
    problems: list[str] = []


class MarkRequest(BaseModel):
    region: str  # the primary
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,56}$")  # the restore point's (the attempt is appended)
    tables: list[str] = []  # besides config `conflicts:` ones; each must exist
    all_tables: bool = True  # and every other permanent user table
    lock_timeout_seconds: float = Field(default=5, gt=0, le=60)


class Mark(BaseModel):
    name: str
    lsn: str
    wal_file: str
    at: datetime  # the primary's clock when the restore point was written
    snapshot: str  # pg_current_snapshot(), for the record
    locked_ms: float  # how long writers to the checked tables waited on the drill
    tables: list[TableSum]
    # Unlogged tables (every-table mode): never in WAL, so no backup or restore has their rows.
    not_restorable: list[str] = []


class WaitArchivedRequest(BaseModel):
    region: str
    wal_file: str
    timeout_seconds: float = Field(default=180, gt=0)


class ScratchSumRequest(BaseModel):
    region: str
    directory: str
    port: int
    tables: list[str]


class Freshness(BaseModel):
    """The newest backup of any type and the newest full, per repo, against their intervals."""

    read_from: str
    every_seconds: float
    full_every_seconds: float
    newest: dict[str, str] = {}  # repo region -> label
    newest_age_seconds: dict[str, float] = {}
    newest_full_age_seconds: dict[str, float] = {}
    problems: list[str] = []


def _segno(wal: str | None) -> int | None:
    """A WAL segment file's position on its timeline (log * 2^32/segsize folded as the name does)."""
    if not wal or not re.fullmatch(r"[0-9A-F]{24}", wal):
        return None
    return int(wal[8:16], 16) * 0x100000000 + int(wal[16:24], 16)


def archiving_problems(s: ArchiverState) -> list[str]:
    """Why WAL is not reaching the repos, or nothing. Twice archive_timeout is the bound: the
    server switches segments at least that often under writes, and one retry round fits."""
    bound = 2 * (s.archive_timeout_seconds or 60)
    out = []
    if s.archive_mode == "off":
        out.append(f"{s.region}: archive_mode is off: no WAL reaches the repos, PITR stops at the newest backup")
        return out
    if s.last_failed_time and (s.last_archived_time is None or s.last_failed_time > s.last_archived_time):
        since = f"last success {s.last_archived_time.isoformat(timespec='seconds')} ({s.last_archived_wal})" \
            if s.last_archived_time else "never archived"
        out.append(f"{s.region}: WAL archiving is failing: {s.last_failed_wal} failed at "
                   f"{s.last_failed_time.isoformat(timespec='seconds')} ({s.failed_count} failures in all); {since}")
    if s.oldest_ready_seconds is not None and s.oldest_ready_seconds > bound:
        out.append(f"{s.region}: {s.ready_count} WAL segments wait to be archived, the oldest for "
                   f"{s.oldest_ready_seconds:.0f} s (> 2 x archive_timeout = {bound:.0f} s)")
    elif s.oldest_ready_seconds is None and s.last_archived_time is not None:
        # Without the status directory: a whole finished segment not archived, long after the last success.
        done, cur = _segno(s.last_archived_wal), _segno(s.current_wal)
        age = (s.at - s.last_archived_time).total_seconds()
        if done is not None and cur is not None and cur > done + 1 and age > bound:
            out.append(f"{s.region}: WAL archiving is stalled: last archived {s.last_archived_wal} {age:.0f} s ago "
                       f"(> 2 x archive_timeout = {bound:.0f} s) while the server writes {s.current_wal}")
    return out


def archiver_state(pg: PostgresConfig, region: str) -> ArchiverState:
    with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=10) as conn:
        a = conn.execute("select archived_count, last_archived_wal, last_archived_time, failed_count, "
                         "last_failed_wal, last_failed_time, now(), current_setting('archive_mode'), "
                         "extract(epoch from current_setting('archive_timeout')::interval), "
                         "pg_walfile_name(pg_current_wal_lsn()) from pg_stat_archiver").fetchone()
        try:
            ready = conn.execute("select count(*), extract(epoch from now() - min(modification)) "
                                 "from pg_ls_archive_statusdir() where name like '%.ready'").fetchone()
        except psycopg.errors.InsufficientPrivilege:
            ready = (None, None)
    s = ArchiverState(region=region, archived_count=a[0], last_archived_wal=a[1], last_archived_time=a[2],
                      failed_count=a[3], last_failed_wal=a[4], last_failed_time=a[5], at=a[6], archive_mode=a[7],
                      archive_timeout_seconds=float(a[8] or 0), current_wal=a[9], ready_count=ready[0],
                      oldest_ready_seconds=float(ready[1]) if ready[1] is not None else
                      (0.0 if ready[0] is not None else None))
    s.problems = archiving_problems(s)
    return s


def _session(conn: psycopg.Connection) -> None:
    for stmt in _SESSION:
        conn.execute(stmt)


def _ident(qualified: str) -> sql.Composable:
    schema, _, name = qualified.partition(".")
    return sql.Identifier(schema, name)


def checksums(conn: psycopg.Connection, tables: list[str]) -> list[TableSum]:
    out = []
    for t in tables:
        n, s = conn.execute(sql.SQL(_CHECKSUM).format(_ident(t))).fetchone()
        out.append(TableSum(table=t, rows=n, checksum=s))
    return out


def resolve_tables(conn: psycopg.Connection, configured: list[str], all_tables: bool) -> list[str]:
    """schema.name of each configured table (a missing one is an error, never a skip) and, with
    ``all_tables``, every other permanent user table."""
    found: list[str] = []
    missing = []
    for name in configured:
        row = conn.execute("select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                           "where c.oid = to_regclass(%s)", (name,)).fetchone()
        if row is None:
            missing.append(name)
        else:
            found.append(f"{row[0]}.{row[1]}")
    if missing:
        raise ApplicationError(f"configured table(s) {', '.join(missing)} do not exist on the primary (conflicts:)",
                               type="ConfigError", non_retryable=True)
    if all_tables:
        found += [f"{s}.{n}" for s, n in conn.execute(_USER_TABLES).fetchall()]
    return sorted(set(found))


def mark_consistent_point(pg: PostgresConfig, req: MarkRequest) -> Mark:
    """A named restore point at which the checked tables are exactly the returned checksums'
    (see the module docstring for why the locks)."""
    with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=10) as conn:
        tables = resolve_tables(conn, req.tables, req.all_tables)
        unlogged = [u.name for u in unlogged_relations(conn, sizes=False) if u.kind == "table"] \
            if req.all_tables else []
    with psycopg.connect(pg.dsn(), connect_timeout=10) as locker, \
            psycopg.connect(pg.dsn(), connect_timeout=10) as reader:
        locker.isolation_level = reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        t0 = time.monotonic()
        locker.execute(sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{int(req.lock_timeout_seconds * 1000)}ms")))
        if tables:
            locker.execute(sql.SQL("lock table {} in share mode").format(sql.SQL(", ").join(_ident(t) for t in tables)))
        snap_id, snapshot = locker.execute("select pg_export_snapshot(), pg_current_snapshot()::text").fetchone()
        lsn, at, wal = locker.execute("select p, clock_timestamp(), pg_walfile_name(p) "
                                      "from pg_create_restore_point(%s) p", (req.name,)).fetchone()
        reader.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snap_id)))
        locker.commit()
        locked_ms = (time.monotonic() - t0) * 1000
        _session(reader)
        with heartbeating():
            sums = checksums(reader, tables)
        reader.commit()
    return Mark(name=req.name, lsn=str(lsn), wal_file=wal, at=at, snapshot=snapshot, locked_ms=locked_ms, tables=sums,
                not_restorable=sorted(set(unlogged) - set(tables)))


def wait_archived(pg: PostgresConfig, region: str, wal_file: str, timeout: float, beat=lambda d: None) -> ArchiverState:
    """Switch to a new segment (a statement of its own: the restore point must not ride in the
    same transaction) and wait until the archiver has the restore point's segment."""
    with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("select pg_switch_wal()")
    deadline = time.monotonic() + timeout
    while True:
        s = archiver_state(pg, region)
        # Names order by timeline, then position; a later timeline's history file ('.history')
        # sorts below any segment and never counts.
        if s.last_archived_wal and s.last_archived_wal[:24] >= wal_file:
            return s
        if time.monotonic() > deadline:
            why = "; ".join(s.problems) or (f"last archived {s.last_archived_wal} at "
                                           f"{s.last_archived_time.isoformat(timespec='seconds') if s.last_archived_time else 'never'}")
            raise ApplicationError(f"WAL archiving is failing: segment {wal_file} (the drill's restore point) was not "
                                   f"archived within {timeout:.0f} s: {why}", type="ArchivingFailing",
                                   non_retryable=True)
        beat({"waiting_for": wal_file, "last_archived": s.last_archived_wal})
        time.sleep(0.5)


def freshness(catalog: Catalog, now: datetime, every: timedelta, full_every: timedelta) -> Freshness:
    """Each repo: the newest backup (any type) within 2 x ``every`` and the newest full within
    2 x ``full_every`` (one missed run is tolerated: the schedule's jitter, a slow backup); a
    broken repo or an empty one is a problem too (``info`` exits 0 on both: read status)."""
    f = Freshness(read_from=catalog.read_from, every_seconds=every.total_seconds(),
                  full_every_seconds=full_every.total_seconds())
    for repo in catalog.repos:
        if not repo.ok and repo.code != 2:
            f.problems.append(f"{repo.region}'s bucket is unreadable: {repo.message}"
                              + (f" (code {repo.code})" if repo.code is not None else ""))
            continue
        backups = catalog.on(repo.region)
        if not backups:
            f.problems.append(f"no backup in {repo.region}'s bucket")
            continue
        newest = backups[-1]
        fulls = [b for b in backups if b.type == "full"]
        age = (now - newest.stopped).total_seconds()
        f.newest[repo.region], f.newest_age_seconds[repo.region] = newest.label, age
        if age > 2 * f.every_seconds:
            f.problems.append(f"the newest backup in {repo.region}'s bucket ({newest.label}, {newest.type}) is "
                              f"{_dur(age)} old, more than 2 x backup.every ({_dur(f.every_seconds)})")
        if fulls:
            fage = (now - fulls[-1].stopped).total_seconds()
            f.newest_full_age_seconds[repo.region] = fage
            if fage > 2 * f.full_every_seconds:
                f.problems.append(f"the newest full backup in {repo.region}'s bucket ({fulls[-1].label}) is "
                                  f"{_dur(fage)} old, more than 2 x backup.full_every ({_dur(f.full_every_seconds)})")
    return f


def _dur(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


class FreshnessRequest(BaseModel):
    region: str  # whose node reads the catalog (both repos)
    every_seconds: float | None = Field(default=None, gt=0)  # override backup.every
    full_every_seconds: float | None = Field(default=None, gt=0)  # override backup.full_every


class RestoreDrillActivities:
    """Primary-side ones (SQL over the network) run on the control worker; the catalog and the
    scratch checksums on the worker of the region whose host holds them."""

    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _pg(self, region: str) -> PostgresConfig:
        try:
            return self.cfg.region(region).postgres
        except KeyError as e:
            raise ApplicationError(f"unknown region {region!r}", type="InvalidInput", non_retryable=True) from e

    @activity.defn
    def read_archiver_state(self, region: str) -> ArchiverState:
        return archiver_state(self._pg(region), region)

    @activity.defn
    def check_backup_freshness(self, req: FreshnessRequest) -> Freshness:
        st = Stanza(self.cfg, req.region)
        st.write_configs()
        with heartbeating():
            try:
                cat = read_catalog(st)
            except PgBackRestError as e:
                raise ApplicationError(str(e), type="InfoFailed") from None
        every = timedelta(seconds=req.every_seconds) if req.every_seconds else self.cfg.backup.every
        full = timedelta(seconds=req.full_every_seconds) if req.full_every_seconds else self.cfg.backup.full_every
        return freshness(cat, datetime.now(timezone.utc), every, full)

    @activity.defn
    def mark_consistent_point(self, req: MarkRequest) -> Mark:
        try:
            # The configured tables always (config `conflicts:`): the ones failback reconciles.
            # A name per attempt: recovery stops at the FIRST restore point of a name, and an
            # attempt that wrote one and then failed must not leave the target at its point while
            # the checksums are the retry's.
            req = req.model_copy(update={"tables": sorted(set(req.tables) | set(self.cfg.conflicts)),
                                         "name": f"{req.name}-{activity.info().attempt}"})
            return mark_consistent_point(self._pg(req.region), req)
        except psycopg.errors.LockNotAvailable as e:
            # Retried: a long writer held a table; the next attempt finds it done.
            raise ApplicationError(f"could not lock the checked tables within {req.lock_timeout_seconds} s: {e}",
                                   type="LockTimeout") from None

    @activity.defn
    def wait_wal_archived(self, req: WaitArchivedRequest) -> ArchiverState:
        return wait_archived(self._pg(req.region), req.region, req.wal_file, req.timeout_seconds, activity.heartbeat)

    @activity.defn
    def scratch_checksums(self, req: ScratchSumRequest) -> list[TableSum]:
        sc = scratch_config(Stanza(self.cfg, req.region), Path(req.directory), req.port)
        with heartbeating(), connect_scratch(sc, timeout=10) as conn:
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            _session(conn)
            missing = [t for t in req.tables
                       if conn.execute("select to_regclass(%s)", (_quoted(t),)).fetchone()[0] is None]
            sums = checksums(conn, [t for t in req.tables if t not in missing])
            conn.commit()
        return sums + [TableSum(table=t, rows=-1, checksum="missing") for t in missing]


def _quoted(qualified: str) -> str:
    schema, _, name = qualified.partition(".")
    return '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
