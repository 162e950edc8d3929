"""A step on a region's queue that no worker takes says so in the UI, and still runs once one does.

Before, a runbook whose next step went to a dead region's queue showed that step "running"
with nothing else, for as long as the region stayed down: at 3 a.m. nobody could tell a slow
step from one nobody would ever take. Runbook.act now says, in the step's detail and the run's
current details, which queue has no worker and for how long, and keeps waiting: the step can
only run there, and must run when the region's worker is back.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from temporalio import activity, workflow
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from tests.lab_helpers import _progress, _until
from workflows import runbook
from workflows.runbook import Runbook

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _Region:
    @activity.defn(name="no_worker_probe_step")
    def step(self, x: str) -> str:
        return f"ran {x}"


class _Failing:
    calls = 0

    @activity.defn(name="no_worker_probe_failing")
    def step(self, x: str) -> str:
        _Failing.calls += 1
        raise RuntimeError(f"attempt {_Failing.calls} failed")


@workflow.defn(name="NoWorkerRetryProbe", sandboxed=False)
class _RetryProbe(Runbook):
    runbook = "no-worker-retry-probe"

    @workflow.run
    async def run(self, queue: str) -> str:
        async with self.step("touch the region"):
            return await self.act(_Failing.step, "here", queue=queue, timeout=30, attempts=2)


@workflow.defn(name="NoWorkerProbe", sandboxed=False)
class _Probe(Runbook):
    runbook = "no-worker-probe"

    @workflow.run
    async def run(self, queue: str) -> str:
        async with self.step("touch the region"):
            return await self.act(_Region.step, "here", queue=queue, timeout=30)


async def test_a_step_no_worker_takes_says_so_and_runs_when_one_does(client, monkeypatch):
    monkeypatch.setattr(runbook, "NO_WORKER_FIRST_S", 1.0)
    monkeypatch.setattr(runbook, "NO_WORKER_MAX_S", 2.0)
    control, region = f"no-worker-control-{uuid.uuid4().hex[:8]}", f"no-worker-region-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=control, workflows=[_Probe], workflow_runner=UnsandboxedWorkflowRunner()):
        handle = await client.start_workflow(_Probe.run, region, id=f"no-worker-{uuid.uuid4().hex[:8]}",
                                             task_queue=control)

        async def said():
            p = await _progress(handle)
            s = p and p.steps and p.steps[-1]
            return s if s and "no worker has taken this step" in (s.detail or "") and "for 3 s" in s.detail else None

        step = await _until(said, 60, "the step saying that no worker took it", 0.2)
        assert region in step.detail and step.status == "running", step
        desc = await handle.describe()
        assert desc.status.name == "RUNNING"
        # The region's worker comes back: the same run goes on and the step completes.
        with ThreadPoolExecutor(2) as ex:
            async with Worker(client, task_queue=region, activities=[_Region().step], activity_executor=ex):
                assert await handle.result() == "ran here"
        p = await _progress(handle)
        # Done, and no longer saying it waits (the step had no detail of its own).
        assert [(s.status, s.detail or None) for s in p.steps] == [("done", None)], p.steps


async def test_a_retry_nobody_takes_still_spends_the_steps_attempts(client, monkeypatch):
    """A retry that no worker takes ends in the same timeout, but an attempt before it ran the
    step. Scheduled anew with its attempts counted from one, a step whose worker keeps dying
    would run forever instead of failing so the runbook can undo or degrade. Here the first of
    two attempts fails and its worker goes: once a worker is back, the step gets one more
    attempt, not two."""
    from datetime import timedelta

    from temporalio.client import WorkflowFailureError
    from temporalio.common import RetryPolicy

    monkeypatch.setattr(runbook, "NO_WORKER_FIRST_S", 1.0)
    # The retry waits 5 s: time enough for its worker to be gone before it is due.
    monkeypatch.setattr(runbook, "RETRY", RetryPolicy(initial_interval=timedelta(seconds=5),
                                                      maximum_interval=timedelta(seconds=5), maximum_attempts=5))
    monkeypatch.setattr(runbook, "NO_WORKER_MAX_S", 2.0)
    _Failing.calls = 0
    control, region = f"no-worker-control-{uuid.uuid4().hex[:8]}", f"no-worker-region-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=control, workflows=[_RetryProbe],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        with ThreadPoolExecutor(2) as ex:
            async with Worker(client, task_queue=region, activities=[_Failing().step], activity_executor=ex):
                handle = await client.start_workflow(_RetryProbe.run, region, id=f"no-worker-{uuid.uuid4().hex[:8]}",
                                                     task_queue=control)
                await _until(lambda: _done(_Failing.calls >= 1), 30, "the first attempt")
        # Its worker is gone before the retry's backoff ends: nobody takes the retry.
        assert _Failing.calls == 1

        async def said():
            p = await _progress(handle)
            s = p and p.steps and p.steps[-1]
            return s if s and "no worker has taken this step" in (s.detail or "") else None

        await _until(said, 60, "the step saying that no worker took its retry", 0.2)
        with ThreadPoolExecutor(2) as ex:
            async with Worker(client, task_queue=region, activities=[_Failing().step], activity_executor=ex):
                with pytest.raises(WorkflowFailureError):
                    await handle.result()
    assert _Failing.calls == 2


async def _done(v):
    return v
