"""Archive guard: keep WAL from piling up on the primary while one region's bucket is down.

Run by a Schedule every minute (overlap SKIP): see activities/backup/archive.py for the rule
and for why it is a workflow of its own rather than a part of MonitorWorkflow. Each run:

1. finds the primary (the guard follows it through failovers, like the backups);
2. on the primary's worker, measures the WAL waiting and probes both buckets; drops a dead
   bucket from archiving once the WAL waiting for it passes ``backup.archive_backlog_max``,
   and takes a dropped one back once it answers;
3. for a bucket taken back (its WAL has a gap), starts a full backup to it (a BackupWorkflow
   of its own, not waited on: a full can take hours, and the guard must keep running every
   minute meanwhile), and again on later runs until one completes.

The outcome is "degraded" (search attribute DrOutcome) whenever archiving is: a bucket
dropped or failing, a gap not yet closed by a full backup, or WAL dropped by pgBackRest's
queue limit. Alerting selects on ``DrRunbook="archive-guard" AND DrOutcome="degraded"``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import BackupActivities, GuardRequest
    from activities.backup.archive import GuardReport
    from activities.postgres.activities import PostgresActivities
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TARGET_REGION, DR_TRIGGER
    from workflows.backup import BackupInput, BackupWorkflow
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, validated


class ArchiveGuardInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trigger: str = Field(default="schedule", max_length=100)
    # Overrides backup.archive_backlog_max for this run.
    backlog_max_bytes: int | None = Field(default=None, ge=16 << 20)
    # Start a full backup to a bucket taken back after a gap.
    full_backup_after_gap: bool = True


class ArchiveGuardResult(BaseModel):
    service: str
    primary_region: str | None = None
    outcome: str
    report: GuardReport | None = None
    # Full backups started to close a gap (workflow ids).
    backups_started: list[str] = []
    degraded: list[str] = []


def gap_backup_id(service: str, region: str) -> str:
    """One full backup per bucket and gap at a time: later guard runs find it running."""
    return f"backup-after-wal-gap-{service}-{region}"


@workflow.defn
class ArchiveGuardWorkflow(Runbook):
    runbook = "archive-guard"
    notifies = "failures"  # scheduled: news only when it fails (runbook.py)

    @workflow.run
    async def run(self, raw: RawInput) -> ArchiveGuardResult:
        inp = validated(ArchiveGuardInput, raw)
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set(self.runbook), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger)])
        async with self.step("Find the primary") as rec:
            primaries = []
            for r in topo.regions:
                s = await self.act(PostgresActivities.postgres_status, r.name, queue=topo.control_task_queue,
                                   timeout=30, attempts=2)
                if s.reachable and s.role == "primary" and not s.read_only:
                    primaries.append(r.name)
            if len(primaries) != 1:
                # Mid-move or region lost: the move's runbook owns the primary; the next run
                # (a minute later) guards whichever node is primary then.
                rec.status, rec.detail = "skipped", f"no single writable primary ({', '.join(primaries) or 'none'})"
                self.finish("skipped")
                return ArchiveGuardResult(service=topo.service, outcome="skipped", degraded=[rec.detail])
            primary = primaries[0]
            rec.detail = primary
        self.source_region = primary
        workflow.upsert_search_attributes([DR_SOURCE_REGION.value_set(primary)])

        async with self.step("Measure WAL waiting and probe both buckets") as rec:
            report: GuardReport = await self.act(
                BackupActivities.guard_archive, GuardRequest(region=primary, backlog_max_bytes=inp.backlog_max_bytes),
                queue=topo.region(primary).task_queue, timeout=300, heartbeat=30, schedule_to_start=60, attempts=3)
            a = report.archiver
            rec.detail = (f"{a.ready_segments} segment(s) ({a.ready_bytes >> 20} MiB) waiting, bound "
                          f"{report.backlog_max_bytes >> 20} MiB; " + ", ".join(
                              f"{p.region} {'up' if p.usable else 'DOWN' if not p.reachable else 'NO STANZA'}"
                              for p in report.repos))
            if report.newly_dropped:
                rec.detail += f"; dropped {', '.join(report.newly_dropped)} from archiving"
            if report.readmitted:
                rec.detail += f"; {', '.join(report.readmitted)} archived to again"
        self.degraded += report.alerts
        if report.dropped:
            self.target_region = ", ".join(report.dropped)
            workflow.upsert_search_attributes([DR_TARGET_REGION.value_set(self.target_region)])

        started: list[str] = []
        if report.needs_full and inp.full_backup_after_gap:
            async with self.step("Start a full backup to each bucket with a WAL gap") as rec:
                for region in report.needs_full:
                    wid = gap_backup_id(topo.service, region)
                    try:
                        await workflow.start_child_workflow(
                            BackupWorkflow.run, BackupInput(type="full", repos=[region], trigger="archive-guard"),
                            id=wid, task_queue=topo.control_task_queue,
                            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
                        started.append(wid)
                    except WorkflowAlreadyStartedError:
                        pass  # an earlier run's is still copying
                rec.detail = f"started {', '.join(started)}" if started else "already running"
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return ArchiveGuardResult(service=topo.service, primary_region=primary, outcome=outcome, report=report,
                                  backups_started=started, degraded=self.degraded)


__all__ = ["ArchiveGuardWorkflow", "ArchiveGuardInput", "ArchiveGuardResult", "gap_backup_id"]
