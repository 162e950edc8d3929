"""Which Temporal Schedules the config asks for: ids, actions, timing. Nothing here talks to
Temporal (apply.py does); this is the pure "desired state".

Every schedule starts a workflow by its type *name* on the control queue, with a plain JSON
input: the workflow finds the primary (or the Redis master) itself when it runs, so no
schedule names a node and none needs editing after a failover. By name also means a schedule
may exist before its workflow does (RestoreDrillWorkflow): its runs fail until a worker
registers the type, and start working without another `apply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from eagle_dr.config import EagleConfig

# Every eagle-dr schedule carries this memo key (and its id starts with `dr-<service>-`):
# `apply` deletes only schedules it owns, never one somebody else made in the namespace.
OWNER_MEMO = "eagle-dr"


def prefix(service: str) -> str:
    return f"dr-{service}-"


@dataclass(frozen=True)
class DesiredSchedule:
    id: str
    workflow: str  # the workflow type name
    input: dict[str, Any]
    every: timedelta
    offset: timedelta
    jitter: timedelta
    catchup_window: timedelta
    task_queue: str
    # Bound on one run: a stuck run must end, or SKIP would skip every later slot.
    execution_timeout: timedelta
    description: str
    memo: dict[str, Any] = field(default_factory=dict)


def _jitter(cfg: EagleConfig, every: timedelta) -> timedelta:
    # At most a tenth of the interval: jitter spreads the load, it must not eat the schedule.
    return min(cfg.backup.schedules.jitter, every / 10)


def _catchup(cfg: EagleConfig, every: timedelta) -> timedelta:
    # A run missed longer ago than one interval is superseded by the next regular one.
    return max(timedelta(seconds=10), min(cfg.backup.schedules.catchup_window, every))


def desired(cfg: EagleConfig) -> list[DesiredSchedule]:
    b, svc, queue = cfg.backup, cfg.service, cfg.temporal.control_task_queue
    p = prefix(svc)

    def make(suffix: str, workflow: str, inp: dict, every: timedelta, offset: timedelta, timeout: timedelta,
             what: str) -> DesiredSchedule:
        return DesiredSchedule(
            id=p + suffix, workflow=workflow, input=inp, every=every, offset=offset % every,
            jitter=_jitter(cfg, every), catchup_window=_catchup(cfg, every), task_queue=queue,
            execution_timeout=timeout, description=what,
            memo={OWNER_MEMO: {"service": svc, "schedule": suffix}})

    out = [
        make("backup-incr", "BackupWorkflow", {"type": "incr", "trigger": "schedule"}, b.every, timedelta(0),
             timedelta(hours=12), f"incremental backup to both buckets every {human(b.every)}"),
        # Half an incremental interval off the incrementals' slots: the daily full and an
        # incremental would otherwise start together every day and the second wait on the first.
        make("backup-full", "BackupWorkflow", {"type": "full", "trigger": "schedule"}, b.full_every, b.every / 2,
             timedelta(hours=24), f"full backup to both buckets every {human(b.full_every)}"),
    ]
    if b.archive_guard_every:
        # Keeps WAL from piling up on the primary while a bucket is unreachable (workflows/
        # archive_guard.py): often, since its bound is disk space; a missed run is worthless later.
        out.append(make("archive-guard", "ArchiveGuardWorkflow", {"trigger": "schedule"}, b.archive_guard_every,
                        timedelta(0), timedelta(minutes=10),
                        f"WAL archive guard every {human(b.archive_guard_every)}"))
    if b.redis_every:
        out.append(make("redis-snapshot", "RedisSnapshotWorkflow", {"trigger": "schedule"}, b.redis_every,
                        b.redis_every / 3, timedelta(hours=1),
                        f"Redis RDB snapshot to both buckets every {human(b.redis_every)}"))
    if b.expire_every:
        out.append(make("expire", "ExpireWorkflow", {"trigger": "schedule"}, b.expire_every, b.expire_every / 4,
                        timedelta(hours=2), f"pgbackrest expire ({human(b.retention)} retention) every "
                                            f"{human(b.expire_every)}"))
    if b.restore_drill_every:
        # {}: the drill's own defaults (the latest backup, the configured tables).
        out.append(make("restore-drill", "RestoreDrillWorkflow", {}, b.restore_drill_every,
                        b.restore_drill_every / 2, timedelta(hours=6),
                        f"restore drill every {human(b.restore_drill_every)}"))
    c = cfg.consistency
    if c.every:
        # The seed's hourly data-consistency-check CronJob. Overlap SKIP (build() sets it for
        # every schedule): a check still running when the next slot comes is not doubled.
        out.append(make("consistency-check", "ConsistencyCheckWorkflow", {"trigger": "schedule"}, c.every,
                        c.every / 6, timedelta(hours=6), f"consistency check every {human(c.every)}"))
    return out


def human(d: timedelta) -> str:
    s = int(d.total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"
