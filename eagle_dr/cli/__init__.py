"""The ``eagle-dr`` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from eagle_dr.config import ConfigError, EagleConfig, UnknownRegion, load_config

app = typer.Typer(no_args_is_help=True, add_completion=True,
                  help="Cross-region disaster recovery for the Eagle Alert System, on Temporal.")
config_app = typer.Typer(no_args_is_help=True, help="Validate the region configuration.")
dev_app = typer.Typer(no_args_is_help=True, help="The local Temporal dev server.")
lab_app = typer.Typer(no_args_is_help=True, help="The local two-region lab.")
sa_app = typer.Typer(no_args_is_help=True, help="eagle-dr's custom search attributes.")
app.add_typer(config_app, name="config")
app.add_typer(dev_app, name="dev-server")
app.add_typer(lab_app, name="lab")
app.add_typer(sa_app, name="search-attributes")

out = Console()
err = Console(stderr=True)


class _State:
    config_path: str | None = None
    debug: bool = False


state = _State()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"eagle-dr {version('eagle-dr')}", highlight=False)
        except PackageNotFoundError:
            out.print("eagle-dr (not installed as a package)", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(config: Optional[str] = typer.Option(None, "--config", "-c", envvar="EAGLE_DR_CONFIG",
                                                help="Region config file (default: config/eagle-dr.yaml)."),
          debug: bool = typer.Option(False, "--debug", envvar="EAGLE_DR_DEBUG",
                                     help="Show the full trace when a dependency is down."),
          _v: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                  help="Print the version and exit.")):
    state.config_path = config
    state.debug = debug
    if config:
        # Processes started from here (the lab's workers, a healed region's worker started by
        # a runbook) must read the same file.
        os.environ["EAGLE_DR_CONFIG"] = os.path.abspath(config)


def _fail(message: str, code: int = 2) -> None:
    # One line, whatever the driver's text (libpq puts its hint on a second, tab-indented one).
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _failed(what: str, e: Exception) -> None:
    """A command that failed, as one line and exit code 1. A dependency that is down is named
    with its address and the likely fix (eagle_dr/cli/errors.py); --debug raises the trace."""
    if state.debug:
        raise e
    from eagle_dr.cli.errors import explain

    why = explain(e, state.config_path)
    if why is None:
        cause = getattr(e, "cause", None)
        why = f"{what}: {getattr(cause, 'message', None) or cause or getattr(e, 'message', None) or e}"
    _fail(escape(why), 1)


def cfg() -> EagleConfig:
    try:
        return load_config(state.config_path)
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable


def _region(c: EagleConfig, name: str) -> str:
    try:
        return c.region(name).name
    except UnknownRegion as e:
        _fail(str(e))
        raise


# -- config -----------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate(file: Optional[str] = typer.Argument(None, help="File to check (default: --config).")):
    """Check a config file; exit 2 with every problem named by field path."""
    try:
        c = load_config(file or state.config_path)
    except ConfigError as e:
        _fail(str(e))
        return
    out.print(f"[green]ok[/]: {file or state.config_path or 'config/eagle-dr.yaml'}: service {c.service}, "
              f"primary {c.primary.name}, secondary {c.secondary.name}")


# -- Temporal dev server ------------------------------------------------------------------------


@dev_app.command("up")
def dev_up():
    """Start the dev server (idempotent)."""
    from eagle_dr.devserver import DevServer

    st = DevServer(cfg()).up()
    out.print(f"Temporal dev server pid {st.pid} on {st.address}, UI {st.ui_url}, history in {st.db_file}")


@dev_app.command("down")
def dev_down():
    from eagle_dr.devserver import DevServer

    out.print("stopped" if DevServer(cfg()).down() else "not running")


@dev_app.command("status")
def dev_status(as_json: bool = typer.Option(False, "--json")):
    from eagle_dr.devserver import DevServer, status_dict

    st = DevServer(cfg()).status()
    if as_json:
        out.print_json(json.dumps(status_dict(st)))
    else:
        out.print(f"{'running' if st.running else 'stopped'}: {st.address} UI {st.ui_url} pid {st.pid or '-'}")
    if not st.running:
        raise typer.Exit(1)


@sa_app.command("ensure")
def sa_ensure():
    """Register eagle-dr's search attributes on the configured Temporal namespace."""
    import asyncio

    from eagle_dr.devserver import ensure_search_attributes
    from eagle_dr.temporal import connect

    c = cfg()

    async def run():
        client = await connect(f"127.0.0.1:{c.lab.dev_server.grpc_port}", config=c)
        return await ensure_search_attributes(client)

    added = asyncio.run(run())
    out.print(f"added: {', '.join(added)}" if added else "all search attributes present")


# -- lab --------------------------------------------------------------------------------------


def _lab():
    from lab.lab import Lab

    return Lab(cfg(), state.config_path)


