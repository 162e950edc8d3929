"""``eagle-dr deploy``: apply a region's overlay (deploy/overlays/<region>) to its cluster.

Rendered by eagle_dr/kustomize.py (no kustomize binary needed), applied object by object with
server-side apply under the field manager ``eagle-dr``. Each object is first compared with what
the cluster holds: an object already as rendered is not sent at all, so a second deploy makes no
write, and ``--dry-run`` prints exactly these comparisons and writes nothing.

The dry run is a client-side diff, not the API server's ``dryRun=All``: the comparison is the
same code that decides what a real deploy sends, it works against any API server (kmock, the
test double, ignores dryRun and would apply), and it needs only read access.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from eagle_dr.kustomize import render

log = structlog.get_logger("eagle_dr.deploy")

FIELD_MANAGER = "eagle-dr"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "deploy"

# The kinds deploy/ holds, in the order they are applied: identities and config before the
# pods that use them, and the NetworkPolicies before the pods so no pod ever runs unfenced.
KINDS: dict[str, tuple[type, str]] = {
    "ServiceAccount": (client.CoreV1Api, "service_account"),
    "Role": (client.RbacAuthorizationV1Api, "role"),
    "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding"),
    "ConfigMap": (client.CoreV1Api, "config_map"),
    "Service": (client.CoreV1Api, "service"),
    "NetworkPolicy": (client.NetworkingV1Api, "network_policy"),
    "PodDisruptionBudget": (client.PolicyV1Api, "pod_disruption_budget"),
    "Deployment": (client.AppsV1Api, "deployment"),
}


class DeployError(Exception):
    pass


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    namespace: str
    action: Literal["create", "update", "unchanged"]
    diff: str


def overlay_dir(region: str, deploy_dir: Path = DEFAULT_DIR) -> Path:
    d = deploy_dir / "overlays" / region
    if not (d / "kustomization.yaml").is_file():
        have = sorted(p.name for p in (deploy_dir / "overlays").glob("*") if (p / "kustomization.yaml").is_file())
        raise DeployError(f"no overlay for region {region!r} in {deploy_dir / 'overlays'} "
                          f"(have: {', '.join(have) or 'none'})")
    return d


def rendered(region: str, deploy_dir: Path = DEFAULT_DIR) -> list[dict[str, Any]]:
    objs = render(overlay_dir(region, deploy_dir))
    unknown = sorted({o["kind"] for o in objs} - set(KINDS))
    if unknown:
        raise DeployError(f"deploy/ holds kinds eagle-dr deploy cannot apply: {', '.join(unknown)}")
    return sorted(objs, key=lambda o: list(KINDS).index(o["kind"]))


def plan(api: client.ApiClient, objs: list[dict[str, Any]]) -> list[Change]:
    """What applying ``objs`` would change, object by object (reads only)."""
    return [_compare(o, _live(api, o)) for o in objs]


def apply(api: client.ApiClient, objs: list[dict[str, Any]]) -> list[Change]:
    """Server-side apply of every object that differs from the cluster; the rest is not sent."""
    changes = plan(api, objs)
    for obj, change in zip(objs, changes):
        if change.action == "unchanged":
            continue
        api_cls, kind = KINDS[obj["kind"]]
        patch = getattr(api_cls(api), f"patch_namespaced_{kind}")
        # force: eagle-dr deploy is the owner of these objects' fields; a hand edit (kubectl
        # edit, another manager) is overwritten rather than left to fail the deploy mid-way.
        patch(obj["metadata"]["name"], obj["metadata"]["namespace"], obj, field_manager=FIELD_MANAGER,
              force=True, _content_type="application/apply-patch+yaml")
        log.info("applied", kind=change.kind, name=change.name, action=change.action)
    return changes


def _live(api: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any] | None:
    api_cls, kind = KINDS[obj["kind"]]
    read = getattr(api_cls(api), f"read_namespaced_{kind}")
    try:
        # The raw JSON, in the API's own field names, to compare with the manifest as written.
        resp = read(obj["metadata"]["name"], obj["metadata"]["namespace"], _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return json.loads(resp.data)


def _compare(desired: dict[str, Any], live: dict[str, Any] | None) -> Change:
    meta = desired["metadata"]
    want = yaml.safe_dump(desired, sort_keys=True)
    if live is None:
        action, have = "create", ""
    else:
        # Only the fields the manifest sets: the API server adds its own (status, uid,
        # managedFields, defaults such as a port's protocol) and those are not a change.
        projected = _project(live, desired)
        action = "unchanged" if projected == desired else "update"
        have = yaml.safe_dump(projected, sort_keys=True)
    where = f"{desired['kind']}/{meta['namespace']}/{meta['name']}"
    diff = "".join(difflib.unified_diff(have.splitlines(keepends=True), want.splitlines(keepends=True),
                                        fromfile=f"cluster: {where}", tofile=f"deploy: {where}"))
    return Change(desired["kind"], meta["name"], meta["namespace"], action, diff)


def _project(live: Any, desired: Any) -> Any:
    """``live`` cut down to the shape of ``desired``; lists of equal length element by element."""
    if isinstance(desired, dict) and isinstance(live, dict):
        return {k: _project(live[k], v) for k, v in desired.items() if k in live}
    if isinstance(desired, list) and isinstance(live, list) and len(desired) == len(live):
        return [_project(lv, dv) for lv, dv in zip(live, desired)]
    return live


# -- Worker Versioning ---------------------------------------------------------------------------


async def make_current(temporal, deployment_name: str, build_id: str, wait_seconds: float = 300,
                       identity: str = "eagle-dr deploy") -> str | None:
    """Make ``<deployment_name>.<build_id>`` the current version: new runbooks start on it and
    AUTO_UPGRADE ones move to it at their next workflow task. Returns the build id that was
    current before (None: none was).

    The server refuses while that version has never polled (its workers are still rolling out)
    or polls fewer task queues than the current one (a build that would strand runs on a queue
    nobody serves): both are retried until ``wait_seconds``, then raised. Missing queues are
    never ignored and a version that never polled is never forced. (A version whose workers
    polled once and are gone now is accepted by the server: check the rollout first.)"""
    import asyncio
    import time

    from temporalio.api.workflowservice.v1 import SetWorkerDeploymentCurrentVersionRequest
    from temporalio.service import RPCError, RPCStatusCode

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            resp = await temporal.workflow_service.set_worker_deployment_current_version(
                SetWorkerDeploymentCurrentVersionRequest(namespace=temporal.namespace, deployment_name=deployment_name,
                                                         build_id=build_id, identity=identity))
        except RPCError as e:
            # NOT_FOUND: no worker of that version has polled yet (or the name is wrong: the
            # message says which version was asked for); UNAVAILABLE: Temporal is restarting.
            not_yet = e.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION,
                                   RPCStatusCode.UNAVAILABLE)
            if not not_yet or time.monotonic() >= deadline:
                raise DeployError(f"{deployment_name}.{build_id} could not be made current"
                                  f"{f' within {wait_seconds:.0f} s' if not_yet else ''}: {e.message}") from e
            await asyncio.sleep(1)
            continue
        prev = resp.previous_deployment_version.build_id
        log.info("version_current", deployment=deployment_name, build_id=build_id, previous=prev or None)
        return prev or None
