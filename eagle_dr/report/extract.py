"""A run's history (and its result, which the history holds) turned into a RunReport.

Works for every workflow type: what a runbook reports in its result (steps, RTO, RPO,
approval, reconciliation) is read by shape, not by runbook name, so a new runbook's report
shows its steps and figures without a change here. Runs without a step list (backup,
restore, ...) get their timeline from the history itself: activities, child workflows and
timers, each from scheduled to closed. Nothing is invented: a figure the run did not
measure stays None and is shown as "unknown".
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Iterable

from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter

from eagle_dr.report.model import (
    ApprovalView,
    AuditQuery,
    Bar,
    ConflictRow,
    Fact,
    Link,
    RpoView,
    RtoView,
    RunReport,
)

# A monitor's history can hold thousands of probes: the timeline shows the first ones and says so.
MAX_HISTORY_BARS = 200

_CONVERTER = pydantic_data_converter.payload_converter

_CLOSE = {
    "workflow_execution_completed_event_attributes": "completed",
    "workflow_execution_failed_event_attributes": "failed",
    "workflow_execution_canceled_event_attributes": "cancelled",
    "workflow_execution_terminated_event_attributes": "terminated",
    "workflow_execution_timed_out_event_attributes": "timed-out",
    "workflow_execution_continued_as_new_event_attributes": "continued-as-new",
}

# Result keys read into their own sections; everything else becomes a fact.
_SECTIONED = {"steps", "rto", "rpo", "approval", "reconciliation", "notes", "workflow_id", "run_id"}


def _values(payloads) -> list[Any]:
    try:
        return list(_CONVERTER.from_payloads(list(payloads.payloads)))
    except Exception:  # noqa: BLE001 - an undecodable payload (a codec we lack) is left out, not fatal
        return []


def _value(payload) -> Any:
    try:
        return _CONVERTER.from_payloads([payload])[0]
    except Exception:  # noqa: BLE001
        return None


def _time(ts) -> datetime:
    return ts.ToDatetime(tzinfo=timezone.utc)


def _parse(v: Any) -> datetime | None:
    if not v:
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
    try:
        d = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


class RunEvents:
    """One pass over the history: what the report needs from it, by scheduled event id."""

    def __init__(self, history: WorkflowHistory):
        self.workflow_id = history.workflow_id
        self.events = list(history.events)
        first = self.events[0]
        st = first.workflow_execution_started_event_attributes
        self.workflow_type = st.workflow_type.name
        self.run_id = st.original_execution_run_id or st.first_execution_run_id
        self.started_at = _time(first.event_time)
        self.input = (_values(st.input) or [None])[0]
        self.last_at = _time(self.events[-1].event_time)
        self.status, self.result, self.failure, self.failure_details = "running", None, None, None
        self.closed_at: datetime | None = None
        self.activities: dict[int, dict] = {}
        self.children: dict[int, dict] = {}
        self.timers: dict[str, dict] = {}
        self.decisions: list[tuple[datetime, str, dict]] = []
        for e in self.events:
            self._read(e)

    def _read(self, e) -> None:
        kind = e.WhichOneof("attributes")
        at = _time(e.event_time)
        a = getattr(e, kind)
        if kind in _CLOSE:
            self.status, self.closed_at = _CLOSE[kind], at
            if kind == "workflow_execution_completed_event_attributes":
                self.result = (_values(a.result) or [None])[0]
            elif kind == "workflow_execution_failed_event_attributes":
                self.failure = _failure_text(a.failure)
                self.failure_details = _failure_details(a.failure)
        elif kind == "activity_task_scheduled_event_attributes":
            summary = _value(e.user_metadata.summary) if e.HasField("user_metadata") and \
                e.user_metadata.HasField("summary") else None
            self.activities[e.event_id] = {"name": a.activity_type.name, "summary": summary, "start": at,
                                           "end": None, "status": "running", "result": None, "detail": ""}
        elif kind == "activity_task_started_event_attributes":
            # The bar starts when a worker picked the task up: a schedule-to-start wait
            # (a dead region's queue) is shown as part of the step, which is what it cost.
            pass
        elif kind.startswith("activity_task_") and kind != "activity_task_cancel_requested_event_attributes":
            act = self.activities.get(a.scheduled_event_id)
            if act is None:
                return
            act["end"] = at
            if kind == "activity_task_completed_event_attributes":
                act["status"], act["result"] = "done", (_values(a.result) or [None])[0]
            elif kind == "activity_task_failed_event_attributes":
                act["status"], act["detail"] = "failed", _failure_text(a.failure)
            elif kind == "activity_task_timed_out_event_attributes":
                act["status"], act["detail"] = "timed-out", _failure_text(a.failure)
            elif kind == "activity_task_canceled_event_attributes":
                act["status"] = "cancelled"
        elif kind == "start_child_workflow_execution_initiated_event_attributes":
            self.children[e.event_id] = {"type": a.workflow_type.name, "workflow_id": a.workflow_id, "run_id": None,
                                         "start": at, "end": None, "status": "running"}
        elif kind.startswith("child_workflow_execution_") or kind == "start_child_workflow_execution_failed_event_attributes":
            child = self.children.get(a.initiated_event_id)
            if child is None:
                return
            if kind == "child_workflow_execution_started_event_attributes":
                child["run_id"] = a.workflow_execution.run_id
            else:
                child["end"] = at
                child["status"] = {"child_workflow_execution_completed_event_attributes": "done"}.get(kind, "failed")
        elif kind == "timer_started_event_attributes":
            self.timers[a.timer_id] = {"start": at, "end": None, "seconds": a.start_to_fire_timeout.ToTimedelta()
                                       .total_seconds()}
        elif kind in ("timer_fired_event_attributes", "timer_canceled_event_attributes"):
            if a.timer_id in self.timers:
                self.timers[a.timer_id]["end"] = at
        elif kind == "workflow_execution_update_accepted_event_attributes":
            req = a.accepted_request.input
            if req.name == "approve":
                self.decisions.append((at, "update", (_values(req.args) or [{}])[0] or {}))
        elif kind == "workflow_execution_signaled_event_attributes":
            if a.signal_name == "approve_signal":
                self.decisions.append((at, "signal", (_values(a.input) or [{}])[0] or {}))

    def activity_result(self, name: str) -> dict | None:
        """The newest completed result of an activity type (e.g. client_outage)."""
        found = [act["result"] for act in self.activities.values() if act["name"] == name and act["result"]]
        return found[-1] if found else None

    def child(self, workflow_type: str) -> dict | None:
        found = [c for c in self.children.values() if c["type"] == workflow_type]
        return found[-1] if found else None


def _failure_text(f) -> str:
    parts = []
    while f is not None and f.message:
        parts.append(f.message)
        f = f.cause if f.HasField("cause") else None
    return ": ".join(dict.fromkeys(parts))


def _failure_details(f) -> Any:
    """What a failed run left in its error's details (a restore drill puts its figures there)."""
    while f is not None:
        if f.HasField("application_failure_info") and f.application_failure_info.details.payloads:
            return (_values(f.application_failure_info.details) or [None])[0]
        f = f.cause if f.HasField("cause") else None
    return None


