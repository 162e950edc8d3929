"""Redis activities: fence, promote, switch over, demote; idempotent, one action each.

They talk to Redis over the network, so they run on the control worker (a dead region's
worker must not be needed to fence or promote the other region's Redis).

Fence, unfence, promote and switchover carry the runbook's DR epoch and refuse to act when a
Redis node records a newer one (activities/redis/epoch.py says where and why); promote and
switchover record it in the new master. A bare region name, or a request without an epoch,
is what workflows recorded before the Redis steps carried it: accepted so those histories
replay and in-flight runs finish, and acted on unchecked.
"""

from __future__ import annotations

import logging

import redis
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.redis import epoch as epochs
from activities.redis import failover
from eagle_dr.config import EagleConfig, scrub

log = logging.getLogger(__name__)


class RedisPromoted(BaseModel):
    promotion: failover.RedisPromotion
    sentinels_repointed: list[str]
    # Why the epoch could not be recorded in the new master (None: recorded, or no epoch given).
    epoch_note: str | None = None


class RedisRegionRequest(BaseModel):
    region: str
    epoch: int | None = None


class RedisMoveRequest(BaseModel):
    old_region: str
    new_region: str
    epoch: int | None = None


def _stale(e: epochs.StaleEpoch) -> ApplicationError:
    return ApplicationError(str(e), type="StaleEpoch", non_retryable=True)


class RedisActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _redis(self, region: str):
        return self.cfg.region(region).redis

    def _refuse_stale(self, epoch: int | None, with_run: bool) -> None:
        """Refuse when any reachable Redis node records a newer epoch. ``with_run`` for the steps
        that record the epoch themselves: the same epoch from another run is stale too."""
        if epoch is None:
            return
        held = epochs.highest_epoch([r.redis for r in self.cfg.regions], self.cfg.service)
        try:
            epochs.refuse_stale(held, epoch, activity.info().workflow_run_id if with_run else None)
        except epochs.StaleEpoch as e:
            raise _stale(e) from e

    def _record(self, region: str, epoch: int | None) -> str | None:
        """Record the epoch in the new master; a write the master refuses (an operator's
        min-replicas-to-write with no replica attached yet) is reported, not a failed move:
        Redis has moved, and PostgreSQL's record of the same epoch still guards the run."""
        if epoch is None:
            return None
        info = activity.info()
        try:
            epochs.record_epoch(self._redis(region), self.cfg.service, epoch, region, info.workflow_id,
                                info.workflow_run_id)
        except epochs.StaleEpoch as e:
            raise _stale(e) from e
        except (redis.RedisError, OSError) as e:
            log.warning("epoch %s not recorded in %s's Redis: %s", epoch, region, e)
            return f"epoch {epoch} not recorded in {region}'s Redis: {scrub(str(e))}"
        return None

    @activity.defn
    def fence_redis(self, req: str | RedisRegionRequest) -> failover.RedisFence:
        req = RedisRegionRequest(region=req) if isinstance(req, str) else req
        # A late fence of a superseded run must not fence what a newer move made the master.
        self._refuse_stale(req.epoch, with_run=False)
        return failover.fence(self._redis(req.region))

    @activity.defn
    def unfence_redis(self, req: str | RedisRegionRequest) -> None:
        req = RedisRegionRequest(region=req) if isinstance(req, str) else req
        # A late compensation must not lift a fence a newer move put there: two masters.
        self._refuse_stale(req.epoch, with_run=False)
        lifted = failover.unfence(self._redis(req.region))
        if not lifted.reachable:
            # Returned quietly, it read as lifted: a cancel's undo said "takes writes again" of a
            # Redis that did not answer, whose fence then stayed (or landed late) on a master.
            raise ApplicationError(f"{req.region}'s Redis did not answer ({lifted.error}): any fence on it is still "
                                   "on", type="RedisUnreachable")

    @activity.defn
    def promote_redis(self, req: str | RedisRegionRequest) -> RedisPromoted:
        """Promote the region's replica, record the epoch in it, and make every reachable Sentinel watch it."""
        req = RedisRegionRequest(region=req) if isinstance(req, str) else req
        self._refuse_stale(req.epoch, with_run=True)
        target = self._redis(req.region)
        promotion = failover.promote(target)
        note = self._record(req.region, req.epoch)
        repointed = failover.repoint_sentinels(target, target)
        return RedisPromoted(promotion=promotion, sentinels_repointed=repointed, epoch_note=note)

    @activity.defn
    def switchover_redis(self, req: RedisMoveRequest) -> failover.RedisSwitchover:
        self._refuse_stale(req.epoch, with_run=True)
        old, new = self._redis(req.old_region), self._redis(req.new_region)
        result = failover.switchover(old, new, timeout_s=60, heartbeat=activity.heartbeat)
        result.epoch_note = self._record(req.new_region, req.epoch)
        failover.repoint_sentinels(new, new)
        return result

    @activity.defn
    def demote_redis(self, req: RedisMoveRequest) -> dict:
        """Make the old region's Redis a replica of the new master (discards its own writes)."""
        return failover.demote(self._redis(req.old_region), self._redis(req.new_region))
