"""The ``eagle-dr`` command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console

from eagle_dr.config import ConfigError, EagleConfig, UnknownRegion, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False,
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


state = _State()


@app.callback()
def _root(config: Optional[str] = typer.Option(None, "--config", "-c", envvar="EAGLE_DR_CONFIG",
                                                help="Region config file (default: config/eagle-dr.yaml).")):
    state.config_path = config


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


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
        client = await connect(f"127.0.0.1:{c.lab.dev_server.grpc_port}")
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
        from eagle_dr.status import collect

        wait_for(lambda: all(w.polling for w in collect(lab.cfg).workers), 60, "every worker to poll", 1)
    if app_traffic:
        lab.start_app()
    out.print(f"[green]lab up[/] in {lab.state}; Temporal UI {ds.ui_url}")
    status(as_json=False)


@lab_app.command("down")
def lab_down(keep_temporal: bool = typer.Option(False, "--keep-temporal")):
    """Stop every lab process (data stays in the state directory)."""
    from eagle_dr.devserver import DevServer

    lab = _lab()
    stopped = lab.down()
    if not keep_temporal and DevServer(lab.cfg).down():
        stopped.append("temporal")
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


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


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """The topology at a glance: roles, timelines, lag, Sentinels, workers."""
    from eagle_dr.status import collect, render

    st = collect(cfg())
    if as_json:
        out.print_json(st.model_dump_json())
    else:
        render(st)


def main() -> None:
    code = 0
    try:
        # Without standalone mode click returns the exit code of a ctx.exit() instead of raising.
        rv = app(standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # click usage errors and the rest
        import click

        if isinstance(e, click.ClickException):
            e.show()
            code = e.exit_code
        elif isinstance(e, click.exceptions.Abort):
            code = 130
        else:
            raise
    # The Temporal SDK can crash at interpreter exit (sdk-python#300): leave without finalizers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