@lab_app.command("up")
def lab_up(app_traffic: bool = typer.Option(True, "--app/--no-app", help="Start the sample app's traffic.")):
    """Dev server, PostgreSQL A->B, Redis + Sentinels, S3, workers, sample app."""
    from eagle_dr.devserver import DevServer
    from lab.processes import wait_for

    lab = _lab()
    with out.status("Temporal dev server"):
        ds = DevServer(lab.cfg).up()
    with out.status("PostgreSQL, Redis, Sentinels, S3"):
        lab.up_servers()
        lab.wait_replication()
    with out.status("workers"):
        lab.start_workers()
        # The UI (--ui-codec-endpoint) decrypts payloads through it.
        lab.start_codec_server()
        from eagle_dr.status import collect

        wait_for(lambda: all(w.polling for w in collect(lab.cfg).workers), 60, "every worker to poll", 1)
    with out.status("schedules"):
        # After the workers: a catch-up run must find someone to run it. In the lab they run
        # as in production (the drill shows a backup following a failover); the test suite
        # never runs `lab up`, so they cannot fire in the middle of `make test`.
        import asyncio

        from eagle_dr.cli.schedules import apply_from_config, print_report

        # apply also starts the always-on monitor (schedules/apply.py): one place for both.
        print_report(asyncio.run(apply_from_config(lab.cfg)))
    with out.status("alerts receiver and Alertmanager"):
        # Alerts in: Alertmanager -> eagle-dr alerts serve -> an incident workflow per rule and group.
        lab.start_receiver()
        lab.start_alertmanager()
    if app_traffic:
        lab.start_app()
    out.print(f"[green]lab up[/] in {lab.state}; Temporal UI {ds.ui_url}")
    # What came up, at a glance (lab up's own exit code says whether it came up, not the verdict).
    _show_status(lab.cfg)


@lab_app.command("down")
def lab_down(keep_temporal: bool = typer.Option(False, "--keep-temporal")):
    """Stop every lab process (data stays in the state directory)."""
    from eagle_dr.devserver import DevServer

    lab = _lab()
    stopped = lab.down()
    if not keep_temporal and DevServer(lab.cfg).down():
        stopped.append("temporal")
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@lab_app.command("reset")
def lab_reset():
    """Stop the lab and discard its data (Temporal history is kept)."""
    _lab().reset()
    out.print("lab reset: the next `eagle-dr lab up` starts from a fresh primary and standby")


@lab_app.command("status")
def lab_status(as_json: bool = typer.Option(False, "--json")):
    """Which lab processes run."""
    from dataclasses import asdict

    st = _lab().status()
    if as_json:
        out.print_json(json.dumps(asdict(st)))
        return
    for p in st.processes:
        out.print(f"{p.name:12} {p.region:10} {'[green]running[/]' if p.running else '[red]stopped[/]'} {p.pid or ''}")


@lab_app.command("kill-region")
def lab_kill(region: str):
    """kill -9 the region's PostgreSQL, Redis, its Sentinel and its worker (a real outage)."""
    lab = _lab()
    killed = lab.kill_region(_region(lab.cfg, region))
    out.print(f"killed in {region}: {', '.join(killed) or 'nothing was running'}")


@lab_app.command("heal-region")
def lab_heal(region: str):
    """Restart what kill-region stopped, without repairing replication."""
    lab = _lab()
    started = lab.heal_region(_region(lab.cfg, region))
    out.print(f"restarted in {region}: {', '.join(started) or 'nothing was down'}")


@lab_app.command("rebuild-standby")
def lab_rebuild(region: str):
    """Throw REGION's data away and re-clone it as a standby of the current primary (lab only)."""
    lab = _lab()
    source = lab.rebuild_standby(_region(lab.cfg, region))
    out.print(f"{region} rebuilt as a standby of {source}")


# -- workers and status -----------------------------------------------------------------------------


@app.command()
def worker(region: Optional[str] = typer.Option(None, "--region", help="Poll this region's task queue."),
           control: bool = typer.Option(False, "--control", help="Run the runbooks (workflows)."),
           pidfile: Optional[str] = typer.Option(None, "--pidfile")):
    """Run a regional worker or the control worker until SIGTERM."""
    from workers.run import main as run_worker

    if bool(region) == control:
        _fail("give exactly one of --region REGION or --control")
    c = cfg()
    run_worker(c, _region(c, region) if region else None, pidfile)


def _show_status(c: EagleConfig, as_json: bool = False) -> int:
    """Print the status once; its exit code (0 healthy, 1 degraded, 2 cannot assess)."""
    from eagle_dr.status import collect, render

    st = collect(c)
    if as_json:
        out.print_json(st.model_dump_json())
    else:
        render(st, out)
    return st.health.exit_code


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output (schema: eagle_dr/status.py)."),
           watch: Optional[float] = typer.Option(None, "--watch", is_flag=False, flag_value=2.0, min=0.5,
                                                 help="Refresh in place every SECONDS (default 2) until Ctrl-C.",
                                                 metavar="[SECONDS]")):
    """The topology at a glance: verdict, roles, timelines, lag, readiness, Sentinels, workers, services.

    Exits 0 healthy, 1 degraded (the verdict line says why), 2 cannot assess."""
    import time

    from eagle_dr.status import collect, render

    c = cfg()
    if watch is None:
        raise typer.Exit(_show_status(c, as_json))
    code = 2
    try:
        while True:
            st = collect(c)
            code = st.health.exit_code
            with out.capture() as frame:
                if as_json:
                    out.print_json(st.model_dump_json())
                else:
                    render(st, out)
            # One write per refresh: the screen never shows half a frame.
            out.clear()
            out.file.write(frame.get())
            out.print(f"[dim]{time.strftime('%H:%M:%S')}: refreshing every {watch:g}s (Ctrl-C to stop)[/]")
            time.sleep(watch)  # the refresh interval the operator asked for, not a synchronisation
    except KeyboardInterrupt:
        raise typer.Exit(code)


