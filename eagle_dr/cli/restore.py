"""``eagle-dr restore``: RestoreWorkflow's modes, one subcommand each, and ``release``.

Input is checked here first (exit 2 naming the option) so a typo never starts a run; what
only the repo can tell (a time before the oldest backup, say) comes back from the workflow as
InvalidInput and exits 2 too.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Optional

import typer
from pydantic import ValidationError

from eagle_dr.cli import EXIT_DEGRADED, _client, _fail, _failed, _plan_option, _region, _run_runbook, _ui_link, app, \
    cfg, out
from eagle_dr.cli.plan import show_plan

restore_app = typer.Typer(no_args_is_help=True, help="Restores from pgBackRest backups: a point-in-time copy, a "
                                                     "standby rebuilt from backup, rows recovered after corruption.")
app.add_typer(restore_app, name="restore")


def _time(option: str, value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        _fail(f"{option}: not a time: {value!r} (ISO 8601 with a zone, e.g. 2026-12-01T21:02:29+00:00)")
        raise
    if t.tzinfo is None:
        _fail(f"{option}: {value!r} has no time zone (add +00:00 or Z)")
    return t


def _minutes(option: str, value: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not m:
        _fail(f"{option}: expected a duration like 90s, 60m, 2h or 0, got {value!r}")
    n, unit = float(m.group(1)), m.group(2) or "m"
    return n * {"s": 1 / 60, "m": 1, "h": 60, "d": 24 * 60}[unit]


def _budget(value: str) -> float:
    """--timeout in seconds: the restore's whole budget, so at least a minute."""
    seconds = _minutes("--timeout", value) * 60
    if seconds < 60:
        _fail(f"--timeout: at least 60s (the restore and its replay), got {value!r}")
    return seconds


def _target(time: Optional[str], lsn: Optional[str], name: Optional[str], latest: bool, inclusive: bool = True):
    from activities.backup.restore import RestoreTarget

    given = [o for o, v in (("--time", time), ("--lsn", lsn), ("--name", name), ("--latest", latest)) if v]
    if name and lsn:
        given.remove("--lsn")  # with --name, where that restore point is: not a target of its own
    if len(given) != 1:
        _fail("give exactly one of --time, --lsn, --name or --latest" + (f" (got {', '.join(given)})" if given else ""))
    try:
        if time:
            return RestoreTarget(kind="time", time=_time("--time", time), inclusive=inclusive)
        if name:  # before --lsn: with --name, --lsn is where that restore point is
            return RestoreTarget(kind="name", name=name, lsn=lsn, inclusive=inclusive)
        if lsn:
            return RestoreTarget(kind="lsn", lsn=lsn, inclusive=inclusive)
    except ValidationError as e:
        _fail(f"{given[0]}: " + "; ".join(x["msg"] for x in e.errors()))
    return RestoreTarget()


def _input(**kw):
    from workflows.restore import RestoreInput

    try:
        return RestoreInput(**kw)
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in e.errors()))
        raise


async def _start(c, inp, kind: str):
    from workflows.restore import RestoreWorkflow

    client = await _client(c)
    handle = await client.start_workflow(RestoreWorkflow.run, inp, id=f"dr-restore-{c.service}-{kind}-"
                                         f"{uuid.uuid4().hex[:8]}", task_queue=c.temporal.control_task_queue,
                                         static_summary=f"restore ({inp.mode}) {c.service}")
    out.print(f"restore ({inp.mode}) started: {handle.id}\n  {_ui_link(c, handle)}")
    return handle


