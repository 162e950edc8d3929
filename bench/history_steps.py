"""Where a run's time went, read from its Temporal history.

For every activity: when it was scheduled (from the run's start), schedule -> start (the
task queue's dispatch: a worker polling, or a backlog), start -> close (the activity's own
work) and the gap before it was scheduled (what the workflow spent between the previous
command's result and this one: workflow task dispatch plus its replay). Local activities
appear as markers: their time is inside the workflow task that recorded them.

    python -m bench.history_steps <workflow-id> [--run-id R] [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from temporalio.api.enums.v1 import EventType


@dataclass
class ActivityTiming:
    name: str
    queue: str
    scheduled_s: float  # from the run's start
    dispatch_ms: float | None  # scheduled -> started
    run_ms: float | None  # started -> completed/failed
    gap_ms: float | None  # previous activity's close -> this one scheduled (None: the first)
    outcome: str


def _t(ev) -> float:
    return ev.event_time.ToDatetime().timestamp()


def activity_timings(history) -> list[ActivityTiming]:
    """The activities of one run in the order they were scheduled, with their timings."""
    events = list(history.events)
    if not events:
        return []
    t0 = _t(events[0])
    scheduled: dict[int, dict] = {}
    out: list[ActivityTiming] = []
    last_close: float | None = None
    for ev in events:
        et = ev.event_type
        if et == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            scheduled[ev.event_id] = {"name": a.activity_type.name, "queue": a.task_queue.name, "sched": _t(ev),
                                      "gap": (_t(ev) - last_close) * 1000 if last_close is not None else None}
        elif et == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            scheduled[ev.activity_task_started_event_attributes.scheduled_event_id]["start"] = _t(ev)
        elif et in (EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED, EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
                    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT, EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED):
            attrs = {EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: ev.activity_task_completed_event_attributes,
                     EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: ev.activity_task_failed_event_attributes,
                     EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: ev.activity_task_timed_out_event_attributes,
                     EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: ev.activity_task_canceled_event_attributes}[et]
            s = scheduled[attrs.scheduled_event_id]
            start, close = s.get("start"), _t(ev)
            out.append(ActivityTiming(
                name=s["name"], queue=s["queue"], scheduled_s=s["sched"] - t0,
                dispatch_ms=(start - s["sched"]) * 1000 if start else None,
                run_ms=(close - start) * 1000 if start else None, gap_ms=s["gap"],
                outcome=EventType.Name(et).removeprefix("EVENT_TYPE_ACTIVITY_TASK_").lower()))
            last_close = close
        elif et == EventType.EVENT_TYPE_MARKER_RECORDED:
            out.append(ActivityTiming(name=f"(marker {ev.marker_recorded_event_attributes.marker_name})", queue="",
                                      scheduled_s=_t(ev) - t0, dispatch_ms=None, run_ms=None, gap_ms=None,
                                      outcome="local"))
    out.sort(key=lambda a: a.scheduled_s)
    return out


def breakdown(history) -> str:
    rows = activity_timings(history)
    lines = [f"{'activity':34} {'queue':22} {'at s':>7} {'gap ms':>7} {'queue ms':>8} {'run ms':>8}  outcome"]
    f = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
    for r in rows:
        lines.append(f"{r.name[:34]:34} {r.queue[:22]:22} {r.scheduled_s:7.3f} {f(r.gap_ms):>7} "
                     f"{f(r.dispatch_ms):>8} {f(r.run_ms):>8}  {r.outcome}")
    acts = [r for r in rows if r.run_ms is not None]
    if acts:
        lines.append(f"{len(acts)} activities: run {sum(r.run_ms for r in acts):.0f} ms, queue "
                     f"{sum(r.dispatch_ms for r in acts):.0f} ms, workflow gaps "
                     f"{sum(r.gap_ms or 0 for r in acts):.0f} ms")
    return "\n".join(lines)


async def _main(args) -> None:
    from eagle_dr.config import load_config
    from eagle_dr.temporal import connect

    cfg = load_config(args.config) if args.config else None
    client = await connect(target_host=args.address, config=cfg) if cfg else await connect(target_host=args.address)
    history = await client.get_workflow_handle(args.workflow_id, run_id=args.run_id).fetch_history()
    print(breakdown(history))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow_id")
    ap.add_argument("--run-id")
    ap.add_argument("--address", default="127.0.0.1:7233")
    ap.add_argument("--config", help="eagle-dr config (its codec key, TLS)")
    asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    main()
