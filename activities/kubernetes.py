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
# ``<prefix><deployment>`` in the routing ConfigMap: the replicas a deployment had when a fence
# scaled it to 0, so routing back to the region can restore them. Why the ConfigMap and not an
# annotation on each Deployment: annotating needs ``patch`` on ``deployments``, which would
# also let the worker change images and pod specs; the Role in rbac.md deliberately grants
# only the scale subresource plus this one ConfigMap. The ConfigMap also holds the epoch, so
# "check the epoch, remember the counts" is one compare-and-swap, and it survives worker
# restarts. (ConfigMap keys may not contain "/", hence the dots.)
REPLICAS_KEY_PREFIX = "eagle-dr.replicas-before-fence."
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
        # 0/0 is not ready: a region whose deployments are scaled to 0 serves nobody, and
        # "every desired pod is ready" is vacuously true there. Serving means at least one
        # ready pod, and every pod the spec asks for.
        return self.observed and self.replicas >= 1 and self.ready_replicas >= self.replicas


class StaleEpochError(RuntimeError):
    """A runbook holding an older fencing token tried to move routing."""

    def __init__(self, config_map: str, stored: int, offered: int, stored_region: str | None, region: str | None,
                 action: str | None = None):
        action = action or f"set {ACTIVE_REGION_KEY}={region!r}"
        super().__init__(
            f"refusing to {action} with {EPOCH_KEY}={offered}: ConfigMap "
            f"{config_map!r} already holds epoch {stored} (region {stored_region!r})"
        )
        self.stored = stored
        self.offered = offered


class ResourceMissing(LookupError):
    pass


class JobNameTaken(RuntimeError):
    """A Job with the requested name exists but was not made from the expected CronJob."""