async def _follow(handle, stop=None):
    """Print each step as it starts and ends, and the approval gate, until the run ends or
    ``stop()`` returns something; returns (result or None, what stop returned)."""
    import asyncio

    from temporalio.client import WorkflowFailureError

    from workflows.models import Progress
    from workflows.restore import RestoreWorkflow

    seen: dict[int, str] = {}
    gate_shown = False
    result = asyncio.ensure_future(handle.result())

    async def show() -> None:
        nonlocal gate_shown
        try:
            p = await handle.query("progress", result_type=Progress)
        except Exception:  # noqa: BLE001 - not started yet, or just finished
            return
        for i, s in enumerate(p.steps):
            if seen.get(i) != s.status:
                seen[i] = s.status
                mark = {"done": "[green]done[/]", "failed": "[red]FAILED[/]", "cancelled": "[yellow]cancelled[/]",
                        "skipped": "skipped"}.get(s.status, "...")
                out.print(f"  {mark} {s.name}" + (f": {s.detail}" if s.detail and s.status != "running" else ""),
                          highlight=False)
        if p.awaiting_approval and not gate_shown:
            gate_shown = True
            try:
                review = await handle.query(RestoreWorkflow.review)
            except Exception:  # noqa: BLE001
                review = None
            if review is not None:
                for t in review.tables:
                    out.print(f"  would write to {t.table}: {t.inserted} inserted, {t.updated} updated, {t.deleted} "
                              f"deleted, {t.flagged} flagged, {t.kept} unchanged")
                    for s in t.sample:
                        out.print(f"    {s['key']}: {s['action']} ({s['reason']})", highlight=False)
            out.print(f"[bold yellow]AWAITING APPROVAL[/]: eagle-dr approve {handle.id} [--reject]")

    while not result.done():
        await show()
        if stop is not None:
            got = await stop()
            if got is not None:
                return None, got
        await asyncio.wait([result], timeout=0.5)
    await show()
    try:
        return result.result(), None
    except WorkflowFailureError as e:
        cause = e.cause
        message = getattr(cause, "message", None) or str(cause or e)
        # Input only the repo or the topology could judge: still bad input.
        _fail(f"restore refused: {message}" if getattr(cause, "type", None) == "InvalidInput"
              else f"restore failed: {message}", 2 if getattr(cause, "type", None) == "InvalidInput" else 1)
        raise


def _outcome(res) -> None:
    for d in res.degraded:
        out.print(f"  [yellow]degraded:[/] {d}")
    if res.outcome == "degraded":
        raise typer.Exit(EXIT_DEGRADED)


@restore_app.command("pitr")
def pitr(time: Optional[str] = typer.Option(None, "--time", help="Recover to this time (ISO 8601 with a zone)."),
         lsn: Optional[str] = typer.Option(
             None, "--lsn", help="Recover to this LSN (e.g. 0/1A2B3C4). With --name: where that restore point is "
                                 "(pg_create_restore_point's answer), so that the restore starts from a backup that "
                                 "ended before it."),
         name: Optional[str] = typer.Option(None, "--name", help="Recover to this restore point."),
         latest: bool = typer.Option(False, "--latest", help="Recover to the end of the archive."),
         repo: Optional[str] = typer.Option(None, "--repo", help="Whose bucket (default: the region's own)."),
         region: Optional[str] = typer.Option(None, "--region", help="Whose host runs the copy (default: the "
                                                                     "secondary's)."),
         keep: str = typer.Option("60m", "--keep", help="How long the copy stays up (90s, 60m, 2h; 0: report and "
                                                        "drop)."),
         port: Optional[int] = typer.Option(None, "--port", help="Port for the copy (default: the first free)."),
         timeout: str = typer.Option("60m", "--timeout", help="How long the restore and its replay may take "
                                                             "(90m, 6h): a big database needs more than an hour."),
         plan: bool = _plan_option()):
    """A point-in-time copy in a scratch instance: prints where it is and how to connect."""
    from workflows.restore import RestoreWorkflow

    c = cfg()
    target = _target(time, lsn, name, latest)
    inp = _input(mode="pitr", target=target, repo=_region(c, repo) if repo else None,
                 region=_region(c, region) if region else None, keep_minutes=_minutes("--keep", keep), port=port,
                 timeout_seconds=_budget(timeout))
    if plan:
        return show_plan(c, "restore", inp)

    async def run():
        handle = await _start(c, inp, "pitr")

        async def copy_up():
            try:
                return await handle.query(RestoreWorkflow.scratch)
            except Exception:  # noqa: BLE001
                return None

        res, scratch = await _follow(handle, copy_up if inp.keep_minutes > 0 else None)
        scratch = scratch or (res.scratch if res else None)
        if scratch is not None:
            at = scratch.recovered_to.isoformat() if scratch.recovered_to else "unknown"
            out.print(f"copy of {c.service} at {at}"
                      f" (backup {scratch.backup_label}, {scratch.repo_region}'s bucket) on {scratch.region}'s host: "
                      f"{scratch.directory}", highlight=False)
        if res is None:
            pg = c.region(scratch.region).postgres
            out.print(f"connect on that host: psql \"host={scratch.socket_dir} port={scratch.port} "
                      f"dbname={pg.database} user={pg.user}\"",
                      highlight=False)
            out.print(f"kept for {keep}; drop it sooner with: eagle-dr restore release {handle.id}")
            return
        out.print("the copy was dropped (--keep 0)")
        _outcome(res)

    _run_runbook("restore", run)


