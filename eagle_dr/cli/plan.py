"""``--plan`` on every runbook command: run PlanWorkflow (workflows/dry_run.py) and print the plan.

Exit 0 when the runbook would proceed, 1 when its preflight would refuse (the reason printed),
2 for bad input: a script can ask "would this failover go through now?" without starting one.
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel

from eagle_dr.cli import EXIT_FAILED, _client, _fail, _run_runbook, out
from eagle_dr.config import EagleConfig


def plan_id(service: str, runbook: str) -> str:
    """Never the move id (dr-move-<service>): a plan neither waits for nor blocks a move."""
    return f"dr-plan-{service}-{runbook}-{uuid.uuid4().hex[:8]}"


def show_plan(c: EagleConfig, runbook: str, inp: BaseModel) -> None:
    from rich.table import Table
    from temporalio.client import WorkflowFailureError

    from workflows.dry_run import PlanInput, PlanWorkflow

    async def run():
        client = await _client(c)
        try:
            plan = await client.execute_workflow(
                PlanWorkflow.run, PlanInput(runbook=runbook, input=inp.model_dump(mode="json")),
                id=plan_id(c.service, runbook), task_queue=c.temporal.control_task_queue,
                static_summary=f"plan of {runbook} {c.service} (changes nothing)")
        except WorkflowFailureError as e:
            cause = e.cause
            if getattr(cause, "type", None) == "InvalidInput":
                _fail(f"plan refused: {getattr(cause, 'message', cause)}")
            raise
        out.print(f"[bold]PLAN[/] {runbook} {plan.service}"
                  + (f": {plan.source_region} -> {plan.target_region}" if plan.target_region else "")
                  + "  [dim](preflight ran read-only; nothing was changed)[/]", highlight=False)
        if plan.blocked:
            out.print(f"[bold red]WOULD REFUSE[/]: {plan.blocked}", highlight=False)
        rows = [("fence", plan.fence), ("promote", plan.promote)]
        if plan.lag_bytes is not None or plan.max_lag_bytes is not None:
            lag = "unknown" if plan.lag_bytes is None else f"{plan.lag_bytes} bytes"
            guard = "any (forced)" if plan.max_lag_bytes is None else f"{plan.max_lag_bytes} bytes"
            rows.append(("lag now", f"{lag} ({plan.lag_basis}); accepts up to {guard}"))
        rows += [("routing", "; ".join(plan.routing) or None), ("rewind", plan.rewind), ("reconcile", plan.reconcile)]
        for k, v in rows:
            if v:
                out.print(f"  [bold]{k}:[/] {v}", highlight=False)
        t = Table(show_header=True, header_style="bold")
        t.add_column("#", justify="right")
        t.add_column("would do")
        t.add_column("detail")
        for i, s in enumerate(plan.steps, 1):
            t.add_row(str(i), s.action, s.detail)
        out.print(t)
        for n in plan.notes:
            out.print(f"  [yellow]note:[/] {n}", highlight=False)
        if plan.blocked:
            _fail("the runbook would refuse now", EXIT_FAILED)

    _run_runbook(f"plan of {runbook}", run)
