"""The DR drill: prove, on the lab, that the runbooks do what they say.

 1. planned switchover to the secondary (zero acknowledged writes may be lost);
 2. a real outage of that region (kill -9 of its PostgreSQL, Redis, Sentinel and worker);
 3. detection as production would see it: health probes failing `failure_threshold` times;
 4. unplanned failover back, with approval auto-granted (and said so);
 5. a report: every step with its duration, RTO and RPO against the targets, and the
    acknowledged writes lost, counted from the sample app's own log.
The failed region is left down: bringing it back is failback's job, never the lab's.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities
    from activities.lab_hooks import LabHooks
    from workflows.failback import FailbackInput, FailbackReport, FailbackWorkflow
    from workflows.failover import FailoverWorkflow
    from workflows.models import ApprovalPolicy, FailoverInput, RunbookResult, SwitchoverInput, Trigger
    from workflows.runbook import Runbook, move_id
    from workflows.switchover import SwitchoverWorkflow
    from workflows.validation import RawInput, invalid, validated


class DrillInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = "eagle-alert"
    # Where the switchover goes (default: the configured secondary); the outage hits it next.
    switchover_to: str | None = None
    probe_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    failure_threshold: int = Field(default=3, ge=1, le=20)
    # Bring the killed region back as a standby at the end (the original topology again).
    failback: bool = True


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
    notes: list[str] = []


@workflow.defn
class DrillWorkflow(Runbook):
    runbook = "drill"

    @workflow.run
    async def run(self, raw: RawInput) -> DrillReport:
        inp = validated(DrillInput, raw)
        control = workflow.info().task_queue
        self.service = inp.service
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
                static_summary=f"Drill: switchover {inp.service} {a} -> {b}")
            st.detail = f"{switchover.outcome}; acked writes lost {switchover.rpo.acknowledged_writes_lost}"

        async with self.step(f"outage: kill region {b}") as st:
            outage = await self.act(LabHooks.kill_region, b, queue=control, timeout=60, attempts=1)
            killed, outage_at = outage.killed, outage.at
            st.detail = "killed " + ", ".join(killed)

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
                static_summary=f"Drill: failover {inp.service} {b} -> {a}")
            st.detail = f"{failover.outcome}; RTO {failover.rto.total_s:.1f}s"

        failback = None
        if inp.failback:
            async with self.step(f"{b} comes back; failback rebuilds it as a standby") as st:
                await self.act(LabHooks.heal_region, b, queue=control, timeout=120, attempts=2)
                failback = await workflow.execute_child_workflow(
                    FailbackWorkflow.run, FailbackInput(service=inp.service, region=b, trigger=Trigger.drill,
                                                        reason="DR drill: failback", switch_back=False),
                    id=move_id(inp.service) if workflow.patched("failback-holds-move-id") else
                    f"dr-failback-{inp.service}", task_queue=control,
                    static_summary=f"Drill: failback {inp.service} region {b}")
                st.detail = f"{failback.rewind.method}; {failback.divergence.lost.lost_commits} commits after the fork" \
                    if failback.rewind else "it already streamed: nothing to rewind"

        outcomes = {switchover.outcome, failover.outcome} | ({"succeeded"} if failback else set())
        self.finish("succeeded" if outcomes == {"succeeded"} else "degraded")
        return DrillReport(service=inp.service, primary_before=a, primary_after=a, switchover=switchover,
                           outage_region=b, killed=killed, detection_seconds=detection, failover=failover,
                           failback=failback,
                           notes=[] if failback else [f"region {b} is left down: failback rebuilds it as a standby"])