def build(history: WorkflowHistory, *, progress: dict | None = None, ui_url: str | None = None,
          namespace: str = "default", children: dict[str, WorkflowHistory] | None = None) -> RunReport:
    """The report of one run. ``progress`` is the ``progress`` query of a running runbook (its
    step list so far); ``children`` maps run ids of runbooks it started to their histories,
    for what only their own history holds (the clients' write gap, by time)."""
    ev = RunEvents(history)
    r = RunReport(workflow_id=ev.workflow_id, run_id=ev.run_id, workflow_type=ev.workflow_type, status=ev.status,
                  started_at=ev.started_at, closed_at=ev.closed_at, now=ev.closed_at or ev.last_at,
                  failure=ev.failure)
    child_events = {run_id: RunEvents(h) for run_id, h in (children or {}).items()}
    result = ev.result if isinstance(ev.result, dict) else None
    if result is None and isinstance(ev.failure_details, dict):
        # A failed run's figures, as it reported them with its error.
        result = ev.failure_details
        r.notes.append("figures below are from the run's error details: it failed")
    if result is None and isinstance(progress, dict):
        result = progress
    r.outcome = (result or {}).get("outcome") if isinstance((result or {}).get("outcome"), str) else None
    r.title = _title(ev.workflow_type, result or {}, ev.input)

    if result is not None:
        _read_result(r, result, ev, child_events, owner="", depth=0)
    if not any(b.depth == 0 for b in r.bars):
        # No step list of its own (a backup, or a drill recorded before drills kept theirs):
        # the history's activities, children and timers, with the children's steps under them.
        nested, r.bars = r.bars, _history_bars(ev, r)
        for owner in dict.fromkeys(b.owner for b in nested):
            _nest(r.bars, [b for b in nested if b.owner == owner])
    if not any(a.source == "result" and a.runbook == _runbook_name(ev.workflow_type, result)
               for a in r.approvals):
        # A run that failed at its gate, or is still there: the decisions it received.
        for at, how, d in ev.decisions:
            r.approvals.append(ApprovalView(runbook=_runbook_name(ev.workflow_type, result), source="history",
                                            outcome=f"{d.get('decision', '?')} ({how})", approver=d.get("approver"),
                                            at=at, comment=d.get("comment") or None))
    if ui_url:
        base = f"{ui_url.rstrip('/')}/namespaces/{namespace}/workflows"
        r.links.append(Link(label=f"{ev.workflow_type} {ev.workflow_id}", url=f"{base}/{ev.workflow_id}/{ev.run_id}"))
        for c in ev.children.values():
            if c["run_id"]:
                r.links.append(Link(label=f"{c['type']} {c['workflow_id']}",
                                    url=f"{base}/{c['workflow_id']}/{c['run_id']}"))
    return r


