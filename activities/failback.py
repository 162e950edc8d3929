"""Bringing a diverged region back under the primary: failback after a failover, and the
loser of a split brain. They run on that region's worker (they act on its data directory and
its Redis dump) and reach the primary (the survivor) over the network."""

from __future__ import annotations

import errno
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from psycopg import sql
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.conflicts.apply import ApplySummary, apply_resolutions
from activities.conflicts.foreign_keys import Holds, apply_in_bounded_waits
from activities.conflicts.resolve_sql import RESERVED_PREFIXES
from activities.postgres import epoch as epochs
from activities.postgres.ctl import PgCtl
from activities.postgres.fence import fence_stop
from activities.postgres.divergence import EXTRACTION_MARGIN, ChangedRelation, ForkPoint, LostWal, LoserRows, \
    NoFork, fork_between, lost_wal, read_loser, regclass_sql
from activities.postgres.lsn import lsn_to_int
from activities.postgres.wal import WalUnreadable
from activities.postgres.rewind import Rewound, rewind_to_standby
from activities.postgres.row_spool import SpoolDir
from activities.postgres.status import connect
from activities.redis import epoch as redis_epochs
from activities.redis.failback import RedisFailback, preserve_and_rejoin
from activities.redis.failover import NotAMaster
from eagle_dr import metrics
from eagle_dr.config import EagleConfig, TableConflictConfig


class FailbackRequest(BaseModel):
    region: str  # the region coming back (the loser of a split brain)
    primary_region: str  # the survivor
    approved_by: str | None = None
    # The DR epoch the survivor recorded when the run decided: rewinding onto it is refused if
    # a newer move has recorded a higher one since (it may no longer be the primary to follow).
    epoch: int | None = None


class Divergence(BaseModel):
    fork: ForkPoint
    lost: LostWal
    # Where the measure's seconds went: the fence's own phases (read_only, stop, controldata,
    # hold), then finding the fork and reading the lost WAL.
    phases: dict[str, float] = {}


class ReconcileRequest(FailbackRequest):
    # Measured by measure_divergence before anything started the old primary again.
    divergence: Divergence
    # Decide every key and roll back: the counts and sample an approver sees first.
    preview: bool = False
    # The "now" of freshness decisions, fixed by the workflow: the preview, the real run
    # and any retry of it decide alike.
    decided_at: datetime | None = None


class TableReconciliation(ApplySummary):
    loser_rows: int
    deleted_keys: int
    # How the divergence was read (activities/postgres/divergence.py read_loser): unchanged
    # (not read at all), blocks (only what the loser's post-fork WAL touched) or full, and why.
    read_mode: str | None = None
    blocks_read: int = 0
    full_read_why: str | None = None


class Reconciliation(BaseModel):
    since: datetime | None
    tables: list[TableReconciliation]
    preview: bool = False
    # Tables `conflicts:` does not list, reconciled by `unlisted_tables: last-write-wins`.
    unlisted_reconciled: list[str] = []
    # System catalogs the loser changed after the fork (DDL, or our own probes' temp tables):
    # reported, not reconciled: schema changes are a human's call.
    catalog_changes: list[str] = []
    # WAL the old primary wrote while it was read (0: the reads add nothing for pg_rewind to
    # copy; it is read as a standby of nothing, which dirties no page for a hint bit).
    loser_read_wal_bytes: int | None = None
    # Where the reconciliation's time went: the old primary's read (wal, start, read, stop,
    # wal_after) and apply (resolve and write, all tables), seconds.
    seconds: dict[str, float] = {}
    # The survivor's rows with an xmin from this id on counted as changed after the fork whatever
    # their timestamps (divergence.LoserRows.survivor_xid_from); None: by their timestamps alone.
    survivor_xid_from: int | None = None
    # Tables either side rewrote since the fork (a migration, pg_repack): their survivor rows
    # were judged by timestamps alone, survivor_xid_from or not.
    rewritten: list[str] = []
    # Writes that still break a foreign key after the holds' last round (conflicts/foreign_keys.py):
    # committed, and reported; empty but for a pathological schema.
    foreign_keys_broken: list[str] = []
    # The old primary's post-fork commits its WAL in reach could not trace (divergence.LoserRows).
    unplaced_commits: int = 0

    def totals(self) -> tuple[int, int, int]:
        """(rows written to the survivor, conflicts, flagged for a human)."""
        return (sum(t.inserted + t.updated + t.deleted for t in self.tables), sum(t.conflicts for t in self.tables),
                sum(t.flagged for t in self.tables))


class FailbackActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _pg(self, region: str):
        return self.cfg.region(region).postgres

    @activity.defn
    def measure_divergence(self, req: FailbackRequest) -> Divergence:
        """Stop the old primary (it may have come back writable) and read what it wrote after
        the fork from its WAL: the failover's true RPO, known only now."""
        with heartbeating():
            # Returns at the shutdown checkpoint, not at the exit: with archiving on, the exit
            # waits for the archiver to push the segment the shutdown closed (most of the stop),
            # and nothing here needs it gone. After that checkpoint the node writes no WAL, so the
            # read below reads the WAL it leaves. (The checkpoint still removes or recycles
            # segments before its own redo, the end of WAL: a read that needs one of those fails
            # after the exit too, WalUnreadable either way.) The reconcile's own stop waits for
            # the exit before anything starts the node again, and so does the rewind's.
            fence = fence_stop(self._pg(req.region), at_checkpoint=True)
            phases = {f"fence {k}": v for k, v in fence.phases.items()}
            t = time.monotonic()
            try:
                fork = fork_between(self._pg(req.primary_region), self._pg(req.region))
            except NoFork as e:
                raise ApplicationError(f"cannot tell where {req.region} diverged from {req.primary_region}: {e}",
                                       type="NoFork", non_retryable=True) from e
            phases["find the fork"] = round(time.monotonic() - t, 4)
            t = time.monotonic()
            try:
                lost = lost_wal(self._pg(req.region), fork)
                phases["read the lost WAL"] = round(time.monotonic() - t, 4)
                return Divergence(fork=fork, lost=lost, phases=phases)
            except WalUnreadable as e:
                # Nothing is rewound or re-cloned after this: the loser keeps its data for a human.
                raise ApplicationError(f"{req.region}'s writes after the fork cannot be read, so they cannot be "
                                       f"kept; it is left stopped with its data intact: {e}", type="WalUnreadable",
                                       non_retryable=True) from e

    @activity.defn
    def reconcile_diverged_rows(self, req: ReconcileRequest) -> Reconciliation:
        """The old primary's post-fork rows, resolved per table strategy, applied to the primary
        in set-based SQL with an audit row per conflict. Idempotent per workflow run."""
        with heartbeating():
            return self._reconcile(req)

    def _reconcile(self, req: ReconcileRequest) -> Reconciliation:
        old, primary = self._pg(req.region), self._pg(req.primary_region)
        PgCtl(old).stop("fast")
        lost = req.divergence.lost
        if lost.lost_commits == 0:
            return Reconciliation(since=None, tables=[], preview=req.preview)
        # Rows the loser stamped up to fork_time count as pre-fork. Unsure where the fork was
        # in time, err early: a row then looks changed on both sides (audited, decided by its
        # strategy) instead of an insert looking like the survivor's delete.
        fork_time = lost.last_commit_before_fork_at or lost.first_lost_commit_at - EXTRACTION_MARGIN
        since = fork_time - EXTRACTION_MARGIN
        with connect(primary, 10) as conn:
            _check_configured_tables(conn, self.cfg.conflicts, req.primary_region)
        # The loser's rows wait on the worker's disk, not in its memory (row_spool.py).
        with SpoolDir(activity.info().workflow_run_id) as spool:
            try:
                return self._read_and_apply(req, old, primary, since, fork_time, spool)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # Retried: the space may be freed, or the next attempt land on another worker.
                raise ApplicationError(
                    f"the worker's spool for {req.region}'s rows ({spool.parent}, TMPDIR) ran out of space; nothing "
                    f"was applied and {req.region} is left stopped with its data intact. Free space there or point "
                    "TMPDIR at a larger volume; the step is retried.", type="SpoolFull") from None

    def _read_and_apply(self, req: ReconcileRequest, old, primary, since: datetime, fork_time: datetime,
                        spool: Path) -> Reconciliation:
        lost = req.divergence.lost
        configs = dict(self.cfg.conflicts)
        read = dict(fork=req.divergence.fork, survivor=primary, fork_time=fork_time)
        got = read_loser(old, {t: c.key for t, c in configs.items()}, since,
                         {t: c.timestamp_column for t, c in configs.items()}, **read, spool_dir=spool / "listed")
        _agrees(req.region, lost, got)
        missing = [t for t, oid in got.oids.items() if oid is None]
        if missing:
            raise ApplicationError(
                f"{req.region} has no table {', '.join(missing)} (configured under conflicts:): it was dropped or "
                f"renamed there after the fork, or the config is wrong. Nothing was applied and {req.region} is left "
                "stopped with its data intact.", type="ConfigError", non_retryable=True)
        unlisted = [c for c in got.changed if c.kind == "user" and c.oid not in set(got.oids.values())]
        unknown = [c for c in got.changed if c.kind == "unknown"]
        extra, refused = self._unlisted(unlisted, primary)
        if refused or unknown:
            # Before anything is written and long before pg_rewind: the loser keeps every row.
            raise ApplicationError(
                f"{req.region} changed tables after the fork that cannot be reconciled: "
                f"{'; '.join(r for r in refused + [u.describe() for u in unknown])}. Nothing was applied; "
                f"{req.region} is left stopped (fenced) with its data intact. List the tables under conflicts: "
                "(or set unlisted_tables: last-write-wins), then run failback again.",
                {"tables": [c.describe() for c in unlisted + unknown]}, type="UnlistedTablesChanged",
                non_retryable=True)
        if extra:
            got = read_loser(old, {t: c.key for t, c in {**configs, **extra}.items()}, since,
                             {t: c.timestamp_column for t, c in {**configs, **extra}.items()}, **read,
                             spool_dir=spool / "all")
            shutil.rmtree(spool / "listed")  # the first read's rows: read again above
            _agrees(req.region, lost, got)
            configs.update(extra)
        info = activity.info()
        priority = {r.name: r.priority for r in self.cfg.regions}
        applying = time.monotonic()
        changed = {t: c for t, c in configs.items() if t in got.rows and got.reads[t].mode != "unchanged"}
        now = req.decided_at or datetime.now(timezone.utc)  # one for every round of apply_all

        def apply_all(holds: Holds, checked: frozenset[str]) -> dict[str, ApplySummary]:
            return {table: apply_resolutions(
                conn, table, tcfg, got.rows[table], got.deleted.get(table, []), loser_region=req.region,
                survivor_region=req.primary_region, region_priority=priority, fork_time=fork_time,
                now=now, workflow_id=info.workflow_id,
                run_id=info.workflow_run_id, approved_by=req.approved_by,
                # A preview writes (and rolls back) only what the foreign-key check must see.
                rehearse=req.preview and table in checked, dry_run=req.preview and table not in checked,
                # A table either side rewrote since the fork: its xmins say nothing (timestamps, as before).
                survivor_xid_from=None if table in got.rewritten else got.survivor_xid_from,
                hold=holds.get(table)) for table, tcfg in changed.items()}

        with connect(primary, 10) as conn:
            # Every table in one transaction, checked for foreign keys before it commits (see
            # conflicts/foreign_keys.py); a preview runs the same and rolls it all back.
            summaries, broken = apply_in_bounded_waits(
                conn, {t: c.key for t, c in changed.items()}, apply_all, survivor_region=req.primary_region,
                force_rollback=req.preview)
        out = []
        for table, tcfg in configs.items():
            if table not in got.rows:
                continue
            how = got.reads[table]
            deleted = got.deleted.get(table, [])
            if table not in summaries:
                # The old primary's WAL shows no change to it after the fork: nothing of its
                # to reconcile, and nothing read on either side.
                out.append(TableReconciliation(table=table, strategy=tcfg.strategy, loser_rows=0, deleted_keys=0,
                                               read_mode=how.mode))
                continue
            summary = summaries[table]
            out.append(TableReconciliation(**summary.model_dump(), loser_rows=len(got.rows[table]),
                                           deleted_keys=len(deleted), read_mode=how.mode,
                                           blocks_read=how.blocks, full_read_why=how.why))
            if not req.preview and summary.audit_rows:
                # Only the attempt that wrote the audit rows counts: a retry that finds them
                # already applied (audit_rows 0) must not count the same conflicts twice.
                metrics.conflicts_resolved(activity.metric_meter(), self.cfg.service, table, summary.strategy,
                                           conflicts=summary.conflicts, flagged=summary.flagged)
        seconds = {**got.seconds, "apply": round(time.monotonic() - applying, 3)}
        catalog = [c.describe() for c in got.changed if c.kind == "catalog"]
        return Reconciliation(since=since, tables=out, preview=req.preview,
                              unlisted_reconciled=sorted(extra), catalog_changes=catalog,
                              loser_read_wal_bytes=got.read_wal_bytes, seconds=seconds,
                              survivor_xid_from=got.survivor_xid_from, rewritten=sorted(set(got.rewritten) & set(changed)),
                              foreign_keys_broken=broken, unplaced_commits=got.unplaced_commits)

    def _unlisted(self, unlisted: list[ChangedRelation], primary) -> tuple[dict[str, TableConflictConfig], list[str]]:
        """Strategies for changed tables `conflicts:` does not list, per `unlisted_tables`; and
        the ones that cannot have one (why, per table)."""
        if not unlisted:
            return {}, []
        if self.cfg.unlisted_tables == "refuse":
            return {}, [f"{c.describe()}: not listed under conflicts: (unlisted_tables: refuse)" for c in unlisted]
        extra: dict[str, TableConflictConfig] = {}
        refused: list[str] = []
        with connect(primary, 10) as conn:
            for c in unlisted:
                if c.database:
                    refused.append(f"{c.describe()}: in database {c.database}, not {primary.database}")
                    continue
                key, has_ts = _key_and_timestamp(conn, c.name)
                if not key or not has_ts:
                    refused.append(f"{c.describe()}: last-write-wins needs a primary key and an updated_at column "
                                   f"on {c.name}")
                    continue
                extra[c.name] = TableConflictConfig(strategy="last-write-wins", key=key, timestamp_column="updated_at")
        return extra, refused

    @activity.defn
    def rewind_old_primary(self, req: FailbackRequest) -> Rewound:
        old = self.cfg.region(req.region)
        require_epoch(self._pg(req.primary_region), self.cfg.service, req.epoch, f"rewinding {req.region} onto")
        with heartbeating():
            return rewind_to_standby(old.postgres, self._pg(req.primary_region), application_name=old.name,
                                     slot=old.postgres.slot_name)

    @activity.defn
    def preserve_redis_and_rejoin(self, req: FailbackRequest) -> RedisFailback:
        old = self.cfg.region(req.region)
        if req.epoch is not None:
            # REPLICAOF makes the old master resync, dropping its keys: a superseded run must not
            # demote a master a newer move promoted (activities/redis/epoch.py: where and why).
            held = redis_epochs.highest_epoch([r.redis for r in self.cfg.regions], self.cfg.service)
            try:
                redis_epochs.refuse_stale(held, req.epoch)
            except redis_epochs.StaleEpoch as e:
                raise ApplicationError(f"{e}; not re-attaching {req.region}'s Redis", type="StaleEpoch",
                                       non_retryable=True) from e
        info = activity.info()
        # Per run: runbooks reuse their workflow id (dr-move-<service>) from one incident to the next.
        key = f"failback/{info.workflow_id}/{info.workflow_run_id}/redis-{old.name}.rdb"
        with heartbeating():
            try:
                return preserve_and_rejoin(old.redis, self.cfg.region(req.primary_region).redis, old.s3, key,
                                           self.cfg.redis_reconcile)
            except NotAMaster as e:
                # Retried: a Sentinel failover under way in the primary region ends in seconds.
                raise ApplicationError(f"{req.primary_region}'s Redis: {e}; {req.region}'s Redis was not made its "
                                       "replica and keeps its keys", type="RedisPrimaryNotMaster") from e


