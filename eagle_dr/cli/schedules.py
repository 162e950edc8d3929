"""``eagle-dr schedules``: the Temporal Schedules behind backups, Redis snapshots, expiry and
restore drills (schedules/): apply the config, list, pause, unpause, trigger."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Optional

import typer
from rich.table import Table

from eagle_dr.cli import _client, _fail, _failed, app, cfg, out

schedules_app = typer.Typer(no_args_is_help=True, help="Temporal Schedules: backups, Redis snapshots, expiry, drills.")
app.add_typer(schedules_app, name="schedules")


def _run(coro_fn):
    from schedules.control import UnknownSchedule

    try:
        return asyncio.run(coro_fn())
    except UnknownSchedule as e:
        _fail(f"no schedule {e.args[0]!r} (see `eagle-dr schedules list`)")
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        _failed(type(e).__name__, e)


async def apply_from_config(c, paused: Optional[bool] = None):
    from schedules.apply import apply

    return await apply(await _client(c), c, paused=paused)


def print_report(r) -> None:
    for what, ids in (("created", r.created), ("updated", r.updated), ("unchanged", r.unchanged),
                      ("deleted", r.deleted)):
        if ids:
            out.print(f"{what}: {', '.join(ids)}")
    if r.monitor:
        out.print(f"monitor: {r.monitor}")


@schedules_app.command("apply")
def schedules_apply(paused: Optional[bool] = typer.Option(
        None, "--paused/--active", help="Create new schedules paused (default: backup.schedules.paused). "
                                        "Existing schedules keep their paused state.")):
    """Create, update or delete schedules to match the config (idempotent)."""
    c = cfg()
    print_report(_run(lambda: apply_from_config(c, paused)))


def _when(t) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}" if t else "-"


@schedules_app.command("list")
def schedules_list(as_json: bool = typer.Option(False, "--json")):
    """Each schedule: action, spec, paused, last and next run, last outcome."""
    from schedules.control import rows

    c = cfg()

    async def run():
        return await rows(await _client(c), c)

    rs = _run(run)
    if as_json:
        out.print_json(json.dumps([r.model_dump(mode="json") for r in rs]))
        return
    t = Table("id", "action", "spec", "paused", "last run (UTC)", "last outcome", "next run (UTC)")
    for r in rs:
        t.add_row(r.id, r.action, r.spec, "[yellow]paused[/]" if r.paused else "no", _when(r.last_run),
                  r.last_outcome or "-", "-" if r.paused else _when(r.next_run))
    out.print(t)


def _note(verb: str, note: str) -> str:
    return note or f"{verb} by {os.environ.get('USER', 'operator')} with eagle-dr"


@schedules_app.command("pause")
def schedules_pause(name: str = typer.Argument(..., help="Schedule id or short name (e.g. backup-incr)."),
                    note: str = typer.Option("", "--note", help="Why (shown in the UI).")):
    """Stop a schedule from taking actions (until unpaused; `apply` keeps it paused)."""
    from schedules.control import pause

    c = cfg()
    sid = _run(lambda: _with_client(c, lambda cl: pause(cl, c, name, _note("paused", note))))
    out.print(f"paused {sid}")


@schedules_app.command("unpause")
def schedules_unpause(name: str = typer.Argument(...), note: str = typer.Option("", "--note")):
    from schedules.control import unpause

    c = cfg()
    sid = _run(lambda: _with_client(c, lambda cl: unpause(cl, c, name, _note("unpaused", note))))
    out.print(f"unpaused {sid}")


@schedules_app.command("trigger")
def schedules_trigger(name: str = typer.Argument(...),
                      allow_overlap: bool = typer.Option(False, "--allow-overlap",
                                                         help="Start even while a run is in flight.")):
    """Run a schedule's action once now, paused or not."""
    from schedules.control import trigger

    c = cfg()
    sid = _run(lambda: _with_client(c, lambda cl: trigger(cl, c, name, allow_overlap)))
    out.print(f"triggered {sid}")


async def _with_client(c, fn):
    return await fn(await _client(c))
