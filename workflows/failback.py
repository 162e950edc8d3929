"""Failback: bring the region lost in a failover back, keep what it alone had, and (by
default) make it primary again with a zero-loss switchover.

 1. preflight: the other region is primary; both regions' workers answer;
 2. approval, when the policy asks;
 3. stop the old primary (it may have come back writable) and read from its WAL what it
    committed after the fork: the failover's real RPO;
 4. reconcile: its post-fork rows are resolved per table strategy and applied to the
    primary, every conflict audited (nothing acknowledged is silently dropped); with
    ``reconcile_approval`` an approver first sees the counts and a sample;
 5. pg_rewind it onto the primary's timeline (pg_basebackup when rewind is impossible,
    and why), stream through its slot;
 6. Redis: snapshot the old master to S3, copy the keys only it has, then re-attach it;
 7. verify: every key the reconcile audited, compared on the primary and the rebuilt standby
    (cost follows the divergence); a difference, or ``verify: full``, checks every row of
    every table (DataSyncWorkflow, which repairs by rebuilding, never by writing a standby);
 8. wait until it has caught up, then switch over back (a child SwitchoverWorkflow).
Every step is idempotent: a worker killed mid-rewind retries the step and finishes.

Point of no return: applying the old primary's rows to the primary (step 4), after which
pg_rewind erases the old primary's copy. Before it, a cancel request ends the run with the
old primary stopped and fenced, its data intact and nothing applied (the safe state: running
again writable it would be a split brain). From it on, a cancel is refused: the rows are
kept, the old primary rewound and re-attached.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.consistency.keys import AuditedKeysResult
    from activities.failback import Divergence, FailbackRequest, Reconciliation
    from activities.health import HealthActivities
    from activities.postgres.activities import PostgresActivities
    from activities.postgres.rewind import Rewound
    from activities.redis.failback import RedisFailback
    from workflows.data_sync import DataSyncResult
    from workflows.models import ApprovalPolicy, RunbookResult, SwitchoverInput, Trigger
    from workflows.plan import failback_plan
    from workflows.rejoin import Rejoin
    from workflows.runbook import move_id, outlives_parent
    from workflows.switchover import SwitchoverWorkflow
    from workflows.validation import RawInput, invalid, validated


class FailbackInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = "eagle-alert"
    region: str = Field(min_length=1, description="the region to bring back")
    reason: str = ""
    trigger: Trigger = Trigger.manual
    approval: ApprovalPolicy = ApprovalPolicy()
    # Asked after the old primary's post-fork rows are decided, before any is written:
    # the approver sees the counts and a sample (details, and the `review` query).
    reconcile_approval: ApprovalPolicy = ApprovalPolicy()
    switch_back: bool = True
    max_catch_up_lag_bytes: int = Field(default=1024 * 1024, ge=0)
    catch_up_timeout_seconds: float = Field(default=600, gt=0)
    measure_client_impact: bool = False
    # The last step's reach. divergence: the keys the failback reconciled, on both sides (its
    # cost follows the divergence; a difference there escalates to full). full: every row of
    # every table (DataSyncWorkflow), as long as the database takes to read.
    verify: Literal["divergence", "full"] = "divergence"


class FailbackReport(BaseModel):
    service: str
    region: str
    primary_before: str
    # None when the region already streamed from the primary (nothing diverged to keep).
    divergence: Divergence | None = None
    reconciliation: Reconciliation | None = None
    rewind: Rewound | None = None
    redis: RedisFailback
    switchover: RunbookResult | None = None
    # The rejoined standby's data checked against the primary (None: failbacks before it).
    verify: DataSyncResult | None = None
    # The divergence's keys compared (verify: divergence; None: failbacks before it, or full).
    verify_keys: AuditedKeysResult | None = None
    steps: list = []
    notes: list[str] = []
    outcome: str | None = None
    cancel_refused: str | None = None


@workflow.defn
class FailbackWorkflow(Rejoin):
    runbook = "failback"
    # A danger preflight found that a cancel before the point of no return leaves as it was
    # (once the old PostgreSQL is stopped to be measured, only its Redis is left).
    _left = ""
    _redis_left = ""

    async def _preflight(self, inp: FailbackInput):
        """Both regions' workers answer and the other region is the primary."""
        async with self.step("preflight") as st:
            topo = await self.topology()
            self.known_region(topo, "region", inp.region)
            primary = topo.other(inp.region).name
            pq, oq = topo.region(primary).task_queue, topo.region(inp.region).task_queue
            self.tag(inp.service, primary, inp.region, inp.trigger.value)
            try:
                p_health = await self.act(HealthActivities.probe_region, primary, queue=pq, timeout=30,
                                          schedule_to_start=30, attempts=2)
                o_health = await self.act(HealthActivities.probe_region, inp.region, queue=oq, timeout=30,
                                          schedule_to_start=30, attempts=2)
            except ActivityError as e:
                raise ApplicationError(f"failback needs both regions' workers: {e.cause or e}",
                                       type="RegionUnhealthy", non_retryable=True) from None
            if p_health.postgres.role != "primary":
                raise invalid("region", f"{primary} is not the primary ({p_health.postgres.role}); "
                                        f"nothing to fail back to")
            st.detail = f"{primary} is primary; {inp.region}'s worker answers"
            # What a cancel before the point of no return leaves as found, now that it is read:
            # the old primary taking writes again (restarted by hand, or never fenced) is a
            # split brain that failback resolves; a cancel before it does must say it is live.
            live = [w for w, up in (("PostgreSQL", o_health.postgres.role == "primary"),
                                    ("Redis", o_health.redis.role == "master")) if up]
            self._left = (f"{inp.region}'s {' and '.join(live)} still take writes beside {primary}'s (a split "
                          f"brain): run failback or split-brain resolution again") if live else ""
            self._redis_left = (f"{inp.region}'s Redis is still a master beside {primary}'s (a split brain): run "
                                f"failback again") if "Redis" in live else ""
            pg = o_health.postgres
            self.plan_text = failback_plan(
                inp.service, inp.region, primary, role=pg.role if pg.reachable else None, switch_back=inp.switch_back,
                streaming_from=pg.upstream if pg.role == "standby" and pg.receiver_status == "streaming" else None,
                verify=inp.verify).summary()
        return topo, primary, pq, oq, o_health


    @workflow.run
    async def run(self, raw: RawInput) -> FailbackReport:
        inp = validated(FailbackInput, raw)
        self.refuse_self_approval(inp.trigger, approval=inp.approval, reconcile_approval=inp.reconcile_approval)
        self.service, self.target_region = inp.service, inp.region
        notes: list[str] = []

        # Until preflight has read the old region, a cancel can only say what it did not check.
        self._left = (f"{inp.region} as found, not yet probed: if its PostgreSQL or Redis takes writes beside the "
                      f"primary, that is a split brain; run failback or split-brain resolution again")
        try:
            topo, primary, pq, oq, o_health = await self._preflight(inp)
        except asyncio.CancelledError:
            if not workflow.patched("failback-cancel-preflight"):
                raise
            raise self.cancelled([], self._left) from None

        measured = False
        try:
            approval = await self.approval(inp.approval, f"fail {inp.service} back to {inp.region}")
            epoch = None
            if workflow.patched("failback-epoch"):
                # What the primary records now: the rewind refuses to follow it if a newer move acts meanwhile.
                epoch = (await self.act(PostgresActivities.read_epoch, primary, queue=pq, timeout=30)).epoch
                self.epoch = epoch
            req = FailbackRequest(region=inp.region, primary_region=primary, approved_by=approval.approver,
                                  epoch=epoch)

            pg = o_health.postgres
            divergence = rreq = None
            # (patched: a failback in flight when this shipped measured instead, and replays so)
            if pg.role == "standby" and pg.receiver_status == "streaming" and workflow.patched("skip-streaming"):
                # Already rebuilt (a second run, or a region rejoined by hand): there is no fork to
                # measure, and stopping a healthy standby to look for one would be the only harm done.
                self.skip_postgres(req, "the old primary", f"{inp.region} already streams from {pg.upstream}")
            else:
                measured = True
                divergence = await self.measure_divergence(req, oq, "the old primary")
                rreq, _ = await self.review_reconciliation(req, divergence, oq, inp.reconcile_approval)
        except (asyncio.CancelledError, ActivityError) as e:
            if isinstance(e, ActivityError) and not isinstance(e.cause, CancelledError):
                raise
            # Nothing to undo: the old primary stays stopped and fenced, which is where it must be
            # until its writes are kept (restarting it writable would make a split brain).
            raise self.cancelled([f"nothing applied to {primary}; {inp.region}'s PostgreSQL is left stopped and "
                                  "fenced with its data intact: run failback again to keep its writes"]
                                 if measured else [], self._redis_left if measured else self._left) from None

        async def keep_rewind_switch() -> FailbackReport:
            reconciliation = rewound = None
            if rreq is not None:
                reconciliation = await self.apply_reconciliation(req, rreq, oq, notes)
                rewound = await self.rewind(req, oq, notes)
            redis = await self.rejoin_redis(req, oq)
            verify = verify_keys = None
            verified = True  # no full verify ran, or it ended green
            if reconciliation is not None and inp.verify == "divergence" \
                    and workflow.patched("failback-verify-divergence"):
                verify_keys, full = await self.verify_divergence(primary, inp.region, reconciliation)
                if full:
                    verify = await self.verify_by_data(primary, inp.region, inp.reconcile_approval,
                                                       f"failback {workflow.info().workflow_id}")
                    verified = verify is not None and verify.outcome == "succeeded"
            elif workflow.patched("failback-verify-by-data"):
                # verify: full, or no reconcile to follow (the region already streamed, rebuilt
                # by someone else: nothing says which of its rows to trust).
                verify = await self.verify_by_data(primary, inp.region, inp.reconcile_approval,
                                                   f"failback {workflow.info().workflow_id}")
                verified = verify is not None and verify.outcome == "succeeded"

            switchover = None
            if inp.switch_back and redis.failed:
                # (Only a run that took the patch "redis-rejoin-failure-degrades" gets here.) The
                # region's Redis is still a master beside the primary's, or the primary's is no
                # master: a switchover between them has no replica to promote, or two masters.
                why = f"{inp.region}'s Redis was not re-attached to {primary}'s (see the Redis step)"
                self.skip(f"switch over back to {inp.region}", why)
                self.degraded.append(f"switch back to {inp.region} not done: {why}; once it is (eagle-dr failback "
                                     f"--region {inp.region}): eagle-dr switchover --to {inp.region}")
            elif inp.switch_back and not verified and workflow.patched("failback-no-switch-back-unverified"):
                # Its data differs from the primary's (or could not be compared), and the repair
                # was refused, timed out or failed: made the primary, it would serve those rows as
                # the truth. It stays a standby; the primary stays where the data is known good.
                why = (f"{inp.region}'s data was not verified identical to {primary}'s (see the verify step): "
                       f"it stays a standby and {primary} the primary")
                self.skip(f"switch over back to {inp.region}", why)
                repair = f"eagle-dr sync --check {verify.check_workflow_id}" if verify else \
                    f"eagle-dr check --regions {primary},{inp.region}, then eagle-dr sync --check <its id>"
                self.degraded.append(f"switch back to {inp.region} not done: {why}; once repaired ({repair}): "
                                     f"eagle-dr switchover --to {inp.region}")
            elif inp.switch_back:
                async with self.step(f"switch over back to {inp.region}") as st:
                    try:
                        switchover = await workflow.execute_child_workflow(
                            SwitchoverWorkflow.run, SwitchoverInput(
                                service=inp.service, target_region=inp.region, trigger=inp.trigger,
                                reason=f"failback to {inp.region}", max_lag_bytes=inp.max_catch_up_lag_bytes,
                                catch_up_timeout_seconds=inp.catch_up_timeout_seconds,
                                approval=ApprovalPolicy(required=True, auto_approve_as=f"failback ({approval.outcome})"),
                                measure_client_impact=inp.measure_client_impact),
                            # The failback itself holds dr-move-<service> (one move per service
                            # at a time, failback included); its switch back is its child.
                            id=f"{move_id(inp.service)}-switch-back"
                            if workflow.info().workflow_id == move_id(inp.service) else move_id(inp.service),
                            task_queue=workflow.info().task_queue,
                            static_summary=f"failback switchover {inp.service} {primary} -> {inp.region}",
                            execution_timeout=timedelta(hours=2),
                            **outlives_parent("failback-switch-back-outlives-it"))
                        st.detail = f"{switchover.outcome}; acked writes lost {switchover.rpo.acknowledged_writes_lost}"
                    except ChildWorkflowError as e:
                        # The region is back as a streaming standby and its writes are kept: the switch
                        # back is the part that failed (it undid itself before its own point of no return).
                        st.status = "failed"
                        st.detail = f"FAILED: {e.cause or e}"
                        self.degrade(f"switching back to {inp.region}", e.cause or e,
                                     f"eagle-dr switchover --to {inp.region} once the cause is fixed")
            outcome = "succeeded" if not self.degraded and (switchover is None or switchover.outcome == "succeeded") \
                else "degraded"
            self.finish(outcome)
            return FailbackReport(service=inp.service, region=inp.region, primary_before=primary,
                                  divergence=divergence, reconciliation=reconciliation, rewind=rewound, redis=redis,
                                  switchover=switchover, verify=verify, verify_keys=verify_keys, steps=self.steps,
                                  notes=notes + self.degraded,
                                  outcome=outcome, cancel_refused=self.cancel_refused)

        return await self.no_return(keep_rewind_switch(), f"keeping {inp.region}'s rows and rewinding it")