def _runbook_name(workflow_type: str, result: dict | None) -> str:
    if isinstance(result, dict) and isinstance(result.get("runbook"), str):
        return result["runbook"]
    # SplitBrainWorkflow -> split_brain, as the runbooks name themselves.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", workflow_type.removesuffix("Workflow")).lower() or workflow_type


def _title(workflow_type: str, result: dict, inp: Any) -> str:
    name = _runbook_name(workflow_type, result)
    src, dst = result.get("source_region"), result.get("target_region")
    if src and dst:
        return f"{name} {result.get('service', '')} {src or '?'} -> {dst or '?'}".replace("  ", " ")
    region = result.get("region") or (inp.get("region") if isinstance(inp, dict) else None)
    return f"{name} {result.get('service', '')}{' region ' + region if region else ''}".strip()


def _is_runbook_result(v: Any) -> bool:
    return isinstance(v, dict) and "steps" in v and ("rto" in v or "runbook" in v or "region" in v)


def _read_result(r: RunReport, res: dict, ev: RunEvents | None, child_events: dict[str, RunEvents], owner: str,
                 depth: int, run_id: str | None = None, workflow_id: str | None = None,
                 workflow_type: str | None = None) -> None:
    runbook = res.get("runbook") or (_runbook_name(workflow_type or "", None) if workflow_type else None) or \
        _runbook_name(ev.workflow_type if ev else "", res)
    label = owner or r.title
    own_events = ev if depth == 0 else child_events.get(run_id or "")
    steps = [_bar(s, depth, owner) for s in res.get("steps") or [] if isinstance(s, dict) and _parse(s.get("started_at"))]
    if steps:
        if depth == 0:
            r.bars.extend(steps)
        else:
            _nest(r.bars, steps)
    if isinstance(res.get("rto"), dict):
        r.rtos.append(_rto(label, res["rto"], own_events))
    if isinstance(res.get("rpo"), dict):
        r.rpos.append(_rpo(label, res["rpo"]))
    if isinstance(res.get("approval"), dict):
        a = res["approval"]
        r.approvals.append(ApprovalView(runbook=runbook if not owner else owner, outcome=str(a.get("outcome", "?")),
                                        required=a.get("required"), approver=a.get("approver"),
                                        at=_parse(a.get("at")), comment=a.get("comment")))
    if isinstance(res.get("reconciliation"), dict):
        _conflicts(r, res["reconciliation"], owner or runbook,
                   workflow_id or (ev.workflow_id if ev else None), run_id or (ev.run_id if ev else None))
    for n in res.get("notes") or []:
        r.notes.append(f"{owner + ': ' if owner else ''}{n}")
    section = owner or runbook
    for key, v in res.items():
        if key in _SECTIONED:
            continue
        if _is_runbook_result(v) or (isinstance(v, dict) and "reconciliation" in v and "region" in v):
            child = _child_of(ev, v, key) if ev else None
            title = _title(child["type"] if child else key, v, None) if "runbook" in v or child else key
            _read_result(r, v, ev, child_events, owner=title, depth=depth + 1,
                         run_id=v.get("run_id") or (child or {}).get("run_id"),
                         workflow_id=v.get("workflow_id") or (child or {}).get("workflow_id"),
                         workflow_type=child["type"] if child else None)
            continue
        r.facts.extend(_facts(section, key, v))


def _child_of(ev: RunEvents, v: dict, key: str) -> dict | None:
    """The child workflow that returned ``v``: by run id when it says, else by type name."""
    if v.get("run_id"):
        for c in ev.children.values():
            if c["run_id"] == v["run_id"]:
                return c
    return ev.child(f"{key.replace('_', ' ').title().replace(' ', '')}Workflow")


def _bar(s: dict, depth: int, owner: str) -> Bar:
    return Bar(label=str(s.get("name", "?")), start=_parse(s.get("started_at")), end=_parse(s.get("finished_at")),
               status=str(s.get("status", "done")), detail=str(s.get("detail") or ""), depth=depth, owner=owner)


