"""Runbook input that must fail up front, naming the field, through real workflow starts on
the lab's dev server and workers: nothing is fenced, promoted or numbered before the refusal.

Each case is chosen so that today's code would do something visibly different (run on, or
end as "no split brain"), and none can move the primary even if the guard were missing
where the runbook stops anyway (approval that times out and aborts, a split-brain
detection that finds none).
"""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.postgres.epoch import read_epoch
from tests.lab_helpers import _names, _primary

# An approval that nobody answers: a run that got past validation aborts after 1 s, unmoved.
ABORTING = {"required": True, "timeout_seconds": 1, "default_action": "abort"}


async def _refused(client, lab, wf: str, raw) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow(wf, raw, id=f"test-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    cause = e.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.non_retryable
    return cause


def _epochs(lab) -> dict[str, int]:
    return {r.name: read_epoch(r.postgres, lab.cfg.service).epoch for r in lab.cfg.regions}


@pytest.mark.parametrize("wf, raw, field, reason", [
    # Item 14: a naive time is refused before anything happens (it used to fail a workflow
    # task forever after fence and promote).
    ("FailoverWorkflow", {"target_region": "{b}", "detected_at": "2024-05-01T12:00:00", "approval": ABORTING},
     "detected_at", "must include a timezone"),
    ("SwitchoverWorkflow", {"target_region": "{b}", "detected_at": "2024-05-01 12:00:00", "approval": ABORTING},
     "detected_at", "must include a timezone"),
    ("SplitBrainWorkflow", {"detected_at": "2024-05-01T12:00:00"}, "detected_at", "must include a timezone"),
    # Item 16: auto_approve_as from a plain input would approve in anyone's name.
    ("FailoverWorkflow", {"target_region": "{b}", "approval": {"required": True, "auto_approve_as": "mallory"}},
     "approval.auto_approve_as", "only for drills"),
    ("SplitBrainWorkflow", {"approval": {"required": True, "auto_approve_as": "mallory"}},
     "approval.auto_approve_as", "only for drills"),
    ("FailbackWorkflow", {"region": "{b}", "switch_back": False, "reconcile_approval": {"required": True, "auto_approve_as": "mallory"}},
     "reconcile_approval.auto_approve_as", "only for drills"),
    # Item 9: a service that is not configured.
    ("FailoverWorkflow", {"service": "eagle-alret", "target_region": "{b}", "approval": ABORTING},
     "service", "unknown service 'eagle-alret'"),
    ("SplitBrainWorkflow", {"service": "eagle-alret"}, "service", "unknown service 'eagle-alret'"),
    ("FailbackWorkflow", {"service": "eagle-alret", "region": "{b}", "switch_back": False}, "service", "unknown service 'eagle-alret'"),
    ("MonitorWorkflow", {"service": "eagle-alret"}, "service", "unknown service 'eagle-alret'"),
])
async def test_bad_input_is_refused_up_front(lab, client, wf, raw, field, reason):
    a, b = _names(lab)
    raw = {k: (b if v == "{b}" else v) for k, v in raw.items()}
    before = _epochs(lab)
    err = await _refused(client, lab, wf, raw)
    assert err.type == "InvalidInput", err.message
    assert f"invalid input: {field}: " in err.message and reason in err.message, err.message
    assert _primary(lab) == a
    assert _epochs(lab) == before


async def test_drill_trigger_may_auto_approve(lab, client):
    """trigger=drill keeps auto-approval (what DrillWorkflow's children send): the run gets past
    the check and stops on the next guard instead (the target is already the primary)."""
    a, _ = _names(lab)
    err = await _refused(client, lab, "FailoverWorkflow", {
        "target_region": a, "trigger": "drill", "approval": {"required": True, "auto_approve_as": "drill"}})
    assert err.type == "InvalidInput" and "target_region" in err.message and "already the primary" in err.message


async def test_aware_detected_at_is_accepted(lab, client):
    """The same times with a zone get past validation (to the approval gate, which aborts)."""
    a, b = _names(lab)
    for when in ("2024-05-01T12:00:00Z", "2024-05-01T14:00:00+02:00"):
        err = await _refused(client, lab, "FailoverWorkflow",
                             {"target_region": b, "detected_at": when, "approval": ABORTING})
        assert err.type == "Aborted" and "timed-out-abort" in err.message, err.message
    assert _primary(lab) == a
