"""``eagle-dr backup``: take a backup now, list what the repos hold."""

from __future__ import annotations

import uuid
from typing import Optional

import typer

from eagle_dr.cli import _client, _fail, _run_runbook, app, cfg, out

backup_app = typer.Typer(no_args_is_help=True, help="pgBackRest backups: take one, list them.")
app.add_typer(backup_app, name="backup")


@backup_app.command("now")
def backup_now(type_: str = typer.Option("incr", "--type", help="full, diff or incr."),
               repo: Optional[list[str]] = typer.Option(None, "--repo", help="Region whose bucket (default: all)."),
               source: str = typer.Option("auto", "--source", help="auto (the standby if it streams), primary, standby.")):
    """Take a backup now through BackupWorkflow and print what it recorded."""
    from workflows.backup import BackupInput, BackupWorkflow

    c = cfg()
    if type_ not in ("full", "diff", "incr"):
        _fail(f"--type: expected full, diff or incr, got {type_!r}")

    async def run():
        client = await _client(c)
        res = await client.execute_workflow(
            BackupWorkflow.run, BackupInput(type=type_, repos=repo or [], source=source, trigger="cli"),
            id=f"dr-backup-{c.service}-{uuid.uuid4().hex[:8]}", task_queue=c.temporal.control_task_queue)
        for b in res.backups:
            out.print(f"{b.repo_region}: {b.type} {b.label}  WAL {b.wal_start}..{b.wal_stop}  "
                      f"{b.repo_size or 0} bytes in the repo, {b.duration_seconds:.0f} s")
        for r, why in res.failed.items():
            out.print(f"[red]{r}: FAILED[/red] {why}")
        # Exit codes as for the runbooks: 3 done but degraded (a repo got no backup).
        raise typer.Exit(0 if res.outcome == "succeeded" else 3)

    _run_runbook("backup", run)
