"""The per-step overhead of a durable runbook: an empty activity's round trip on a Temporal server.

A workflow runs ``n`` empty activities one after another on a task queue of another worker
(as a runbook's regional step is), then ``n`` on its own queue (a control step), then ``n``
empty local activities. Each returns
the wall-clock time it ran; the median gap between consecutive calls is the round trip a
runbook pays per step on top of the step's own work: schedule -> dispatch to a worker ->
result -> workflow task -> the next schedule. The local figure is what a step costs when it
runs inside the workflow task (no server round trip of its own).

    python -m bench.step_overhead --address 127.0.0.1:7233 [--n 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker


@activity.defn(name="bench_empty")
async def empty() -> float:
    return time.time()


@workflow.defn(name="BenchStepOverhead", sandboxed=False)
class StepOverheadWorkflow:
    @workflow.run
    async def run(self, n: int, activity_queue: str) -> dict[str, list[float]]:
        remote, same, local = [], [], []
        for _ in range(n):
            remote.append(await workflow.execute_activity(
                empty, task_queue=activity_queue, start_to_close_timeout=timedelta(seconds=10)))
        for _ in range(n):
            # The workflow's own queue (a runbook's control steps): the server may hand the task
            # back in the workflow task's response (eager execution) instead of through matching.
            same.append(await workflow.execute_activity(empty, start_to_close_timeout=timedelta(seconds=10)))
        for _ in range(n):
            local.append(await workflow.execute_local_activity(empty, start_to_close_timeout=timedelta(seconds=10)))
        return {"activity": remote, "activity_on_workflow_queue": same, "local_activity": local}


def _gaps_ms(ts: list[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in zip(ts, ts[1:])]


async def measure(client: Client, n: int = 50) -> dict[str, dict]:
    """Median (min, max) round trip in ms of an empty activity and an empty local activity."""
    wf_queue, act_queue = f"bench-overhead-wf-{uuid.uuid4()}", f"bench-overhead-act-{uuid.uuid4()}"
    async with Worker(client, task_queue=wf_queue, workflows=[StepOverheadWorkflow], activities=[empty],
                      workflow_runner=UnsandboxedWorkflowRunner()), \
            Worker(client, task_queue=act_queue, activities=[empty]):
        out = await client.execute_workflow(StepOverheadWorkflow.run, args=[n + 1, act_queue],
                                            id=f"bench-step-overhead-{uuid.uuid4()}", task_queue=wf_queue,
                                            execution_timeout=timedelta(minutes=5))
    res = {}
    for kind, ts in out.items():
        gaps = _gaps_ms(ts)
        res[kind] = {"median_ms": statistics.median(gaps), "min_ms": min(gaps), "max_ms": max(gaps), "n": len(gaps)}
    return res


def fmt(res: dict[str, dict]) -> list[str]:
    return [f"  empty {kind.replace('_', ' ')} round trip: median {r['median_ms']:.1f} ms "
            f"({r['min_ms']:.1f}-{r['max_ms']:.1f}, n={r['n']})" for kind, r in res.items()]


async def _main(args) -> None:
    client = await Client.connect(args.address)
    print("\n".join(fmt(await measure(client, args.n))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="127.0.0.1:7233")
    ap.add_argument("--n", type=int, default=50)
    asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    main()
