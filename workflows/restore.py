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

Nothing here touches the live primary or standby: the scratch instance is a new cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import DropScratchRequest, RestoreActivities, RestoreRequest
    from activities.backup.restore import RestoreTarget, Scratch
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TARGET_REGION, DR_TRIGGER
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, invalid, validated


class RestoreInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Whose host runs the scratch instance, and whose bucket it restores from. Unset region:
    # the configured secondary's (spares the primary's host). Unset repo: the region's own bucket.
    region: str | None = None
    repo: str | None = None
    target: RestoreTarget = RestoreTarget()
    port: int | None = Field(default=None, ge=1024, le=65535)
    # How long the copy stays up for inspection; 0 deletes it as soon as it is reported.
    keep_minutes: float = Field(default=60, ge=0, le=7 * 24 * 60)
    trigger: str = Field(default="manual", max_length=100)


class RestoreResult(BaseModel):
    service: str
    scratch: Scratch
    dropped: bool
    degraded: list[str] = []
    outcome: str


@workflow.defn
class RestoreWorkflow(Runbook):
    runbook = "restore"

    def __init__(self) -> None:
        super().__init__()
        self.released = False
        self.scratch_copy: Scratch | None = None

    @workflow.query
    def scratch(self) -> Scratch | None:
        """Where the copy is (host's socket directory and port) while it is kept."""
        return self.scratch_copy

    @workflow.signal
    def release(self) -> None:
        """Done with the scratch copy: delete it now."""
        self.released = True

    @workflow.run
    async def run(self, raw: RawInput) -> RestoreResult:
        inp = validated(RestoreInput, raw)
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        names = [r.name for r in topo.regions]
        if inp.region is not None and inp.region not in names:
            raise invalid("region", f"unknown region {inp.region!r} (regions: {', '.join(names)})")
        if inp.repo is not None and inp.repo not in names:
            raise invalid("repo", f"unknown repo {inp.repo!r}: repos are named by region ({', '.join(names)})")
        region = inp.region or next((r.name for r in topo.regions if r.configured_role != "primary"), names[0])
        repo = inp.repo or region
        self.source_region, self.target_region = repo, f"scratch on {region}"
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("restore"), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger), DR_SOURCE_REGION.value_set(repo),
                                           DR_TARGET_REGION.value_set(region)])
        queue = topo.region(region).task_queue
        req = RestoreRequest(region=region, repo_region=repo, target=inp.target, name=_dir_name(workflow.info()),
                             port=inp.port, fallback=inp.repo is None)

        async with self.step(f"Check {inp.target.describe()} against {repo}'s backups") as rec:
            try:
                chk = await self.act(RestoreActivities.check_restore_target, req, queue=queue, timeout=180,
                                     heartbeat=30, schedule_to_start=60, attempts=3)
            except ActivityError as e:
                raise _as_input_error(e) from None
            rec.detail = f"{chk.repo_region}'s bucket: backups {chk.oldest_backup} .. {chk.newest_backup}"
            if chk.fell_back:
                # The region's own bucket is lost or unreadable: restore from the other region's.
                self.degraded.append(f"restored from {chk.repo_region}'s bucket: {chk.fell_back}")
                rec.detail += f" (fell back: {chk.fell_back})"
                req = req.model_copy(update={"repo_region": chk.repo_region})
                self.source_region = chk.repo_region

        scratch: Scratch | None = None
        try:
            async with self.step(f"Restore into a scratch instance on {region}") as rec:
                try:
                    scratch = await self.act(RestoreActivities.restore_scratch, req, queue=queue,
                                             timeout=req.timeout_seconds + 300, heartbeat=60, schedule_to_start=60,
                                             attempts=2)
                except ActivityError as e:
                    raise _as_input_error(e) from None
                self.scratch_copy = scratch
                rec.detail = (f"backup {scratch.backup_label}, reached {_t(scratch.recovered_to)} on timeline "
                              f"{scratch.timeline}; restore {scratch.restore_seconds:.1f} s, replay "
                              f"{scratch.recovery_seconds:.1f} s; port {scratch.port}")
            if inp.keep_minutes > 0:
                until = workflow.now() + timedelta(minutes=inp.keep_minutes)
                async with self.step(f"Keep the copy until {until:%H:%M} UTC (signal 'release' to drop it sooner)"):
                    try:
                        await workflow.wait_condition(lambda: self.released, timeout=timedelta(minutes=inp.keep_minutes))
                    except asyncio.TimeoutError:
                        pass
        finally:
            # Always, also on failure or cancel (shielded from it): a scratch instance holds a
            # port and a copy of the database's disk.
            await asyncio.shield(asyncio.ensure_future(self._drop(region, queue, req, scratch)))
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return RestoreResult(service=topo.service, scratch=scratch, dropped=True, degraded=self.degraded,
                             outcome=outcome)

    async def _drop(self, region: str, queue: str, req: RestoreRequest, scratch: Scratch | None) -> None:
        async with self.step("Stop and delete the scratch instance"):
            await self.act(RestoreActivities.drop_scratch,
                           DropScratchRequest(region=region, name=req.name,
                                              port=scratch.port if scratch else (req.port or 1024)),
                           queue=queue, timeout=180, heartbeat=30, attempts=10)


def _dir_name(info) -> str:
    """Short, one per run: a Unix socket path inside it must stay under 108 bytes."""
    return "r-" + hashlib.sha1(f"{info.workflow_id}/{info.run_id}".encode()).hexdigest()[:12]


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
