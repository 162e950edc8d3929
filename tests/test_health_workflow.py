"""HealthCheckWorkflow input validation, on the time-skipping test server.

(The dead-region path needs real schedule-to-start timeouts, which the Java test server
does not skip; it is covered on the dev server in test_lab.py.)"""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from eagle_dr.temporal import SEARCH_ATTRIBUTES, find_bin
from workers.run import sandbox_runner
from workflows.health import HealthCheckWorkflow


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def ts_env():
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_bin("temporal-test-server"), data_converter=pydantic_data_converter)
    # The Java test server knows no custom search attributes until told.
    await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace="default", search_attributes={k.name: IndexedValueType.ValueType(int(k.indexed_value_type))
                                                for k in SEARCH_ATTRIBUTES}))
    yield env
    await env.shutdown()


@pytest.mark.parametrize("raw, field, reason", [
    ({"regions": []}, "regions", "at least one region is required"),
    ({}, "regions", "Field required"),
    ({"regions": [{"name": "us-east-1"}]}, "regions.0.task_queue", "Field required"),
    ({"regions": [{"name": "a", "task_queue": "q"}], "probe_timeout_seconds": -1}, "probe_timeout_seconds",
     "greater than 0"),
    ({"regions": [{"name": "a", "task_queue": "q"}], "colour": "red"}, "colour", "unknown field"),
    ("us-east-1", "(input)", "expected a JSON object"),
])
async def test_bad_input_fails_at_once_naming_the_field(ts_env, raw, field, reason):
    async with Worker(ts_env.client, task_queue="control-bad", workflows=[HealthCheckWorkflow],
                      workflow_runner=sandbox_runner()):
        with pytest.raises(WorkflowFailureError) as e:
            await ts_env.client.execute_workflow("HealthCheckWorkflow", raw, id=str(uuid.uuid4()),
                                                 task_queue="control-bad")
    cause = e.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.non_retryable and cause.type == "InvalidInput"
    assert field in cause.message and reason in cause.message
