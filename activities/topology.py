"""What a runbook needs to know about the configuration, read on the control worker.

Workflows cannot read files (determinism), so the config reaches them through this one
activity; its result is in history and a replay sees the same topology.
"""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import activity

from eagle_dr.config import EagleConfig


class RegionInfo(BaseModel):
    name: str
    task_queue: str
    configured_role: str
    priority: int
    # host:port of the region's Redis (None in histories recorded before it was carried).
    redis_address: str | None = None


class Topology(BaseModel):
    service: str
    regions: list[RegionInfo]
    control_task_queue: str
    rto_target_seconds: float | None
    rpo_target_seconds: float | None
    cache_rpo_target_seconds: float | None
    lab: bool
    survivor_rule: str = "active-region"
    # backup.read_from: where "auto" backups read the data files (absent from old histories).
    backup_read_from: str = "primary"
    # notifications: channel -> the events it gets. Empty (and absent from old histories):
    # the workflows issue no notification activity at all.
    notify_channels: dict[str, list[str]] = {}
    # How long after losing all contact a region's worker has surely fenced its own primary
    # (workers/self_fence.py); None: self-fencing is off (and absent from old histories).
    self_fence_wait_seconds: float | None = None

    def notify_targets(self, kind: str) -> list[str]:
        return [name for name, kinds in self.notify_channels.items() if kind in kinds]

    def region(self, name: str) -> RegionInfo | None:
        return next((r for r in self.regions if r.name == name), None)

    def other(self, name: str) -> RegionInfo:
        return next(r for r in self.regions if r.name != name)


class TopologyActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def describe_topology(self) -> Topology:
        o = self.cfg.objectives
        secs = lambda d: d.total_seconds() if d is not None else None  # noqa: E731
        return Topology(
            service=self.cfg.service,
            regions=[RegionInfo(name=r.name, task_queue=r.temporal.task_queue, configured_role=r.role,
                                priority=r.priority, redis_address=f"{r.redis.host}:{r.redis.port}")
                     for r in self.cfg.regions],
            control_task_queue=self.cfg.temporal.control_task_queue,
            rto_target_seconds=secs(o.critical.rto), rpo_target_seconds=secs(o.critical.rpo),
            cache_rpo_target_seconds=secs(o.cache.rpo), lab=self.cfg.routing.lab_file,
            survivor_rule=self.cfg.split_brain.survivor_rule, backup_read_from=self.cfg.backup.read_from,
            notify_channels=self.cfg.notifications.routing(), self_fence_wait_seconds=self.cfg.health.self_fence_wait_seconds())