def _nest(bars: list[Bar], child: list[Bar]) -> None:
    """Insert a child runbook's steps right after the parent's step that ran it (its time span
    holds the child's first step), after any child steps already there."""
    first = child[0].start
    at = len(bars)
    for i, b in enumerate(bars):
        if b.depth == 0 and b.start <= first and (b.end is None or first <= b.end):
            at = i + 1
            while at < len(bars) and bars[at].depth > 0:
                at += 1
    bars[at:at] = child


def _rto(title: str, d: dict, ev: RunEvents | None) -> RtoView:
    v = RtoView(title=title, **{k: d.get(k) for k in (
        "detection_to_decision_s", "decision_to_writable_s", "writable_to_serving_s", "total_s", "target_s", "met",
        "client_outage_s", "serving_basis")},
        **{k: _parse(d.get(k)) for k in ("detected_at", "decided_at", "writable_at", "serving_at")})
    gap = ev.activity_result("client_outage") if ev else None
    if isinstance(gap, dict):
        v.client_gap_start, v.client_gap_end = _parse(gap.get("last_ok_before")), _parse(gap.get("first_ok_after"))
    return v


def _rpo(title: str, d: dict) -> RpoView:
    return RpoView(title=title, **{k: d.get(k) for k in RpoView.model_fields if k != "title" and k in d})


def _conflicts(r: RunReport, rec: dict, runbook: str, workflow_id: str | None, run_id: str | None) -> None:
    for t in rec.get("tables") or []:
        if isinstance(t, dict):
            r.conflicts.append(ConflictRow(runbook=runbook, table=str(t.get("table", "?")),
                                           strategy=str(t.get("strategy", "?")),
                                           **{k: t.get(k) for k in ("loser_rows", "inserted", "updated", "deleted",
                                                                    "conflicts", "flagged", "audit_rows")}))
    if workflow_id:
        r.audit_queries.append(AuditQuery(runbook=runbook, workflow_id=workflow_id, run_id=run_id,
                                          sql=audit_sql(workflow_id, run_id)))


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def audit_sql(workflow_id: str, run_id: str | None) -> str:
    """The query that lists every per-key decision the run applied (activities/conflicts/apply.py)."""
    where = f"workflow_id = {_literal(workflow_id)}" + (f" and run_id = {_literal(run_id)}" if run_id else "")
    return ('select "timestamp", table_name, strategy, conflict, action, winner_region, approved_by, primary_key,\n'
            "       survivor_version, loser_version, result, reason\n"
            f"  from eagle_dr.conflict_audit\n where {where}\n order by table_name, id;")


def _facts(section: str, key: str, v: Any, depth: int = 0) -> Iterable[Fact]:
    if v is None or v == [] or v == {}:
        return []
    if isinstance(v, dict):
        if depth >= 1:
            return [Fact(section=section, name=key, value=_compact(v))]
        out: list[Fact] = []
        for k, sub in v.items():
            out.extend(_facts(section, f"{key}.{k}", sub, depth + 1))
        return out
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v):
            return [Fact(section=section, name=key, value=", ".join(str(x) for x in v))]
        return [Fact(section=section, name=f"{key}[{i}]", value=_compact(x)) for i, x in enumerate(v[:50])]
    if isinstance(v, float):
        return [Fact(section=section, name=key, value=f"{v:.3f}".rstrip("0").rstrip("."))]
    return [Fact(section=section, name=key, value=str(v))]


def _compact(v: Any) -> str:
    if isinstance(v, dict):
        s = ", ".join(f"{k}={_compact(x)}" for k, x in v.items() if x not in (None, [], {}))
    elif isinstance(v, list):
        s = "[" + ", ".join(_compact(x) for x in v) + "]"
    elif isinstance(v, float):
        s = f"{v:.3f}".rstrip("0").rstrip(".")
    else:
        s = str(v)
    return s if len(s) <= 400 else s[:397] + "..."


def _history_bars(ev: RunEvents, r: RunReport) -> list[Bar]:
    """The timeline of a run that keeps no step list: its activities, children and timers."""
    bars = []
    for a in ev.activities.values():
        bars.append(Bar(label=a["summary"] if isinstance(a["summary"], str) and a["summary"] else a["name"],
                        start=a["start"], end=a["end"], status=a["status"], detail=a["detail"]))
    for c in ev.children.values():
        bars.append(Bar(label=f"{c['type']} {c['workflow_id']}", start=c["start"], end=c["end"], status=c["status"]))
    for tid, t in ev.timers.items():
        bars.append(Bar(label=f"wait {t['seconds']:g}s", start=t["start"], end=t["end"],
                        status="done" if t["end"] else "running"))
    bars.sort(key=lambda b: b.start)
    if len(bars) > MAX_HISTORY_BARS:
        r.notes.append(f"timeline: the first {MAX_HISTORY_BARS} of {len(bars)} activities, children and timers")
        bars = bars[:MAX_HISTORY_BARS]
    return bars