@app.command()
def unfence(region: str = typer.Option(..., "--region", help="The region whose fences to lift."),
            local: bool = typer.Option(False, "--local", help="Also lift a stop fence: run on the region's "
                                                              "database host (acts on its data directory)."),
            force: bool = typer.Option(False, "--force", help="Even if the other region has a writable primary "
                                                              "or records a newer DR epoch.")):
    """Lift what a terminated runbook left fenced (eagle-dr status names it): PostgreSQL and Redis.

    Refused while a runbook holds the service's move (it owns its fences) and, without --force,
    while the other region has a writable primary (that would make two) or records a newer DR
    epoch than this region (a later move superseded it: failback brings it back, not unfence)."""
    import asyncio

    from activities.postgres.fence import lift_stop_fence, unfence as pg_unfence
    from activities.postgres.status import pg_status
    from activities.redis.failover import unfence as redis_unfence
    from eagle_dr.temporal import move_running

    c = cfg()
    _region(c, region)
    if asyncio.run(move_running(f"127.0.0.1:{c.lab.dev_server.grpc_port}", c.service, c)) is not False:
        _fail(f"a runbook holds dr-move-{c.service} (or Temporal cannot say): it owns its fences; cancel it first",
              EXIT_BUSY)
    other = c.other(region)
    st = pg_status(other.postgres, 3)
    if st.role == "primary" and not st.read_only and not force:
        _fail(f"{other.name} has a writable primary: lifting {region}'s fence would make two. Use eagle-dr failback "
              f"--region {region} to bring it back as a standby (or --force if {other.name} is to be fenced)", 2)
    pg = c.region(region).postgres
    if local:
        # It starts still read-only (the fence's ALTER SYSTEM survives), so its epoch can be read first.
        lift_stop_fence(pg)
    own, newest = _region_epoch(c, region), max((_region_epoch(c, r.name) for r in c.regions if r.name != region),
                                                key=lambda e: e[0])
    if newest[0] > own[0] and not force:
        _fail(f"{newest[1]} records DR epoch {newest[0]}, newer than {region}'s {own[0]} ({own[1]}): a later move "
              f"superseded {region}, and lifting its fence would bring back a stale primary. Use eagle-dr failback "
              f"--region {region} (or --force)", 2)
    try:
        pg_unfence(pg)
        out.print(f"{region}: PostgreSQL fence lifted (epoch {own[0]})")
    except Exception as e:  # noqa: BLE001 - a stopped server needs --local on its host
        _fail(f"{region}: PostgreSQL unreachable ({e}); if it is stopped by a fence, run this on its host with "
              "--local", EXIT_FAILED)
    r = redis_unfence(c.region(region).redis)
    out.print(f"{region}: Redis " + ("fence lifted" if r.reachable else f"unreachable: {r.error}"))


def _region_epoch(c: EagleConfig, region: str) -> tuple[int, str]:
    """The highest DR epoch the region's PostgreSQL or Redis records, and where it was read.

    ``eagle-dr unfence`` carries the epoch of the move whose fences it lifts: the newest one
    recorded on the fenced region. Another region recording a newer epoch means that move was
    superseded, as a runbook step with an older epoch than the one recorded is refused.
    Unreadable records count as 0: no evidence of a newer move."""
    import psycopg
    import redis

    from activities.postgres import epoch as pg_epochs
    from activities.redis import epoch as redis_epochs

    r = c.region(region)
    found: list[tuple[int, str]] = []
    try:
        found.append((pg_epochs.read_epoch(r.postgres, c.service).epoch, f"{region}'s PostgreSQL"))
    except psycopg.Error:
        pass
    try:
        found.append((redis_epochs.read_epoch(r.redis, c.service).epoch, f"{region}'s Redis"))
    except (redis.RedisError, OSError):
        pass
    return max(found, key=lambda e: e[0], default=(0, f"{region}: no epoch readable"))


# -- runbooks -------------------------------------------------------------------------------------


def _client(c: EagleConfig):
    from eagle_dr.temporal import connect

    return connect(f"127.0.0.1:{c.lab.dev_server.grpc_port}", config=c)


async def _runbook_client(c: EagleConfig):
    """The client a runbook is started with, after a look at its task queue: with no worker
    polling it, the run is queued and the live step list would sit still without a word."""
    from eagle_dr.status import POLLER_FRESH_SECONDS
    from eagle_dr.temporal import poller_ages

    client = await _client(c)
    queue = c.temporal.control_task_queue
    try:
        ages = await poller_ages(client, queue, workflow=True)
    except Exception:  # noqa: BLE001 - only a warning: starting the run reports Temporal itself
        return client
    if not any(a <= POLLER_FRESH_SECONDS for a in ages.values()):
        err.print(f"warning: no worker has polled task queue {queue} in the last {POLLER_FRESH_SECONDS}s: the "
                  "run is queued and starts when one does (eagle-dr worker --control; eagle-dr status)",
                  highlight=False, soft_wrap=True)
    return client


