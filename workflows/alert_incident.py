"""One alert incident: every Alertmanager notification of one group, for one rule.

``eagle-dr alerts serve`` signals-with-start this workflow for each notification, under an
id derived from the rule and Alertmanager's group key (``incident_id``). Alertmanager
retries, repeats and concurrent posts of the same group therefore all land in one run, and a
storm of a thousand alerts for one incident is one workflow: each alert is recorded here by
its fingerprint and ``startsAt`` (the ``incident`` query), duplicates are counted, not lost.

The rule's action is taken once per incident, on its first firing alert:

- ``monitor``: start the service's MonitorWorkflow (``monitor_id``) if none runs, and signal
  it ``alert`` with every change (firing and resolved), so it probes at once;
- ``failover``: start FailoverWorkflow under the single-flight ``dr-move-<service>`` id with
  approval required: an alert is evidence for a human, never by itself a reason to move a
  region (the monitor's quorum probing is what may fail over automatically);
- ``split-brain``: start SplitBrainWorkflow (detection, and resolution only after approval);
- ``record``: nothing but this record.

Started runbooks are abandoned children: they outlive the incident, which ends when every
alert it saw is resolved (or after ``idle_seconds`` without a notification). A move that is
already running is recorded, not retried. The workflow continues as new when its history
grows long, carrying what it recorded.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import FailureError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_TARGET_REGION, DR_TRIGGER
    from workflows.models import AlertNotice, AwareTime
    from workflows.validation import RawInput, validated

# Alerts per signal: a storm's notification is split so no payload nears Temporal's 2 MB cap.
SIGNAL_CHUNK = 200


class AlertRecord(BaseModel):
    """One alert as Alertmanager reported it (labels only: annotations stay in Alertmanager)."""

    model_config = ConfigDict(extra="forbid")
    fingerprint: str = Field(min_length=1)
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = {}
    starts_at: AwareTime
    ends_at: AwareTime | None = None

    @property
    def key(self) -> str:
        # A re-fire of the same series after it resolved has a new startsAt: a new alert.
        return f"{self.fingerprint}@{self.starts_at.isoformat()}"


class AlertBatch(BaseModel):
    """One notification's alerts for this incident (the ``alerts`` signal)."""

    model_config = ConfigDict(extra="forbid")
    alerts: list[AlertRecord]


