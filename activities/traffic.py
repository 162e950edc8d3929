"""Moving and checking traffic: routing (lab file, Kubernetes ConfigMap + scaling, Route 53)
and the end-to-end write/read that proves the new region serves.

These run on the control worker: they talk to APIs, not to a region's disks.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import redis
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities.deadline import deadline_across_attempts
from activities.heartbeat import heartbeating
from activities.kubernetes import KubernetesCluster, ResourceMissing, StaleEpochError
from activities.postgres.status import connect
from activities.postgres.unlogged import unreadable_sequences
from activities.redis.status import client as redis_client
from activities.routing import LabRouter, StaleEpoch
from eagle_dr.config import EagleConfig, scrub, scrubbed_first_line


class RouteRequest(BaseModel):
    region: str
    epoch: int
    # Desired replicas per deployment for the target region; empty = restore what the
    # region had before it was scaled down (or leave as is).
    replicas: dict[str, int] = {}
    # Change nothing until the region's PostgreSQL is writable (out of recovery), polling it
    # from here: a switchover asks for routing together with the promotion instead of after it.
    # False in older histories: routing as soon as asked.
    after_writable: bool = False
    after_writable_timeout_seconds: float = 200


class RouteResult(BaseModel):
    region: str
    previous_region: str | None
    # e.g. "configmap@us-west-2", "dns", "lab"
    changed: list[str]
    # after_writable: how long routing waited for the region's PostgreSQL to leave recovery.
    waited_writable_s: float | None = None
    scaled_up: dict[str, int] = {}
    # Where each scaled-up count came from ("remembered at fence", "from the other region", ...).
    scaled_from: dict[str, str] = {}
    # Clusters whose ConfigMap could not be written (region -> error): reported, not fatal.
    unreachable: dict[str, str] = {}


class ScaleDownRequest(BaseModel):
    region: str
    # The runbook's DR epoch; None (a history recorded before epochs reached this step) = unfenced.
    epoch: int | None = None


class ScaleDownResult(BaseModel):
    region: str
    reachable: bool
    previous: dict[str, int] = {}
    error: str | None = None
    # Scaled to 0 but the counts could not be remembered (e.g. no routing ConfigMap).
    note: str | None = None


class Verification(BaseModel):
    region: str
    ok: bool
    postgres_write_ms: float | None = None
    redis_roundtrip_ms: float | None = None
    error: str | None = None
    # Unlogged sequences the promoted primary cannot read (activities/postgres/unlogged.py):
    # nextval() on them fails until repaired. "name: error" each.
    broken_sequences: list[str] = []


def wait_writable(pg, timeout_s: float, poll_s: float = 0.005) -> float:
    """Until ``pg`` is out of recovery (pg_promote done: it takes writes). A tight poll on one
    session: what it replaces is a workflow round trip of ~30 ms inside the write outage.
    Raises NotWritable (non-retryable: the runbook's promotion is what failed) at the deadline,
    and CancelledError when the runbook cancels the wait (its promotion failed)."""
    started = time.monotonic()
    deadline = deadline_across_attempts(timeout_s)
    beat = 0.0
    conn = None
    last_error = "in recovery"
    try:
        while True:
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = connect(pg, 2)
                if not conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                    return time.monotonic() - started
                last_error = "in recovery"
            except psycopg.Error as e:
                last_error = scrubbed_first_line(e)
            now = time.monotonic()
            if now > deadline:
                raise ApplicationError(f"{pg.host}:{pg.port} not writable within {timeout_s:.0f} s ({last_error}): "
                                       "routing left unchanged", type="NotWritable", non_retryable=True)
            if activity.in_activity() and now - beat >= 1.0:
                beat = now
                activity.heartbeat({"waiting": "writable", "last": last_error})
                if activity.is_cancelled():
                    raise CancelledError("routing wait cancelled: routing left unchanged")
            time.sleep(poll_s)
    finally:
        if conn is not None:
            conn.close()


class TrafficActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _cluster(self, region: str) -> KubernetesCluster:
        return KubernetesCluster(self.cfg.region(region).kubernetes)

    @activity.defn
    def scale_down_region(self, req: str | ScaleDownRequest) -> ScaleDownResult:
        """Scale the region's microservices to 0 (part of fencing), remembering their replicas
        in that cluster's ConfigMap so routing back restores them; unreachable is a result.

        A bare region name is what workflows recorded before the epoch reached this step: it
        is still accepted so their histories replay, and acts unfenced.
        """
        req = ScaleDownRequest(region=req) if isinstance(req, str) else req
        if not self.cfg.routing.kubernetes:
            return ScaleDownResult(region=req.region, reachable=True)
        try:
            with self._cluster(req.region) as k8s:
                try:
                    previous = k8s.fence_scale_down(req.epoch)
                except ResourceMissing as e:
                    # No ConfigMap to remember the counts in: the fence matters more than the
                    # memory (routing back falls back to the other region's counts).
                    return ScaleDownResult(region=req.region, reachable=True, previous=k8s.scale(None, 0),
                                           note=f"replicas not remembered: {e}")
                return ScaleDownResult(region=req.region, reachable=True, previous=previous)
        except StaleEpochError as e:
            # A newer runbook owns this region (it may have just restored it): never scale it down.
            raise ApplicationError(str(e), type="StaleEpoch", non_retryable=True) from e
        except Exception as e:  # noqa: BLE001 - a dead region's API is expected during failover
            return ScaleDownResult(region=req.region, reachable=False, error=scrub(str(e))[:300])

    # no_thread_cancel_exception: a cancel (only ever asked while it waits for a promotion,
    # after_writable) is read in that wait; raised by the SDK anywhere in this thread, it
    # could land between two routing mechanisms and leave them disagreeing.
    @activity.defn(no_thread_cancel_exception=True)
    def route_traffic(self, req: RouteRequest) -> RouteResult:
        """Point every configured routing mechanism at ``req.region``, stamped with the epoch,
        and bring the region's services back to the replicas they had."""
        target = self.cfg.region(req.region)
        result = RouteResult(region=req.region, previous_region=None, changed=[])
        if req.after_writable:
            result.waited_writable_s = wait_writable(target.postgres, req.after_writable_timeout_seconds)
            # The runbook set a heartbeat timeout for the wait: the routing calls after it (a
            # Route 53 change waits for INSYNC) must beat too, or the server starts a second
            # attempt beside this one.
            with heartbeating(every=1.0):
                return self._route(req, target, result)
        return self._route(req, target, result)

    def _route(self, req: RouteRequest, target, result: RouteResult) -> RouteResult:
        dns = None
        try:
            if self.cfg.routing.dns and target.dns:
                from activities.dns import Route53Failover

                dns = Route53Failover(self.cfg.routing.dns_endpoint_url, target.dns.zone)
                set_id = target.dns.set_identifier or target.name
                # Refuse before any cluster is touched; point_to checks again, atomically.
                dns.check_epoch(target.dns.record, set_id, req.epoch)
            if self.cfg.routing.kubernetes:
                self._route_kubernetes(req, result)
            if dns is not None:
                before = dns.point_to(target.dns.record, target.dns.value, target.dns.ttl, set_id, epoch=req.epoch)
                if before != target.dns.value:
                    result.changed.append("dns")
            if self.cfg.routing.lab_file:
                router = LabRouter(self.cfg.lab.state_dir)
                result.previous_region = result.previous_region or router.active_region()
                if router.set_active_region(req.region, req.epoch):
                    result.changed.append("lab")
        except (StaleEpoch, StaleEpochError) as e:
            # A newer runbook owns routing now: retrying can never succeed.
            raise ApplicationError(str(e), type="StaleEpoch", non_retryable=True) from e
        return result

    def _route_kubernetes(self, req: RouteRequest, result: RouteResult) -> None:
        """Each region has its own cluster, and each cluster's ConfigMap says which region is
        active: all of them must agree, or the old region's services keep acting as active."""
        clusters: dict[str, KubernetesCluster] = {}
        try:
            # Check the epoch in every cluster before changing any: a newer runbook may have
            # reached only some of them. The target's cluster must answer (its services are
            # scaled up there: a retry is the only way on); another one may be down with its
            # region, which is reported, not fatal.
            for region in self.cfg.regions:
                k8s = self._cluster(region.name)
                try:
                    k8s.check_route_epoch(req.region, req.epoch)
                except StaleEpochError:
                    k8s.close()
                    raise
                except Exception as e:
                    k8s.close()
                    if region.name == req.region:
                        raise
                    result.unreachable[region.name] = scrub(str(e).strip())[:300]
                    continue
                clusters[region.name] = k8s
            target = clusters[req.region]
            result.previous_region = target.get_active_region()
            if target.set_active_region(req.region, req.epoch):
                result.changed.append(f"configmap@{req.region}")
            restored = target.restore_replicas(self._fallback_counts(clusters, req.region, result), req.replicas)
            result.scaled_up = {name: n for name, (n, _) in restored.items()}
            result.scaled_from = {name: why for name, (_, why) in restored.items()}
            for name, k8s in clusters.items():
                if name == req.region:
                    continue
                try:
                    if k8s.set_active_region(req.region, req.epoch):
                        result.changed.append(f"configmap@{name}")
                except StaleEpochError:
                    raise
                except Exception as e:  # noqa: BLE001 - the region traffic leaves may be dying
                    result.unreachable[name] = scrub(str(e).strip())[:300]
        finally:
            for k8s in clusters.values():
                k8s.close()

    @staticmethod
    def _fallback_counts(clusters: dict[str, KubernetesCluster], target: str, result: RouteResult) -> dict[str, int]:
        """Per deployment, what the other region runs (or ran before its fence): the size the
        service needs when the target itself never recorded one."""
        counts: dict[str, int] = {}
        for name, k8s in clusters.items():
            if name == target:
                continue
            try:
                remembered = k8s.remembered_replicas()
                for d in k8s.list_deployments():
                    counts.setdefault(d.name, d.replicas or remembered.get(d.name, 0))
            except Exception as e:  # noqa: BLE001 - only a hint; the target's own memory comes first
                result.unreachable[name] = scrub(str(e).strip())[:300]
        return counts

    @activity.defn
    def wait_region_ready(self, region: str) -> dict[str, int]:
        """Every service deployment of the region has at least one ready pod and as many as
        it asks for; a region scaled to 0 (0/0) is not ready."""
        if not self.cfg.routing.kubernetes:
            return {}
        with self._cluster(region) as k8s:
            return k8s.wait_ready(self.cfg.region(region).kubernetes.selector, timeout_s=300,
                                  heartbeat=activity.heartbeat)

    @activity.defn
    def verify_service(self, region: str) -> Verification:
        """A real write and read-back in the region, through the path the service uses."""
        r = self.cfg.region(region)
        probe = f"verify-{uuid.uuid4()}"
        try:
            t0 = time.monotonic()
            with connect(r.postgres, 5) as conn:
                conn.execute("create schema if not exists eagle_dr")
                conn.execute("create table if not exists eagle_dr.verify_probe (id text primary key, region text, "
                             "at timestamptz default clock_timestamp())")
                conn.execute("insert into eagle_dr.verify_probe (id, region) values (%s, %s)", (probe, region))
                got = conn.execute("select region from eagle_dr.verify_probe where id = %s", (probe,)).fetchone()
                pg_ms = (time.monotonic() - t0) * 1000
                try:
                    broken = unreadable_sequences(conn)
                except psycopg.Error:
                    broken = []  # the catalog read is a finding's source, never a verify failure
            if not got or got[0] != region:
                return Verification(region=region, ok=False, error="probe row not read back")
            t1 = time.monotonic()
            rc = redis_client(r.redis, 5)
            rc.set(f"eagle-dr:{probe}", region, ex=300)
            if rc.get(f"eagle-dr:{probe}") != region:
                return Verification(region=region, ok=False, error="redis probe not read back")
            return Verification(region=region, ok=True, postgres_write_ms=pg_ms,
                                redis_roundtrip_ms=(time.monotonic() - t1) * 1000, broken_sequences=broken)
        except (psycopg.Error, redis.RedisError, OSError) as e:
            return Verification(region=region, ok=False, error=scrub(str(e).strip())[:300])