def _ui_link(c: EagleConfig, handle) -> str:
    return f"{c.temporal.ui_url}/namespaces/{handle._client.namespace}/workflows/{handle.id}"


def _run_runbook(what: str, run) -> None:
    """Run a command's coroutine: a failed runbook is one line and exit code 1, not a traceback."""
    import asyncio

    try:
        asyncio.run(run())
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001
        _failed(f"{what} failed", e)


async def _start_and_follow(c: EagleConfig, what: str, workflow_run, inp, workflow_id: str, report) -> None:
    """Start a runbook (refused if one holds its id), follow its steps live, print its report."""
    from temporalio.common import WorkflowIDConflictPolicy

    from temporalio.exceptions import WorkflowAlreadyStartedError

    client = await _runbook_client(c)
    try:
        handle = await client.start_workflow(workflow_run, inp, id=workflow_id,
                                             task_queue=c.temporal.control_task_queue,
                                             id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                                             static_summary=f"{what} {c.service}")
    except WorkflowAlreadyStartedError:
        _fail(f"already in progress: {workflow_id}", EXIT_BUSY)
    out.print(f"{what} started: {_ui_link(c, handle)}")
    r = await _follow(handle, c)
    report(r)
    switched = getattr(r, "switchover", None)
    _exit_for(what, getattr(r, "outcome", None) or (switched.outcome if switched else "succeeded"),
              getattr(r, "steps", []))


async def _follow(handle, c: EagleConfig) -> object:
    """Live step list in the terminal until the workflow ends; returns its result."""
    import asyncio

    from rich.live import Live
    from rich.table import Table

    from workflows.models import Progress

    def table(p) -> Table:
        t = Table(title=f"{p.runbook} {p.service}: {p.source_region or '?'} -> {p.target_region}"
                  + (f"  epoch {p.epoch}" if p.epoch is not None else "")
                  + ("  [bold yellow]AWAITING APPROVAL: eagle-dr approve " + handle.id + "[/]"
                     if p.awaiting_approval else ""), title_justify="left")
        for col in ("step", "status", "s", "detail"):
            t.add_column(col)
        for s in p.steps:
            colour = {"done": "green", "failed": "red", "running": "yellow", "cancelled": "magenta"}.get(s.status, "white")
            t.add_row(s.name, f"[{colour}]{s.status}[/]", f"{s.seconds:.2f}" if s.seconds is not None else "",
                      s.detail)
        return t

    result_task = asyncio.ensure_future(handle.result())
    if not out.is_terminal:
        # Piped or logged: one line per change (a live table would print only at the end,
        # hiding the approval command a watcher is waiting for).
        seen: dict[str, str] = {}
        asked = False
        while True:
            try:
                p = await handle.query("progress", result_type=Progress)
            except Exception:  # noqa: BLE001 - not started yet, or finished between calls
                p = None
            if p is not None:
                for st in p.steps:
                    if seen.get(st.name) != st.status:
                        seen[st.name] = st.status
                        out.print(f"{st.status:8} {st.name}" + (f": {st.detail}" if st.detail else ""),
                                  highlight=False)
                if p.awaiting_approval and not asked:
                    out.print(f"AWAITING APPROVAL: eagle-dr approve {handle.id} (or --reject)", highlight=False)
                asked = bool(p.awaiting_approval)
            if result_task.done():
                break
            await asyncio.wait([result_task], timeout=0.5)
        return result_task.result()
    with Live(console=out, refresh_per_second=4) as live:
        while not result_task.done():
            try:
                live.update(table(await handle.query("progress", result_type=Progress)))
            except Exception:  # noqa: BLE001 - not started yet, or finished between calls
                pass
            await asyncio.wait([result_task], timeout=0.5)
        try:
            live.update(table(await handle.query("progress", result_type=Progress)))
        except Exception:  # noqa: BLE001
            pass
    return result_task.result()


def _verdict(met) -> str:
    return "[red]UNKNOWN[/]" if met is None else "[green]met[/]" if met else "[red]MISSED[/]"


def _report(r) -> None:
    out.print(f"[bold]{r.runbook}[/] {r.service} {r.source_region} -> {r.target_region}: "
              f"[{'green' if r.outcome == 'succeeded' else 'red'}]{r.outcome}[/] (epoch {r.epoch}, "
              f"approval {r.approval.outcome}{' by ' + r.approval.approver if r.approval.approver else ''})")
    rto, rpo = r.rto, r.rpo

    def s(v) -> str:
        return f"{v:.2f}s" if v is not None else "unknown"

    out.print(f"  RTO {s(rto.total_s)} (target {rto.target_s:.0f}s: {_verdict(rto.met)}) = detection->decision "
              f"{s(rto.detection_to_decision_s)} + decision->writable {s(rto.decision_to_writable_s)} + "
              f"writable->serving {s(rto.writable_to_serving_s)}"
              + (f"; clients saw {rto.client_outage_s:.2f}s" if rto.client_outage_s is not None else ""))
    if rto.serving_basis:
        out.print(f"  [red]RTO unknown[/]: {rto.serving_basis}")
    out.print(f"  RPO: WAL lost {rpo.lost_wal_bytes if rpo.lost_wal_bytes is not None else '[red]unknown[/]'} bytes"
              + (f", {rpo.lost_commits} commits" if rpo.lost_commits is not None else "")
              + (f" over {rpo.loss_window_s:.2f}s" if rpo.loss_window_s else "")
              + f" ({rpo.wal_basis}); Redis offset gap "
              f"{rpo.redis_offset_gap if rpo.redis_offset_gap is not None else 'unknown'}; acknowledged writes lost "
              f"{rpo.acknowledged_writes_lost if rpo.acknowledged_writes_lost is not None else 'n/a'}"
              + (f" of {rpo.acknowledged_writes_total}" if rpo.acknowledged_writes_total else "")
              + (f" (target {rpo.target_s:.0f}s: {_verdict(rpo.met)})" if rpo.target_s is not None else ""))
    for n in r.notes:
        out.print(f"  [yellow]note:[/] {n}")


