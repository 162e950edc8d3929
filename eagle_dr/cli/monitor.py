"""``eagle-dr monitor``: the always-on health monitor of the service (eagle_dr/monitor.py):
start (idempotent), stop, status, pause, resume."""

from __future__ import annotations

import asyncio
import json
import os
import time

import typer

from eagle_dr.cli import _client, _fail, _failed, app, cfg, out

monitor_app = typer.Typer(no_args_is_help=True, help="The always-on health monitor (MonitorWorkflow).")
app.add_typer(monitor_app, name="monitor")


def _run(coro_fn):
    try:
        return asyncio.run(coro_fn())
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        _failed(type(e).__name__, e)


def _who() -> str:
    return os.environ.get("USER", "operator")


@monitor_app.command("start")
def monitor_start():
    """Start the monitor from the config's health section; already running: says so, exit 0."""
    from eagle_dr.monitor import start_monitor

    c = cfg()

    async def run():
        handle, started = await start_monitor(await _client(c), c)
        return handle, started

    handle, started = _run(run)
    h = c.health
    what = "started" if started else "already running"
    out.print(f"monitor {what}: {handle.id} (every {h.interval.total_seconds():g}s, threshold {h.failure_threshold}, "
              f"auto failover {'on' if h.auto_failover else 'off'}) {c.temporal.ui_url}/namespaces/"
              f"{handle._client.namespace}/workflows/{handle.id}")


async def _signal_and_wait(c, signal: str, arg, done, what: str) -> str:
    """Signal the monitor, then poll its state until ``done(state)`` (bounded): a signal is
    durable even with the control worker down, so no answer in time is said, not failed."""
    from eagle_dr.monitor import monitor_id, monitor_view

    client = await _client(c)
    view = await monitor_view(client, c.service)
    if not view.running:
        _fail(f"the monitor is not running ({monitor_id(c.service)}): eagle-dr monitor start", 1)
    handle = client.get_workflow_handle(view.workflow_id, run_id=view.run_id)
    # The run id is not pinned for the signal: a continue-as-new between describe and signal
    # must not lose it.
    await client.get_workflow_handle(view.workflow_id).signal(signal, *([arg] if arg is not None else []))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        v = await monitor_view(client, c.service)
        if done(v):
            return f"monitor {what}: {v.line()}"
        await asyncio.sleep(0.3)
    return f"monitor {what} requested ({handle.id}); not confirmed yet: the control worker applies it when it runs"


@monitor_app.command("pause")
def monitor_pause(reason: str = typer.Option("", "--reason", help="Why (shown by status and in the UI).")):
    """Keep probing and reporting, but start no failover or split-brain resolution."""
    c = cfg()
    why = reason or f"paused by {_who()}"
    out.print(_run(lambda: _signal_and_wait(c, "pause", why, lambda v: v.status == "paused", "paused")))


@monitor_app.command("resume")
def monitor_resume():
    """Let the monitor act again (a primary still down is acted on at the next round)."""
    c = cfg()
    out.print(_run(lambda: _signal_and_wait(c, "resume", None, lambda v: v.status == "running", "resumed")))


@monitor_app.command("stop")
def monitor_stop(reason: str = typer.Option("", "--reason")):
    """End the monitor gracefully after its current round (`start` brings it back)."""
    c = cfg()
    why = reason or f"stopped by {_who()}"
    out.print(_run(lambda: _signal_and_wait(c, "stop", why, lambda v: not v.running, "stopped")))


@monitor_app.command("status")
def monitor_status(as_json: bool = typer.Option(False, "--json")):
    """Running or paused, what each vantage point saw of each region last round, findings.

    Exit 1 when the monitor is not running."""
    from eagle_dr.monitor import monitor_view

    c = cfg()

    async def run():
        return await monitor_view(await _client(c), c.service)

    v = _run(run)
    if as_json:
        out.print_json(json.dumps(v.model_dump(mode="json")))
    else:
        _render(v)
    if not v.running:
        raise typer.Exit(1)


def _render(v) -> None:
    from rich.markup import escape
    from rich.table import Table

    out.print(escape(v.line()))
    st = v.state
    if st is None:
        if v.error:
            out.print(f"[yellow]{escape(v.error)}[/]")
        return
    if st.last_round_at:
        out.print(f"round {st.rounds} at {st.last_round_at:%Y-%m-%d %H:%M:%S} UTC; automatic failovers started "
                  f"{st.failovers_started}" + (f"; cooldown until {st.cooldown_until:%Y-%m-%d %H:%M:%S} UTC"
                                               if st.cooldown_until else ""))
    regions = sorted({r for seen in st.probes.values() for r in seen})
    if regions:
        t = Table(title="last probe (vantage point -> region)", title_justify="left")
        t.add_column("vantage")
        for r in regions:
            t.add_column(r)
        colour = {"up": "green", "standby": "cyan", "read-only": "yellow", "down": "red", "no answer": "red"}
        for vantage, seen in st.probes.items():
            cells = []
            for r in regions:
                p = seen.get(r)
                if p is None:
                    cells.append("-")
                    continue
                ms = f" {p.seconds * 1000:.0f} ms" if p.seconds is not None else ""
                redis = "" if p.redis_up is None else (", redis up" if p.redis_up else ", [red]redis down[/]")
                cells.append(f"[{colour.get(p.verdict, 'white')}]{p.verdict}[/]{ms}{redis}")
            t.add_row(vantage, *cells)
        out.print(t)
    for f in st.findings[-10:]:
        out.print(f"  {escape(f)}")
