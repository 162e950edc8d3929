"""``eagle-dr sync``: repair what a consistency check found (DataSyncWorkflow), steps live."""

from __future__ import annotations

import uuid

import typer

from eagle_dr.cli import _run_runbook, _start_and_follow, app, cfg, out


@app.command("sync")
def sync(check: str = typer.Option(..., "--check", help="The consistency check's workflow id (eagle-dr check "
                                                        "prints it) whose differences to repair."),
         approval: bool = typer.Option(True, "--require-approval/--no-approval",
                                       help="Wait for an approval showing the counts and a sample (default)."),
         max_keys: int = typer.Option(20_000, "--max-keys", min=1, max=20_000,
                                      help="Refuse a table with more differing keys than this.")):
    """Re-copy the primary's version of each differing key to B (a copy database or a writable
    region), or rebuild B when it is a physical standby; then check again. Exit 0: the follow-up
    check is clean; 3: differences remain; 1: failed or rejected."""
    from workflows.data_sync import DataSyncWorkflow

    c = cfg()
    inp = {"check_workflow_id": check, "approval": {"required": approval}, "max_keys": max_keys, "trigger": "cli"}

    async def run():
        await _start_and_follow(c, "data sync", DataSyncWorkflow.run, inp,
                                f"dr-sync-{c.service}-{uuid.uuid4().hex[:8]}", report)

    _run_runbook("data sync", run)


def report(r) -> None:
    out.print(f"[bold]data sync[/] {r.service}: {r.region_a} -> {r.region_b}"
              + (f" (database {r.database_b})" if r.database_b else "") + f", path {r.path}: {r.why}",
              highlight=False)
    for s in r.synced:
        out.print(f"  {s.table}: {s.keys} keys, {s.inserted} inserted, {s.updated} updated, {s.deleted} deleted, "
                  f"{s.flagged} flagged, {s.audit_rows} audit rows (eagle_dr.conflict_audit on B)", highlight=False)
    if r.rebuilt is not None:
        out.print(f"  rebuilt {r.region_b}'s standby: {r.rebuilt.outcome}", highlight=False)
    if r.remaining is not None:
        out.print(f"  follow-up check {r.verify_workflow_id}: {r.remaining} differences", highlight=False)