# Exit codes of the runbook commands: 0 succeeded, 1 failed (nothing or not all was done),
# 2 bad input or config, 3 done but degraded (the command names what), 4 another move holds the id.
EXIT_FAILED, EXIT_DEGRADED, EXIT_BUSY = 1, 3, 4


def _exit_for(what: str, outcome: str, steps) -> None:
    if outcome in ("succeeded", "resolved", "no-split-brain"):
        return
    steps = [st if isinstance(st, dict) else st.model_dump() for st in steps]
    failed = [st["name"] + (f" ({st['detail']})" if st.get("detail") else "") for st in steps
              if st.get("status") in ("failed", "cancelled")]
    if outcome == "degraded":
        _fail(f"{what} finished DEGRADED: " + ("; ".join(failed) or "see the notes above"), EXIT_DEGRADED)
    if outcome == "unknown":
        _fail(f"{what}: UNKNOWN, a node did not answer (see the notes above)", EXIT_DEGRADED)
    _fail(f"{what} {outcome}" + (": " + "; ".join(failed) if failed else ""), EXIT_FAILED)


def _plan_option():
    return typer.Option(False, "--plan", help="Run the preflight read-only and print what it would do; change "
                                              "nothing (eagle_dr/cli/plan.py).")


def _move(kind: str, to: str, reason: str, force: bool, max_lag: Optional[int], approval: bool,
          approval_timeout: float, default_action: str, measure: bool, plan: bool = False) -> None:
    from eagle_dr.launch import AlreadyInProgress, start_move
    from workflows.models import ApprovalPolicy, FailoverInput, SwitchoverInput, Trigger

    c = cfg()
    _region(c, to)
    policy = ApprovalPolicy(required=approval, timeout_seconds=approval_timeout, default_action=default_action)
    common = dict(service=c.service, target_region=to, reason=reason, trigger=Trigger.manual, approval=policy,
                  measure_client_impact=measure)
    if kind == "failover":
        inp = FailoverInput(**common, force=force, **({"max_lag_bytes": max_lag} if max_lag is not None else {}))
    else:
        inp = SwitchoverInput(**common, **({"max_lag_bytes": max_lag} if max_lag is not None else {}))
    if plan:
        from eagle_dr.cli.plan import show_plan

        return show_plan(c, kind, inp)

    async def run():
        client = await _runbook_client(c)
        try:
            handle = await start_move(client, c, inp)
        except AlreadyInProgress as e:
            _fail(str(e), EXIT_BUSY)
        out.print(f"{kind} started: {_ui_link(c, handle)}")
        r = await _follow(handle, c)
        _report(r)
        _exit_for(kind, r.outcome, r.steps)

    _run_runbook(kind, run)


@app.command()
def failover(to: str = typer.Option(..., "--to", help="Region to promote."),
             reason: str = typer.Option("", "--reason"), force: bool = typer.Option(False, "--force",
             help="Fail over even if the standby lags more than --max-lag-bytes (data loss)."),
             max_lag_bytes: Optional[int] = typer.Option(None, "--max-lag-bytes"),
             approval: bool = typer.Option(False, "--require-approval/--no-approval"),
             approval_timeout: float = typer.Option(900, "--approval-timeout"),
             default_action: str = typer.Option("abort", "--approval-default"),
             measure: bool = typer.Option(False, "--measure-clients", help="Lab: count lost acknowledged writes."),
             plan: bool = _plan_option()):
    """Unplanned failover to REGION (fence, promote, re-route, verify, measure)."""
    _move("failover", to, reason, force, max_lag_bytes, approval, approval_timeout, default_action, measure, plan)


@app.command()
def switchover(to: str = typer.Option(..., "--to"), reason: str = typer.Option("", "--reason"),
               max_lag_bytes: Optional[int] = typer.Option(None, "--max-lag-bytes"),
               approval: bool = typer.Option(False, "--require-approval/--no-approval"),
               approval_timeout: float = typer.Option(900, "--approval-timeout"),
               default_action: str = typer.Option("abort", "--approval-default"),
               measure: bool = typer.Option(False, "--measure-clients"),
               plan: bool = _plan_option()):
    """Planned switchover to REGION with zero data loss."""
    _move("switchover", to, reason, False, max_lag_bytes, approval, approval_timeout, default_action, measure, plan)


