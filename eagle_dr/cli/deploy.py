"""``eagle-dr deploy --region R [--dry-run]``: eagle-dr's own manifests (deploy/) to a region's
cluster, reached as the config's ``regions[R].kubernetes`` says (api_url, or the kubeconfig
context). See eagle_dr/deploy.py for how it applies and what the dry run compares.

``eagle-dr set-current-version BUILD_ID``: the last step of a versioned deploy (Worker
Versioning, ``temporal.deployment_name``), once the new control workers run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from eagle_dr.cli import _client, _fail, _failed, _region, app, cfg, out


@app.command()
def deploy(region: str = typer.Option(..., "--region", help="The region whose overlay to apply (deploy/overlays/R)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the diff against the cluster; change nothing."),
           deploy_dir: Optional[Path] = typer.Option(None, "--dir", help="The deploy/ directory (default: the "
                                                     "checkout's deploy/).")):
    """Apply eagle-dr's Kubernetes manifests to one region's cluster (server-side apply)."""
    from activities.kubernetes import _api_client
    from eagle_dr import deploy as d
    from eagle_dr.kustomize import KustomizeError

    c = cfg()
    name = _region(c, region)
    try:
        objs = d.rendered(name, deploy_dir or d.DEFAULT_DIR)
    except (d.DeployError, KustomizeError, OSError) as e:
        _fail(str(e))
        return
    api = _api_client(c.region(name).kubernetes)
    try:
        changes = d.plan(api, objs) if dry_run else d.apply(api, objs)
    except Exception as e:  # noqa: BLE001 - one line, the API server's reason
        _failed(f"deploy to {name}", e)
        return
    finally:
        api.close()
    for ch in changes:
        if dry_run and ch.diff:
            out.print(escape(ch.diff), end="", highlight=False, soft_wrap=True)
        verb = {"create": "would create" if dry_run else "created",
                "update": "would update" if dry_run else "updated", "unchanged": "unchanged"}[ch.action]
        out.print(f"{verb}: {ch.kind}/{ch.name}", highlight=False)
    n = {a: sum(ch.action == a for ch in changes) for a in ("create", "update", "unchanged")}
    if dry_run:
        out.print(f"{name}: {n['create']} to create, {n['update']} to update, {n['unchanged']} unchanged "
                  "(dry run: nothing changed)", highlight=False)
    else:
        out.print(f"{name}: {n['create']} created, {n['update']} updated, {n['unchanged']} unchanged",
                  highlight=False)


@app.command("set-current-version")
def set_current_version(build_id: str = typer.Argument(..., help="The new control workers' EAGLE_DR_BUILD_ID."),
                        wait: float = typer.Option(300, "--wait", help="Seconds to wait for that build's workers "
                                                   "to poll every task queue the current one does.")):
    """Route new and AUTO_UPGRADE runbooks to a new build of the control worker."""
    import asyncio

    from eagle_dr import deploy as d

    c = cfg()
    name = c.temporal.deployment_name
    if not name:
        _fail("temporal.deployment_name is not set: the workers are unversioned, there is no version to make current")
        return
    if not build_id.strip():
        _fail("BUILD_ID is empty")
        return

    async def run():
        return await d.make_current(await _client(c), name, build_id, wait)

    try:
        prev = asyncio.run(run())
    except d.DeployError as e:
        _fail(str(e))
        return
    except Exception as e:  # noqa: BLE001 - one line, Temporal's reason
        _failed("set-current-version", e)
        return
    out.print(f"{name}.{build_id} is current (was: {f'{name}.{prev}' if prev else 'none'})", highlight=False)
