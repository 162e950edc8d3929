"""Restore: a point-in-time copy of the database in a scratch instance.

The runbook:

1. Check the target against the repo's backups (a time in the future, or before the oldest
   backup ends, is refused before anything is written).
2. Restore the newest backup that finished before the target into a scratch directory on the
   chosen region's host, start it on a free port with archiving off, replay WAL to the target,
   promote it.
3. Report what it reached (the newest commit in the copy), how long restore and replay took,
   and where to connect.
4. Keep it for ``keep_minutes`` (or until the ``release`` signal), then stop and delete it.
   A failure or a cancel deletes it too: nothing is left half done.

In the default mode (``pitr``) nothing touches the live primary or standby: the scratch
instance is a new cluster. Two more modes write to live servers, each only after an approval
that shows what it would do (``approval``, required by default):

``rebuild-standby``: replace a region's standby with the newest backup from its own bucket
   (the other region's when that is lost) instead of a pg_basebackup across regions, then
   stream from the primary. Refused for the primary's region. The old data directory is kept
   aside until the new one streams, and put back if the rebuild fails.
``recover-rows``: the seed's data-corruption procedure. Restore to just before the corruption
   (``target``: a time, LSN or restore point, exclusive for a time) into a scratch instance,
   decide the chosen tables' rows (``tables``: each with an optional WHERE) against the
   primary with the conflict engine, the copy winning, and show counts and a sample; once
   approved, apply them with one audit row per key (``eagle_dr.conflict_audit``). A reject, a
   timeout or a cancel before that leaves the primary untouched. The apply is the point of no
   return (a cancel then is refused). The scratch copy is dropped in every case.

``verify``: does the newest backup, with the archive, rebuild the primary's data exactly, key
   by key? Restore it into a scratch instance as a hot standby that replays the archive alone
   until it reaches the primary's newest archived segment (a missing segment stalls it: the run
   fails with ArchiveGap, naming the missing segment and where the bucket's archive ends; a
   replay that is only slow is waited for, once the repo shows it holds the segment), then
   streams from the
   primary. A consistency check (child ConsistencyCheckWorkflow, ``scratch_b``) then compares
   every table with the primary as with a standby: each range at one LSN on both sides, exact
   keys for any difference, the application writing on. None of the service's data is written
   (the check records its run in eagle_dr.consistency_runs, as every check does, but leaves the
   service's consistency metrics alone); the copy is dropped in every case. Refused where the
   primary's synchronous_standby_names would take the copy as a synchronous standby. (The restore drill checks table checksums at a restore point; this
   names the keys, and holds no lock on the primary.)

Why one workflow and not three: the modes share the input's target and repo, the check
against the repo's backups, the fallback to the other bucket, the scratch handling and the
``eagle-dr restore`` front end; a mode field keeps one runbook name in the UI's filters.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import DropScratchRequest, FollowRestoreRequest, RebuildRequest, \
        RecoverRowsRequest, RestoreActivities, RestoreRequest
    from activities.consistency.activities import ScratchRef
    from activities.backup.rebuild import RebuiltStandby
    from activities.backup.recover import RowRecovery, RowSelection
    from activities.backup.left_copies import copy_name
    from activities.backup.restore import FollowingScratch, RestoreTarget, Scratch
    from workflows.models import ApprovalPolicy, ApprovalRecord, RequiredApproval
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TARGET_REGION, DR_TRIGGER
    from workflows.consistency import ConsistencyCheckWorkflow, ConsistencyInput, ConsistencyResult
    from workflows.runbook import Runbook, described
    from workflows.validation import RawInput, invalid, validated
    from workflows.left_copies import drop_left_copies
    from workflows.repo_lock import RESTORE_GIVES_UP_SECONDS, ReadsBackups, visible_to_expiries
    from workflows.wal_gaps import unread_note, with_gaps


class RestoreInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Whose host runs the scratch instance, and whose bucket it restores from. Unset region: a
    # reachable region that is not the primary now (spares the primary's host). Unset repo: the
    # region's own bucket.
    region: str | None = None
    repo: str | None = None
    target: RestoreTarget = RestoreTarget()
    port: int | None = Field(default=None, ge=1024, le=65535)
    # How long the copy stays up for inspection; 0 deletes it as soon as it is reported.
    keep_minutes: float = Field(default=60, ge=0, le=7 * 24 * 60)
    # How long pgBackRest's restore plus the replay may take before the step gives up (the
    # rebuild of a standby: the restore and the catch-up). An hour fits tens of GB; a database
    # of hundreds needs more, or the step fails and is retried from scratch.
    timeout_seconds: float = Field(default=3600, ge=60, le=7 * 86400)
    trigger: str = Field(default="manual", max_length=100)
    mode: Literal["pitr", "rebuild-standby", "recover-rows", "verify"] = "pitr"
    # recover-rows: which tables, and rows, to copy back into the primary.
    tables: list[RowSelection] = Field(default=[], max_length=100)
    # The gate before anything is written to a live server (rebuild-standby, recover-rows).
    approval: RequiredApproval = ApprovalPolicy(required=True)
    # How long the restore waits for an expire (one holding the expiry lock, or a pgbackrest
    # expire still running on a node) before it goes on beside it and says so: an expire hung
    # on a bucket that is down must not hold a restore at 3 a.m.
    expiry_wait_seconds: float = Field(default=RESTORE_GIVES_UP_SECONDS, ge=1, le=86400)


class RestoreResult(BaseModel):
    service: str
    mode: str = "pitr"
    scratch: Scratch | None = None
    dropped: bool
    degraded: list[str] = []
    outcome: str
    primary_region: str | None = None
    approval: ApprovalRecord | None = None
    rebuilt: RebuiltStandby | None = None
    recovery: RowRecovery | None = None
    # verify: the copy (archive replay, then streaming) and the key-level check against the primary.
    following: FollowingScratch | None = None
    check: ConsistencyResult | None = None


@workflow.defn
class RestoreWorkflow(ReadsBackups, Runbook):
    runbook = "restore"

    def __init__(self) -> None:
        super().__init__()
        self.released = False
        self.expiry_wait = RESTORE_GIVES_UP_SECONDS
        self.scratch_copy: Scratch | None = None
        self.pending_review: RowRecovery | None = None

    @workflow.query
    def scratch(self) -> Scratch | None:
        """Where the copy is (host's socket directory and port) while it is kept."""
        return self.scratch_copy

    @workflow.query
    def review(self) -> RowRecovery | None:
        """recover-rows: what applying the copy's rows would do (counts and a sample), while
        approval waits."""
        return self.pending_review

    @workflow.signal
    def release(self) -> None:
        """Done with the scratch copy: delete it now."""
        self.released = True

    @workflow.run
    async def run(self, raw: RawInput) -> RestoreResult:
        inp = validated(RestoreInput, raw)
        self.expiry_wait = inp.expiry_wait_seconds
        self.not_reading_yet()
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        names = [r.name for r in topo.regions]
        if inp.region is not None:
            self.known_region(topo, "region", inp.region)
        if inp.repo is not None and inp.repo not in names:
            raise invalid("repo", f"unknown repo {inp.repo!r}: repos are named by region ({', '.join(names)})")
        if inp.region is not None:
            region = inp.region
        elif workflow.patched("restore-scratch-off-primary"):
            async with self.step("Choose the scratch host: a region that is not the primary now") as rec:
                region = rec.detail = await self.scratch_region(topo)
        else:
            # Runs started before the patch chose the configured secondary, and replay so.
            region = next((r.name for r in topo.regions if r.configured_role != "primary"), names[0])
        repo = inp.repo or region
        self.source_region, self.target_region = repo, f"scratch on {region}"
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("restore"), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger), DR_SOURCE_REGION.value_set(repo),
                                           DR_TARGET_REGION.value_set(region)])
        queue = topo.region(region).task_queue
        req = RestoreRequest(region=region, repo_region=repo, target=inp.target, name=_dir_name(workflow.info()),
                             port=inp.port, fallback=inp.repo is None, timeout_seconds=inp.timeout_seconds)
        if inp.mode == "rebuild-standby":
            return await self._rebuild(inp, topo, req, queue)
        if inp.mode == "recover-rows":
            return await self._recover(inp, topo, req, queue)
        if inp.mode == "verify":
            return await self._verify(inp, topo, req, queue)

        req, chk = await self._check(inp, topo, req, queue)
        scratch: Scratch | None = None
        try:
            scratch = await self._restore(region, req, queue)
            if inp.keep_minutes > 0:
                until = workflow.now() + timedelta(minutes=inp.keep_minutes)
                async with self.step(f"Keep the copy until {until:%H:%M} UTC (signal 'release' to drop it sooner)"):
                    try:
                        await workflow.wait_condition(lambda: self.released, timeout=timedelta(minutes=inp.keep_minutes))
                    except asyncio.TimeoutError:
                        pass
        finally:
            # Always, also on failure or cancel (_drop_whatever_happens): a scratch instance holds a
            # port and a copy of the database's disk.
            await self._drop_whatever_happens(region, queue, req, scratch)
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return RestoreResult(service=topo.service, scratch=scratch, dropped=True, degraded=self.degraded,
                             outcome=outcome)

    async def _check(self, inp: RestoreInput, topo, req: RestoreRequest, queue: str):
        await self._no_expiry(topo)
        if inp.mode != "rebuild-standby" and workflow.patched("restore-drops-ended-runs-copies"):
            # Before this run's own copy (the rebuild makes none): a host's disk and ports are
            # not held by copies nobody will drop.
            await drop_left_copies(self, topo, req.region, queue)
        async with self.step(f"Check {inp.target.describe()} against {req.repo_region}'s backups") as rec:
            req, unread = await with_gaps(self, topo, req)
            try:
                chk = await self.act(RestoreActivities.check_restore_target, req, queue=queue, timeout=180,
                                     heartbeat=30, schedule_to_start=60, attempts=3)
            except ActivityError as e:
                raise _as_input_error(e) from None
            if note := unread_note(unread, chk.gaps_read_here):
                self.degraded.append(note)
            rec.detail = f"{chk.repo_region}'s bucket: backups {chk.oldest_backup} .. {chk.newest_backup}"
            if chk.fell_back:
                # The region's own bucket is lost or unreadable: restore from the other region's.
                self.degraded.append(f"restored from {chk.repo_region}'s bucket: {chk.fell_back}")
                rec.detail += f" (fell back: {chk.fell_back})"
                req = req.model_copy(update={"repo_region": chk.repo_region})
                self.source_region = chk.repo_region
        return req, chk

    async def _no_expiry(self, topo) -> None:
        # Before the backups are read, in every mode: an expire must not delete the set or the
        # WAL this run restores (workflows/repo_lock.py).
        if workflow.patched("restore-visible-to-expiries"):
            if note := await visible_to_expiries(self, topo, self.expiry_wait):
                self.degraded.append(note)

    async def _restore(self, region: str, req: RestoreRequest, queue: str) -> Scratch:
        async with self.step(f"Restore into a scratch instance on {region}") as rec:
            try:
                scratch = await self.act(RestoreActivities.restore_scratch, req, queue=queue,
                                         timeout=req.timeout_seconds + 300, heartbeat=60, schedule_to_start=60,
                                         attempts=2)
            except ActivityError as e:
                raise _as_input_error(e) from None
            self.done_reading()
            self.scratch_copy = scratch
            rec.detail = (f"backup {scratch.backup_label}, reached {_t(scratch.recovered_to)} on timeline "
                          f"{scratch.timeline}; restore {scratch.restore_seconds:.1f} s, replay "
                          f"{scratch.recovery_seconds:.1f} s; port {scratch.port}")
            if scratch.timeline_note and workflow.patched("restore-says-latest-timeline"):
                # Nothing named the live branch: a fenced old primary or a split brain's loser,
                # once promoted, archives a newer timeline of its own, and "latest" follows it.
                self.degraded.append(scratch.timeline_note)
        return scratch

    def _self_approval(self, inp: RestoreInput) -> None:
        # As for the moves (Runbook.refuse_self_approval): only drills and child runs approve themselves.
        if inp.approval.auto_approve_as and inp.trigger != "drill" and workflow.info().parent is None:
            raise invalid("approval.auto_approve_as", "honoured only for drills (trigger 'drill') and runs "
                                                      "started by another runbook; leave it unset")

    async def _primary(self, topo) -> str:
        async with self.step("Find the primary") as rec:
            primary = await self.find_primary(topo)
            if primary is None:
                raise ApplicationError("no region's PostgreSQL answers as primary: nothing to follow or to write "
                                       "rows into (a PITR copy needs none: mode pitr)", type="NoPrimary",
                                       non_retryable=True)
            rec.detail = primary
        return primary

    # -- rebuild-standby ---------------------------------------------------------------------

    async def _rebuild(self, inp: RestoreInput, topo, req: RestoreRequest, queue: str) -> RestoreResult:
        if inp.region is None:
            raise invalid("region", "rebuild-standby needs the region whose standby to rebuild")
        if inp.target.kind != "latest":
            raise invalid("target", "a standby is rebuilt to the end of the archive (target latest), then streams")
        self._self_approval(inp)
        region = inp.region
        self.target_region = f"{region}'s standby"
        primary = await self._primary(topo)
        if primary == region:
            raise invalid("region", f"{region} is the primary: only a standby is rebuilt from backup (a primary "
                                    "that must go back in time is a PITR plus a failover)")
        req, chk = await self._check(inp, topo, req, queue)
        # Expiry goes on while a person's approval waits (up to days); the wait comes again after it.
        waits = inp.approval.required and not inp.approval.auto_approve_as
        if waits:
            self.done_reading()
        approval = await self.approval(
            inp.approval, f"replace {region}'s PostgreSQL data directory with backup {chk.newest_backup} from "
                          f"{req.repo_region}'s bucket and stream from {primary} (the old directory is kept aside "
                          "until the new one streams)")
        if waits:
            await self._no_expiry(topo)
        rreq = RebuildRequest(region=region, primary_region=primary, repo_region=req.repo_region,
                              timeout_seconds=inp.timeout_seconds)
        failed: BaseException | None = None
        async with self.step(f"Rebuild {region}'s standby from {req.repo_region}'s bucket") as rec:
            try:
                rebuilt = await self.act(RestoreActivities.rebuild_standby, rreq, queue=queue,
                                         timeout=rreq.timeout_seconds + 600,
                                         heartbeat=60, schedule_to_start=60, attempts=3)
            except (ActivityError, asyncio.CancelledError) as e:
                refused = _as_input_error(e) if isinstance(e, ActivityError) else e
                if refused is not e or not workflow.patched("restore-rebuild-undo"):
                    # A refusal of the input changed nothing (the node is checked before it is touched).
                    raise refused from None
                failed = e
                rec.status, rec.detail = ("cancelled", "cancelled") if isinstance(e, asyncio.CancelledError) else \
                    ("failed", f"FAILED: {described(e)}")
            else:
                self.done_reading()
                rec.detail = (f"backup {rebuilt.backup_label}: restore {_seconds(rebuilt.restore_seconds)}, catch-up "
                              f"{_seconds(rebuilt.catch_up_seconds)}; streaming from {rebuilt.upstream}")
        if failed is not None:
            # Before anything is kept, so undone: the original directory back and the node as it
            # was (the activity does this itself unless its worker died). Run to its end even if
            # a cancel is what ended the rebuild, or arrives now.
            undone, asked = await self.settled(self._undo_rebuild(rreq, queue))
            if isinstance(failed, asyncio.CancelledError) or asked:
                raise self.cancelled([undone]) from None
            self.finish("failed")
            raise ApplicationError(f"rebuilding {region}'s standby failed ({described(failed)}); undone: {undone}",
                                   type="RebuildFailed", non_retryable=True) from None
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return RestoreResult(service=topo.service, mode=inp.mode, dropped=False, degraded=self.degraded,
                             outcome=outcome, primary_region=primary, approval=approval, rebuilt=rebuilt)

    async def _undo_rebuild(self, rreq: RebuildRequest, queue: str) -> str:
        async with self.step(f"Undo: {rreq.region}'s original data directory back, as it was") as rec:
            try:
                rec.detail = await self.act(RestoreActivities.undo_rebuild, rreq, queue=queue, timeout=600,
                                            heartbeat=60, schedule_to_start=60, attempts=3)
            except ActivityError as e:
                rec.status = "failed"
                rec.detail = (f"NOT undone ({described(e)}): {rreq.region}'s original data directory may still be "
                              f"set aside beside its data directory (.<name>.eagle-dr-before-restore): move it back "
                              f"and start it, or run the rebuild again")
            return rec.detail

    # -- recover-rows ------------------------------------------------------------------------

    async def _recover(self, inp: RestoreInput, topo, req: RestoreRequest, queue: str) -> RestoreResult:
        if not inp.tables:
            raise invalid("tables", "recover-rows needs at least one table to copy back")
        names = [t.table for t in inp.tables]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise invalid("tables", f"listed twice: {', '.join(dup)} (one entry per table; combine the WHERE "
                                    "clauses with OR)")
        if inp.target.kind == "latest":
            raise invalid("target", "recover-rows restores to just before the corruption: give a time, an LSN or "
                                    "a restore point, not latest")
        self._self_approval(inp)
        region = req.region
        primary = await self._primary(topo)
        self.target_region = f"{primary} (rows from a copy on {region})"
        req, chk = await self._check(inp, topo, req, queue)
        scratch: Scratch | None = None
        try:
            scratch = await self._restore(region, req, queue)
            rreq = RecoverRowsRequest(region=region, name=req.name, port=scratch.port, primary_region=primary,
                                      tables=inp.tables,
                                      restored_to=scratch.recovered_to or inp.target.time or workflow.now())
            async with self.step(f"Decide the copy's rows against {primary} (nothing written)") as rec:
                try:
                    preview = await self.act(RestoreActivities.recover_rows, rreq, queue=queue, timeout=3600,
                                             heartbeat=30, attempts=3)
                except ActivityError as e:
                    raise _as_input_error(e) from None
                self.pending_review = preview
                rec.detail = _recovery_counts(preview)
            approval = await self.approval(
                inp.approval, f"write to {primary}: {_recovery_counts(preview)} (sample: {_recovery_sample(preview)}; "
                              "full list: the `review` query)")
            self.pending_review = None
            rreq = rreq.model_copy(update={"preview": False, "approved_by": approval.approver or approval.outcome})
            recovery = await self.no_return(self._apply_rows(rreq, primary, queue), f"rows written to {primary}")
        finally:
            await self._drop_whatever_happens(region, queue, req, scratch)
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return RestoreResult(service=topo.service, mode=inp.mode, scratch=scratch, dropped=True,
                             degraded=self.degraded, outcome=outcome, primary_region=primary, approval=approval,
                             recovery=recovery)

    # -- verify --------------------------------------------------------------------------------

    async def _verify(self, inp: RestoreInput, topo, req: RestoreRequest, queue: str) -> RestoreResult:
        if inp.target.kind != "latest":
            raise invalid("target", "verify restores the newest backup to the end of the archive and then follows "
                                    "the primary: leave the target at latest")
        region = req.region
        primary = await self._primary(topo)
        self.target_region = f"a copy on {region}, following {primary}"
        req, chk = await self._check(inp, topo, req, queue)
        following: FollowingScratch | None = None
        check: ConsistencyResult | None = None
        try:
            async with self.step(f"Restore into a scratch instance on {region}, replay the archive, follow "
                                 f"{primary}") as rec:
                freq = FollowRestoreRequest(**req.model_dump(), primary_region=primary)
                try:
                    following = await self.act(RestoreActivities.restore_following_scratch, freq, queue=queue,
                                               timeout=req.timeout_seconds + 300, heartbeat=60, schedule_to_start=60,
                                               attempts=2)
                except ActivityError as e:
                    cause = e.cause
                    if isinstance(cause, ApplicationError) and cause.type == "ArchiveGap":
                        raise ApplicationError(cause.message, type="ArchiveGap", non_retryable=True) from None
                    raise _as_input_error(e) from None
                self.done_reading()  # replayed from the archive; it streams from the primary now
                self.scratch_copy = sc = following.scratch
                if not following.archive_checked:
                    self.degraded.append(f"the archive's continuity was NOT verified: the primary's newest archived "
                                         f"file was {following.archived_segment or 'none'}, not a WAL segment (none "
                                         "archived yet, or a history file just after a promotion); verify again later")
                rec.detail = (f"backup {sc.backup_label}; the archive alone replayed to "
                              f"{following.archive_replayed_to} (the primary's newest archived segment: "
                              f"{following.archived_segment or 'none'}); streaming from {following.upstream}; "
                              f"restore {sc.restore_seconds:.1f} s, replay {sc.recovery_seconds:.1f} s; port {sc.port}")
            async with self.step(f"Compare every table with {primary}, key by key") as rec:
                check = await workflow.execute_child_workflow(
                    ConsistencyCheckWorkflow.run,
                    ConsistencyInput(scratch_b=ScratchRef(region=region, port=sc.port, socket_dir=sc.socket_dir),
                                     redis=False, trigger=f"restore-verify:{inp.trigger}"[:100]),
                    id=f"{workflow.info().workflow_id}-check", task_queue=workflow.info().task_queue)
                rec.detail = (f"{check.differences} differing keys in {len(check.tables)} tables "
                              f"({sum(t.rows_a for t in check.tables)} rows on {primary})")
                if check.differences:
                    rec.status = "failed"
                    self.degraded.extend(f"the restored copy differs: {d}" for d in check.degraded)
                elif check.degraded:
                    self.degraded.extend(check.degraded)
        finally:
            await self._drop_whatever_happens(region, queue, req, self.scratch_copy)
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return RestoreResult(service=topo.service, mode=inp.mode, scratch=self.scratch_copy, dropped=True,
                             degraded=self.degraded, outcome=outcome, primary_region=primary, following=following,
                             check=check)

    async def _apply_rows(self, rreq: RecoverRowsRequest, primary: str, queue: str) -> RowRecovery:
        async with self.step(f"Write the copy's rows to {primary} (audited)") as rec:
            recovery = await self.act(RestoreActivities.recover_rows, rreq, queue=queue, timeout=3600, heartbeat=30,
                                      attempts=5)
            rec.detail = _recovery_counts(recovery) + "; every key in eagle_dr.conflict_audit"
            if flagged := recovery.totals()[3]:
                self.degraded.append(f"{flagged} keys were flagged for a human, not written (the primary re-used "
                                     "them for other rows, or writing them would break a foreign key): see "
                                     "eagle_dr.conflict_audit where action = 'flag'")
            if recovery.foreign_keys_broken:
                self.degraded.append(f"{len(recovery.foreign_keys_broken)} written rows still break a foreign key: "
                                     f"{'; '.join(recovery.foreign_keys_broken[:5])}")
        return recovery

    async def _drop_whatever_happens(self, region: str, queue: str, req: RestoreRequest,
                                     scratch: Scratch | None) -> None:
        """The drop to its end, also on a failure or a cancel, including one asked while it
        runs: a shield only kept the drop's task going while the run ended cancelled around it,
        its activity's retries never scheduled, and the copy (a writable database of production
        data, a port, disk beside a standby) stayed."""
        if workflow.patched("restore-drop-settles"):
            await self.settled(self._drop(region, queue, req, scratch))
        else:
            await asyncio.shield(asyncio.ensure_future(self._drop(region, queue, req, scratch)))

    async def _drop(self, region: str, queue: str, req: RestoreRequest, scratch: Scratch | None) -> None:
        async with self.step("Stop and delete the scratch instance"):
            await self.act(RestoreActivities.drop_scratch,
                           DropScratchRequest(region=region, name=req.name,
                                              port=scratch.port if scratch else (req.port or 1024)),
                           queue=queue, timeout=180, heartbeat=30, attempts=10)


