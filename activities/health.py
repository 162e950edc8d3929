"""Health probes.

``probe_region`` runs on a region's own worker (its view of its own databases).
``probe_regions_from_here`` runs on any worker, regional or control: it is one *vantage
point* looking at named regions over the network, so the monitor can tell a dead region
(every vantage point that answers sees it down) from a dead worker (its vantage point
does not answer; the others see the databases fine).
"""

from __future__ import annotations

import socket

import redis
from pydantic import BaseModel, Field
from temporalio import activity

from activities.postgres.status import PgStatus, pg_status
from activities.redis.status import RedisStatus, redis_status
from activities.redis.status import client as redis_client
from eagle_dr.config import EagleConfig


class RegionHealth(BaseModel):
    region: str
    worker: str
    postgres: PgStatus
    redis: RedisStatus

    @property
    def healthy(self) -> bool:
        return self.postgres.reachable and self.redis.reachable


class ProbeRequest(BaseModel):
    # Empty: only "this worker is alive and picks up work" (eagle-dr status uses that).
    regions: list[str] = []
    timeout_seconds: float = Field(default=3.0, gt=0, le=30)


class RegionSighting(BaseModel):
    """What one vantage point saw of one region."""

    region: str
    postgres_up: bool
    postgres_role: str | None = None  # "primary" | "standby"
    read_only: bool | None = None
    redis_up: bool
    error: str | None = None

    @property
    def verdict(self) -> str:
        """down | standby | read-only (a fenced primary: a move is under way) | up (a writable primary)."""
        if not self.postgres_up:
            return "down"
        if self.postgres_role != "primary":
            return "standby"
        return "read-only" if self.read_only else "up"


class VantageReport(BaseModel):
    worker: str
    sightings: list[RegionSighting] = []

    def of(self, region: str) -> RegionSighting | None:
        return next((s for s in self.sightings if s.region == region), None)


def _worker() -> str:
    return f"{socket.gethostname()}/{activity.info().task_queue}"


def _redis_ping(cfg, timeout: float) -> str | None:
    try:
        redis_client(cfg, timeout).ping()
    except (redis.RedisError, OSError) as e:
        return str(e) or type(e).__name__
    return None


class HealthActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def probe_region(self, region: str) -> RegionHealth:
        """Probe this region's PostgreSQL and Redis; unreachable is a result, not an error."""
        r = self.cfg.region(region)
        timeout = min(self.cfg.health.timeout.total_seconds(), 10.0)
        return RegionHealth(region=region, worker=_worker(), postgres=pg_status(r.postgres, timeout),
                            redis=redis_status(r.redis, timeout))

    @activity.defn
    def probe_regions_from_here(self, req: ProbeRequest) -> VantageReport:
        """From this worker, over the network: each named region's PostgreSQL with a real
        query (role, read-only) and its Redis with PING. Unreachable is a sighting, not an error."""
        out = []
        for name in req.regions:
            r = self.cfg.region(name)
            pg = pg_status(r.postgres, req.timeout_seconds)
            redis_error = _redis_ping(r.redis, req.timeout_seconds)
            errors = [e for e in (pg.error and f"postgres: {pg.error}", redis_error and f"redis: {redis_error}") if e]
            out.append(RegionSighting(region=name, postgres_up=pg.reachable, postgres_role=pg.role,
                                      read_only=pg.read_only, redis_up=redis_error is None,
                                      error="; ".join(errors) or None))
        return VantageReport(worker=_worker(), sightings=out)
