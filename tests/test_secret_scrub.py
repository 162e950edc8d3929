"""A secret in an activity's exception never reaches workflow history: a real worker with the
production interceptor, on the test dev server, and the whole history searched for it."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from eagle_dr.config import SecretRef
from tests.histories import decrypted_json
from workers.scrub import ScrubSecrets

SECRET = f"pw-{uuid.uuid4().hex}"


@activity.defn
def connect_with_secret(env_var: str) -> None:
    password = SecretRef(env=env_var).resolve()
    try:
        # What libpq says about a conninfo it cannot parse: it quotes the offending piece.
        raise ValueError(f'missing "=" after "{password}" in connection info string')
    except ValueError as e:
        raise RuntimeError(f"cannot connect: {e} (password={password})") from e


@workflow.defn(sandboxed=False)
class LeakyWorkflow:
    @workflow.run
    async def run(self, env_var: str) -> None:
        await workflow.execute_activity(connect_with_secret, env_var, start_to_close_timeout=timedelta(seconds=10),
                                        retry_policy=RetryPolicy(maximum_attempts=1))


async def test_activity_error_with_a_secret_is_scrubbed(client, monkeypatch):
    monkeypatch.setenv("EAGLE_DR_TEST_SCRUB_SECRET", SECRET)
    queue = f"scrub-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[LeakyWorkflow], activities=[connect_with_secret],
                      activity_executor=ThreadPoolExecutor(2),
                      workflow_runner=UnsandboxedWorkflowRunner(), interceptors=[ScrubSecrets()]):
        handle = await client.start_workflow(LeakyWorkflow.run, "EAGLE_DR_TEST_SCRUB_SECRET",
                                             id=f"test-scrub-{uuid.uuid4()}", task_queue=queue)
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    cause = e.value.cause.cause  # ActivityError -> ApplicationError
    assert cause.type == "RuntimeError"
    assert "cannot connect" in cause.message and "***" in cause.message
    history = await decrypted_json(handle)
    assert SECRET not in history
    assert "cannot connect" in history