def _check_configured_tables(conn, conflicts: dict[str, TableConflictConfig], region: str) -> None:
    """A configured table the survivor lacks is a config error, never a silent skip."""
    for table, tcfg in conflicts.items():
        ident = regclass_sql(table)
        oid = conn.execute(sql.SQL("select to_regclass({})::oid").format(sql.Literal(ident.as_string(conn)))
                           ).fetchone()[0]
        if oid is None:
            raise ApplicationError(f"conflicts: table {table!r} does not exist on {region} (names are case-sensitive; "
                                   "use schema.table outside the search path). Nothing was applied.",
                                   type="ConfigError", non_retryable=True)
        found = conn.execute("select attname, attgenerated <> '' from pg_attribute where attrelid = %s and attnum > 0 "
                             "and not attisdropped", (oid,)).fetchall()
        cols = {r[0] for r in found}
        for col in [*tcfg.key, tcfg.timestamp_column]:
            if col not in cols:
                raise ApplicationError(f"conflicts: table {table!r} on {region} has no column {col!r}. Nothing was "
                                       "applied.", type="ConfigError", non_retryable=True)
        # Checked by the apply too, but only after the old primary was read; here, before.
        # (A generated column is never written, and the apply does not check it.)
        if reserved := sorted(c for c, generated in found if not generated and c.startswith(RESERVED_PREFIXES)):
            raise ApplicationError(f"conflicts: table {table!r} on {region} has columns {reserved} whose prefix the "
                                   "conflict engine reserves for its own. Nothing was applied.", type="ConfigError",
                                   non_retryable=True)


