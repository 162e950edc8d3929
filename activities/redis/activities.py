"""Redis activities: fence, promote, switch over, demote; idempotent, one action each.

They talk to Redis over the network, so they run on the control worker (a dead region's
worker must not be needed to fence or promote the other region's Redis).
"""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import activity

from activities.redis import failover
from eagle_dr.config import EagleConfig


class RedisPromoted(BaseModel):
    promotion: failover.RedisPromotion
    sentinels_repointed: list[str]


class RedisMoveRequest(BaseModel):
    old_region: str
    new_region: str


class RedisActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _redis(self, region: str):
        return self.cfg.region(region).redis

    @activity.defn
    def fence_redis(self, region: str) -> failover.RedisFence:
        return failover.fence(self._redis(region))

    @activity.defn
    def unfence_redis(self, region: str) -> None:
        failover.unfence(self._redis(region))

    @activity.defn
    def promote_redis(self, region: str) -> RedisPromoted:
        """Promote the region's replica and make every reachable Sentinel watch it."""
        target = self._redis(region)
        promotion = failover.promote(target)
        repointed = failover.repoint_sentinels(target, target)
        return RedisPromoted(promotion=promotion, sentinels_repointed=repointed)

    @activity.defn
    def switchover_redis(self, req: RedisMoveRequest) -> failover.RedisSwitchover:
        old, new = self._redis(req.old_region), self._redis(req.new_region)
        result = failover.switchover(old, new, timeout_s=60, heartbeat=activity.heartbeat)
        failover.repoint_sentinels(new, new)
        return result

    @activity.defn
    def demote_redis(self, req: RedisMoveRequest) -> dict:
        """Make the old region's Redis a replica of the new master (discards its own writes)."""
        return failover.demote(self._redis(req.old_region), self._redis(req.new_region))
