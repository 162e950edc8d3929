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
        assert [s.status for s in p.steps] == ["done"], p.steps