@restore_app.command("verify")
def verify(repo: Optional[str] = typer.Option(None, "--repo", help="Whose bucket (default: the region's own)."),
           region: Optional[str] = typer.Option(None, "--region", help="Whose host runs the copy (default: a region "
                                                                       "that is not the primary)."),
           plan: bool = _plan_option()):
    """Restore the newest backup, replay the archive, follow the primary, and compare every
    table with it key by key; the copy is dropped at the end. Exit 3 when it differs."""
    c = cfg()
    inp = _input(mode="verify", repo=_region(c, repo) if repo else None, region=_region(c, region) if region else None,
                 keep_minutes=0)
    if plan:
        return show_plan(c, "restore", inp)

    async def run():
        handle = await _start(c, inp, "verify")
        res, _ = await _follow(handle)
        chk = res.check
        if chk is not None:
            for t in chk.tables:
                d = t.diff
                out.print(f"  {t.table}: {t.rows_a} rows, {t.differences} differing keys (+{d.inserted} ~{d.updated} "
                          f"-{d.deleted})", highlight=False)
            out.print(f"backup {res.scratch.backup_label if res.scratch else '?'} restored, archive replayed to "
                      f"{res.following.archive_replayed_to if res.following else '?'}: "
                      + ("identical to the primary" if not chk.differences else f"{chk.differences} keys DIFFER"),
                      highlight=False)
        _outcome(res)

    _run_runbook("restore", run)


@restore_app.command("rebuild-standby")
def rebuild_standby(region: Optional[str] = typer.Option(None, "--region",
                                                         help="The region whose standby to rebuild (required)."),
                    repo: Optional[str] = typer.Option(None, "--repo",
                                                       help="Whose bucket (default: the region's own)."),
                    approval_timeout: float = typer.Option(900, "--approval-timeout", help="Seconds; then abort."),
                    timeout: str = typer.Option("60m", "--timeout", help="How long the restore and the catch-up "
                                                                         "may take (90m, 6h)."),
                    plan: bool = _plan_option()):
    """Replace REGION's standby with the newest backup and stream from the primary (asks for approval)."""
    from workflows.models import ApprovalPolicy

    c = cfg()
    if not region:
        # Checked here, not by typer: a missing option must exit 2 with one line, like the rest.
        _fail("--region: name the region whose standby to rebuild")
    inp = _input(mode="rebuild-standby", region=_region(c, region), repo=_region(c, repo) if repo else None,
                 approval=ApprovalPolicy(required=True, timeout_seconds=approval_timeout),
                 timeout_seconds=_budget(timeout))
    if plan:
        return show_plan(c, "restore", inp)

    async def run():
        handle = await _start(c, inp, "rebuild")
        res, _ = await _follow(handle)
        r = res.rebuilt
        out.print(f"{region} rebuilt from backup {r.backup_label} ({r.repo_region}'s bucket): streaming from "
                  f"{r.upstream}, replayed to {r.replay_lsn}")
        _outcome(res)

    _run_runbook("restore", run)


