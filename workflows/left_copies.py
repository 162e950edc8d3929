"""Before a restore makes its scratch copy on a host: drop the copies there whose run has ended
without dropping them (activities/backup/left_copies.py: terminated or reset runs)."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import RestoreActivities
    from activities.backup.left_copies import DropLeftRequest, FindLeftRequest
    from activities.backup.readers import CopiesInUseRequest, RepoReaderActivities
    from workflows.runbook import described


async def drop_left_copies(runbook, topo, region: str, queue: str) -> None:
    """Never stops the restore: a copy not looked at now is looked at by the next one."""
    async with runbook.step(f"Drop copies on {region} whose runs ended without dropping them") as rec:
        looked_at = workflow.now()
        try:
            found = await runbook.act(RestoreActivities.find_left_copies,
                                      FindLeftRequest(region=region, looked_at=looked_at), queue=queue, timeout=60,
                                      schedule_to_start=60, attempts=3)
            in_use = set(await runbook.act(RepoReaderActivities.copies_in_use, CopiesInUseRequest(copies=found),
                                           queue=topo.control_task_queue, timeout=120, attempts=3)) if found else set()
            ended = [c.name for c in found if c.name not in in_use]
            res = await runbook.act(RestoreActivities.drop_left_copies,
                                    DropLeftRequest(region=region, names=ended, looked_at=looked_at), queue=queue,
                                    timeout=900, heartbeat=60, schedule_to_start=60, attempts=2) if ended else None
        except ActivityError as e:
            rec.detail = f"not looked at ({described(e)}): the next restore on {region} looks again"
            return
        if res is None:
            rec.detail = "none"
            return
        parts = []
        if res.dropped:
            parts.append(f"dropped {len(res.dropped)}: " + ", ".join(
                f"{c.name} ({c.owner.workflow_id}, made {c.made_at:%Y-%m-%d %H:%M} UTC)" for c in res.dropped))
            workflow.logger.warning("dropped scratch copies whose runs had ended",
                                    extra={"region": region, "copies": [c.name for c in res.dropped]})
        if res.failed:
            parts.append(f"could not drop {'; '.join(res.failed)}")
        if res.not_reached:
            parts.append(f"left for the next restore (out of time): {', '.join(res.not_reached)}")
        rec.detail = "; ".join(parts) or "none (gone meanwhile)"
