"""Split-brain resolution: two regions both think they are primary. Stop the bleeding first,
then keep every write either side made that can be kept, and record every decision.

 1. detect: which of PostgreSQL, Redis and routing is split (nothing split: done);
 2. decide the survivor by the configured rule (active region, highest DR epoch, region
    priority) and take the next DR epoch on it: anything the loser's side still runs is stale;
 3. fence the loser at once: PostgreSQL read-only, Redis writes paused, its services
    scaled to 0; route traffic to the survivor;
 4. Redis: snapshot the loser's master to S3, copy the keys only it has, REPLICAOF the survivor
    (first: its write pause runs out on its own);
 5. PostgreSQL: stop the loser, measure from its WAL what it committed after the fork, decide
    its post-fork rows per table strategy (an approver may review counts and a sample),
    apply them to the survivor, every decision audited in eagle_dr.conflict_audit;
 6. resync: pg_rewind the loser into a standby of the survivor (pg_basebackup if impossible),
    then compare every key the reconcile audited on both (``verify: full``, or a difference
    there: every row of every table, DataSyncWorkflow);
 7. verify: one writable primary, one Redis master, one active region, a real write and read.
The loser's services stay at 0: it is the passive region now, as after any failover.
If the approver rejects, no row is applied and the loser stays stopped, its data intact
(its Redis was already re-attached in step 4: cache keys are only ever added, never replaced,
and its snapshot stays in S3).

Point of no return: fencing the loser (step 3), the first thing it does to either side. A
cancel request during detection or the survivor's choice ends the run cancelled with
nothing changed; from the fence on it is refused: stopping half-way would leave a fenced
loser with nobody keeping its writes, or two writers again.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.consistency.keys import AuditedKeysResult
    from activities.failback import Divergence, FailbackRequest, Reconciliation
    from activities.postgres.activities import EpochRequest, FenceRequest, PostgresActivities
    from activities.postgres.rewind import Rewound
    from activities.redis.activities import RedisActivities, RedisMoveRequest, RedisRegionRequest
    from activities.redis.failover import RedisFence
    from activities.redis.failback import RedisFailback
    from activities.split_brain import SplitBrainActivities, SplitBrainReport, SurvivorChoice, choose_survivor
    from activities.traffic import RouteRequest, ScaleDownRequest, ScaleDownResult, TrafficActivities
    from eagle_dr.temporal import DR_EPOCH
    from workflows.data_sync import DataSyncResult
    from workflows.models import ApprovalPolicy, ApprovalRecord, AwareTime, StepRecord, Trigger
    from workflows.plan import split_brain_plan
    from workflows.rejoin import Rejoin
    from workflows.runbook import redis_fence_state
    from workflows.validation import RawInput, invalid, validated


class SplitBrainInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = Field(default="eagle-alert", min_length=1)
    reason: str = Field(default="", max_length=2000)
    trigger: Trigger = Trigger.manual
    # Override the configured rule for this run: active-region | highest-epoch | priority.
    survivor_rule: str | None = None
    # Or name the survivor outright (it must be one of the writable primaries).
    survivor: str | None = None
    # Asked after the loser's rows are decided, before any is written (counts and a sample).
    approval: ApprovalPolicy = ApprovalPolicy()
    detected_at: AwareTime | None = None
    # The loser's data check after its rewind, as failback's (workflows/failback.py): the keys
    # reconciled (divergence), or every row of every table (full).
    verify: Literal["divergence", "full"] = "divergence"


class SplitBrainResult(BaseModel):
    service: str
    outcome: str  # resolved | no-split-brain | unknown (a node did not answer) | degraded | aborted
    findings: list[str]
    detection: SplitBrainReport
    choice: SurvivorChoice | None = None
    epoch: int | None = None
    divergence: Divergence | None = None
    reconciliation: Reconciliation | None = None
    approval: ApprovalRecord | None = None
    rewind: Rewound | None = None
    redis: RedisFailback | None = None
    # The loser, rewound into a standby, checked against the survivor by data.
    verify: DataSyncResult | None = None
    verify_keys: AuditedKeysResult | None = None
    after: SplitBrainReport | None = None
    # Split seen -> one writer left (loser fenced, traffic on the survivor) -> all resolved.
    detected_at: datetime
    single_writer_at: datetime | None = None
    resolved_at: datetime | None = None
    seconds_to_single_writer: float | None = None
    seconds_to_resolved: float | None = None
    steps: list[StepRecord] = []
    notes: list[str] = []
    cancel_refused: str | None = None


RULES = ("active-region", "highest-epoch", "priority")


@workflow.defn
class SplitBrainWorkflow(Rejoin):
    runbook = "split-brain"
    _verified = True  # the loser's data, once checked against the survivor's (verify_by_data)

    @workflow.run
    async def run(self, raw: RawInput) -> SplitBrainResult:
        inp = validated(SplitBrainInput, raw)
        self.refuse_self_approval(inp.trigger, approval=inp.approval)
        if inp.survivor_rule is not None and inp.survivor_rule not in RULES:
            raise invalid("survivor_rule", f"unknown rule {inp.survivor_rule!r} (known: {', '.join(RULES)})")
        control = workflow.info().task_queue
        detected_at = inp.detected_at or workflow.info().start_time
        self.service = inp.service
        notes: list[str] = []
        report: SplitBrainReport | None = None
        epoch_asked = epoch_recorded = False

        try:
            async with self.step("detect") as st:
                topo = await self.topology()
                if inp.survivor is not None:
                    self.known_region(topo, "survivor", inp.survivor)
                report: SplitBrainReport = await self.act(SplitBrainActivities.detect_split_brain, queue=control,
                                                          timeout=60)
                st.detail = report.detail
            result = SplitBrainResult(service=inp.service, outcome="no-split-brain", findings=report.findings,
                                      detection=report, detected_at=detected_at, steps=self.steps, notes=notes)
            # Validation copied the lists: later notes go into the result's own, and its steps
            # are the run's (the report's timeline lists every step, not only "detect").
            notes = result.notes
            self.steps = result.steps
            if not report.split:
                if report.unreachable and workflow.patched("split-brain-unknown-when-unseen"):
                    # A node that did not answer may be a second writer: "no split brain" would
                    # be a claim nobody checked (a partition hides exactly that).
                    result.outcome = "unknown"
                    notes.append(report.unseen_note)
                    notes += report.fenced_notes  # a Redis or routing source unseen: still said
                    self.finish("unknown")
                    return result
                notes += report.fenced_notes
                self.finish("no-split-brain")
                return result

            async with self.step("decide the survivor") as st:
                rule = inp.survivor_rule or topo.survivor_rule
                try:
                    choice = choose_survivor(rule, report, {r.name: r.priority for r in topo.regions}, inp.survivor)
                except ValueError as e:
                    raise invalid("survivor", str(e)) from None
                survivor, loser = choice.survivor, choice.loser
                self.target_region = survivor
                self.tag(inp.service, loser, survivor, inp.trigger.value)
                self.epoch = max(report.epochs.values(), default=0) + 1
                epoch_asked = True
                await self.act(PostgresActivities.record_epoch, EpochRequest(region=survivor, epoch=self.epoch),
                               queue=control, timeout=30)
                epoch_recorded = True
                workflow.upsert_search_attributes([DR_EPOCH.value_set(self.epoch)])
                st.detail = f"{survivor} survives ({choice.rule}: {choice.why}); {loser} loses; epoch {self.epoch}"
                self.plan_text = split_brain_plan(
                    inp.service, findings=report.findings, survivor=survivor, loser=loser,
                    why=f"{choice.rule}: {choice.why}", epoch=self.epoch, redis_split=len(report.all_redis_masters) > 1
                    and loser in report.all_redis_masters, pg_split=loser in report.postgres_primaries
                    or loser in report.fenced_primaries or f"{loser}/postgres" in report.unreachable,
                    verify=inp.verify).summary()
        except (asyncio.CancelledError, ActivityError) as e:
            if isinstance(e, ActivityError) and not isinstance(e.cause, CancelledError):
                raise
            # Nothing was touched, so nothing is undone; but the split brain is still live and
            # whoever cancelled must read that, not only "cancelled".
            left = (f"the split brain is NOT resolved ({'; '.join(report.findings)}): both sides may still take "
                    f"writes; run split-brain resolution again or fence one side") if report is not None and \
                report.split else "whatever split brain there is, unresolved"
            # The one write before the point of no return, and it is not undone: epochs only
            # rise. It makes runbooks holding an older epoch stand down; a new run takes the next.
            kept = [f"{survivor}'s DR epoch {'raised' if epoch_recorded else 'may have been raised'} to "
                    f"{self.epoch} (epochs only rise; a new run takes the next)"] if epoch_asked else []
            raise self.cancelled([], left, kept=kept) from None

        async def stop_the_bleeding() -> SplitBrainResult:
            result.choice, result.epoch = choice, self.epoch
            lq = topo.region(loser).task_queue
            # A loser already fenced read-only (by an earlier attempt, say) diverged all the same;
            # one the control worker cannot reach may be writable: unknown is never "not a primary".
            pg_unknown = f"{loser}/postgres" in report.unreachable
            pg_split = loser in report.postgres_primaries or loser in report.fenced_primaries or pg_unknown
            # A fenced (paused) master is no second writer, but it still has to be re-attached.
            redis_split = len(report.all_redis_masters) > 1 and loser in report.all_redis_masters

            async with self.step(f"fence {loser} and route to {survivor}") as st:
                # Past the point of no return, one fence that fails (its retries spent) must not
                # fail the run with the others still in flight and nothing routed: each ends, and
                # a failed one counts as not done (PostgreSQL then gets the stop fence on its own
                # worker; Redis and services are reported unfenced). Older histories raised.
                settle = workflow.patched("split-brain-fences-roll-forward")
                scaled, pg_fence, r_fence = await asyncio.gather(
                    self.act(TrafficActivities.scale_down_region, ScaleDownRequest(region=loser, epoch=self.epoch),
                             queue=control, timeout=60, attempts=2),
                    self.act(PostgresActivities.fence_postgres, FenceRequest(region=loser, epoch=self.epoch,
                                                                            method="read_only"), queue=control, timeout=30)
                    if pg_split else _none(),
                    self.act(RedisActivities.fence_redis, RedisRegionRequest(region=loser, epoch=self.epoch),
                             queue=control, timeout=30) if redis_split else _none(), return_exceptions=settle)
                for outcome in (scaled, pg_fence, r_fence):
                    # A newer epoch took over (another runbook moved on): this one stops acting.
                    if isinstance(outcome, ActivityError) and isinstance(outcome.cause, ApplicationError) and \
                            outcome.cause.type == "StaleEpoch":
                        raise outcome
                if isinstance(scaled, BaseException):
                    scaled = ScaleDownResult(region=loser, reachable=False, error=_why(scaled))
                if isinstance(pg_fence, BaseException):
                    notes.append(f"{loser}'s PostgreSQL read-only fence failed: {_why(pg_fence)}")
                    pg_fence = None
                if isinstance(r_fence, BaseException):
                    notes.append(f"{loser}'s Redis fence failed: {_why(r_fence)}")
                    r_fence = RedisFence(address="unknown", reachable=False)
                if pg_split and not (pg_fence and pg_fence.method):
                    # Out of the network's reach: stop it on its own worker, if that worker answers.
                    try:
                        pg_fence = await self.act(PostgresActivities.fence_postgres, FenceRequest(
                            region=loser, epoch=self.epoch, method="stop"), queue=lq, timeout=120, schedule_to_start=30,
                            attempts=2)
                    except ActivityError:
                        pg_fence = None
                if report.all_redis_masters == [loser]:
                    # Redis's only master is on the loser's side: move it to the survivor, losing nothing.
                    await self.act(RedisActivities.switchover_redis, RedisMoveRequest(
                        old_region=loser, new_region=survivor, epoch=self.epoch), queue=control, timeout=120,
                        heartbeat=30)
                else:
                    await self.act(RedisActivities.promote_redis, RedisRegionRequest(region=survivor, epoch=self.epoch),
                                   queue=control, timeout=60)
                # Clients go to the survivor whatever happens next.
                route = await self.act(TrafficActivities.route_traffic, RouteRequest(region=survivor, epoch=self.epoch),
                                       queue=control, timeout=120)
                pg_state = (pg_fence.method if pg_fence and pg_fence.method else "NOT FENCED") if pg_split else \
                    "was not a primary"
                redis_state = (redis_fence_state(r_fence) if r_fence.reachable else "UNREACHABLE, not paused") \
                    if redis_split else \
                    "not a second master"
                st.detail = (f"{loser}: postgres {pg_state}, redis {redis_state}, services "
                             f"{'scaled to 0' if scaled.reachable else 'UNREACHABLE, not scaled down'}; traffic on "
                             f"{survivor} ({', '.join(route.changed) or 'already routed'})")
                if redis_split and not r_fence.reachable:
                    notes.append(f"{loser}'s Redis could not be paused: it may take writes until it is re-attached")
                if not scaled.reachable:
                    notes.append(f"{loser}'s services could not be scaled to 0: {scaled.error}")
                if pg_split and not (pg_fence and pg_fence.method):
                    st.status = "failed"
                    self.finish("failed")
                    raise ApplicationError(
                        f"{loser}'s PostgreSQL could not be fenced (not over the network, and its worker did not stop "
                        f"it): it may still take writes. Traffic is on {survivor}. Fence {loser} by hand (stop it), "
                        f"then run eagle-dr failback --region {loser}: it keeps the writes {loser} took after the "
                        "fork and rejoins it (run again, split-brain resolution would no longer see a node that is "
                        "down).", type="LoserUnfenced", non_retryable=True)
            result.single_writer_at = workflow.now()

            req = FailbackRequest(region=loser, primary_region=survivor, epoch=self.epoch)
            if redis_split:
                result.redis = await self.rejoin_redis(req, lq)
            else:
                self.skip("preserve and re-attach Redis", f"{loser}'s Redis was not a second master")

            if pg_split:
                result.divergence = await self.measure_divergence(req, lq, loser)
                result.reconciliation, result.approval = await self.reconcile(req, result.divergence, lq, inp.approval,
                                                                              notes)
                result.rewind = await self.rewind(req, lq, notes)
                full = True
                if result.reconciliation is not None and inp.verify == "divergence" \
                        and workflow.patched("split-brain-verify-divergence"):
                    result.verify_keys, full = await self.verify_divergence(survivor, loser, result.reconciliation)
                if full and workflow.patched("split-brain-verify-by-data"):
                    result.verify = await self.verify_by_data(survivor, loser, inp.approval,
                                                              f"split-brain {workflow.info().workflow_id}")
                    self._verified = result.verify is not None and result.verify.outcome == "succeeded"
            else:
                self.skip_postgres(req, loser, f"{loser}'s PostgreSQL was not a primary: nothing diverged")

            async with self.step("verify") as st:
                await self.act(TrafficActivities.wait_region_ready, survivor, queue=control, timeout=330, heartbeat=30)
                after: SplitBrainReport = await self.act(SplitBrainActivities.detect_split_brain, queue=control,
                                                         timeout=60)
                verification = await self.act(TrafficActivities.verify_service, survivor, queue=control, timeout=60)
                # Unreachable is not verified: a loser nobody can see may still be writable.
                one = after.postgres_primaries == [survivor] and after.all_redis_masters == [survivor] and \
                    {v for v in after.active_region_views.values() if v} <= {survivor} and not after.unreachable
                ok = one and verification.ok and self._verified
                st.detail = (f"one primary, one master, routing on {survivor}" if one else
                             "NOT VERIFIED: " + ("; ".join(after.findings + [f"unreachable: {u}" for u in after.unreachable])
                                                 or f"primaries {after.postgres_primaries}, masters {after.redis_masters}")) \
                    + ("; write + read OK" if verification.ok else f"; verify FAILED: {verification.error}")
                if not ok:
                    st.status = "failed"
            result.after = after
            result.resolved_at = workflow.now()
            result.seconds_to_single_writer = (result.single_writer_at - detected_at).total_seconds()
            result.seconds_to_resolved = (result.resolved_at - detected_at).total_seconds()
            result.outcome = "resolved" if ok else "degraded"
            result.cancel_refused = self.cancel_refused
            # What failed past the point of no return, with its repair (rejoin.py's degrades).
            result.notes += [n for n in self.degraded if n not in result.notes]
            self.finish(result.outcome)
            return result

        return await self.no_return(stop_the_bleeding(), f"fencing {loser}")


async def _none() -> None:
    return None


def _why(e: BaseException) -> str:
    """An activity's own error message (its cause), not the wrapper's "Activity task failed"."""
    return str(getattr(e, "cause", None) or e)
