"""``eagle-dr backup``: take a backup now, list what the repos hold."""

from __future__ import annotations

import uuid
from typing import Optional

import typer

from eagle_dr.cli import _client, _fail, _run_runbook, app, cfg, err, out

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


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def catalog_view(cat, archiver, now) -> dict:
    """Per repo: its state, encryption, backups (with age) and the window PITR can reach: from
    the oldest backup's end (nothing earlier is consistent) to the newest WAL in that repo's
    archive, timed by the primary's archiver when that is the segment it archived last."""
    repos = []
    for r in cat.repos:
        arch = next((a for a in cat.archive if a.repo_key == r.key), None)
        backups = cat.on(r.region)
        max_wal = arch.max_wal if arch else None
        end, end_note = None, None
        if max_wal and archiver is not None and archiver.last_archived_wal and \
                max_wal >= archiver.last_archived_wal[:24]:
            end = archiver.last_archived_time
        elif max_wal:
            end_note = f"WAL {max_wal} (time unknown)"
        repos.append({
            "region": r.region, "repo_key": r.key, "ok": r.ok, "status_code": r.code, "status": r.message,
            "encrypted": (r.cipher or cat.cipher or "none") != "none", "cipher": r.cipher or cat.cipher,
            "archive_min": arch.min_wal if arch else None, "archive_max": max_wal,
            "pitr_from": backups[0].stopped.isoformat() if backups else None,
            "pitr_to": end.isoformat() if end else end_note,
            "backups": [{"label": b.label, "type": b.type, "size": b.size, "repo_size": b.repo_size,
                         "wal_start": b.wal_start, "wal_stop": b.wal_stop, "started": b.started.isoformat(),
                         "stopped": b.stopped.isoformat(), "age_seconds": (now - b.stopped).total_seconds(),
                         "error": b.error} for b in backups]})
    return {"stanza": cat.stanza, "read_from": cat.read_from, "ok": cat.ok, "status_code": cat.code,
            "status": cat.message, "backup_running": cat.backup_running, "repos": repos,
            "broken": [r["region"] for r in repos if not r["ok"] and r["status_code"] != 2]}


def _read_catalog(c, region: Optional[str], local: bool):
    """The catalog from a region's worker (it holds that node's pgBackRest config); without
    --region the standby's first, then the other: any node's info shows both repos."""
    import asyncio
    from datetime import timedelta

    from activities.backup.catalog import read_catalog
    from activities.backup.pgbackrest import Stanza
    from activities.postgres.status import pg_status

    if local:
        if not region:
            _fail("--local needs --region (the node whose pgBackRest config this host holds)")
        return read_catalog(Stanza(c, region))
    order = [region] if region else sorted(c.region_names, key=lambda n: pg_status(c.region(n).postgres, 3).role == "primary")

    async def via_worker():
        from temporalio.worker import Worker

        from workers.run import sandbox_runner
        from workflows.catalog import BackupCatalogWorkflow, CatalogRequest

        try:
            client = await _client(c)
        except RuntimeError as e:
            _fail(f"Temporal is unreachable ({e}); on a database host, read its node's catalog with "
                  f"--local --region REGION", 1)
        errors = []
        for name in order:
            own = f"eagle-dr-backup-list-{uuid.uuid4()}"
            async with Worker(client, task_queue=own, workflows=[BackupCatalogWorkflow],
                              workflow_runner=sandbox_runner()):
                try:
                    return await client.execute_workflow(
                        BackupCatalogWorkflow.run,
                        CatalogRequest(region=name, task_queue=c.region(name).temporal.task_queue),
                        id=own, task_queue=own, execution_timeout=timedelta(seconds=400))
                except Exception as e:  # noqa: BLE001 - that region's worker is down: try the next
                    cause = getattr(e, "cause", None)
                    errors.append(f"{name}: {getattr(getattr(cause, 'cause', None), 'message', None) or cause or e}")
        _fail("no region's worker could read the backup catalog: " + "; ".join(errors), 1)

    return asyncio.run(via_worker())


def _primary_archiver(c):
    from activities.backup.drill import archiver_state
    from activities.postgres.status import pg_status

    for r in c.regions:
        if pg_status(r.postgres, 3).role == "primary":
            try:
                return archiver_state(r.postgres, r.name)
            except Exception:  # noqa: BLE001 - the window's end is then named by its WAL only
                return None
    return None


@backup_app.command("list")
def backup_list(region: Optional[str] = typer.Option(None, "--region", help="Whose worker reads the catalog "
                                                                                "(default: the standby's, then the other)."),
                local: bool = typer.Option(False, "--local", help="Read it here (on --region's database host)."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Backups per repo (region's bucket): type, size, WAL range, age, encryption, the PITR window.
    Exits 1 when a repo is broken (pgbackrest info exits 0 then: its status code says so)."""
    import json
    from datetime import datetime, timezone

    c = cfg()
    if region and region not in c.region_names:
        _fail(f"--region: unknown region {region!r} (regions: {', '.join(c.region_names)})")
    cat = _read_catalog(c, region, local)
    view = catalog_view(cat, _primary_archiver(c), datetime.now(timezone.utc))
    if as_json:
        out.print_json(json.dumps(view))
    else:
        out.print(f"stanza [bold]{view['stanza']}[/], read on {view['read_from']}'s node"
                  + (" (a backup is running)" if view["backup_running"] else ""), soft_wrap=True, highlight=False)
        for r in view["repos"]:
            # No status code: pgBackRest was not asked (its S3 endpoint did not answer).
            why = r["status"] if r["status_code"] is None else f"status code {r['status_code']}: {r['status']}"
            state = "[green]ok[/]" if r["ok"] else (
                "[yellow]no valid backups[/]" if r["status_code"] == 2 else f"[bold red]BROKEN[/] ({why})")
            out.print(f"\n[bold]{r['region']}[/]'s bucket (repo{r['repo_key']}): {state}; "
                      f"{'encrypted ' + r['cipher'] if r['encrypted'] else '[red]NOT encrypted[/]'}; "
                      f"archived WAL {r['archive_min'] or '-'} .. {r['archive_max'] or '-'}", soft_wrap=True,
                      highlight=False)
            # A bucket that could not be read has an unknown window, not an empty one.
            empty = "unknown (bucket not read)" if not r["ok"] and r["status_code"] is None else "none (no backup)"
            out.print(f"  PITR window: {r['pitr_from'] or empty} .. {r['pitr_to'] or '-'}", soft_wrap=True,
                      highlight=False)
            if r["backups"]:
                # Plain lines, never a table squeezed to the terminal: labels and WAL names must
                # print whole (copied into restore commands), also through a pipe.
                out.print(f"  {'label':34} {'type':5} {'size':>10} {'in repo':>10}  {'WAL start .. stop':50} age",
                          soft_wrap=True, highlight=False)
                for b in r["backups"]:
                    out.print(f"  {b['label']:34} {b['type']:5} {_size(b['size']):>10} {_size(b['repo_size']):>10}  "
                              f"{b['wal_start']} .. {b['wal_stop']}  {_age(b['age_seconds'])}"
                              + (" [red](page checksum errors)[/]" if b["error"] else ""),
                              soft_wrap=True, highlight=False)
    if view["broken"]:
        err.print(f"[bold red]broken repo(s):[/] {', '.join(view['broken'])}")
        raise typer.Exit(1)
