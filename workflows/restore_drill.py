"""Restore drill: prove the newest backup restores, and measure the backup RTO and RPO.

None of pgBackRest, barman or CloudNativePG does this for you. A Schedule starts it with ``{}``
(every field has a default). The runbook:

1. Check WAL archiving on the primary (pg_stat_archiver, WAL segments waiting): when it fails,
   no restore can reach a recent point, and the drill fails at once, saying why.
2. Check the backups' age in each region's bucket: the newest backup within 2 x backup.every,
   the newest full within 2 x backup.full_every. A stale one fails the drill at the end (the
   restore is still tried: whether what exists restores is worth knowing just then).
3. Mark a consistent point on the primary: a named restore point at which the checked tables
   (config ``conflicts:`` and every other permanent user table) are exactly the checksums taken
   (activities/backup/drill.py says how: a few milliseconds of SHARE locks, an exported snapshot).
4. Wait until that point's WAL segment is in the archive.
5. Restore the newest backup into a scratch instance on a region's host and replay to the
   restore point (RestoreActivities: ``--archive-mode=off``, its own port and socket).
6. Checksum the same tables in the copy; any difference fails the drill, naming the tables.
7. Measure the newest recoverable point (the newest archived WAL segment) and the RPO.
8. Always stop and delete the scratch instance, also on failure or cancel.

Nothing here changes the live primary's data; it only holds the checked tables' SHARE locks
for a moment and writes a restore point record into its WAL.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import DropScratchRequest, RestoreActivities, RestoreRequest
    from activities.backup.drill import (
        ArchiverState,
        Freshness,
        FreshnessRequest,
        Mark,
        MarkRequest,
        RestoreDrillActivities,
        ScratchSumRequest,
        TableSum,
        WaitArchivedRequest,
    )
    from activities.backup.left_copies import copy_name
    from activities.backup.restore import RestoreTarget, Scratch
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import (
        DR_BACKUP_LABEL,
        DR_BACKUP_REPO,
        DR_RESTORE_SECONDS,
        DR_RPO_SECONDS,
        DR_RUNBOOK,
        DR_SERVICE,
        DR_SOURCE_REGION,
        DR_TARGET_REGION,
        DR_TRIGGER,
    )
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, validated
    from workflows.left_copies import drop_left_copies
    from workflows.repo_lock import ReadsBackups, visible_to_expiries
    from workflows.wal_gaps import unread_note, with_gaps

SCHEDULED_BY = SearchAttributeKey.for_keyword("TemporalScheduledById")


class RestoreDrillInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Whose host runs the scratch instance (default: a reachable region that is not the
    # primary, sparing its host), and whose bucket it restores from (default: that region's own;
    # the other's when it is lost, and the drill says so).
    region: str | None = None
    repo: str | None = None
    # Overrides of backup.every / backup.full_every for the age check (seconds).
    backup_every_seconds: float | None = Field(default=None, gt=0)
    full_every_seconds: float | None = Field(default=None, gt=0)
    # Tables to check besides the configured ones (schema.name), and whether every other
    # permanent user table is checked too.
    tables: list[str] = []
    all_tables: bool = True
    # Unset: "schedule" when a Temporal Schedule started the run, else "manual".
    trigger: str | None = Field(default=None, max_length=100)
    timeout_seconds: float = Field(default=3600, gt=0, le=86400)


class TableCheck(BaseModel):
    table: str
    primary_rows: int
    restored_rows: int
    match: bool


class RestoreDrillResult(BaseModel):
    service: str
    region: str  # whose host ran the scratch
    repo_region: str | None = None  # whose bucket it restored from
    primary_region: str | None = None
    backup_label: str | None = None
    restore_point: str | None = None
    restore_point_lsn: str | None = None
    restore_point_at: datetime | None = None
    restore_seconds: float | None = None  # pgbackrest restore
    replay_seconds: float | None = None  # start, replay to the restore point, promote
    rto_seconds: float | None = None  # the backup RTO: restore + replay
    recovered_to: datetime | None = None  # newest commit in the copy
    # The newest recoverable point: the newest WAL segment in the archive and when it got there.
    newest_archived_wal: str | None = None
    newest_recoverable: datetime | None = None
    rpo_seconds: float | None = None  # the backup RPO: the primary's clock minus newest_recoverable
    freshness: Freshness | None = None
    tables: list[TableCheck] = []
    # Unlogged tables: in no backup (never in WAL), so never compared; named, and the drill degraded.
    not_restorable: list[str] = []
    locked_ms: float | None = None
    problems: list[str] = []
    degraded: list[str] = []
    outcome: str = "running"


@workflow.defn(name="RestoreDrillWorkflow")
class RestoreDrillWorkflow(ReadsBackups, Runbook):
    runbook = "restore-drill"
    notifies = "failures"  # scheduled: news only when it fails (runbook.py)

    def __init__(self) -> None:
        super().__init__()
        self.result_so_far: RestoreDrillResult | None = None

    @workflow.query
    def report(self) -> RestoreDrillResult | None:
        return self.result_so_far

    @workflow.run
    async def run(self, raw: RawInput) -> RestoreDrillResult:
        inp = validated(RestoreDrillInput, raw)
        self.not_reading_yet()
        info = workflow.info()
        trigger = inp.trigger or ("schedule" if info.typed_search_attributes.get(SCHEDULED_BY) else "manual")
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=info.task_queue, timeout=30)
        self.service = topo.service
        for field, value in (("region", inp.region), ("repo", inp.repo)):
            if value is not None:
                self.known_region(topo, field, value)
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set(self.runbook), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(trigger)])
        control = topo.control_task_queue

        async with self.step("Find the primary") as rec:
            status = await self.postgres_statuses(topo, control)
            primaries = self.primaries(status)
            if len(primaries) != 1:
                raise self._fail(None, "no single primary to compare with "
                                       f"({self.no_single_primary(status, primaries)})", "NoPrimary")
            primary = primaries[0]
            region = inp.region or next((n for n, s in status.items() if n != primary and s.reachable), primary)
            repo = inp.repo or region
            rec.detail = f"primary {primary}; scratch on {region}, from {repo}'s bucket"
        res = RestoreDrillResult(service=topo.service, region=region, repo_region=repo, primary_region=primary)
        self.result_so_far = res
        self.source_region, self.target_region = repo, f"scratch on {region}"
        workflow.upsert_search_attributes([DR_SOURCE_REGION.value_set(repo), DR_TARGET_REGION.value_set(region)])
        queue = topo.region(region).task_queue

        async with self.step(f"Check WAL archiving on {primary}") as rec:
            arch: ArchiverState = await self.act(RestoreDrillActivities.read_archiver_state, primary, queue=control,
                                                 timeout=30, attempts=3)
            self._archived(res, arch)
            rec.detail = f"last archived {arch.last_archived_wal} at {_t(arch.last_archived_time)}; " \
                         f"{arch.failed_count} failures in all"
            if arch.problems:
                # No restore can reach a recent point: fail now, saying why.
                raise self._fail(res, "; ".join(arch.problems), "ArchivingFailing")

        async with self.step("Check the backups' age in each bucket") as rec:
            fresh: Freshness = await self.act(
                RestoreDrillActivities.check_backup_freshness,
                FreshnessRequest(region=region, every_seconds=inp.backup_every_seconds,
                                 full_every_seconds=inp.full_every_seconds),
                queue=queue, timeout=180, heartbeat=30, schedule_to_start=60, attempts=3)
            res.freshness = fresh
            res.problems += fresh.problems
            rec.detail = "; ".join(f"{r}: newest {lbl}, {fresh.newest_age_seconds[r]:.0f} s old"
                                   for r, lbl in fresh.newest.items()) or "no backups"
            if fresh.problems:
                rec.status = "failed"
                rec.detail += " -- " + "; ".join(fresh.problems)

        name = _point_name(info)
        async with self.step(f"Mark a consistent point on {primary} and checksum its tables") as rec:
            mark: Mark = await self.act(RestoreDrillActivities.mark_consistent_point,
                                        MarkRequest(region=primary, name=name, tables=inp.tables,
                                                    all_tables=inp.all_tables),
                                        queue=control, timeout=inp.timeout_seconds, heartbeat=30, attempts=3)
            res.restore_point, res.restore_point_lsn, res.restore_point_at = mark.name, mark.lsn, mark.at
            res.locked_ms = mark.locked_ms
            rec.detail = (f"restore point {mark.name} at {mark.lsn} ({_t(mark.at)}); {len(mark.tables)} tables, "
                          f"{sum(t.rows for t in mark.tables)} rows; writers held {mark.locked_ms:.0f} ms")
            if mark.not_restorable:
                res.not_restorable = mark.not_restorable
                shown = ", ".join(mark.not_restorable[:10])
                more = len(mark.not_restorable) - 10
                rec.detail += f"; NOT RESTORABLE (unlogged): {shown}"
                self.degraded.append(f"NOT RESTORABLE (unlogged, never in WAL: no backup has their rows): {shown}"
                                     + (f" and {more} more" if more > 0 else "")
                                     + "; ALTER TABLE ... SET LOGGED to back them up")

        async with self.step(f"Wait for {mark.wal_file} to reach the archive") as rec:
            try:
                arch = await self.act(RestoreDrillActivities.wait_wal_archived,
                                      WaitArchivedRequest(region=primary, wal_file=mark.wal_file,
                                                          timeout_seconds=2 * (arch.archive_timeout_seconds or 60) + 60),
                                      queue=control, timeout=600, heartbeat=30, attempts=2)
            except ActivityError as e:
                raise self._fail(res, str(e.cause.message if isinstance(e.cause, ApplicationError) else e),
                                 "ArchivingFailing") from None
            rec.detail = f"archived {arch.last_archived_wal} at {_t(arch.last_archived_time)}"

        # The mark's position too: a backup that ended after it must not be the one restored.
        target = RestoreTarget(kind="name", name=mark.name, lsn=mark.lsn)
        req = RestoreRequest(region=region, repo_region=repo, target=target,
                             name=_dir_name(info), timeout_seconds=inp.timeout_seconds, fallback=inp.repo is None)
        scratch: Scratch | None = None
        try:
            if workflow.patched("restore-visible-to-expiries"):
                # An expire must not delete the set or the WAL this drill restores (workflows/repo_lock.py).
                if note := await visible_to_expiries(self, topo):
                    self.degraded.append(note)
            if workflow.patched("restore-drops-ended-runs-copies"):
                await drop_left_copies(self, topo, region, queue)
            async with self.step(f"Check {repo}'s bucket") as rec:
                req, unread = await with_gaps(self, topo, req)
                try:
                    chk = await self.act(RestoreActivities.check_restore_target, req, queue=queue, timeout=180,
                                         heartbeat=30, schedule_to_start=60, attempts=3)
                except ActivityError as e:
                    raise self._fail(res, _why(e), "RestoreFailed") from None
                rec.detail = f"backups {chk.oldest_backup} .. {chk.newest_backup}"
                if note := unread_note(unread, chk.gaps_read_here):
                    self.degraded.append(note)
                if chk.fell_back:
                    self.degraded.append(f"restored from {chk.repo_region}'s bucket: {chk.fell_back}")
                    req = req.model_copy(update={"repo_region": chk.repo_region})
                    res.repo_region = self.source_region = chk.repo_region

            async with self.step(f"Restore the newest backup on {region} and replay to {mark.name}") as rec:
                try:
                    scratch = await self.act(RestoreActivities.restore_scratch, req, queue=queue,
                                             timeout=req.timeout_seconds + 300, heartbeat=60, schedule_to_start=60,
                                             attempts=2)
                except ActivityError as e:
                    raise self._fail(res, f"the restore failed: {_why(e)}", "RestoreFailed") from None
                self.done_reading()
                res.backup_label, res.recovered_to = scratch.backup_label, scratch.recovered_to
                res.restore_seconds, res.replay_seconds = scratch.restore_seconds, scratch.recovery_seconds
                res.rto_seconds = scratch.restore_seconds + scratch.recovery_seconds
                workflow.upsert_search_attributes([DR_BACKUP_LABEL.value_set([scratch.backup_label or "unknown"]),
                                                   DR_BACKUP_REPO.value_set([req.repo_region]),
                                                   DR_RESTORE_SECONDS.value_set(res.rto_seconds)])
                rec.detail = (f"backup {scratch.backup_label}: restore {scratch.restore_seconds:.1f} s + replay "
                              f"{scratch.recovery_seconds:.1f} s = RTO {res.rto_seconds:.1f} s")

            async with self.step("Compare the copy's tables with the primary's") as rec:
                got: list[TableSum] = await self.act(
                    RestoreDrillActivities.scratch_checksums,
                    ScratchSumRequest(region=region, directory=scratch.directory, port=scratch.port,
                                      tables=[t.table for t in mark.tables]),
                    queue=queue, timeout=inp.timeout_seconds, heartbeat=30, attempts=3)
                theirs = {t.table: t for t in got}
                for t in mark.tables:
                    g = theirs.get(t.table)
                    res.tables.append(TableCheck(table=t.table, primary_rows=t.rows,
                                                 restored_rows=g.rows if g else -1,
                                                 match=g is not None and (g.rows, g.checksum) == (t.rows, t.checksum)))
                bad = [c for c in res.tables if not c.match]
                for c in bad:
                    res.problems.append(f"{c.table} differs in the restored copy: {c.restored_rows} rows (-1: missing) "
                                        f"against {c.primary_rows} on the primary at {mark.name}, or the same count with "
                                        f"other contents")
                rec.detail = f"{len(res.tables) - len(bad)} of {len(res.tables)} tables identical"
                if bad:
                    rec.status = "failed"
        except BaseException:
            if res.outcome == "running":
                res.outcome = "failed"
            raise
        finally:
            # Always, also on failure or cancel, including one asked while it runs (a shield
            # let the run end cancelled around it): a scratch instance holds a port and a copy
            # of the database's disk.
            if workflow.patched("restore-drop-settles"):
                await self.settled(self._drop(region, queue, req, scratch))
            else:
                await asyncio.shield(asyncio.ensure_future(self._drop(region, queue, req, scratch)))

        async with self.step("Measure the newest recoverable point") as rec:
            arch = await self.act(RestoreDrillActivities.read_archiver_state, primary, queue=control, timeout=30,
                                  attempts=3)
            self._archived(res, arch)
            res.problems += arch.problems
            rec.detail = f"WAL up to {res.newest_archived_wal} archived at {_t(res.newest_recoverable)}: RPO " + \
                         (f"{res.rpo_seconds:.0f} s" if res.rpo_seconds is not None else "unknown")
        res.degraded = self.degraded
        if res.problems:
            raise self._fail(res, "; ".join(res.problems), "RestoreDrillFailed")
        res.outcome = "degraded" if self.degraded else "succeeded"
        self.finish(res.outcome)
        return res

    def _archived(self, res: RestoreDrillResult, arch: ArchiverState) -> None:
        res.newest_archived_wal, res.newest_recoverable = arch.last_archived_wal, arch.last_archived_time
        if arch.last_archived_time is not None:
            # What a primary lost now would take with it: everything after the newest archived
            # segment (the segment in progress, at most archive_timeout of writes, and any backlog).
            res.rpo_seconds = max(0.0, (arch.at - arch.last_archived_time).total_seconds())
            workflow.upsert_search_attributes([DR_RPO_SECONDS.value_set(res.rpo_seconds)])

    def _fail(self, res: RestoreDrillResult | None, why: str, kind: str) -> ApplicationError:
        """Fail loudly: the run fails, outcome failed, the message says why and the details carry
        the figures measured so far (a drill report reads them)."""
        self.finish("failed")
        if res is not None:
            res.outcome = "failed"
            res.degraded = self.degraded
        self._details(f"FAILED: {why}")
        return ApplicationError(f"restore drill failed: {why}",
                                *([res.model_dump(mode="json")] if res is not None else []),
                                type=kind, non_retryable=True)

    async def _drop(self, region: str, queue: str, req: RestoreRequest, scratch: Scratch | None) -> None:
        async with self.step("Stop and delete the scratch instance"):
            await self.act(RestoreActivities.drop_scratch,
                           DropScratchRequest(region=region, name=req.name,
                                              port=scratch.port if scratch else 1024),
                           queue=queue, timeout=180, heartbeat=30, attempts=10)


def _why(e: ActivityError) -> str:
    return e.cause.message if isinstance(e.cause, ApplicationError) else str(e.cause or e)


def _point_name(info) -> str:
    """The restore point's name: unique per run, at most 63 bytes."""
    return "drill-" + hashlib.sha1(f"{info.workflow_id}/{info.run_id}".encode()).hexdigest()[:16]


def _dir_name(info) -> str:
    return copy_name("RestoreDrillWorkflow", info.workflow_id, info.run_id)


def _t(v) -> str:
    return v.isoformat(timespec="seconds") if v else "unknown"


__all__ = ["RestoreDrillWorkflow", "RestoreDrillInput", "RestoreDrillResult", "TableCheck"]
