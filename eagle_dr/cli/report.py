"""``eagle-dr report``: the evidence of one runbook or drill run, from its Temporal history."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from eagle_dr.cli import _client, _fail, app, cfg, out
from eagle_dr.config import EagleConfig


async def fetch_report(client, c: EagleConfig, workflow_id: str, run_id: str | None = None):
    """The RunReport of a run: its history, the histories of the runbooks it started (for what
    only they hold, such as the clients' write gap by time) and, while it runs, its step list."""
    from eagle_dr.report.extract import RunEvents, build

    from eagle_dr.codec import decode_in_place

    codec = client.data_converter.payload_codec
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    history = await handle.fetch_history()
    await decode_in_place(codec, history.events)
    ev = RunEvents(history)
    children = {}
    for child in ev.children.values():
        if child["run_id"]:
            try:
                children[child["run_id"]] = await client.get_workflow_handle(
                    child["workflow_id"], run_id=child["run_id"]).fetch_history()
                await decode_in_place(codec, children[child["run_id"]].events)
            except Exception:  # noqa: BLE001 - a child past retention: its figures stay in the parent's result
                pass
    progress = None
    if ev.status == "running":
        try:
            progress = await handle.query("progress")
        except Exception:  # noqa: BLE001 - not a runbook (no progress query), or no worker: history bars
            progress = None
        if progress is not None and not isinstance(progress, dict):
            progress = progress.model_dump(mode="json") if hasattr(progress, "model_dump") else None
    return build(history, progress=progress, ui_url=c.temporal.ui_url, namespace=client.namespace,
                 children=children)


def write_html(report, path: str | Path) -> Path:
    from eagle_dr.report.html import render

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render(report), encoding="utf-8")
    return p


@app.command()
def report(workflow_id: str = typer.Argument(..., help="The run's workflow id (e.g. dr-drill-eagle-alert)."),
           html: Optional[str] = typer.Option(None, "--html", help="Write a self-contained HTML report to FILE."),
           run_id: Optional[str] = typer.Option(None, "--run-id", help="A given run (default: the latest).")):
    """The evidence of a runbook or drill run: timeline, RTO phases, RPO, approvals, conflicts, UI links.

    Without --html prints a text summary. A running workflow gives a partial report marked running."""
    import asyncio

    from temporalio.service import RPCError, RPCStatusCode

    from eagle_dr.report.text import render

    c = cfg()

    async def run():
        client = await _client(c)
        return await fetch_report(client, c, workflow_id, run_id)

    try:
        r = asyncio.run(run())
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            _fail(f"no such workflow: {workflow_id}" + (f" run {run_id}" if run_id else ""), 1)
        _fail(f"Temporal: {e.message}", 1)
        return
    if html:
        p = write_html(r, html)
        out.print(f"HTML report of {r.workflow_id} ({r.status}): {p}", highlight=False)
    else:
        out.print(render(r), highlight=False, markup=False)