@app.command()
def approve(workflow_id: str, approver: str = typer.Option(os.environ.get("USER", "operator"), "--as"),
            reject: bool = typer.Option(False, "--reject"), comment: str = typer.Option("", "--comment")):
    """Approve (or --reject) a runbook waiting at its approval gate."""
    import asyncio

    from workflows.models import ApprovalDecision

    c = cfg()

    async def run():
        client = await _client(c)
        handle = client.get_workflow_handle(workflow_id)
        return await handle.execute_update("approve", ApprovalDecision(
            approver=approver, decision="reject" if reject else "approve", comment=comment))

    try:
        out.print(asyncio.run(run()))
    except Exception as e:  # noqa: BLE001
        _failed("approval not accepted", e)


@app.command()
def drill(switchover_to: Optional[str] = typer.Option(None, "--switchover-to"),
          html: Optional[str] = typer.Option(None, "--html", help="Where to write the HTML report (default: "
                                                                   "<lab state>/reports/drill-<time>.html).")):
    """The DR drill on the lab: switchover, real outage, detection, failover, report (text and HTML)."""

    from eagle_dr.launch import AlreadyInProgress, start_drill
    from workflows.drill import DrillInput

    c = cfg()
    if switchover_to:
        _region(c, switchover_to)

    async def run():
        client = await _runbook_client(c)
        try:
            handle = await start_drill(client, c, DrillInput(service=c.service, switchover_to=switchover_to))
        except AlreadyInProgress as e:
            _fail(str(e), EXIT_BUSY)
        out.print(f"drill started: {_ui_link(c, handle)}")
        report = await _follow(handle, c)
        out.rule("DR drill report")
        _report(report.switchover)
        out.print(f"outage: killed {', '.join(report.killed)} in {report.outage_region}; detected after "
                  f"{report.detection_seconds:.1f}s")
        _report(report.failover)
        if report.failback:
            _failback_report(report.failback)
        _consistency_report(report.consistency, report.consistency_error)
        _restore_drill_report(report.restore_drill, report.restore_drill_error)
        if report.alert_latency:
            out.print(f"[bold]alert -> workflow[/]: {escape(report.alert_latency.summary())}")
        for n in report.notes:
            out.print(f"[yellow]note:[/] {n}")
        out.print(f"Temporal UI: {_ui_link(c, handle)} (children: {c.temporal.ui_url}/namespaces/"
                  f"{client.namespace}/workflows?query=DrTrigger%3D%22drill%22)")
        await _drill_files(client, c, handle, html)
        parts = [report.switchover, report.failover] + ([report.failback.switchover] if report.failback and
                                                          report.failback.switchover else [])
        degraded = [f"{p.runbook} -> {p.target_region}" for p in parts if p.outcome != "succeeded"]
        if report.restore_drill_error or (report.restore_drill and report.restore_drill.outcome != "succeeded"):
            degraded.append("restore drill")
        if report.consistency_error or (report.consistency and report.consistency.differences):
            degraded.append("consistency check")
        if degraded:
            _fail(f"drill finished DEGRADED: {', '.join(degraded)}", EXIT_DEGRADED)

    _run_runbook("drill", run)


async def _drill_files(client, c: EagleConfig, handle, html: Optional[str]) -> None:
    """The drill's evidence on disk: the HTML report (eagle-dr report --html) and, beside it,
    the same report as text. A failure to write them is said, never the drill's failure."""
    from datetime import datetime, timezone
    from pathlib import Path

    from eagle_dr.cli.report import fetch_report, write_html
    from eagle_dr.report.text import render as render_text

    try:
        r = await fetch_report(client, c, handle.id, handle.result_run_id)
        if html:
            page = Path(html)
        else:
            from lab.lab import Lab

            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            page = Lab(c, state.config_path).state / "reports" / f"drill-{stamp}.html"
        write_html(r, page)
        page.with_suffix(".txt").write_text(render_text(r) + "\n", encoding="utf-8")
        out.print(f"report: {page} (HTML, open in a browser) and {page.with_suffix('.txt')} (text)", highlight=False)
    except Exception as e:  # noqa: BLE001
        err.print(f"[yellow]warning:[/] the drill's report files were not written: {escape(str(e))}")


def _consistency_report(r, error: str | None) -> None:
    """The rebuilt standby against the primary, by data: rows per table, differing keys."""
    if r is None and error is None:
        return
    if error:
        out.print(f"[bold]consistency check[/]: [bold red]FAILED[/]: {escape(error)}")
        return
    verdict = "[green]identical[/]" if r.differences == 0 else f"[bold red]{r.differences} DIFFERENCES[/]"
    rows = sum(t.rows_a for t in r.tables)
    redis = "" if r.redis is None else \
        f"; Redis {'identical' if not r.redis.differences else 'DIFFERS'}"
    out.print(f"[bold]consistency check[/] {r.region_b} against {r.region_a}: {verdict} "
              f"({len(r.tables)} tables, {rows} rows{redis})")
    for t in r.tables:
        if t.differences:
            sample = [",".join(k) for k in (t.diff.inserted_keys + t.diff.updated_keys + t.diff.deleted_keys)[:5]]
            out.print(f"  {t.table}: {t.differences} keys differ (sample: {'; '.join(sample)})")