class KubernetesCluster:
    def __init__(
        self,
        settings: ClusterSettings,
        api_client: client.ApiClient | None = None,
        request_timeout_s: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        # (connect, read) per request: a dead region's API server (packets dropped, not
        # refused) must cost seconds, not the activity's whole start-to-close timeout.
        self._timeout = request_timeout_s
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
        items = self._apps.list_namespaced_deployment(
            self.namespace, label_selector=sel or None, _request_timeout=self._timeout
        ).items
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
                self._apps.patch_namespaced_deployment_scale(
                    name, self.namespace, {"spec": {"replicas": n}}, _request_timeout=self._timeout
                )
        return {name: current[name] for name in targets}

    def wait_ready(
        self,
        selector: str | None,
        timeout_s: float,
        poll_s: float = 0.5,
        heartbeat: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, int]:
        """Block until every matching deployment serves: at least one ready pod, and as many as
        desired. A deployment scaled to 0 never counts as ready; returns ready counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.list_deployments(selector)
            pending = [s for s in states if not s.ready]
            # No deployment at all serves nobody either (a selector that matches nothing).
            if states and not pending:
                return {s.name: s.ready_replicas for s in states}
            if heartbeat is not None:
                heartbeat({"pending": {s.name: f"{s.ready_replicas}/{s.replicas}" for s in pending}})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = ", ".join(
                    f"{s.name} ({s.ready_replicas}/{s.replicas} ready"
                    f"{'' if s.observed else ', spec not observed'}{', scaled to 0' if s.replicas == 0 else ''})"
                    for s in pending
                ) or "no deployment matches"
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

        def update(data: dict[str, str]) -> dict[str, str | None] | None:
            stored_epoch = self._check_route_epoch(data, region, epoch)
            if data.get(ACTIVE_REGION_KEY) == region and (epoch is None or epoch == stored_epoch):
                return None
            patch: dict[str, str | None] = {ACTIVE_REGION_KEY: region}
            if epoch is not None:
                patch[EPOCH_KEY] = str(epoch)
            return patch

        return self._update_config_map(update)

    def check_route_epoch(self, region: str, epoch: int) -> int | None:
        """Raise ``StaleEpochError`` if ``set_active_region(region, epoch)`` would be refused;
        returns the stored epoch. Lets a runbook check every cluster before it changes any."""
        return self._check_route_epoch(self._config_map_data(), region, epoch)

    # -- remembered replicas (fence and restore) -------------------------------------------

    def remembered_replicas(self) -> dict[str, int]:
        return _remembered(self._config_map_data(), self.config_map)

    def fence_scale_down(self, epoch: int | None = None) -> dict[str, int]:
        """Scale the configured deployments to 0, first remembering each one's replicas in the
        ConfigMap; returns the replicas each had before the call.

        Idempotent across retries and worker restarts: only a count above 0 is remembered, so
        a second scale-down (already at 0) keeps the first one's count instead of writing 0.
        With an epoch, a ConfigMap holding a higher one means a newer runbook owns this
        region (it may have just restored it): ``StaleEpochError``, nothing changed.
        """
        running = {d.name: d.replicas for d in self.list_deployments() if d.replicas > 0}

        def update(data: dict[str, str]) -> dict[str, str | None] | None:
            stored = _epoch(data.get(EPOCH_KEY), self.config_map)
            if epoch is not None and stored is not None and epoch < stored:
                raise StaleEpochError(self.config_map, stored, epoch, data.get(ACTIVE_REGION_KEY), None,
                                      action=f"scale {self._sel(None)!r} to 0")
            patch = {REPLICAS_KEY_PREFIX + name: str(n) for name, n in running.items()
                     if data.get(REPLICAS_KEY_PREFIX + name) != str(n)}
            return patch or None

        # The count is written before the scale: a worker killed in between leaves a
        # remembered count and running pods, which the retry scales down; never the reverse.
        self._update_config_map(update)
        return self.scale(None, 0)

    def restore_replicas(
        self, fallback: Mapping[str, int] | None = None, explicit: Mapping[str, int] | None = None
    ) -> dict[str, tuple[int, str]]:
        """Scale the configured deployments that are at 0 back up; returns, per deployment
        changed, ``(replicas, where the count came from)``.

        The count is, in order: ``explicit``; what this cluster remembered when it was fenced;
        ``fallback`` (the same deployment in the region traffic leaves); else 1, because one
        serving pod beats none (an autoscaler or the operator takes it from there). A
        deployment already running is left alone. The remembered counts used are then
        forgotten, so a later restore cannot resurrect a count from an older fence.
        """
        explicit, fallback = dict(explicit or {}), dict(fallback or {})
        remembered = self.remembered_replicas()
        plan: dict[str, tuple[int, str]] = {}
        deployments = self.list_deployments()
        for d in deployments:
            if d.name in explicit:
                plan[d.name] = (int(explicit[d.name]), "requested")
            elif d.replicas > 0:
                continue
            elif remembered.get(d.name, 0) > 0:
                plan[d.name] = (remembered[d.name], "remembered at fence")
            elif fallback.get(d.name, 0) > 0:
                plan[d.name] = (int(fallback[d.name]), "from the other region")
            else:
                plan[d.name] = (1, "no recorded count")
        missing = sorted(set(explicit) - set(plan))
        if missing:
            raise ResourceMissing(f"deployments {', '.join(missing)} not found in namespace {self.namespace!r}"
                                  f" with selector {self.selector!r}")
        before = self.scale(None, {name: n for name, (n, _) in plan.items()})
        # Forget the count of every deployment now running, including one a retried call
        # (killed between scale and forget) finds already scaled up.
        used = [d.name for d in deployments if d.name in remembered and plan.get(d.name, (d.replicas,))[0] > 0]
        if used:
            self._update_config_map(lambda data: {REPLICAS_KEY_PREFIX + n: None for n in used
                                                  if REPLICAS_KEY_PREFIX + n in data} or None)
        return {name: plan[name] for name in plan if before[name] != plan[name][0]}

    # -- jobs ------------------------------------------------------------------------------

    def create_job_from_cronjob(self, cronjob_name: str, job_name: str) -> str:
        """What ``kubectl create job --from=cronjob/<cronjob_name> <job_name>`` does, once."""
        existing = self._read_job(job_name)
        if existing is not None:
            return self._check_owner(existing, cronjob_name)
        try:
            cj = self._batch.read_namespaced_cron_job(cronjob_name, self.namespace, _request_timeout=self._timeout)
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
            self._batch.create_namespaced_job(self.namespace, body, _request_timeout=self._timeout)
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

    def _check_route_epoch(self, data: Mapping[str, str], region: str, epoch: int | None) -> int | None:
        stored_region = data.get(ACTIVE_REGION_KEY)
        stored_epoch = _epoch(data.get(EPOCH_KEY), self.config_map)
        if epoch is not None and stored_epoch is not None and (
            epoch < stored_epoch or (epoch == stored_epoch and region != stored_region)
        ):
            raise StaleEpochError(self.config_map, stored_epoch, epoch, stored_region, region)
        return stored_epoch

    def _config_map_data(self) -> dict[str, str]:
        return {k: v for k, v in (self._read_config_map().data or {}).items() if v is not None}

    def _update_config_map(self, update: Callable[[dict[str, str]], dict[str, str | None] | None]) -> bool:
        """Read-check-write of the ConfigMap's data; ``update`` returns the keys to set (None
        deletes one) or None for "nothing to do", and may raise to refuse."""
        for _ in range(_CAS_ATTEMPTS):
            cm = self._read_config_map()
            changes = update({k: v for k, v in (cm.data or {}).items() if v is not None})
            if not changes:
                return False
            patch: dict[str, Any] = {"data": changes}
            if cm.metadata and cm.metadata.resource_version:
                # A merge patch carrying resourceVersion is a compare-and-swap on a real API
                # server: a concurrent writer makes it 409 and we re-check the epoch.
                patch["metadata"] = {"resourceVersion": cm.metadata.resource_version}
            try:
                self._core.patch_namespaced_config_map(
                    self.config_map, self.namespace, patch, _request_timeout=self._timeout
                )
                return True
            except ApiException as e:
                if e.status != 409:
                    raise
        raise RuntimeError(
            f"ConfigMap {self.config_map!r} kept changing under us; gave up after {_CAS_ATTEMPTS} tries"
        )

    def _read_config_map(self) -> client.V1ConfigMap:
        try:
            return self._core.read_namespaced_config_map(
                self.config_map, self.namespace, _request_timeout=self._timeout
            )
        except ApiException as e:
            if e.status == 404:
                raise ResourceMissing(
                    f"ConfigMap {self.config_map!r} not found in namespace {self.namespace!r}"
                ) from None
            raise

    def _read_job(self, job_name: str) -> client.V1Job | None:
        try:
            return self._batch.read_namespaced_job(job_name, self.namespace, _request_timeout=self._timeout)
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


def _remembered(data: Mapping[str, str], config_map: str) -> dict[str, int]:
    out = {}
    for key, value in data.items():
        if key.startswith(REPLICAS_KEY_PREFIX):
            try:
                out[key[len(REPLICAS_KEY_PREFIX):]] = int(value)
            except ValueError:
                raise ValueError(f"ConfigMap {config_map!r} has a non-integer {key}: {value!r}") from None
    return out


def _epoch(value: str | None, config_map: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        # A garbled token must stop the runbook, not silently switch fencing off.
        raise ValueError(f"ConfigMap {config_map!r} has a non-integer {EPOCH_KEY}: {value!r}") from None
