"""The DR drill: prove, on the lab, that the runbooks do what they say.

 1. planned switchover to the secondary (zero acknowledged writes may be lost);
 2. a real outage of that region (kill -9 of its PostgreSQL, Redis, Sentinel and worker);
 3. detection as production would see it: health probes failing `failure_threshold` times;
 4. unplanned failover back, with approval auto-granted (and said so);
 5. failback of the killed region as a standby;
 6. a consistency check of the rebuilt standby against the primary (ConsistencyCheckWorkflow:
    every user table down to exact keys, and Redis): failback's result, checked by data;
 7. a backup and a restore drill (RestoreDrillWorkflow): the newest backup restored into a
    scratch instance and checked against the primary, giving the backup RTO, the backup RPO and
    the newest recoverable point;
 8. a report: every step with its duration, RTO and RPO against the targets, and the
    acknowledged writes lost, counted from the sample app's own log.
The failed region is left down: bringing it back is failback's job, never the lab's.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.alert_probe import AlertLatency, AlertProbeActivities, AlertProbeRequest
    from activities.health import HealthActivities
    from activities.lab_hooks import LabHooks
    from workflows.backup import BackupInput, BackupWorkflow
    from workflows.consistency import ConsistencyCheckWorkflow, ConsistencyInput, ConsistencyResult
    from workflows.failback import FailbackInput, FailbackReport, FailbackWorkflow
    from workflows.failover import FailoverWorkflow
    from workflows.models import (ApprovalPolicy, FailoverInput, MonitorHold, RunbookResult, StepRecord,
                                  SwitchoverInput, Trigger)
    from workflows.restore_drill import RestoreDrillInput, RestoreDrillResult, RestoreDrillWorkflow
    from workflows.runbook import Runbook, monitor_id, move_id, outlives_parent
    from workflows.switchover import SwitchoverWorkflow
    from workflows.validation import RawInput, invalid, validated


# Longer than any drill on the lab takes; a drill that ends releases its hold at once.
HOLD_FOR = timedelta(hours=1)


class DrillInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = "eagle-alert"
    # Where the switchover goes (default: the configured secondary); the outage hits it next.
    switchover_to: str | None = None
    probe_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    failure_threshold: int = Field(default=3, ge=1, le=20)
    # Bring the killed region back as a standby at the end (the original topology again).
    failback: bool = True
    # Then take a backup and run a restore drill (backup RTO/RPO, newest recoverable point).
    restore_drill: bool = True
    # After failback, compare the rebuilt standby with the primary, table by table and Redis.
    consistency_check: bool = True


class DrillReport(BaseModel):
    service: str
    primary_before: str
    primary_after: str
    switchover: RunbookResult
    outage_region: str
    killed: list[str]
    detection_seconds: float
    failover: RunbookResult
    failback: "FailbackReport | None" = None
    # The restore drill's figures (also when it failed: its error carries them) and its verdict.
    restore_drill: RestoreDrillResult | None = None
    restore_drill_error: str | None = None
    # The consistency check of the rebuilt standby (None: not run, or drills before it).
    consistency: ConsistencyResult | None = None
    consistency_error: str | None = None
    # Alertmanager -> incident workflow, measured during the outage (None in drills before it).
    alert_latency: AlertLatency | None = None
    # The drill's own steps, for its report's timeline (empty in drills recorded before).
    steps: list[StepRecord] = []
    notes: list[str] = []


@workflow.defn
class DrillWorkflow(Runbook):
    runbook = "drill"

    @workflow.run
    async def run(self, raw: RawInput) -> DrillReport:
        inp = validated(DrillInput, raw)
        self.service = inp.service
        # The drill kills a region and fails over itself; the always-on monitor would race it to
        # the same failover (one move id: the loser's step fails). Held, the monitor watches and
        # reports but starts nothing until the drill ends (or the hold lapses, if it never does).
        held = workflow.patched("drill-holds-monitor") and await self._signal_monitor(
            "hold", MonitorHold(holder=workflow.info().workflow_id, until=workflow.now() + HOLD_FOR,
                                reason="DR drill in progress"))
        try:
            return await self._drill(inp)
        finally:
            if held:
                await self._signal_monitor("release", workflow.info().workflow_id)

    async def _signal_monitor(self, signal: str, arg) -> bool:
        try:
            await workflow.get_external_workflow_handle(monitor_id(self.service)).signal(signal, arg)
            return True
        except Exception as e:  # noqa: BLE001 - no monitor running is no monitor to hold
            workflow.logger.info("monitor not signalled", extra={"signal": signal, "error": str(e)})
            return False

    async def _drill(self, inp: DrillInput) -> DrillReport:
        control = workflow.info().task_queue
        topo = await self.topology()
        primary = await self.find_primary(topo)
        if primary is None:
            raise invalid("(lab)", "no region has a PostgreSQL primary; bring the lab up first")
        b = inp.switchover_to or topo.other(primary).name
        self.known_region(topo, "switchover_to", b)
        a = topo.other(b).name
        self.source_region, self.target_region = a, b
        auto = ApprovalPolicy(required=True, auto_approve_as="drill (auto-approved)")

        async with self.step(f"switchover {a} -> {b}") as st:
            switchover: RunbookResult = await workflow.execute_child_workflow(
                SwitchoverWorkflow.run, SwitchoverInput(service=inp.service, target_region=b, trigger=Trigger.drill,
                                                        reason="DR drill: planned switchover", approval=auto,
                                                        measure_client_impact=True),
                id=move_id(inp.service), task_queue=control,
                static_summary=f"Drill: switchover {inp.service} {a} -> {b}",
                **outlives_parent("drill-moves-outlive-it"))
            st.detail = f"{switchover.outcome}; acked writes lost {switchover.rpo.acknowledged_writes_lost}"

        async with self.step(f"outage: kill region {b}") as st:
            outage = await self.act(LabHooks.kill_region, b, queue=control, timeout=60, attempts=1)
            killed, outage_at = outage.killed, outage.at
            st.detail = "killed " + ", ".join(killed)

        alert_task = None
        # Guarded: drills recorded before it (tests/histories/drill*.json) replay unchanged.
        if workflow.patched("drill-alert-latency"):
            # Concurrent with detection, not before it: the probes' timing (and so the failover's
            # RTO, counted from the kill) must not include the alert's round trip.
            alert_task = asyncio.ensure_future(self._alert_latency(inp, control, b))

        async with self.step(f"detect the outage of {b}") as st:
            failures = 0
            while failures < inp.failure_threshold:
                try:
                    health = await self.act(HealthActivities.probe_region, b, queue=topo.region(b).task_queue,
                                            timeout=inp.probe_interval_seconds * 2,
                                            schedule_to_start=inp.probe_interval_seconds, attempts=1)
                    ok = health.postgres.reachable
                except ActivityError:
                    ok = False
                failures = 0 if ok else failures + 1
                if ok:
                    await workflow.sleep(timedelta(seconds=inp.probe_interval_seconds))
            detected_at = workflow.now()
            detection = (detected_at - outage_at).total_seconds()
            st.detail = f"{inp.failure_threshold} failed probes, {detection:.1f}s after the kill"

        async with self.step(f"failover {b} -> {a}") as st:
            failover: RunbookResult = await workflow.execute_child_workflow(
                FailoverWorkflow.run, FailoverInput(service=inp.service, target_region=a, trigger=Trigger.drill,
                                                    reason=f"DR drill: region {b} killed", approval=auto,
                                                    detected_at=outage_at, measure_client_impact=True,
                                                    source_known_down=True),
                id=move_id(inp.service), task_queue=control,
                static_summary=f"Drill: failover {inp.service} {b} -> {a}",
                **outlives_parent("drill-moves-outlive-it"))
            st.detail = f"{failover.outcome}; RTO {failover.rto.total_s:.1f}s"

        alert_latency = await alert_task if alert_task else None

        failback = None
        if inp.failback:
            async with self.step(f"{b} comes back; failback rebuilds it as a standby") as st:
                await self.act(LabHooks.heal_region, b, queue=control, timeout=120, attempts=2)
                failback = await workflow.execute_child_workflow(
                    FailbackWorkflow.run, FailbackInput(service=inp.service, region=b, trigger=Trigger.drill,
                                                        reason="DR drill: failback", switch_back=False),
                    id=move_id(inp.service) if workflow.patched("failback-holds-move-id") else
                    f"dr-failback-{inp.service}", task_queue=control,
                    static_summary=f"Drill: failback {inp.service} region {b}",
                    **outlives_parent("drill-moves-outlive-it"))
                st.detail = f"{failback.rewind.method}; {failback.divergence.lost.lost_commits} commits after the fork" \
                    if failback.rewind else "it already streamed: nothing to rewind"

        # The failback's own outcome (runs before the patch counted it succeeded whatever it said:
        # a Redis it could not re-attach now degrades it instead of failing it).
        outcomes = {switchover.outcome, failover.outcome} | (
            ({failback.outcome} if workflow.patched("drill-counts-failback-outcome") else {"succeeded"})
            if failback else set())
        consistency, consistency_error = None, None
        # Guarded: drills recorded before it replay without the check.
        if failback and inp.consistency_check and workflow.patched("drill-consistency-check"):
            consistency, consistency_error = await self._consistency(inp, control, a, b)
            outcomes.add(consistency.outcome if consistency else "failed")
        restore_drill, restore_drill_error = None, None
        # Guarded: histories of drills recorded before it (tests/histories/drill.json) replay unchanged.
        if inp.restore_drill and workflow.patched("drill-restore-drill"):
            restore_drill, restore_drill_error = await self._restore_drill(inp, control, a, b if failback else a)
            outcomes.add(restore_drill.outcome if restore_drill and not restore_drill_error else "failed")
        self.finish("succeeded" if outcomes == {"succeeded"} else "degraded")
        return DrillReport(service=inp.service, primary_before=a, primary_after=a, switchover=switchover,
                           outage_region=b, killed=killed, detection_seconds=detection, failover=failover,
                           failback=failback, restore_drill=restore_drill, restore_drill_error=restore_drill_error,
                           consistency=consistency, consistency_error=consistency_error,
                           alert_latency=alert_latency, steps=self.steps,
                           notes=[] if failback else [f"region {b} is left down: failback rebuilds it as a standby"])

    async def _alert_latency(self, inp: DrillInput, control: str, region: str) -> AlertLatency:
        """One real alert through the lab's Alertmanager and receiver, timed until the incident
        workflow has it. A measurement that fails is the drill's finding, never its end."""
        st = StepRecord(name="alert -> incident workflow latency", status="running", started_at=workflow.now())
        self.steps.append(st)
        try:
            res = await self.act(AlertProbeActivities.measure_alert_latency,
                                 AlertProbeRequest(service=inp.service, region=region, tag=workflow.info().run_id),
                                 queue=control, timeout=60, heartbeat=10, attempts=1)
        except ActivityError as e:
            res = AlertLatency(error=getattr(e.cause, "message", None) or str(e))
        st.status = "done" if res.seconds is not None else "failed"
        st.detail, st.finished_at = res.summary(), workflow.now()
        return res

    async def _consistency(self, inp: DrillInput, control: str, primary: str,
                           standby: str) -> tuple[ConsistencyResult | None, str | None]:
        """Failback says the rebuilt standby streams; this says it holds the primary's data. A
        difference is the drill's finding (degraded), never the end of its report."""
        async with self.step(f"consistency check: {standby} (rebuilt) against {primary}") as st:
            try:
                res = await workflow.execute_child_workflow(
                    ConsistencyCheckWorkflow.run, ConsistencyInput(regions=[primary, standby], trigger="drill",
                                                                 # listed as not compared, not a failure
                                                                 skip_tables_without_key=True),
                    task_queue=control, id=f"dr-drill-{inp.service}-consistency",
                    static_summary=f"Drill: consistency of {standby} against {primary}")
            except ChildWorkflowError as e:
                st.status, st.detail = "failed", f"check FAILED: {_cause(e)}"
                return None, _cause(e)
            tables = len(res.tables)
            st.detail = (f"{tables} tables and Redis identical" if res.differences == 0 else
                         f"{res.differences} DIFFERENCES in {', '.join(res.degraded) or 'the data'}")
            if res.differences:
                st.status = "failed"
            return res, None

    async def _restore_drill(self, inp: DrillInput, control: str, primary: str,
                             scratch_region: str) -> tuple[RestoreDrillResult | None, str | None]:
        """A backup (the lab starts with none; after the failover it is the new timeline's first),
        then a restore drill on the standby's host. A failure is the drill's finding, reported
        with the figures measured so far, never the end of the report."""
        async with self.step("backup, then a restore drill of it") as st:
            try:
                await workflow.execute_child_workflow(
                    BackupWorkflow.run, BackupInput(type="incr", trigger="drill"), task_queue=control,
                    id=f"dr-drill-{inp.service}-backup", static_summary="Drill: backup before the restore drill")
            except ChildWorkflowError as e:
                # Reported, and the restore drill still runs: it says how stale the newest backup is.
                st.detail = f"backup failed: {_cause(e)}; "
            try:
                res = await workflow.execute_child_workflow(
                    RestoreDrillWorkflow.run, RestoreDrillInput(region=scratch_region, trigger="drill"),
                    task_queue=control, id=f"dr-drill-{inp.service}-restore-drill",
                    static_summary=f"Drill: restore drill on {scratch_region}")
            except ChildWorkflowError as e:
                cause = e.cause
                details = cause.details if isinstance(cause, ApplicationError) else ()
                res = RestoreDrillResult.model_validate(details[0]) if details else None
                st.status, st.detail = "failed", (st.detail or "") + f"restore drill FAILED: {_cause(e)}"
                return res, _cause(e)
            st.detail = (st.detail or "") + (
                f"restore drill {res.outcome}: backup RTO {res.rto_seconds:.1f} s, backup RPO "
                f"{res.rpo_seconds:.0f} s, newest recoverable point {res.newest_recoverable}"
                if res.rto_seconds is not None and res.rpo_seconds is not None else f"restore drill {res.outcome}")
            return res, None


def _cause(e: ChildWorkflowError) -> str:
    c = e.cause
    return getattr(c, "message", None) or str(c or e)