def _restore_drill_report(r, error: str | None) -> None:
    """The backup side of the drill: the restore drill's verdict, backup RTO and RPO, and the
    newest recoverable point (a failed drill's figures come with its error)."""
    if r is None and error is None:
        return
    verdict = "[bold red]FAILED[/]: " + escape(error) if error else f"[green]{r.outcome}[/]"
    out.print(f"[bold]restore drill[/]: {verdict}")
    if r is None:
        return
    rto = f"{r.rto_seconds:.1f}s (restore {r.restore_seconds:.1f}s + replay {r.replay_seconds:.1f}s)" \
        if r.rto_seconds is not None else "[red]UNKNOWN[/] (no restore finished)"
    rpo = f"{r.rpo_seconds:.0f}s" if r.rpo_seconds is not None else "[red]UNKNOWN[/]"
    out.print(f"  backup {r.backup_label or '?'} from {r.repo_region}'s bucket, restored on {r.region}: backup RTO {rto}")
    out.print(f"  backup RPO {rpo}: newest recoverable point {r.newest_recoverable.isoformat(timespec='seconds') if r.newest_recoverable else 'unknown'} "
              f"(WAL {r.newest_archived_wal or '?'} archived)")
    if r.tables:
        same = sum(1 for t in r.tables if t.match)
        out.print(f"  {same} of {len(r.tables)} tables identical to the primary at restore point {r.restore_point}")


def _redis_kept(r) -> str:
    if r.failed:
        return escape(r.kept("the primary"))
    if not r.reachable:
        return "unreachable, nothing to keep (no persistence)"
    if r.snapshot is None:
        return "already a replica of the primary, nothing to keep"
    # Key names are arbitrary bytes: never let one be read as console markup.
    return escape(r.kept("the primary"))


def _failback_report(f) -> None:
    if f.divergence is None:
        out.print(f"[bold]failback[/] of {f.region} (primary {f.primary_before}): it already streamed from the "
                  "primary, nothing to rewind or keep")
    else:
        lost = f.divergence.lost
        out.print(f"[bold]failback[/] of {f.region} (primary {f.primary_before}): fork at {lost.fork_lsn}; the old "
                  f"primary had {lost.lost_commits} commits / {lost.lost_bytes} bytes after it")
        _reconciliation_lines(f.reconciliation)
        out.print(f"  PostgreSQL: {f.rewind.summary()}")
    out.print(f"  Redis: {_redis_kept(f.redis)}")
    _verify_lines(f)
    if f.switchover:
        _report(f.switchover)
    for n in f.notes:
        out.print(f"  [yellow]note:[/] {n}")


def _verify_option():
    return typer.Option("divergence", "--verify", callback=_verify_choice,
                        help="The last step's reach. divergence: the keys the run reconciled, on both sides "
                             "(follows the divergence); full: every row of every table (as long as the "
                             "database takes to read).")


def _verify_choice(value: str) -> str:
    if value not in ("divergence", "full"):
        raise typer.BadParameter(f"expected divergence or full, got {value!r}")
    return value


@app.command()
def failback(region: str = typer.Option(..., "--region", help="The region to bring back."),
             switch_back: bool = typer.Option(True, "--switch-back/--standby-only",
                                              help="Make it primary again after it caught up."),
             approval: bool = typer.Option(False, "--require-approval/--no-approval"),
             verify: str = _verify_option(),
             plan: bool = _plan_option()):
    """Bring a failed-over region back: keep its post-fork writes, rewind, re-attach, switch back."""

    from workflows.failback import FailbackInput, FailbackWorkflow
    from workflows.models import ApprovalPolicy
    from workflows.runbook import move_id

    c = cfg()
    _region(c, region)

    inp = FailbackInput(service=c.service, region=region, switch_back=switch_back,
                        approval=ApprovalPolicy(required=approval), verify=verify)
    if plan:
        from eagle_dr.cli.plan import show_plan

        return show_plan(c, "failback", inp)

    async def run():
        # The same id as failover/switchover: a failback and a failover of one service never run at once.
        await _start_and_follow(c, f"failback of {region}", FailbackWorkflow.run, inp, move_id(c.service),
                                _failback_report)

    _run_runbook("failback", run)


def _verify_lines(r) -> None:
    """A failback's or split-brain resolution's last data check: the reconciled keys, every table, or both."""
    if r.verify_keys is not None:
        vk = r.verify_keys
        colour = "green" if not vk.differences else "red"
        out.print(f"  verify: [{colour}]{vk.differences} of {vk.keys} reconciled keys differ[/] ({vk.seconds:.1f}s); "
                  "every other row not read (eagle-dr check reads them)")
    if r.verify is not None:
        out.print(f"  verify (every table): {r.verify.outcome}, path {r.verify.path}")


def _reconciliation_lines(rec) -> None:
    for t in rec.tables:
        out.print(f"  {t.table} ({t.strategy}): {t.loser_rows} post-fork rows, {t.inserted} inserted, {t.updated} "
                  f"updated, {t.deleted} deleted, {t.conflicts} conflicts, {t.flagged} flagged (eagle_dr.conflict_audit)")


