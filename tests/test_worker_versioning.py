"""Worker Versioning for deploys: a runbook started by the old build is finished by the new one.

Runbooks outlive deploys (an approval gate can wait for hours), so a deploy must not strand a
run on a build that no longer polls. With worker deployment versioning and AUTO_UPGRADE, the
run moves to the deployment's current version at its next workflow task. Its own dev server:
versioning changes task-queue routing, which must not leak into the shared test lab's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
import pytest_asyncio
import yaml
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkerDeploymentConfig

from eagle_dr.deploy import DeployError, make_current
from eagle_dr.temporal import find_bin
from tests.conftest import PORT_SHIFT
from tests.lab_helpers import _until

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Above the test lab's dev server ports (7233/7243/7244/8233 + shift) and the TLS proxies' (+40).
GRPC_PORT = 7233 + 50 + PORT_SHIFT
DEPLOYMENT = "eagle-dr-control"


@workflow.defn(name="VersionedToy", versioning_behavior=VersioningBehavior.AUTO_UPGRADE)
class VersionedToy:
    """Waits for a signal, like a runbook at its approval gate; returns which builds ran it."""

    def __init__(self) -> None:
        self.approved = False

    @workflow.run
    async def run(self) -> str:
        started_on = workflow.info().get_current_deployment_version()
        await workflow.wait_condition(lambda: self.approved)
        finished_on = workflow.info().get_current_deployment_version()
        return f"{started_on.build_id if started_on else None}->{finished_on.build_id if finished_on else None}"

    @workflow.signal
    def approve(self) -> None:
        self.approved = True


@pytest_asyncio.fixture(loop_scope="session")
async def env():
    e = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_bin("temporal"), port=GRPC_PORT, ui=False,
        dev_server_extra_args=["--http-port", str(GRPC_PORT + 1), "--metrics-port", str(GRPC_PORT + 2)])
    try:
        yield e
    finally:
        await e.shutdown()


def _worker(client: Client, queue: str, build_id: str) -> Worker:
    return Worker(client, task_queue=queue, workflows=[VersionedToy], workflow_runner=UnsandboxedWorkflowRunner(),
                  deployment_config=WorkerDeploymentConfig(
                      version=WorkerDeploymentVersion(DEPLOYMENT, build_id), use_worker_versioning=True))


async def _make_current(client: Client, build_id: str) -> str | None:
    """What a deploy does once the new build's workers poll (eagle-dr set-current-version)."""
    return await make_current(client, DEPLOYMENT, build_id, wait_seconds=30, identity="test-deploy")


async def test_new_build_finishes_a_run_started_by_the_old_one(env):
    client = env.client
    queue = f"versioning-{uuid.uuid4().hex[:8]}"
    wid = f"toy-{queue}"

    async with _worker(client, queue, "1.0"):
        await _make_current(client, "1.0")
        # A build none of whose workers polls is refused, not forced: runs would wait on nobody.
        with pytest.raises(DeployError, match=r"eagle-dr-control\.9\.9 could not be made current within 2 s"):
            await make_current(client, DEPLOYMENT, "9.9", wait_seconds=2)
        handle = await client.start_workflow(VersionedToy.run, id=wid, task_queue=queue,
                                             execution_timeout=timedelta(minutes=2))

        async def first_task_done():
            desc = await handle.describe()
            v = desc.raw_description.workflow_execution_info.versioning_info
            return v.deployment_version.build_id == "1.0" and v.behavior == VersioningBehavior.AUTO_UPGRADE.value

        await _until(first_task_done, 30, "the 1.0 worker to run the first workflow task")
    # The 1.0 worker is gone (a deploy replaced it); the run waits at its gate.

    async with _worker(client, queue, "2.0"):
        assert await _make_current(client, "2.0") == "1.0"
        await handle.signal(VersionedToy.approve)
        assert await handle.result() == "1.0->2.0"
    v = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
    assert v.deployment_version.build_id == "2.0"


async def test_the_real_control_worker_polls_as_a_version_and_a_deploy_moves_its_runs(env, monkeypatch, tmp_path):
    """workers/run.py's control worker with temporal.deployment_name: the registry's workflows
    run AUTO_UPGRADE by default. A run of one of them (the backup-repo lock, which needs no
    activity) started on build 1.0 is finished by build 2.0 after the deploy; and a versioned
    config without a build id is refused, naming the variable."""
    from concurrent.futures import ThreadPoolExecutor

    from eagle_dr.config import DEFAULT_CONFIG, load_config
    from workers.run import build_worker
    from workflows.repo_lock import RepoLockWorkflow

    base = load_config(DEFAULT_CONFIG, env={})
    queue = f"control-{uuid.uuid4().hex[:8]}"
    cfg = base.model_copy(update={"temporal": base.temporal.model_copy(update={
        "control_task_queue": queue, "deployment_name": DEPLOYMENT})})
    monkeypatch.delenv("EAGLE_DR_BUILD_ID", raising=False)
    with ThreadPoolExecutor(4) as executor:
        with pytest.raises(ValueError, match="EAGLE_DR_BUILD_ID"):
            build_worker(env.client, cfg, None, executor)
        monkeypatch.setenv("EAGLE_DR_BUILD_ID", "1.0")
        async with build_worker(env.client, cfg, None, executor):
            await _make_current(env.client, "1.0")
            handle = await env.client.start_workflow(RepoLockWorkflow.run, "test-holder", id=f"lock-{queue}",
                                                     task_queue=queue, execution_timeout=timedelta(minutes=2))

            async def first_task_done():
                v = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
                return v.deployment_version.build_id == "1.0" and v.behavior == VersioningBehavior.AUTO_UPGRADE.value

            await _until(first_task_done, 30, "the 1.0 control worker to run the first workflow task")
        monkeypatch.setenv("EAGLE_DR_BUILD_ID", "2.0")
        async with build_worker(env.client, cfg, None, executor):
            # The deploy's last step, by the real command, against this dev server.
            path = tmp_path / "eagle-dr.yaml"
            doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
            doc["temporal"] |= {"control_task_queue": queue, "deployment_name": DEPLOYMENT}
            doc["temporal"].pop("codec", None)  # its key is a lab secret; this call carries no payload
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            r = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "eagle_dr.cli", "--config", str(path), "set-current-version", "2.0", "--wait", "60"],
                capture_output=True, text=True, timeout=120,
                env={**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{GRPC_PORT}", "COLUMNS": "200"})
            assert r.returncode == 0, r.stderr
            assert f"{DEPLOYMENT}.2.0 is current (was: {DEPLOYMENT}.1.0)" in r.stdout, r.stdout
            await handle.signal(RepoLockWorkflow.release)
            assert await handle.result() == "test-holder"
    v = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
    assert v.deployment_version.build_id == "2.0"


def test_set_current_version_needs_a_versioned_config():
    # The lab's config is unversioned: no Temporal call, one line saying why.
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "set-current-version", "2.0"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2 and "temporal.deployment_name is not set" in r.stderr, r.stderr
