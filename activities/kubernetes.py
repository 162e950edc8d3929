"""One region's Kubernetes cluster, as the runbooks need it: scale, wait, route, run a job.

A thin, synchronous adapter over the official client (activities run it in a thread). Every
method is idempotent so a Temporal retry after a lost response does no harm. Results are plain
dataclasses or dicts of str/int, safe to put in workflow history; nothing here carries secrets.

The RBAC these calls need is in ``activities/rbac.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

ACTIVE_REGION_KEY = "active.region"
EPOCH_KEY = "dr.epoch"
_CAS_ATTEMPTS = 5


class ClusterSettings(Protocol):
    """What the adapter reads from ``eagle_dr.config.KubernetesConfig``."""

    api_url: str | None
    context: str | None
    namespace: str
    selector: str
    config_map: str


@dataclass(frozen=True)
class DeploymentState:
    name: str
    replicas: int
    ready_replicas: int
    # False while the controller has not yet seen the latest spec (real clusters only;
    # kmock has no generations), so a stale "ready" from before a scale is not trusted.
    observed: bool = True

    @property
    def ready(self) -> bool:
        return self.observed and self.ready_replicas == self.replicas


class StaleEpochError(RuntimeError):
    """A runbook holding an older fencing token tried to move routing."""

    def __init__(self, config_map: str, stored: int, offered: int, stored_region: str | None, region: str):
        super().__init__(
            f"refusing to set {ACTIVE_REGION_KEY}={region!r} with {EPOCH_KEY}={offered}: ConfigMap "
            f"{config_map!r} already holds epoch {stored} (region {stored_region!r})"
        )
        self.stored = stored
        self.offered = offered


class ResourceMissing(LookupError):
    pass


class JobNameTaken(RuntimeError):
    """A Job with the requested name exists but was not made from the expected CronJob."""


class KubernetesCluster:
    def __init__(self, settings: ClusterSettings, api_client: client.ApiClient | None = None) -> None:
        self.namespace = settings.namespace
        self.selector = settings.selector
        self.config_map = settings.config_map
        self._api = api_client or _api_client(settings)
        self._apps = client.AppsV1Api(self._api)
        self._core = client.CoreV1Api(self._api)
        self._batch = client.BatchV1Api(self._api)

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> KubernetesCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- deployments -----------------------------------------------------------------------

    def list_deployments(self, selector: str | None = None) -> list[DeploymentState]:
        """``selector=None`` means the configured selector; ``""`` means every deployment."""
        sel = self.selector if selector is None else selector
        items = self._apps.list_namespaced_deployment(self.namespace, label_selector=sel or None).items
        return sorted((_state(d) for d in items), key=lambda s: s.name)

    def scale(self, selector: str | None, replicas: int | Mapping[str, int]) -> dict[str, int]:
        """Scale every matching deployment; returns each one's replicas *before* the call.

        ``replicas`` may be a mapping (e.g. a previous return value, to undo a scale): then
        only the named deployments are touched, and all must exist, checked before any change.
        """
        current = {d.name: d.replicas for d in self.list_deployments(selector)}
        if isinstance(replicas, Mapping):
            missing = sorted(set(replicas) - set(current))
            if missing:
                raise ResourceMissing(
                    f"deployments {', '.join(missing)} not found in namespace {self.namespace!r}"
                    f" with selector {self._sel(selector)!r}"
                )
            targets = {name: int(n) for name, n in replicas.items()}
        else:
            targets = dict.fromkeys(current, int(replicas))
        if any(n < 0 for n in targets.values()):
            raise ValueError(f"replicas must be >= 0, got {targets}")
        for name, n in targets.items():
            if current[name] != n:
                self._apps.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": n}})
        return {name: current[name] for name in targets}

    def wait_ready(
        self,
        selector: str | None,
        timeout_s: float,
        poll_s: float = 0.5,
        heartbeat: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, int]:
        """Block until every matching deployment has ready == desired; returns ready counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.list_deployments(selector)
            pending = [s for s in states if not s.ready]
            if not pending:
                return {s.name: s.ready_replicas for s in states}
            if heartbeat is not None:
                heartbeat({"pending": {s.name: f"{s.ready_replicas}/{s.replicas}" for s in pending}})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = ", ".join(
                    f"{s.name} ({s.ready_replicas}/{s.replicas} ready{'' if s.observed else ', spec not observed'})"
                    for s in pending
                )
                raise TimeoutError(
                    f"deployments not ready after {timeout_s:g}s in namespace {self.namespace!r}"
                    f" (selector {self._sel(selector)!r}): {detail}"
                )
            time.sleep(min(poll_s, remaining))

    # -- routing ConfigMap -----------------------------------------------------------------

    def get_active_region(self) -> str | None:
        return (self._read_config_map().data or {}).get(ACTIVE_REGION_KEY)

    def set_active_region(self, region: str, epoch: int | None = None) -> bool:
        """Point ``active.region`` at ``region``; returns whether anything changed.

        ``epoch`` is a fencing token: a lower one than stored is refused, and so is the same
        one naming a different region (two runbooks must never share a token). Without an
        epoch the write is unfenced (manual use) and ``dr.epoch`` is left alone.
        """
        for _ in range(_CAS_ATTEMPTS):
            cm = self._read_config_map()
            data = cm.data or {}
            stored_region = data.get(ACTIVE_REGION_KEY)
            stored_epoch = _epoch(data.get(EPOCH_KEY), self.config_map)
            if epoch is not None and stored_epoch is not None and (
                epoch < stored_epoch or (epoch == stored_epoch and region != stored_region)
            ):
                raise StaleEpochError(self.config_map, stored_epoch, epoch, stored_region, region)
            if stored_region == region and (epoch is None or epoch == stored_epoch):
                return False
            patch: dict[str, Any] = {"data": {ACTIVE_REGION_KEY: region}}
            if epoch is not None:
                patch["data"][EPOCH_KEY] = str(epoch)
            if cm.metadata and cm.metadata.resource_version:
                # A merge patch carrying resourceVersion is a compare-and-swap on a real API
                # server: a concurrent writer makes it 409 and we re-check the epoch.
                patch["metadata"] = {"resourceVersion": cm.metadata.resource_version}
            try:
                self._core.patch_namespaced_config_map(self.config_map, self.namespace, patch)
                return True
            except ApiException as e:
                if e.status != 409:
                    raise
        raise RuntimeError(
            f"ConfigMap {self.config_map!r} kept changing under us; gave up after {_CAS_ATTEMPTS} tries"
        )

    # -- jobs ------------------------------------------------------------------------------

    def create_job_from_cronjob(self, cronjob_name: str, job_name: str) -> str:
        """What ``kubectl create job --from=cronjob/<cronjob_name> <job_name>`` does, once."""
        existing = self._read_job(job_name)
        if existing is not None:
            return self._check_owner(existing, cronjob_name)
        try:
            cj = self._batch.read_namespaced_cron_job(cronjob_name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise ResourceMissing(f"CronJob {cronjob_name!r} not found in namespace {self.namespace!r}") from None
            raise
        template = self._api.sanitize_for_serialization(cj.spec.job_template)
        meta = template.get("metadata") or {}
        owner = {"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob_name, "controller": True}
        if cj.metadata.uid:  # always set by a real API server
            owner["uid"] = cj.metadata.uid
        body = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": job_name,
                "namespace": self.namespace,
                "labels": meta.get("labels") or {},
                "annotations": {**(meta.get("annotations") or {}), "cronjob.kubernetes.io/instantiate": "manual"},
                "ownerReferences": [owner],
            },
            "spec": template.get("spec") or {},
        }
        try:
            self._batch.create_namespaced_job(self.namespace, body)
        except ApiException as e:
            if e.status != 409:  # a concurrent retry won the race: same outcome
                raise
            job = self._read_job(job_name)
            if job is None:
                raise
            return self._check_owner(job, cronjob_name)
        return job_name

    def job_status(self, job_name: str) -> Literal["running", "succeeded", "failed"]:
        job = self._read_job(job_name)
        if job is None:
            raise ResourceMissing(f"Job {job_name!r} not found in namespace {self.namespace!r}")
        status = job.status
        for cond in (status.conditions if status else None) or []:
            if cond.status == "True" and cond.type in ("Complete", "SuccessCriteriaMet"):
                return "succeeded"
            if cond.status == "True" and cond.type in ("Failed", "FailureTarget"):
                return "failed"
        completions = (job.spec.completions if job.spec else None) or 1
        if status and (status.succeeded or 0) >= completions:
            return "succeeded"
        return "running"

    # -- internals -------------------------------------------------------------------------

    def _sel(self, selector: str | None) -> str:
        return self.selector if selector is None else selector

    def _read_config_map(self) -> client.V1ConfigMap:
        try:
            return self._core.read_namespaced_config_map(self.config_map, self.namespace)
        except ApiException as e:
            if e.status == 404:
                raise ResourceMissing(
                    f"ConfigMap {self.config_map!r} not found in namespace {self.namespace!r}"
                ) from None
            raise

    def _read_job(self, job_name: str) -> client.V1Job | None:
        try:
            return self._batch.read_namespaced_job(job_name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _check_owner(self, job: client.V1Job, cronjob_name: str) -> str:
        owners = (job.metadata.owner_references if job.metadata else None) or []
        if not any(o.kind == "CronJob" and o.name == cronjob_name for o in owners):
            raise JobNameTaken(f"Job {job.metadata.name!r} exists but was not created from CronJob {cronjob_name!r}")
        return job.metadata.name


def _api_client(settings: ClusterSettings) -> client.ApiClient:
    # Always a private ApiClient: two regions' clusters live in one worker process, so the
    # client library's global default configuration must never be touched.
    if settings.api_url:
        cfg = client.Configuration()
        cfg.host = settings.api_url
        return client.ApiClient(cfg)
    if settings.context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    return config.new_client_from_config(context=settings.context, persist_config=False)


def _state(d: client.V1Deployment) -> DeploymentState:
    desired = d.spec.replicas if d.spec and d.spec.replicas is not None else 1  # the API's default
    status = d.status
    generation = d.metadata.generation if d.metadata else None
    observed_gen = status.observed_generation if status else None
    return DeploymentState(
        name=d.metadata.name,
        replicas=desired,
        # The API omits readyReplicas when it is 0.
        ready_replicas=(status.ready_replicas if status else None) or 0,
        observed=generation is None or (observed_gen is not None and observed_gen >= generation),
    )


def _epoch(value: str | None, config_map: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        # A garbled token must stop the runbook, not silently switch fencing off.
        raise ValueError(f"ConfigMap {config_map!r} has a non-integer {EPOCH_KEY}: {value!r}") from None
