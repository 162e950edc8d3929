"""Notifications from a workflow: which channel gets which event, sent as activities.

The topology (activities/topology.py) says which channels exist and what each wants; with
none configured nothing here issues a command, so a lab without ``notifications:`` and every
recorded history replay exactly as before. With channels, the first send records the
``notify-events`` patch marker.

Each channel is its own activity call with a short timeout and a few retries: a retry never
sends a second copy to a channel that already took the first, and one channel that is down
costs only its own retries. A delivery that still fails is recorded (``failures``) and
logged, never raised: a pager that is down must not fail the failover it reports on.

Events in mid-run are not awaited (the runbook goes on while the message travels);
``flush()`` waits for what is still in flight, and the runbook base calls it after the
"finished" event, before the run completes: activities still pending when a workflow
completes are never run.

Each channel gets a run's events in the order they were sent: a delivery waits until the
channel's previous one has ended (delivered or given up). Sent side by side, a run that ends
within milliseconds could put "finished" on a pager before "started", and a PagerDuty resolve
that overtakes its trigger leaves the incident open for good. Runs that started before this
(no ``notify-in-order`` marker) replay with their deliveries side by side, as recorded.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.notify.activities import NotifyActivities
    from activities.notify.event import NotifyEvent, NotifyRequest
    from activities.topology import Topology

PATCH = "notify-events"
IN_ORDER = "notify-in-order"

# Three attempts, 1 s then 2 s apart: a channel that hiccups gets through, one that is down
# is given up on within seconds (each attempt is bounded by the channel's own timeout, at
# most 60 s, which start_to_close only backs up). Secrets missing or a channel unknown to the
# worker are not retried: waiting does not fix a config.
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2,
                    maximum_interval=timedelta(seconds=5), maximum_attempts=3,
                    non_retryable_error_types=["UnknownChannel", "SecretUnavailable"])
ONCE = RetryPolicy(maximum_attempts=1)


class Notifier:
    def __init__(self) -> None:
        self.routes: dict[str, list[str]] = {}
        self.queue: str | None = None
        self.failures: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self._last: dict[str, asyncio.Task] = {}  # per channel: its latest delivery, to queue behind
        self._gave_up: set[str] = set()  # channels a delivery was given up on in this run

    def configure(self, topo: Topology) -> None:
        self.routes = dict(topo.notify_channels)
        self.queue = topo.control_task_queue

    @property
    def active(self) -> bool:
        return bool(self.routes)

    def send(self, event: NotifyEvent) -> None:
        """Start delivering ``event`` to every channel that wants it; do not wait."""
        targets = [name for name, kinds in self.routes.items() if event.kind in kinds]
        if not targets or not workflow.patched(PATCH):
            return
        in_order = workflow.patched(IN_ORDER)
        for name in targets:
            before = self._last.get(name) if in_order else None
            task = asyncio.ensure_future(self._deliver(name, event, before))
            self._last[name] = task
            self._tasks.append(task)

    async def _deliver(self, channel: str, event: NotifyEvent, before: asyncio.Task | None = None) -> None:
        if before is not None and not before.done():
            # workflow.wait, not await: the earlier delivery's own end (even a cancel) must not
            # be raised here; this one goes out whichever way that one ended.
            await workflow.wait([before])
        try:
            await workflow.execute_activity_method(
                NotifyActivities.send_notification, NotifyRequest(channel=channel, event=event),
                task_queue=self.queue, start_to_close_timeout=timedelta(seconds=75),
                schedule_to_close_timeout=timedelta(minutes=3),
                # A channel already given up on in this run gets one try per event: queued in
                # order, each with its full retries, a hung channel held the run's end (and a
                # monitor's next round) for minutes per event.
                retry_policy=ONCE if channel in self._gave_up else RETRY,
                summary=f"notify {channel}: {event.kind}")
            # Delivered: the channel is up again, and its next event (in a monitor, hours later:
            # the night's outage page) gets its full retries back.
            self._gave_up.discard(channel)
        except ActivityError as e:
            self._gave_up.add(channel)
            why = f"{channel}: {event.kind} not delivered ({e.cause or e})"
            self.failures.append(why)
            workflow.logger.warning("notification failed", extra={"channel": channel, "kind": event.kind,
                                                                   "error": str(e.cause or e)})

    async def flush(self) -> None:
        """Wait for every delivery still in flight (each ends by itself, bounded by RETRY)."""
        pending = [t for t in self._tasks if not t.done()]
        self._tasks = []
        if pending:
            await asyncio.gather(*pending)


def incident_key(workflow_id: str, run_id: str) -> str:
    """One PagerDuty incident per runbook run: its approval, failed steps and end share it."""
    return f"eagle-dr/{workflow_id}/{run_id}"


def outage_key(service: str, region: str) -> str:
    """One incident per service and region: stable across the monitor's continue-as-new, so the
    run that sees the region back resolves what an earlier run triggered."""
    return f"eagle-dr/{service}/outage/{region}"


def readiness_key(service: str, check: str) -> str:
    return f"eagle-dr/{service}/readiness/{check}"


def _seconds(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.1f} s"


def _against(target: float | None, met: bool | None) -> str:
    if target is None:
        return "no target"
    return f"target {target:.0f} s: " + ("met" if met else "unknown" if met is None else "MISSED")


def measurement_lines(rto, rpo) -> list[str]:
    """RTO and RPO against their targets, "unknown" where a run did not measure them."""
    out = []
    if rto is not None:
        out.append((f"RTO unknown ({rto.serving_basis})" if rto.serving_basis else
                    f"RTO {_seconds(rto.total_s)} ({_against(rto.target_s, rto.met)})")
                   + (f"; clients saw {_seconds(rto.client_outage_s)}" if rto.client_outage_s is not None else ""))
    if rpo is not None:
        unk = lambda v, unit="": "unknown" if v is None else f"{v}{unit}"  # noqa: E731
        out.append(f"RPO: loss window {_seconds(rpo.loss_window_s)}, WAL lost {unk(rpo.lost_wal_bytes, ' bytes')}, "
                   f"acknowledged writes lost {unk(rpo.acknowledged_writes_lost)}, Redis offset gap "
                   f"{unk(rpo.redis_offset_gap)} ({_against(rpo.target_s, rpo.met)})")
    return out


def readiness_event(service: str, check: str, detail: str, degraded: bool, at: datetime,
                    region: str | None = None, workflow_id: str | None = None,
                    run_id: str | None = None) -> NotifyEvent:
    """What the monitor sends when a readiness check turns bad (``degraded``) or good again.
    Warning, not critical: nothing is down yet, but the next failover would fail."""
    return NotifyEvent(kind="readiness-degraded" if degraded else "readiness-restored", service=service,
                       summary=f"{check}: {detail}", action="trigger" if degraded else "resolve",
                       severity="warning", dedup_key=readiness_key(service, check), at=at, region=region,
                       runbook="monitor", workflow_id=workflow_id, run_id=run_id, lines=[detail])
