"""Before a restore makes its scratch copy on a host: drop the copies there that no running
restore owns (activities/backup/left_copies.py: terminated or reset runs leave them)."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import RestoreActivities
    from activities.backup.left_copies import LeftCopiesRequest, copy_name
    from activities.backup.readers import ReadersRequest, RepoReaderActivities
    from workflows.runbook import described


async def drop_left_copies(runbook, topo, region: str, queue: str) -> None:
    """Never stops the restore: a copy not looked at now is looked at by the next one."""
    async with runbook.step(f"Drop copies on {region} that no running restore owns") as rec:
        listed_at = workflow.now()
        try:
            running = await runbook.act(RepoReaderActivities.list_running_restores,
                                        ReadersRequest(service=topo.service), queue=topo.control_task_queue,
                                        timeout=60, attempts=3)
            dropped = await runbook.act(RestoreActivities.drop_left_copies, LeftCopiesRequest(
                region=region, keep=[copy_name(r.workflow_type, r.workflow_id, r.run_id) for r in running],
                listed_at=listed_at), queue=queue, timeout=900, heartbeat=60, schedule_to_start=60, attempts=3)
        except ActivityError as e:
            rec.detail = f"not looked at ({described(e)}): the next restore on {region} looks again"
            return
        if dropped:
            rec.detail = (f"dropped {len(dropped)} left by restores that ended without dropping them (terminated "
                          f"or reset): {', '.join(f'{c.name} (made {c.made_at:%Y-%m-%d %H:%M} UTC)' for c in dropped)}")
            workflow.logger.warning("dropped scratch copies no running restore owned",
                                    extra={"region": region, "copies": [c.name for c in dropped]})
        else:
            rec.detail = "none"