def _selections(tables: list[str], wheres: list[str], delete_missing: bool):
    from activities.backup.recover import RowSelection

    if not tables:
        _fail("--table: give at least one table to recover")
    if len(set(tables)) != len(tables):
        _fail("--table: a table is listed twice")
    preds: dict[str, str] = {}
    for w in wheres:
        head, sep, rest = w.partition("=")
        if sep and head.strip() in tables and rest.strip():
            table, pred = head.strip(), rest.strip()
        elif len(tables) == 1:
            table, pred = tables[0], w.strip()
        else:
            _fail(f"--where {w!r}: with several tables write TABLE=PREDICATE (tables: {', '.join(tables)})")
        if not pred:
            _fail("--where: empty predicate")
        if table in preds:
            _fail(f"--where: two predicates for {table} (combine them with AND / OR)")
        preds[table] = pred
    try:
        return [RowSelection(table=t, where=preds.get(t), delete_missing=delete_missing) for t in tables]
    except ValidationError as e:
        _fail("--table: " + "; ".join(x["msg"] for x in e.errors()))


@restore_app.command("recover-rows")
def recover_rows(before: Optional[str] = typer.Option(None, "--before", help="Restore to just before this time "
                                                                            "(ISO 8601 with a zone): before the "
                                                                            "corruption (required)."),
                 table: list[str] = typer.Option([], "--table", help="A table to copy back (repeat for more)."),
                 where: list[str] = typer.Option([], "--where", help="Which rows: an SQL predicate; with several "
                                                                     "tables TABLE=PREDICATE."),
                 delete_missing: bool = typer.Option(False, "--delete-missing",
                                                     help="Also delete selected rows the copy lacks (inserted "
                                                          "after --before)."),
                 repo: Optional[str] = typer.Option(None, "--repo", help="Whose bucket (default: the region's own)."),
                 region: Optional[str] = typer.Option(None, "--region", help="Whose host runs the copy."),
                 approval_timeout: float = typer.Option(900, "--approval-timeout", help="Seconds; then abort."),
                 plan: bool = _plan_option()):
    """Copy chosen rows from a copy restored to just before TIME back into the primary (reviewed, approved, audited)."""
    from activities.backup.restore import RestoreTarget
    from workflows.models import ApprovalPolicy

    c = cfg()
    if not before:
        _fail("--before: give the time just before the corruption (ISO 8601 with a zone)")
    selections = _selections(table, where, delete_missing)
    target = RestoreTarget(kind="time", time=_time("--before", before), inclusive=False)
    inp = _input(mode="recover-rows", target=target,
                 tables=selections, repo=_region(c, repo) if repo else None,
                 region=_region(c, region) if region else None,
                 approval=ApprovalPolicy(required=True, timeout_seconds=approval_timeout))
    if plan:
        return show_plan(c, "restore", inp)

    async def run():
        handle = await _start(c, inp, "rows")
        res, _ = await _follow(handle)
        for t in res.recovery.tables:
            out.print(f"{t.table}: {t.inserted} inserted, {t.updated} updated, {t.deleted} deleted, {t.flagged} "
                      f"flagged, {t.kept} unchanged; audit: eagle_dr.conflict_audit where workflow_id = '{handle.id}'")
        _outcome(res)

    _run_runbook("restore", run)


@restore_app.command("release")
def release(workflow_id: str = typer.Argument(..., help="The restore run whose scratch copy to drop now.")):
    """Drop a kept PITR copy now instead of at the end of --keep."""
    import asyncio

    c = cfg()

    async def run():
        from temporalio.client import WorkflowExecutionStatus

        from workflows.restore import RestoreWorkflow

        client = await _client(c)
        handle = client.get_workflow_handle(workflow_id)
        desc = await handle.describe()
        if desc.workflow_type != "RestoreWorkflow":
            _fail(f"{workflow_id} is a {desc.workflow_type}, not a restore")
        if desc.status != WorkflowExecutionStatus.RUNNING:
            _fail(f"{workflow_id} is not running ({desc.status.name.lower()}): its copy is already dropped", 1)
        await handle.signal(RestoreWorkflow.release)
        await handle.result()
        out.print(f"released: the copy of {workflow_id} is dropped")

    try:
        asyncio.run(run())
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001
        _failed("release failed", e)
