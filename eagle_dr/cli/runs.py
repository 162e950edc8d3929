"""``eagle-dr runs``: the history of runbooks, and ``eagle-dr watch``: attach to one.

Both read Temporal itself (visibility and the runs' own results and queries), so they see
every run however it was started: by this CLI, from the UI's Start Workflow form or its API
(``temporal workflow start``), by a Schedule or by an alert.

``runs --json`` prints a list of objects, one per run, newest first. The schema is stable:
fields are only ever added.

    workflow_id, run_id       the run
    runbook                   DrRunbook (failover, switchover, failback, split-brain, drill, backup, ...)
    trigger                   DrTrigger (manual, automatic, drill, schedule, alert, ...) or null
    source_region, target_region
    status                    Temporal's: Running, Completed, Failed, Canceled, Terminated, TimedOut, ...
    outcome                   DrOutcome (succeeded, failed, degraded, cancelled, ...) or null while unknown
    started_at, closed_at     ISO 8601, UTC (closed_at null while running)
    rto_s, rto_target_s, rto_met        null when the run measured none (never 0 for unknown)
    rpo_wal_bytes, rpo_s, rpo_target_s, rpo_met, acknowledged_writes_lost
    approver                  who approved (or "drill (auto-approved)"), null when no approval was asked
    ui                        the run's page in the Temporal UI
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Optional

import typer
from rich.table import Table

from eagle_dr.cli import _client, _exit_for, _fail, _failed, _follow, _report, _ui_link, app, cfg, out
from eagle_dr.config import parse_duration

# The always-on services are not runbook runs: listed only when asked for by name.
_SERVICES = ("monitor", "alert-incident")


def _query(service: str, runbook: str | None, outcome: str | None, since: datetime | None,
           running: bool = False) -> str:
    def q(v: str) -> str:
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"

    parts = [f"DrService = {q(service)}"]
    if runbook:
        parts.append(f"DrRunbook = {q(runbook)}")
    else:
        parts.append("DrRunbook IS NOT NULL")
        parts += [f"DrRunbook != {q(s)}" for s in _SERVICES]
    if outcome:
        parts.append(f"DrOutcome = {q(outcome)}")
    if since:
        parts.append(f"StartTime > {q(since.isoformat().replace('+00:00', 'Z'))}")
    if running:
        parts.append("ExecutionStatus = 'Running'")
    return " AND ".join(parts)


def _measured(result) -> dict:
    """RTO/RPO/approver from a run's result, whichever runbook: a move carries them itself, a
    drill or failback in the move it made. Missing is None, never 0."""
    if not isinstance(result, dict):
        return {}
    move = next((m for m in (result, result.get("failover"), result.get("switchover"))
                 if isinstance(m, dict) and isinstance(m.get("rto"), dict)), None)
    row: dict = {}
    if move is not None:
        rto, rpo = move["rto"], move.get("rpo") or {}
        # A move whose routing failed never served: its steps' time is no RTO (unknown).
        row.update(rto_s=None if rto.get("serving_basis") else rto.get("total_s"), rto_target_s=rto.get("target_s"),
                   rto_met=rto.get("met"),
                   rpo_wal_bytes=rpo.get("lost_wal_bytes"), rpo_s=rpo.get("loss_window_s"),
                   rpo_target_s=rpo.get("target_s"), rpo_met=rpo.get("met"),
                   acknowledged_writes_lost=rpo.get("acknowledged_writes_lost"))
    approval = (result.get("approval") or (move or {}).get("approval")) if isinstance(result, dict) else None
    if isinstance(approval, dict):
        row["approver"] = approval.get("approver")
    return row


async def _rows(c, runbook: str | None, outcome: str | None, since: datetime | None, limit: int) -> list[dict]:
    from eagle_dr.temporal import DR_OUTCOME, DR_RUNBOOK, DR_SOURCE_REGION, DR_TARGET_REGION, DR_TRIGGER

    client = await _client(c)
    rows = []
    async for wf in client.list_workflows(_query(c.service, runbook, outcome, since), limit=limit):
        sa = wf.typed_search_attributes
        handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
        row = {"workflow_id": wf.id, "run_id": wf.run_id, "runbook": sa.get(DR_RUNBOOK), "trigger": sa.get(DR_TRIGGER),
               "source_region": sa.get(DR_SOURCE_REGION), "target_region": sa.get(DR_TARGET_REGION),
               "status": wf.status.name.title().replace("_", "") if wf.status else None,
               "outcome": sa.get(DR_OUTCOME),
               "started_at": wf.start_time.isoformat() if wf.start_time else None,
               "closed_at": wf.close_time.isoformat() if wf.close_time else None,
               "rto_s": None, "rto_target_s": None, "rto_met": None, "rpo_wal_bytes": None, "rpo_s": None,
               "rpo_target_s": None, "rpo_met": None, "acknowledged_writes_lost": None, "approver": None,
               "ui": _ui_link(c, handle)}
        if row["status"] == "Completed":
            try:
                row.update(_measured(await handle.result()))
            except Exception:  # noqa: BLE001 - a result this version cannot read: its figures stay unknown
                pass
        rows.append(row)
    return rows


def _fmt_s(v) -> str:
    return "unknown" if v is None else f"{v:.1f}s"


def _met(v) -> str:
    return "" if v is None else " [green]met[/]" if v else " [red]MISSED[/]"


@app.command()
def runs(runbook: Optional[str] = typer.Option(None, "--runbook", help="Only this runbook (failover, drill, ...)."),
         outcome: Optional[str] = typer.Option(None, "--outcome", help="Only this outcome (succeeded, failed, ...)."),
         since: str = typer.Option("7d", "--since", help="Started within this long (30m, 7d, ...)."),
         limit: int = typer.Option(50, "--limit", min=1, max=1000),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable (schema: eagle_dr/cli/runs.py).")):
    """Past and running runbooks, newest first: trigger, regions, outcome, RTO/RPO against target."""
    c = cfg()
    try:
        after = datetime.now(timezone.utc) - parse_duration(since)
    except ValueError as e:
        _fail(f"--since: {e}")
    try:
        rows = asyncio.run(_rows(c, runbook, outcome, after, limit))
    except Exception as e:  # noqa: BLE001
        _failed("runs", e)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    t = Table(title=f"{c.service}: runbooks since {after:%Y-%m-%d %H:%M} UTC", title_justify="left")
    for col in ("started (UTC)", "runbook", "trigger", "move", "outcome", "RTO", "RPO", "approver"):
        t.add_column(col)
    # Ids are what the next command needs (watch, report, approve): folded, never cut short.
    t.add_column("workflow", overflow="fold")
    for r in rows:
        outcome_ = r["outcome"] or r["status"]
        colour = "green" if outcome_ in ("succeeded", "resolved", "healthy") else \
            "yellow" if r["status"] == "Running" else "red"
        rpo = "unknown" if r["rpo_wal_bytes"] is None else f"{r['rpo_wal_bytes']} B WAL"
        t.add_row((r["started_at"] or "")[:19].replace("T", " "), r["runbook"] or "", r["trigger"] or "",
                  f"{r['source_region'] or '?'} -> {r['target_region']}" if r["target_region"] else "",
                  f"[{colour}]{outcome_}[/]", _fmt_s(r["rto_s"]) + _met(r["rto_met"]) if r["rto_target_s"] else "",
                  rpo + _met(r["rpo_met"]) if r["rto_target_s"] else "", r["approver"] or "", r["workflow_id"])
    out.print(t)
    if not rows:
        out.print("no runs (widen --since, or check --runbook/--outcome)")


async def _latest(client, c) -> str | None:
    async for wf in client.list_workflows(_query(c.service, None, None, None, running=True), limit=1):
        return wf.id
    return None


@app.command()
def watch(workflow_id: str = typer.Argument(..., help="A workflow id, or 'latest' (the newest running runbook).")):
    """Attach to a runbook however it was started: its live steps, the approval command when it
    waits for one, and its report."""
    from workflows.models import RunbookResult

    c = cfg()

    async def run():
        client = await _client(c)
        wid = workflow_id
        if wid == "latest":
            wid = await _latest(client, c)
            if wid is None:
                _fail("no runbook is running (eagle-dr runs shows past ones)", 1)
        handle = client.get_workflow_handle(wid)
        out.print(f"watching {wid}: {_ui_link(c, handle)}")
        return await _follow(handle, c)

    try:
        result = asyncio.run(run())
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001
        _failed(f"watch {workflow_id}", e)
    if isinstance(result, dict) and isinstance(result.get("rto"), dict):
        r = RunbookResult.model_validate(result)
        _report(r)
        _exit_for(r.runbook, r.outcome, r.steps)
        return
    outcome = result.get("outcome") if isinstance(result, dict) else None
    out.print(f"finished: {outcome or 'completed'}")
    if outcome in ("failed", "degraded", "cancelled"):
        _exit_for(workflow_id, outcome, result.get("steps") or [])
