"""A sync activity cancelled while it starts threads: the worker keeps serving.

The SDK raises CancelledError in the activity's thread by id; in CPython 3.11 a thread being
started still carries its creator's id, so the cancel could kill the new thread before it said
it started and leave the activity (and, through ThreadPoolExecutor's global lock, the whole
worker) waiting forever (workers/thread_start.py). Here a worker in its own process runs an
activity that starts threads back to back, and the workflow cancels it again and again; after
each cancel, another activity on the same worker must still complete.

Run as ``python -m tests.test_worker_thread_cancel ADDRESS QUEUE [--unshielded]`` it is that worker.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

ROUNDS = 20


@activity.defn
def start_threads_until_cancelled() -> int:
    started = 0
    while True:
        # A pool per call, as HealthActivities._probe_all makes one: the start happens in submit.
        # Mostly starting threads, so that a cancel is likely to land in a start.
        for _ in range(20):
            pool = ThreadPoolExecutor(max_workers=2)
            pool.submit(lambda: None)
            pool.submit(lambda: None)
            pool.shutdown(wait=True)
            started += 2
        activity.heartbeat(started)


@activity.defn
def ping() -> str:
    return "pong"


@workflow.defn
class CancelWhileStartingThreads:
    @workflow.run
    async def run(self, rounds: int) -> int:
        served = 0
        for i in range(rounds):
            handle = workflow.start_activity(
                start_threads_until_cancelled, start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=timedelta(seconds=0.3), retry_policy=RetryPolicy(maximum_attempts=1),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED)
            await workflow.sleep(0.05 + 0.02 * (i % 5))
            handle.cancel()
            try:
                await handle
            except ActivityError:
                pass
            if await workflow.execute_activity(ping, start_to_close_timeout=timedelta(seconds=10),
                                               retry_policy=RetryPolicy(maximum_attempts=1)) == "pong":
                served += 1
        return served


async def _serve(address: str, queue: str, shielded: bool) -> None:
    if shielded:
        from workers.thread_start import install

        install()
    client = await Client.connect(address)
    with ThreadPoolExecutor(max_workers=8) as executor:
        await Worker(client, task_queue=queue, workflows=[CancelWhileStartingThreads],
                     activities=[start_threads_until_cancelled, ping], activity_executor=executor,
                     workflow_runner=UnsandboxedWorkflowRunner()).run()


async def test_cancels_while_an_activity_starts_threads_never_wedge_the_worker(dev_server, lab_cfg):
    address = f"127.0.0.1:{lab_cfg.lab.dev_server.grpc_port}"
    queue = f"thread-cancel-{uuid.uuid4()}"
    worker = subprocess.Popen([sys.executable, "-m", "tests.test_worker_thread_cancel", address, queue])
    try:
        client = await Client.connect(address)
        handle = await client.start_workflow(CancelWhileStartingThreads.run, ROUNDS, id=queue, task_queue=queue,
                                             execution_timeout=timedelta(seconds=240))
        # Each round takes well under a second; a wedged worker never finishes the next round.
        served = await asyncio.wait_for(handle.result(), 120)
        assert served == ROUNDS
        assert worker.poll() is None, "the worker process died"
    finally:
        worker.kill()
        worker.wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2], "--unshielded" not in sys.argv))
