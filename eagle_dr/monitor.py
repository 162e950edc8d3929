"""The always-on monitor as a service: one ``MonitorWorkflow`` per service under a fixed id,
started from the config's ``health`` section (by ``eagle-dr monitor start``, ``lab up`` and
``schedules apply``), paused, resumed and stopped by signals, read by its ``monitor_state`` query.

The fixed id is what makes it one: a second start finds the running one (start is
idempotent), and ``status`` knows where to look. Its settings are those of the run that
started it; after a config change, ``eagle-dr monitor stop`` then ``start`` applies them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy, \
    WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from eagle_dr.config import EagleConfig
from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_TRIGGER
from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow


def monitor_id(service: str) -> str:
    return f"dr-monitor-{service}"


def monitor_input(cfg: EagleConfig) -> MonitorInput:
    h = cfg.health
    return MonitorInput(service=cfg.service, interval_seconds=h.interval.total_seconds(),
                        failure_threshold=h.failure_threshold, auto_failover=h.auto_failover,
                        auto_failover_cooldown_seconds=h.auto_failover_cooldown.total_seconds(),
                        max_lag_bytes=h.max_lag_bytes, require_approval=h.require_approval,
                        watch_split_brain=h.watch_split_brain, auto_resolve_split_brain=h.auto_resolve_split_brain,
                        confirm_interval_seconds=h.confirm_interval.total_seconds() if h.confirm_interval else None,
                        confirm_rounds=h.confirm_rounds, readiness_every_seconds=cfg.readiness.every.total_seconds())


async def start_monitor(client: Client, cfg: EagleConfig) -> tuple[WorkflowHandle, bool]:
    """(handle, True) when started now, (handle, False) when one was already running."""
    wid = monitor_id(cfg.service)
    try:
        desc = await client.get_workflow_handle(wid).describe()
        if desc.status == WorkflowExecutionStatus.RUNNING:
            return client.get_workflow_handle(wid, run_id=desc.run_id), False
    except RPCError as e:
        if e.status != RPCStatusCode.NOT_FOUND:
            raise
    handle = await client.start_workflow(
        MonitorWorkflow.run, monitor_input(cfg), id=wid, task_queue=cfg.temporal.control_task_queue,
        # USE_EXISTING: two starts racing (lab up beside schedules apply) give one monitor, not
        # an error; a stopped monitor may be started again (ALLOW_DUPLICATE).
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=TypedSearchAttributes([SearchAttributePair(DR_RUNBOOK, "monitor"),
                                                 SearchAttributePair(DR_SERVICE, cfg.service),
                                                 SearchAttributePair(DR_TRIGGER, "service")]),
        static_summary=f"health monitor {cfg.service} (always on)")
    return handle, True


class MonitorView(BaseModel):
    """What ``status`` and ``monitor status`` show."""

    workflow_id: str
    running: bool
    status: str  # running | paused | not running | unknown
    run_id: str | None = None
    since: datetime | None = None
    state: MonitorState | None = None
    error: str | None = None

    def line(self) -> str:
        if self.status == "not running":
            return f"monitor: NOT RUNNING ({self.workflow_id}; eagle-dr monitor start)"
        if self.status == "unknown":
            return f"monitor: unknown ({self.error})"
        st = self.state
        parts = [f"monitor: {self.status.upper() if self.status == 'paused' else self.status}"]
        if st is not None:
            parts.append(f"watching {st.watched_region or '?'}; {st.failures}/{st.failure_threshold} failed rounds; "
                         f"auto failover {'on' if st.auto_failover else 'off'}")
            if st.paused_since:
                parts.append(f"paused since {st.paused_since:%Y-%m-%d %H:%M:%S} UTC"
                             + (f" ({st.pause_reason})" if st.pause_reason else ""))
            elif st.running_since:
                parts.append(f"since {st.running_since:%Y-%m-%d %H:%M:%S} UTC")
            if st.auto_failover:
                # What an automatic failover is judged on (workflows/monitor.py _lag_refusal).
                parts.append(f"standby {st.target_lag_bytes} bytes behind at {st.target_lag_at:%H:%M:%S} UTC"
                             if st.target_lag_at is not None and st.target_lag_bytes is not None else
                             "standby lag NOT MEASURED yet (no automatic failover until it is)")
            if st.workers_down:
                parts.append(f"WORKER DOWN: {', '.join(st.workers_down)}")
            if st.readiness is not None:
                parts.append(st.readiness.error or st.readiness.line())
        return "; ".join(parts)


async def monitor_view(client: Client, service: str) -> MonitorView:
    wid = monitor_id(service)
    handle = client.get_workflow_handle(wid)
    try:
        desc = await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return MonitorView(workflow_id=wid, running=False, status="not running")
        return MonitorView(workflow_id=wid, running=False, status="unknown", error=str(e))
    if desc.status != WorkflowExecutionStatus.RUNNING:
        return MonitorView(workflow_id=wid, running=False, status="not running", run_id=desc.run_id)
    try:
        state = await handle.query(MonitorWorkflow.monitor_state)
    except Exception as e:  # noqa: BLE001 - running, but its worker cannot answer now
        # Not "running": it may be paused, and `monitor resume` took "running" as its proof.
        return MonitorView(workflow_id=wid, running=True, status="unknown", run_id=desc.run_id,
                           error=f"running, but its state cannot be read now (control worker down?): {e}")
    return MonitorView(workflow_id=wid, running=True, status="paused" if state.status == "paused" else "running",
                       run_id=desc.run_id, since=state.running_since, state=state)
