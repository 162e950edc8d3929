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


VALUE = f"row-{uuid.uuid4().hex}"
# The lab's connection string holds its password: by reference only, as the runbooks do.
_DSNS: dict[str, str] = {}


@activity.defn
def write_a_bad_row(args: list[str]) -> None:
    """What an apply meets on a production table: the server's own error escapes the activity."""
    import psycopg

    ref, kind = args
    with psycopg.connect(_DSNS[ref], autocommit=True) as conn:
        conn.execute("create temp table scrub_rows (id int primary key, email text unique not null, n int)")
        conn.execute("insert into scrub_rows values (1, %s, 1)", (VALUE,))
        if kind == "unique":  # DETAIL:  Key (email)=(...) already exists.
            conn.execute("insert into scrub_rows values (2, %s, 1)", (VALUE,))
        elif kind == "not-null":  # DETAIL:  Failing row contains (...).
            conn.execute("insert into scrub_rows values (3, null, %s)", (len(VALUE),))
        else:  # invalid input syntax for type integer: "..." / CONTEXT:  COPY scrub_rows, line 1, column n: "..."
            with conn.cursor().copy("copy scrub_rows from stdin") as copy:
                copy.write(f"4\t{VALUE}x\t{VALUE}\n")


@workflow.defn(sandboxed=False)
class BadRowWorkflow:
    @workflow.run
    async def run(self, args: list[str]) -> None:
        await workflow.execute_activity(write_a_bad_row, args, start_to_close_timeout=timedelta(seconds=20),
                                        retry_policy=RetryPolicy(maximum_attempts=1))


@pytest.mark.parametrize("kind", ["unique", "not-null", "copy"])
async def test_row_values_a_postgresql_error_quotes_never_reach_history(lab, client, kind):
    """A key that collides, a failing row, a COPY line or a value its type refuses: PostgreSQL
    quotes the row's values in its error, which an activity's failure writes to history (and the
    UI, and the step-failed page). They are withheld; what went wrong stays readable."""
    from tests.lab_helpers import _primary

    ref = uuid.uuid4().hex
    _DSNS[ref] = lab.cfg.region(_primary(lab)).postgres.dsn()
    queue = f"scrub-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[BadRowWorkflow], activities=[write_a_bad_row],
                      activity_executor=ThreadPoolExecutor(2),
                      workflow_runner=UnsandboxedWorkflowRunner(), interceptors=[ScrubSecrets()]):
        handle = await client.start_workflow(BadRowWorkflow.run, [ref, kind], id=f"test-scrub-rows-{uuid.uuid4()}",
                                             task_queue=queue)
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    cause = e.value.cause.cause
    said = {"unique": "duplicate key value violates unique constraint", "not-null": "violates not-null constraint",
            "copy": "invalid input syntax for type integer"}[kind]
    assert said in cause.message and "(row values withheld)" in cause.message, cause.message
    history = await decrypted_json(handle)
    assert VALUE not in history
    assert said in history
