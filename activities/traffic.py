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
from temporalio.exceptions import ApplicationError

from activities.kubernetes import KubernetesCluster, StaleEpochError
from activities.postgres.status import connect
from activities.redis.status import client as redis_client
from activities.routing import LabRouter, StaleEpoch
from eagle_dr.config import EagleConfig, scrub


class RouteRequest(BaseModel):
    region: str
    epoch: int
    # Desired replicas per deployment for the target region; empty = restore what the
    # region had before it was scaled down (or leave as is).
    replicas: dict[str, int] = {}


class RouteResult(BaseModel):
    region: str
    previous_region: str | None
    changed: list[str]
    scaled_up: dict[str, int] = {}


class ScaleDownResult(BaseModel):
    region: str
    reachable: bool
    previous: dict[str, int] = {}
    error: str | None = None


class Verification(BaseModel):
    region: str
    ok: bool
    postgres_write_ms: float | None = None
    redis_roundtrip_ms: float | None = None
    error: str | None = None


class TrafficActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _cluster(self, region: str) -> KubernetesCluster:
        return KubernetesCluster(self.cfg.region(region).kubernetes)

    @activity.defn
    def scale_down_region(self, region: str) -> ScaleDownResult:
        """Scale the region's microservices to 0 (part of fencing); unreachable is a result."""
        if not self.cfg.routing.kubernetes:
            return ScaleDownResult(region=region, reachable=True)
        try:
            with self._cluster(region) as k8s:
                return ScaleDownResult(region=region, reachable=True,
                                       previous=k8s.scale(self.cfg.region(region).kubernetes.selector, 0))
        except Exception as e:  # noqa: BLE001 - a dead region's API is expected during failover
            return ScaleDownResult(region=region, reachable=False, error=scrub(str(e))[:300])

    @activity.defn
    def route_traffic(self, req: RouteRequest) -> RouteResult:
        """Point every configured routing mechanism at ``req.region``, stamped with the epoch."""
        target = self.cfg.region(req.region)
        changed, previous, scaled = [], None, {}
        try:
            if self.cfg.routing.kubernetes:
                with self._cluster(req.region) as k8s:
                    selector = target.kubernetes.selector
                    if req.replicas:
                        k8s.scale(selector, req.replicas)
                        scaled = dict(req.replicas)
                    previous = k8s.get_active_region()
                    if k8s.set_active_region(req.region, req.epoch):
                        changed.append("configmap")
            if self.cfg.routing.dns and target.dns:
                from activities.dns import Route53Failover

                dns = Route53Failover(self.cfg.routing.dns_endpoint_url, target.dns.zone)
                before = dns.point_to(target.dns.record, target.dns.value, target.dns.ttl,
                                      target.dns.set_identifier or target.name)
                if before != target.dns.value:
                    changed.append("dns")
            if self.cfg.routing.lab_file:
                router = LabRouter(self.cfg.lab.state_dir)
                previous = previous or router.active_region()
                if router.set_active_region(req.region, req.epoch):
                    changed.append("lab")
        except (StaleEpoch, StaleEpochError) as e:
            # A newer runbook owns routing now: retrying can never succeed.
            raise ApplicationError(str(e), type="StaleEpoch", non_retryable=True) from e
        return RouteResult(region=req.region, previous_region=previous, changed=changed, scaled_up=scaled)

    @activity.defn
    def wait_region_ready(self, region: str) -> dict[str, int]:
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
            if not got or got[0] != region:
                return Verification(region=region, ok=False, error="probe row not read back")
            t1 = time.monotonic()
            rc = redis_client(r.redis, 5)
            rc.set(f"eagle-dr:{probe}", region, ex=300)
            if rc.get(f"eagle-dr:{probe}") != region:
                return Verification(region=region, ok=False, error="redis probe not read back")
            return Verification(region=region, ok=True, postgres_write_ms=pg_ms,
                                redis_roundtrip_ms=(time.monotonic() - t1) * 1000)
        except (psycopg.Error, redis.RedisError, OSError) as e:
            return Verification(region=region, ok=False, error=scrub(str(e).strip())[:300])