def _split_brain_report(r) -> None:
    if r.outcome == "no-split-brain":
        out.print("[green]no split brain[/]: no second writable primary or Redis master, routing agrees")
        for n in r.notes:  # a fenced old primary beside the writer: failback keeps its writes
            out.print(f"  [yellow]note:[/] {n}")
        return
    if r.outcome == "unknown":
        out.print(f"[yellow]split brain unknown[/]: none seen, but {', '.join(r.detection.unreachable)} did not "
                  "answer")
        for n in r.notes:  # what to do about it: run again once it answers
            out.print(f"  [yellow]note:[/] {n}")
        return
    colour = "green" if r.outcome == "resolved" else "red"
    out.print(f"[bold]split brain[/] [{colour}]{r.outcome}[/]: " + "; ".join(r.findings))
    out.print(f"  survivor {r.choice.survivor} ({r.choice.rule}: {r.choice.why}); loser {r.choice.loser}; "
              f"epoch {r.epoch}")
    out.print(f"  one writer after {r.seconds_to_single_writer:.1f}s, resolved after {r.seconds_to_resolved:.1f}s")
    if r.divergence:
        lost = r.divergence.lost
        out.print(f"  fork at {lost.fork_lsn}: the loser had {lost.lost_commits} commits / {lost.lost_bytes} bytes "
                  f"after it")
    if r.reconciliation:
        _reconciliation_lines(r.reconciliation)
    if r.rewind:
        out.print(f"  PostgreSQL: {r.rewind.summary()}")
    if r.redis:
        out.print(f"  Redis: {_redis_kept(r.redis)}")
    _verify_lines(r)
    for n in r.notes:
        out.print(f"  [yellow]note:[/] {n}")


@app.command("split-brain")
def split_brain(survivor: str = typer.Option(None, "--survivor", help="Name the survivor (default: the rule)."),
                rule: str = typer.Option(None, "--rule", help="active-region | highest-epoch | priority "
                                                              "(default: split_brain.survivor_rule)."),
                approval: bool = typer.Option(False, "--require-approval/--no-approval",
                                              help="Review counts and a sample before the loser's rows are applied."),
                verify: str = _verify_option(),
                plan: bool = _plan_option()):
    """Resolve a split brain: fence the loser, keep its writes per table strategy, resync it."""

    from workflows.models import ApprovalPolicy
    from workflows.runbook import move_id
    from workflows.split_brain import SplitBrainInput, SplitBrainWorkflow

    c = cfg()
    if survivor:
        _region(c, survivor)

    inp = SplitBrainInput(service=c.service, survivor=survivor, survivor_rule=rule,
                          approval=ApprovalPolicy(required=approval), verify=verify)
    if plan:
        from eagle_dr.cli.plan import show_plan

        return show_plan(c, "split-brain", inp)

    async def run():
        # The same id as failover/switchover: never two moves of one service at once.
        await _start_and_follow(c, "split-brain resolution", SplitBrainWorkflow.run, inp, move_id(c.service),
                                _split_brain_report)

    _run_runbook("split-brain resolution", run)


def main() -> None:
    code = 0
    try:
        # Without standalone mode click returns the exit code of a ctx.exit() instead of raising.
        rv = app(prog_name="eagle-dr", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # click usage errors and the rest
        import click

        # typer 0.29 raises the errors of the click it bundles (typer._click), not click's own.
        try:
            from typer._click import exceptions as bundled
        except ImportError:  # an older typer on plain click
            bundled = click.exceptions
        if isinstance(e, (click.ClickException, bundled.ClickException)):
            e.show()
            code = e.exit_code
        # (typer 0.29's bundled exceptions module has no Abort: typer.Abort is the one it raises.)
        elif isinstance(e, (click.exceptions.Abort, getattr(bundled, "Abort", click.exceptions.Abort), typer.Abort)):
            code = 130
        else:
            from eagle_dr.cli.errors import explain

            why = None if state.debug else explain(e, state.config_path)
            if why is None:
                raise
            err.print(f"[bold red]error:[/] {escape(why)}", highlight=False)
            err.print("(eagle-dr --debug ... shows the trace)", style="dim", highlight=False)
            code = 1
    # The Temporal SDK can crash at interpreter exit (sdk-python#300): leave without finalizers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Command groups with a module of their own (eagle_dr/cli/<group>.py). Each builds its
# typer app from the helpers above and adds it to ``app``; imported last, when they exist.
from eagle_dr.cli import backup as _backup_cli  # noqa: E402,F401
from eagle_dr.cli import schedules as _schedules_cli  # noqa: E402,F401
from eagle_dr.cli import restore as _restore_cli  # noqa: E402,F401
from eagle_dr.cli import alerts as _alerts_cli  # noqa: E402,F401
from eagle_dr.cli import monitor as _monitor_cli  # noqa: E402,F401
from eagle_dr.cli import runs as _runs_cli  # noqa: E402,F401
from eagle_dr.cli import report as _report_cli  # noqa: E402,F401
from eagle_dr.cli import notify as _notify_cli  # noqa: E402,F401
from eagle_dr.cli import codec as _codec_cli  # noqa: E402,F401
from eagle_dr.cli import check as _check_cli  # noqa: E402,F401
from eagle_dr.cli import sync as _sync_cli  # noqa: E402,F401
from eagle_dr.cli import deploy as _deploy_cli  # noqa: E402,F401

if __name__ == "__main__":
    main()