def _seconds(s: float | None) -> str:
    return "unknown" if s is None else f"{s:.1f} s"


def _dir_name(info) -> str:
    return copy_name("RestoreWorkflow", info.workflow_id, info.run_id)


def _recovery_counts(r: RowRecovery) -> str:
    verb = "would be" if r.preview else ""
    parts = [f"{t.table}: {t.inserted} inserted, {t.updated} updated, {t.deleted} deleted, {t.kept} unchanged, "
             f"{t.flagged} flagged ({t.rows_in_copy} rows in the copy, {t.missing_in_copy} only on the primary)"
             for t in r.tables]
    return (f"{verb} " if verb else "") + "; ".join(parts)


def _recovery_sample(r: RowRecovery) -> str:
    items = [f"{t.table} {s['key']}: {s['action']}" for t in r.tables for s in t.sample if s["action"] !=
             "keep_survivor"][:8]
    return "; ".join(items) or "nothing to write"


def _t(v) -> str:
    return v.isoformat(timespec="seconds") if v else "unknown"


def _as_input_error(e: ActivityError) -> BaseException:
    """An activity's refusal of the input becomes the workflow's, naming the field."""
    cause = e.cause
    if isinstance(cause, ApplicationError) and cause.type in ("InvalidInput", "PortInUse", "NoBackup",
                                                               "RepoUnavailable", "ScratchExists"):
        field = (cause.details[0] or {}).get("field") if cause.details else None
        if field:
            return invalid(field, cause.message)
        return ApplicationError(cause.message, type=cause.type, non_retryable=True)
    return e
