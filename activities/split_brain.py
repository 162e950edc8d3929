"""Split-brain detection: more than one writable primary, more than one Redis master, or
regions that disagree about which one is active. Reports exactly which."""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import activity

from activities.postgres.status import pg_status
from activities.redis.status import redis_status
from activities.routing import LabRouter
from eagle_dr.config import EagleConfig


class SplitBrainReport(BaseModel):
    postgres_primaries: list[str]
    redis_masters: list[str]
    active_region_views: dict[str, str | None]
    unreachable: list[str] = []

    @property
    def findings(self) -> list[str]:
        out = []
        if len(self.postgres_primaries) > 1:
            out.append(f"postgres: {len(self.postgres_primaries)} writable primaries "
                       f"({', '.join(self.postgres_primaries)})")
        if len(self.redis_masters) > 1:
            out.append(f"redis: {len(self.redis_masters)} masters ({', '.join(self.redis_masters)})")
        views = {v for v in self.active_region_views.values() if v}
        if len(views) > 1:
            out.append(f"routing: sources disagree on the active region ({self.active_region_views})")
        return out

    @property
    def split(self) -> bool:
        return bool(self.findings)


def detect(cfg: EagleConfig) -> SplitBrainReport:
    primaries, masters, unreachable = [], [], []
    for r in cfg.regions:
        pg = pg_status(r.postgres, 3)
        if not pg.reachable:
            unreachable.append(f"{r.name}/postgres")
        # A fenced (read-only) primary takes no writes: it is not a second writer.
        elif pg.role == "primary" and not pg.read_only:
            primaries.append(r.name)
        rd = redis_status(r.redis, 3)
        if not rd.reachable:
            unreachable.append(f"{r.name}/redis")
        elif rd.role == "master":
            masters.append(r.name)
    views: dict[str, str | None] = {}
    if cfg.routing.lab_file:
        views["lab"] = LabRouter(cfg.lab.state_dir).active_region()
    if cfg.routing.kubernetes:
        from activities.kubernetes import KubernetesCluster

        for r in cfg.regions:
            try:
                with KubernetesCluster(r.kubernetes) as k8s:
                    views[f"configmap@{r.name}"] = k8s.get_active_region()
            except Exception:  # noqa: BLE001 - an unreachable cluster is reported, not fatal
                unreachable.append(f"{r.name}/kubernetes")
    return SplitBrainReport(postgres_primaries=primaries, redis_masters=masters, active_region_views=views,
                            unreachable=unreachable)


class SplitBrainActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def detect_split_brain(self) -> SplitBrainReport:
        return detect(self.cfg)
