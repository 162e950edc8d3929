"""Starting runbooks the way every entry point must: one move per service at a time,
a static summary and details for the UI, search attributes from the first event."""

from __future__ import annotations

from temporalio.client import Client, WorkflowHandle
from temporalio.common import TypedSearchAttributes, SearchAttributePair, WorkflowIDConflictPolicy, \
    WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from eagle_dr.config import EagleConfig
from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_TARGET_REGION, DR_TRIGGER
from workflows.drill import DrillInput, DrillWorkflow
from workflows.runbook import move_id
from workflows.failover import FailoverWorkflow
from workflows.models import FailoverInput, MoveInput, SwitchoverInput
from workflows.switchover import SwitchoverWorkflow


class AlreadyInProgress(RuntimeError):
    def __init__(self, workflow_id: str, run_id: str | None):
        super().__init__(f"already in progress: {workflow_id}" + (f" (run {run_id})" if run_id else ""))
        self.workflow_id = workflow_id
        self.run_id = run_id


def _details(runbook: str, inp: MoveInput) -> str:
    lines = [f"**{runbook}** of `{inp.service}` to **{inp.target_region}**", "",
             f"- trigger: {inp.trigger.value}", f"- reason: {inp.reason or '(none given)'}",
             f"- approval: {'required' if inp.approval.required else 'not required'}"]
    if isinstance(inp, FailoverInput):
        lines.append(f"- max lag: {inp.max_lag_bytes} bytes" + (" (FORCED past it)" if inp.force else ""))
    return "\n".join(lines)


async def start_move(client: Client, cfg: EagleConfig, inp: MoveInput) -> WorkflowHandle:
    runbook = "failover" if isinstance(inp, FailoverInput) else "switchover"
    wf = FailoverWorkflow.run if isinstance(inp, FailoverInput) else SwitchoverWorkflow.run
    wid = move_id(inp.service)
    try:
        return await client.start_workflow(
            wf, inp, id=wid, task_queue=cfg.temporal.control_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"{runbook} {inp.service} -> {inp.target_region} ({inp.trigger.value})",
            static_details=_details(runbook, inp),
            search_attributes=TypedSearchAttributes([
                SearchAttributePair(DR_RUNBOOK, runbook), SearchAttributePair(DR_SERVICE, inp.service),
                SearchAttributePair(DR_TARGET_REGION, inp.target_region),
                SearchAttributePair(DR_TRIGGER, inp.trigger.value)]))
    except WorkflowAlreadyStartedError as e:
        raise AlreadyInProgress(wid, getattr(e, "run_id", None)) from None


async def start_drill(client: Client, cfg: EagleConfig, inp: DrillInput) -> WorkflowHandle:
    wid = f"dr-drill-{inp.service}"
    try:
        return await client.start_workflow(
            DrillWorkflow.run, inp, id=wid, task_queue=cfg.temporal.control_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"DR drill of {inp.service}: switchover, outage, failover",
            static_details="Planned switchover to the secondary, a real kill -9 of that region, detection by "
                           "health probes, and an unplanned failover back. Approvals are auto-granted.",
            search_attributes=TypedSearchAttributes([SearchAttributePair(DR_RUNBOOK, "drill"),
                                                     SearchAttributePair(DR_SERVICE, inp.service),
                                                     SearchAttributePair(DR_TRIGGER, "drill")]))
    except WorkflowAlreadyStartedError as e:
        raise AlreadyInProgress(wid, getattr(e, "run_id", None)) from None


__all__ = ["AlreadyInProgress", "start_move", "start_drill", "SwitchoverInput", "FailoverInput"]