def _key_and_timestamp(conn, table: str) -> tuple[list[str], bool]:
    """The primary key columns of ``table`` and whether it has an updated_at column."""
    oid = conn.execute(sql.SQL("select to_regclass({})::oid").format(
        sql.Literal(regclass_sql(table).as_string(conn)))).fetchone()[0]
    if oid is None:
        return [], False
    key = [r[0] for r in conn.execute(
        "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) "
        "where i.indrelid = %s and i.indisprimary order by array_position(i.indkey::int2[], a.attnum)", (oid,)).fetchall()]
    has_ts = conn.execute("select exists (select 1 from pg_attribute where attrelid = %s and attname = 'updated_at' "
                          "and not attisdropped)", (oid,)).fetchone()[0]
    return key, has_ts


def require_epoch(primary, service: str, epoch: int | None, what: str) -> None:
    """Refuse a destructive step (pg_rewind, a rejoin) onto a primary whose DR epoch moved past
    the run's: a newer move acted since, and following this node may be following the wrong one."""
    if epoch is None:
        return  # a run recorded before the epoch was carried
    held = epochs.read_epoch(primary, service).epoch
    if held > epoch:
        raise ApplicationError(f"stale epoch {epoch}: {what} a primary that records epoch {held} (a newer move ran "
                               "since); nothing was changed", type="StaleEpoch", non_retryable=True)


def _agrees(region: str, lost: LostWal, got: LoserRows) -> None:
    """The measured divergence and the read's own scan of the same stopped WAL must agree:
    fewer commits, or an earlier end, means the read missed writes the measure counted, and
    applying it, then rewinding, would erase them while reporting them kept."""
    if got.wal_commits is None:
        return
    short = got.wal_end_lsn is not None and lost.end_lsn is not None and \
        lsn_to_int(got.wal_end_lsn) < lsn_to_int(lost.end_lsn)
    if got.wal_commits != lost.lost_commits or short:
        raise ApplicationError(
            f"{region}'s WAL after the fork read twice gives two answers: measured {lost.lost_commits} commits to "
            f"{lost.end_lsn}, read {got.wal_commits} to {got.wal_end_lsn}. Nothing was applied; {region} is left "
            "stopped (fenced) with its data intact. Read its WAL by hand (pg_waldump) before any rewind.",
            type="DivergenceMismatch", non_retryable=True)
