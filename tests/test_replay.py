"""Replay every recorded history against today's workflow code."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.histories import recorded, workflow_id
from workers.registry import WORKFLOWS
from workers.run import sandbox_runner

HISTORIES = recorded()


def test_every_workflow_has_a_recorded_history():
    names = {p.stem.split("-")[0] for p in HISTORIES}
    for wf in WORKFLOWS:
        assert any(wf.__name__.removesuffix("Workflow").lower() in n.replace("_", "") for n in names), \
            f"no recorded history for {wf.__name__} in tests/histories/"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path):
    replayer = Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter, workflow_runner=sandbox_runner())
    await replayer.replay_workflow(WorkflowHistory.from_json(workflow_id(path), path.read_text()))
