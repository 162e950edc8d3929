"""Which workers are alive: ``eagle-dr status`` asks each task queue for real.

DescribeTaskQueue's pollers cannot say it: a live worker on an idle queue re-polls only
when its long poll expires (about a minute), so its ``last_access_time`` is as old as a
dead worker's for that long, and the server keeps a dead worker's entry for minutes. So
status runs this workflow on a throw-away queue served by its own in-process worker (it
must not depend on the control worker, which is one of those being checked): every queue
gets a no-op probe with a short schedule-to-start timeout. Picked up means alive now.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities, ProbeRequest


class LivenessInput(BaseModel):
    task_queues: list[str]
    pickup_seconds: float = 3.0


class QueueLiveness(BaseModel):
    task_queue: str
    alive: bool
    worker: str | None = None
    error: str | None = None


@workflow.defn
class WorkerLivenessWorkflow:
    @workflow.run
    async def run(self, inp: LivenessInput) -> list[QueueLiveness]:
        async def ask(queue: str) -> QueueLiveness:
            try:
                seen = await workflow.execute_activity_method(
                    HealthActivities.probe_regions_from_here, ProbeRequest(), task_queue=queue,
                    schedule_to_start_timeout=timedelta(seconds=inp.pickup_seconds),
                    start_to_close_timeout=timedelta(seconds=5), retry_policy=RetryPolicy(maximum_attempts=1))
            except ActivityError as e:
                # Only a timeout means nobody took it: a worker that took it and failed (an
                # older build without this activity, say) is alive.
                alive = not isinstance(e.cause, TimeoutError)
                return QueueLiveness(task_queue=queue, alive=alive, error=str(e.cause or e))
            return QueueLiveness(task_queue=queue, alive=True, worker=seen.worker)

        return list(await asyncio.gather(*(ask(q) for q in inp.task_queues)))
