"""The backup catalog as a region's worker reads it (``pgbackrest info`` needs the node's own
pgBackRest config): what ``eagle-dr backup list`` runs on a throw-away in-process worker, like
``eagle-dr status``'s liveness probe. Not a runbook: no steps, nothing changed, no history kept
beyond the CLI's run.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import BackupActivities
    from activities.backup.catalog import Catalog


class CatalogRequest(BaseModel):
    region: str
    task_queue: str
    # A dead worker must not make the CLI hang: it tries the next region.
    pickup_seconds: float = 10


@workflow.defn
class BackupCatalogWorkflow:
    @workflow.run
    async def run(self, req: CatalogRequest) -> Catalog:
        return await workflow.execute_activity_method(
            BackupActivities.read_backup_catalog, req.region, task_queue=req.task_queue,
            start_to_close_timeout=timedelta(seconds=150), heartbeat_timeout=timedelta(seconds=30),
            schedule_to_start_timeout=timedelta(seconds=req.pickup_seconds),
            retry_policy=RetryPolicy(maximum_attempts=2, non_retryable_error_types=["InvalidInput"]))
