"""Health probes, run on each region's own worker (its view of its own databases)."""

from __future__ import annotations

import socket

from pydantic import BaseModel
from temporalio import activity

from activities.postgres.status import PgStatus, pg_status
from activities.redis.status import RedisStatus, redis_status
from eagle_dr.config import EagleConfig


class RegionHealth(BaseModel):
    region: str
    worker: str
    postgres: PgStatus
    redis: RedisStatus

    @property
    def healthy(self) -> bool:
        return self.postgres.reachable and self.redis.reachable


class HealthActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def probe_region(self, region: str) -> RegionHealth:
        """Probe this region's PostgreSQL and Redis; unreachable is a result, not an error."""
        r = self.cfg.region(region)
        timeout = min(self.cfg.health.timeout.total_seconds(), 10.0)
        return RegionHealth(region=region, worker=f"{socket.gethostname()}/{activity.info().task_queue}",
                            postgres=pg_status(r.postgres, timeout), redis=redis_status(r.redis, timeout))