class ActionSpec(BaseModel):
    """What the incident starts: a workflow type by name, its id and its (raw) input.
    ``detected_at`` and ``reason`` are filled in from the first firing alert."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["monitor", "failover", "split-brain", "record"]
    workflow: str | None = None
    workflow_id: str | None = None
    input: dict[str, Any] = {}
    task_queue: str | None = None
    # Why the action cannot be taken (a failover alert without a region label): recorded.
    refused: str | None = None


class IncidentState(BaseModel):
    # key (fingerprint@startsAt) -> firing | resolved (final for a key). Statuses only, no
    # labels: this travels in the continue-as-new input, and a storm of 10,000 alerts must
    # stay far below Temporal's payload cap (the labels are in the signals' history).
    alerts: dict[str, Literal["firing", "resolved"]] = {}
    notifications: int = 0
    duplicates: int = 0
    action: str | None = None
    action_taken_at: datetime | None = None
    first_firing_at: datetime | None = None
    notices_sent: int = 0
    # The monitor had ended when a notice was due (terminated, failed): started again, and how.
    monitor_restarts: int = 0
    monitor_restarted: str | None = None

    @property
    def firing(self) -> int:
        return sum(status == "firing" for status in self.alerts.values())


class IncidentInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = Field(min_length=1)
    rule: str = Field(min_length=1)
    group_key: str = ""
    group_labels: dict[str, str] = {}
    action: ActionSpec
    idle_seconds: float = Field(default=24 * 3600, gt=0)
    # Bounded history: continue as new after this many notifications (or sooner, when Temporal
    # suggests it), carrying what was recorded.
    notifications_per_run: int = Field(default=1000, ge=1)
    # Carried across continue-as-new.
    state: IncidentState | None = None


class IncidentSummary(BaseModel):
    """The ``incident`` query and the result."""

    incident_id: str
    rule: str
    action: str | None
    alerts: int
    firing: int
    resolved: int
    notifications: int
    duplicates: int
    outcome: str = "open"  # open | resolved | idle
    monitor_restarts: int = 0


@workflow.defn
class AlertIncidentWorkflow:
    def __init__(self) -> None:
        self.pending: list[AlertBatch] = []
        self.state = IncidentState()
        self.inp: IncidentInput | None = None
        self.notifications_this_run = 0

    @workflow.signal
    def alerts(self, batch: AlertBatch) -> None:
        self.pending.append(batch)

    @workflow.query
    def incident(self) -> IncidentSummary:
        return self._summary("open")

    def _summary(self, outcome: str) -> IncidentSummary:
        st = self.state
        return IncidentSummary(incident_id=workflow.info().workflow_id, rule=self.inp.rule if self.inp else "",
                               action=st.action, alerts=len(st.alerts), firing=st.firing,
                               resolved=len(st.alerts) - st.firing, notifications=st.notifications,
                               duplicates=st.duplicates, outcome=outcome, monitor_restarts=st.monitor_restarts)

    @workflow.run
    async def run(self, raw: RawInput) -> IncidentSummary:
        inp = self.inp = validated(IncidentInput, raw)
        if inp.state is not None:
            self.state = inp.state
        self._show()
        while True:
            try:
                await workflow.wait_condition(lambda: bool(self.pending), timeout=timedelta(seconds=inp.idle_seconds))
            except asyncio.TimeoutError:
                return self._summary("idle")
            while self.pending:
                changed = self._record(self.pending.pop(0))
                if changed:
                    await self._act(inp, changed)
            self._show()
            if self.state.alerts and not self.state.firing:
                return self._summary("resolved")
            if workflow.info().is_continue_as_new_suggested() or self.notifications_this_run >= \
                    inp.notifications_per_run:
                await workflow.wait_condition(workflow.all_handlers_finished)
                # Batches that arrived meanwhile are handled here, not dropped: the new run
                # starts with an empty signal queue. (One arriving after this task is seen by
                # Temporal, which then fails the continue-as-new and replays it with the signal.)
                while self.pending:
                    if changed := self._record(self.pending.pop(0)):
                        await self._act(inp, changed)
                if self.state.alerts and not self.state.firing:
                    return self._summary("resolved")
                workflow.continue_as_new(inp.model_copy(update={"state": self.state}))

    def _record(self, batch: AlertBatch) -> list[AlertRecord]:
        """Merge one notification; returns the alerts that are new or newly resolved."""
        st = self.state
        st.notifications += 1
        self.notifications_this_run += 1
        changed = []
        for a in batch.alerts:
            seen = st.alerts.get(a.key)
            if seen is not None and (seen == "resolved" or a.status == "firing"):
                st.duplicates += 1
                continue
            st.alerts[a.key] = a.status
            changed.append(a)
            if a.status == "firing" and (st.first_firing_at is None or a.starts_at < st.first_firing_at):
                st.first_firing_at = a.starts_at
        return changed

    async def _act(self, inp: IncidentInput, changed: list[AlertRecord]) -> None:
        spec = inp.action
        if self.state.action is None and any(a.status == "firing" for a in changed):
            self.state.action = await self._start(inp, spec)
            self.state.action_taken_at = workflow.now()
            workflow.logger.info("alert incident action", extra={"rule": inp.rule, "action": self.state.action})
        if spec.kind == "monitor" and spec.workflow_id and self.state.action is not None:
            notice = AlertNotice(rule=inp.rule, incident_id=workflow.info().workflow_id,
                                 group_labels=inp.group_labels,
                                 firing=sum(a.status == "firing" for a in changed),
                                 resolved=sum(a.status == "resolved" for a in changed),
                                 sample=[a.labels for a in changed[:5]])
            try:
                await workflow.get_external_workflow_handle(spec.workflow_id).signal("alert", notice)
                self.state.notices_sent += 1
            except FailureError as e:
                if not workflow.patched("incident-restarts-monitor"):
                    # (Runs before the patch: recorded only, the text growing with each notice.)
                    self.state.action = f"{self.state.action}; signal to {spec.workflow_id} failed: {e.message}"
                    return
                # The monitor ended (terminated, failed) while its alerts still fire: nothing
                # watches the service. Started again, as the first firing alert started it, and
                # told; not when it completed (`eagle-dr monitor stop`: a human's decision).
                # (Only the count and the last restart are kept: the state travels in
                # continue-as-new, and a notice every few minutes for a day would pile up.)
                started = await self._start(inp, spec, restart=True)
                if started.startswith("started"):
                    self.state.monitor_restarts += 1
                    self.state.monitor_restarted = f"{workflow.now():%H:%M:%S} UTC after {e.message}: {started}"
                try:
                    await workflow.get_external_workflow_handle(spec.workflow_id).signal("alert", notice)
                    self.state.notices_sent += 1
                except FailureError:
                    pass  # ended again at once: the next notice tries again

    async def _start(self, inp: IncidentInput, spec: ActionSpec, restart: bool = False) -> str:
        if spec.kind == "record" or not spec.workflow:
            return spec.refused or "recorded"
        args = dict(spec.input)
        if spec.kind in ("failover", "split-brain"):
            first = self.state.first_firing_at or workflow.now()
            args.setdefault("detected_at", first.isoformat())
            names = ", ".join(f"{k}={v}" for k, v in sorted(inp.group_labels.items()))
            args.setdefault("reason", f"alert rule {inp.rule}: {names}"[:2000])
        attrs = [SearchAttributePair(DR_SERVICE, inp.service), SearchAttributePair(DR_TRIGGER, "alert")]
        if spec.kind != "monitor":
            attrs.append(SearchAttributePair(DR_RUNBOOK, spec.kind))
        if args.get("target_region"):
            attrs.append(SearchAttributePair(DR_TARGET_REGION, args["target_region"]))
        # A restart replaces only a run that failed, was terminated or timed out; so does a
        # monitor's first start: a monitor stopped with `eagle-dr monitor stop` (its run
        # completed) stays stopped, whichever incident an alert opens next (a stop before
        # maintenance, whose own alerts then started it again, with automatic failover).
        failed_only = restart or (spec.kind == "monitor" and workflow.patched("incident-monitor-stays-stopped"))
        try:
            await workflow.start_child_workflow(
                spec.workflow, args, id=spec.workflow_id, task_queue=spec.task_queue or workflow.info().task_queue,
                # The runbook outlives the incident (an approval can take longer than the alert).
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"{spec.kind} {inp.service} (alert rule {inp.rule})",
                static_details=f"started by alert incident {workflow.info().workflow_id}; group labels: "
                               + ", ".join(f"{k}={v}" for k, v in sorted(inp.group_labels.items())),
                search_attributes=TypedSearchAttributes(attrs),
                **({"id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY} if failed_only else {}))
        except WorkflowAlreadyStartedError:
            if restart:
                return f"not restarted: {spec.workflow_id} runs again or was stopped (eagle-dr monitor stop)"
            if spec.kind == "monitor":
                if failed_only:
                    return (f"monitor {spec.workflow_id} not started: already running (signalled), or stopped "
                            "with eagle-dr monitor stop")
                return f"monitor {spec.workflow_id} already running: signalled"
            return f"not started: {spec.workflow_id} already in progress"
        return f"started {spec.workflow} {spec.workflow_id}"

    def _show(self) -> None:
        st, inp = self.state, self.inp
        workflow.set_current_details(
            f"**alert incident** rule `{inp.rule}` ({inp.action.kind}) of {inp.service}\n\n"
            f"- group: " + ", ".join(f"{k}={v}" for k, v in sorted(inp.group_labels.items())) + "\n"
            f"- alerts: {len(st.alerts)} ({st.firing} firing), {st.notifications} notifications, "
            f"{st.duplicates} duplicates\n- action: {st.action or 'none yet'}"
            + (f"\n- monitor restarted {st.monitor_restarts} times, last {st.monitor_restarted}"
               if st.monitor_restarts else ""))
