"""Split brain: detecting it (more than one writable primary, more than one Redis master, or
routing sources that disagree about the active region: the report says exactly which) and
choosing the survivor by the configured rule (a pure function: the workflow runs it)."""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import activity

from activities.postgres.epoch import read_epoch
from activities.postgres.status import pg_status
from activities.redis.status import fenced as _redis_fenced
from activities.redis.status import redis_status
from activities.routing import LabRouter
from eagle_dr.config import EagleConfig


class SplitBrainReport(BaseModel):
    postgres_primaries: list[str]
    redis_masters: list[str]
    active_region_views: dict[str, str | None]
    unreachable: list[str] = []
    # Primaries already fenced read-only: not a second writer, but diverged all the same.
    fenced_primaries: list[str] = []
    # Redis masters a runbook fenced (writes paused, replication held): the old master a
    # failover left behind for failback, not a second writer.
    fenced_masters: list[str] = []
    # Each reachable PostgreSQL node's DR epoch: a promoted node carries its own line.
    epochs: dict[str, int] = {}

    @property
    def all_redis_masters(self) -> list[str]:
        """Every node in the master role, fenced or not: what a resolution must re-attach."""
        return sorted({*self.redis_masters, *self.fenced_masters})

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

    @property
    def detail(self) -> str:
        """The detect step's line, in the runbook and in its plan alike."""
        if self.findings:
            return "; ".join(self.findings)
        if self.unreachable:
            return f"none seen, but {', '.join(self.unreachable)} did not answer"
        return "; ".join(["no split brain", *(f"{r}'s primary is fenced read-only" for r in self.fenced_primaries)])

    @property
    def unseen_note(self) -> str | None:
        """Why "no split brain" cannot be claimed: a node that did not answer may be a second
        writer (a partition hides exactly that)."""
        if not self.unreachable:
            return None
        return (f"cannot tell: {', '.join(self.unreachable)} did not answer. Run split-brain detection again once "
                "it answers; an old primary kept down since a failover rejoins with eagle-dr failback --region "
                "<it>, which keeps its writes")

    @property
    def fenced_notes(self) -> list[str]:
        """What "no split brain" must not hide: a primary fenced read-only is no second writer,
        but it is not a standby either. Beside a writable one it is an old primary back from an
        outage (fenced by the failover or, when that could not reach it, by its own worker as
        superseded): whatever it committed after the fork is in neither region's live data
        until failback keeps it. Alone, no region takes writes. Nothing while a PostgreSQL node
        did not answer: the writer may be the one unseen, and lifting a fence then makes two."""
        if any(u.endswith("/postgres") for u in self.unreachable):
            return []
        if not self.postgres_primaries:
            return [f"no writable PostgreSQL primary: {r}'s is a primary fenced read-only (eagle-dr unfence "
                    f"--region {r} lifts a fence a runbook left)" for r in self.fenced_primaries]
        writers = ", ".join(self.postgres_primaries)
        return [f"{r}'s PostgreSQL is an old primary, fenced read-only beside {writers}: not a second writer, "
                f"but whatever it committed after the fork is not in {writers}; eagle-dr failback --region {r} "
                "keeps it and makes it a standby" for r in self.fenced_primaries]


def detect(cfg: EagleConfig) -> SplitBrainReport:
    primaries, fenced, masters, fenced_masters, unreachable, epochs = [], [], [], [], [], {}
    for r in cfg.regions:
        pg = pg_status(r.postgres, 3)
        if pg.reachable:
            epochs[r.name] = read_epoch(r.postgres, cfg.service).epoch
        if not pg.reachable:
            unreachable.append(f"{r.name}/postgres")
        # A fenced (read-only) primary takes no writes: it is not a second writer.
        elif pg.role == "primary":
            (fenced if pg.read_only else primaries).append(r.name)
        rd = redis_status(r.redis, 3)
        if not rd.reachable:
            unreachable.append(f"{r.name}/redis")
        elif rd.role == "master":
            (fenced_masters if _redis_fenced(r.redis) else masters).append(r.name)
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
                            unreachable=unreachable, epochs=epochs, fenced_primaries=fenced,
                            fenced_masters=fenced_masters)


class SurvivorChoice(BaseModel):
    survivor: str
    loser: str
    rule: str  # the rule that decided
    why: str


# When the configured rule cannot decide, these follow; priority always can.
FALLBACK_RULES = ("highest-epoch", "priority")


def choose_survivor(rule: str, report: SplitBrainReport, priorities: dict[str, int],
                    chosen: str | None = None) -> SurvivorChoice:
    """Which region keeps writing. Only a writable PostgreSQL primary can survive a database
    split; when PostgreSQL has a single primary (the split is in Redis or routing only), it
    survives whatever the rule says: data follows the database."""
    regions = sorted(priorities, key=lambda r: (priorities[r], r))

    def pick(survivor: str, rule_used: str, why: str) -> SurvivorChoice:
        return SurvivorChoice(survivor=survivor, loser=next(r for r in regions if r != survivor), rule=rule_used,
                              why=why)

    candidates = [r for r in regions if r in report.postgres_primaries] or regions
    if chosen is not None:
        if chosen not in candidates:
            raise ValueError(f"{chosen} cannot survive: the writable primaries are {', '.join(candidates)}")
        return pick(chosen, "operator", f"{chosen} chosen by the operator")
    if len(candidates) == 1:
        return pick(candidates[0], "single-primary", f"{candidates[0]} holds the only writable PostgreSQL primary")
    for r in (rule, *(f for f in FALLBACK_RULES if f != rule)):
        if r == "active-region":
            views = {v for v in report.active_region_views.values() if v}
            if len(views) == 1 and (v := next(iter(views))) in candidates:
                return pick(v, r, f"routing names {v} the active region")
        elif r == "highest-epoch":
            epochs = {c: report.epochs.get(c, -1) for c in candidates}
            top = max(epochs.values())
            if [c for c in candidates if epochs[c] == top] == [winner := max(epochs, key=epochs.get)]:
                return pick(winner, r, f"{winner} holds the highest DR epoch ({top}; "
                                       + ", ".join(f"{c}: {e}" for c, e in sorted(epochs.items())) + ")")
        elif r == "priority":
            return pick(candidates[0], r, f"{candidates[0]} has the highest region priority "
                                          f"({priorities[candidates[0]]})")
    raise AssertionError("priority always decides")


class SplitBrainActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def detect_split_brain(self) -> SplitBrainReport:
        return detect(self.cfg)
