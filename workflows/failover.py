"""Unplanned failover: the primary region is lost; make the secondary the primary.

The runbook, as an SRE would do it by hand:
 1. preflight: the target is a healthy standby, and not too far behind (unless forced);
 2. take the next DR epoch (the fencing token every later step carries);
 3. approval, when the policy asks for it;
 4. fence the old primary wherever it can still be reached (stop PostgreSQL, pause Redis
    writes, scale its microservices to 0); a dead region is recorded as unfenced, not waited for;
 5. promote PostgreSQL and record the epoch in it; then, side by side, promote Redis (and
    re-point the Sentinels) and
 6. re-route traffic (ConfigMap, DNS, the lab's routing) and wait for the services;
 7. verify with a real write and read in the new region;
 8. measure RTO and RPO and compare them with the targets.
Point of no return: the promotion request (step 5). Before it, a cancel request lifts the
fences again (PostgreSQL, Redis, the services) and the run ends cancelled. A promotion that
fails is stopped until the standby provably cannot promote, then the fences are lifted and
the run fails (a standby that promoted all the same rolls the move forward). From the
promotion on, a cancel is refused, and a part that fails (Redis, routing) is reported as
degraded with the command that repairs it: traffic goes to the new primary regardless.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities, RegionHealth
    from activities.postgres.activities import EpochRequest, FenceRequest, LostWalRequest, PostgresActivities, \
        PromoteRequest, UnfenceRequest
    from activities.postgres.fence import PgFence
    from activities.postgres.promote import Promotion, PromotionAbort
    from activities.postgres.status import PgStatus
    from activities.postgres.unlogged import describe
    from activities.postgres.lsn import lsn_diff
    from activities.redis import failover as redis_failover
    from activities.redis.activities import RedisActivities, RedisRegionRequest
    from activities.traffic import RouteRequest, ScaleDownRequest, TrafficActivities
    from workflows.models import FailoverInput, Rpo, Rto, RunbookResult
    from workflows.plan import failover_plan
    from workflows.runbook import Runbook, described, not_picked_up, redis_fence_state, went_silent
    from workflows.validation import RawInput, invalid, validated

# The old primary's stop fence kills a server still up this long after the stop request: one
# hung on its host (frozen, stuck in I/O) never acts on it, and waiting for a graceful exit held
# the failover for the fence's whole 120 s timeout while its worker, alive, kept the fence.
KILL_AFTER_S = 10.0


@workflow.defn
class FailoverWorkflow(Runbook):
    runbook = "failover"

    @workflow.run
    async def run(self, raw: RawInput) -> RunbookResult:
        inp = validated(FailoverInput, raw)
        self.refuse_self_approval(inp.trigger, approval=inp.approval)
        info = workflow.info()
        control = info.task_queue
        self.service, self.target_region = inp.service, inp.target_region
        detected_at = inp.detected_at or info.start_time
        notes: list[str] = []

        async with self.step("preflight") as st:
            where = await self.place(inp)
            topo, source, target, tq, sq = where.topology, where.source, where.target, where.target_queue, \
                where.source_queue
            try:
                t_health: RegionHealth = await self.act(HealthActivities.probe_region, target, queue=tq, timeout=30,
                                                        schedule_to_start=30, attempts=2)
            except ActivityError as e:
                raise ApplicationError(f"target region {target} is not answering: {e.cause or e}",
                                       type="TargetUnhealthy", non_retryable=True) from None
            check_target(target, t_health)
            s_health = None
            if inp.source_known_down:
                notes.append(f"source region {source} was declared down by failed health probes")
            else:
                try:
                    # A dead region's worker never picks this up: give it a few seconds, then move on.
                    s_health = await self.act(HealthActivities.probe_region, source, queue=sq, timeout=15,
                                              schedule_to_start=5, attempts=1)
                except ActivityError:
                    notes.append(f"source region {source} worker did not answer the preflight probe")
            source_pg = s_health.postgres if s_health else None
            lag, lag_basis = standby_lag(source_pg, t_health.postgres)
            st.detail = f"target standby OK; lag {lag if lag is not None else 'unknown'} bytes ({lag_basis})"
            self._lag_guard(inp, lag, lag_basis, notes)
            self.plan_text = failover_plan(inp.service, source, target, source_worker=s_health is not None, lag=lag,
                                           basis=lag_basis, max_lag_bytes=inp.max_lag_bytes,
                                           force=inp.force).summary()

        fencing = False
        try:
            # The source's record too when it answered the preflight (a move cancelled there
            # after recording may not have reached the standby); a dead one costs nothing.
            previous = await self.take_epoch(target, tq, others=[source] if source_pg is not None and
                                             source_pg.reachable else [])
            approval = await self.approval(inp.approval, f"fail over {inp.service} to {target}")
            if inp.approval.required and workflow.patched("lag-guard-after-approval"):
                # The approval may have waited minutes: the standby can have fallen further behind.
                async with self.step("re-check the lag guard") as st:
                    t_health = await self.act(HealthActivities.probe_region, target, queue=tq, timeout=30,
                                              schedule_to_start=30, attempts=2)
                    if s_health is not None:
                        try:
                            s_health = await self.act(HealthActivities.probe_region, source, queue=sq, timeout=15,
                                                      schedule_to_start=5, attempts=1)
                        except ActivityError:
                            s_health = None
                    lag, lag_basis = standby_lag(s_health.postgres if s_health else None, t_health.postgres)
                    st.detail = f"lag {lag if lag is not None else 'unknown'} bytes ({lag_basis})"
                    self._lag_guard(inp, lag, lag_basis, notes)
            if inp.approval.required and inp.source_known_down and workflow.patched("source-down-after-approval"):
                await self._source_still_down(source, control)
            decided_at = workflow.now()

            fencing = True
            async with self.step("fence old primary") as st:
                # With the source's worker gone, all three fences are control steps: run them as
                # local activities (same timeouts and retries), which saves a task dispatch and
                # a workflow task round trip between the decision and the promotion. Not when the
                # source's worker lives: its stop fence is a remote step, and local ones would
                # hold this workflow task (and with it the stop's schedule) until they end.
                local = s_health is None and workflow.patched("failover-local-fences-when-source-down")
                # All three at once: each waits out its own timeout against a dead region.
                # All three end before a failure or a cancel is raised: gather alone raised at the
                # first one to end, and the undo then ran beside a PostgreSQL fence still in
                # flight, which re-fenced the old primary after the undo had lifted it (seen
                # under load: a cancel while Redis hung). Older histories keep the old order.
                settle = workflow.patched("failover-fences-settle-before-undo")
                fences = await asyncio.gather(
                    self._fence_postgres(source, sq if s_health else None, control, local=local),
                    self.act(RedisActivities.fence_redis, RedisRegionRequest(region=source, epoch=self.epoch),
                             queue=control, timeout=30, attempts=2, local=local),
                    self.act(TrafficActivities.scale_down_region, ScaleDownRequest(region=source, epoch=self.epoch),
                             queue=control, timeout=60, attempts=2, local=local), return_exceptions=settle)
                for outcome in fences:
                    if isinstance(outcome, BaseException):
                        raise outcome
                pg_fence, r_fence, scaled = fences
                self._scaled_down = scaled.reachable
                fenced = (pg_fence.method or "unfenced") + _killed(pg_fence)
                st.detail = f"postgres: {fenced}; redis: {redis_fence_state(r_fence)}; " \
                            f"services: {'scaled to 0' if scaled.reachable else 'unreachable'}"
                if r_fence.paused and not r_fence.durable:
                    rewrite = r_fence.error or "CONFIG REWRITE failed"
                    notes.append(f"{source}'s Redis fence is NOT persisted ({rewrite}): a restart of that Redis lifts "
                                 f"it, and its clients would write beside {target}'s master; make its redis.conf "
                                 "writable and run failback (or split-brain) soon")
            wait_for = topo.self_fence_wait_seconds
            waited = not pg_fence.method and not pg_fence.refused and bool(wait_for) and \
                not getattr(self, "source_worker_answered", False) and workflow.patched("failover-wait-self-fence")
            if waited:
                pg_fence = await self._await_self_fence(source, sq, tq, control, wait_for, local, notes)
            # Unfenced and not waited for: refused (the server is down, its host answers) or no
            # self-fence bound. Down is not fenced: a supervisor, a reboot or a person starting
            # it again would make it a writable primary beside the new one. So once the target
            # is promoted, its worker (alive more often than not: it is the server that died)
            # holds it as a standby of nothing, beside the routing.
            unfenced = not pg_fence.method and not waited
            hold = unfenced and workflow.patched("failover-hold-unfenced-old-primary")
            if unfenced and not hold:
                notes.append(f"old primary in {source} was unreachable and is NOT fenced: it must stay down "
                             "until failback rewinds it")

        except asyncio.CancelledError:
            raise self.cancelled(await self._undo_fences(source, sq, control) if fencing else []) from None
        except ActivityError as e:
            if not isinstance(e.cause, CancelledError):
                raise
            raise self.cancelled(await self._undo_fences(source, sq, control) if fencing else []) from None

        async def promote_and_route() -> RunbookResult:
            promotion_started = workflow.now()
            async with self.step("promote") as st:
                # The epoch recorded by the promotion itself: as a step of its own, a target
                # worker that died right after the promotion left the new primary with the old
                # epoch, and once the partition healed the old primary's worker, seeing no newer
                # epoch anywhere, lifted its self-fence: two writable primaries.
                records = workflow.patched("failover-promote-records-epoch")
                try:
                    promotion = await self.act(PostgresActivities.promote_postgres, PromoteRequest(
                        region=target, epoch=self.epoch, timeout_seconds=inp.promote_timeout_seconds,
                        record_epoch=records, epoch_failure_returned=records), queue=tq,
                        # schedule_to_start: past the point of no return a cancel is refused, so a
                        # dead target worker would hold the outage (and a monitor awaiting this
                        # run) forever; long enough for a restarted pod, then the abort path.
                        timeout=inp.promote_timeout_seconds + 60, heartbeat=30, schedule_to_start=120)
                except ActivityError as e:
                    stale = isinstance(e.cause, ApplicationError) and e.cause.type == "StaleEpoch"
                    if stale or not workflow.patched("failover-abort-promotion-before-unfence"):
                        lifted = await self._compensate_fence(source, pg_fence, r_fence.reachable, control, sq)
                        self.finish("failed")
                        raise ApplicationError(f"promotion of {target} failed; {lifted} and routing was not changed: "
                                               f"{e.cause or e}", type="PromotionFailed", non_retryable=True) from None
                    # pg_promote(wait => false) goes on after we stop waiting: the standby may still
                    # become writable. The fence comes off only once it provably cannot; if it did
                    # promote, the move rolls forward from here instead.
                    promotion = await self._abort_promotion(target, tq, source, pg_fence, r_fence.reachable, control,
                                                            sq, e)
                    records = False  # promoted behind the step's back: nothing recorded it
                    notes.append(f"{target} finished promoting after the promote step gave up; the move went on")
                try:
                    # Bounded in the queue: a target worker that died right after the promotion
                    # never picks it up, and past the point of no return the move must go on to
                    # Redis and routing (control steps) and say what is missing, not wait.
                    if not records or promotion.epoch_error:
                        await self.act(PostgresActivities.record_epoch, EpochRequest(region=target, epoch=self.epoch),
                                       queue=tq, schedule_to_start=30)
                except ActivityError as e:
                    if not workflow.patched("failover-epoch-record-degrades"):
                        raise
                    # Promoted: past the point of no return, the move goes on to Redis and
                    # routing (which check the epoch themselves), and says what is missing.
                    self.degrade(f"recording epoch {self.epoch} on {target}", e.cause or e,
                                 f"record it on {target} before any other move (activities/postgres/epoch.py "
                                 "advance_epoch); until then an older runbook's epoch check reads a lower one there")
                holding = asyncio.ensure_future(self._hold_old_primary(source, sq, target, notes)) if hold else None
                routing = None
                if workflow.patched("failover-route-beside-redis"):
                    # Clients follow routing and write to PostgreSQL, which is writable and holds
                    # the epoch now: routing need not wait for Redis's promotion, which against a
                    # frozen old master waits out a 2 s read timeout (its epoch check). Each part
                    # handles its own failure (degraded, reported), so neither stops the other.
                    # Routing is a step of its own, awaited once this one ends (which is Redis's).
                    promoting = asyncio.ensure_future(self._promote_redis(target, control, st, promotion))
                    routing = asyncio.ensure_future(self._reroute(target, control))
                    redis = await promoting
                else:
                    redis = await self._promote_redis(target, control, st, promotion)

            await (routing if routing is not None else self._reroute(target, control))

            verification = await self.verify(target, control)
            serving_at = workflow.now()
            held = await holding if holding is not None else None

            async with self.step("measure RTO/RPO") as st:
                rto = Rto(detected_at=detected_at, decided_at=decided_at, promotion_started_at=promotion_started,
                          writable_at=promotion.writable_at, serving_at=serving_at, target_s=topo.rto_target_seconds)
                rpo = Rpo(redis_offset_gap=_gap(r_fence, redis.promotion) if redis else None,
                          target_s=topo.rpo_target_seconds)
                lost = None
                if promotion.replay_lsn is None:
                    rpo.wal_basis = ("unknown: the promote step was retried after the standby had been promoted, so its "
                                     "replay position at promotion was not seen; failback measures the loss")
                elif workflow.patched("measure-lost-wal"):
                    try:
                        lost = await self.act(PostgresActivities.measure_lost_wal, LostWalRequest(
                            region=source, from_lsn=promotion.replay_lsn), queue=sq, timeout=300, schedule_to_start=5,
                            attempts=1)
                    except ActivityError as e:
                        notes.append(f"{source}'s own WAL could not be read ({e.cause or e}): the loss is measured at "
                                     "failback")
                wal_rpo(rpo, lost, pg_fence, promotion.replay_lsn)
                not_carried(rpo, notes, target, source_pg, t_health.postgres)
                if inp.measure_client_impact:
                    await self.measure_clients(rto, rpo, target, previous, outage_since=detected_at)
                finish_measurement(rto, rpo, verified=verification.ok, routed=self.routed())
                self.measured(rto, rpo)
                st.detail = f"{rto_text(rto)} (target {rto.target_s}s, {verdict(rto.met)}); RPO " \
                            f"{rpo.lost_wal_bytes if rpo.lost_wal_bytes is not None else 'unknown'} WAL bytes " \
                            f"({verdict(rpo.met)})"

            outcome = "succeeded" if verification.ok and not self.degraded else "degraded"
            self.finish(outcome)
            return RunbookResult(runbook=self.runbook, workflow_id=info.workflow_id, run_id=info.run_id,
                                 service=inp.service, source_region=source, target_region=target, epoch=self.epoch,
                                 outcome=outcome, trigger=inp.trigger, reason=inp.reason, approval=approval,
                                 steps=self.steps, rto=rto, rpo=rpo, source_fenced=pg_fence.method or held, notes=notes,
                                 degraded=self.degraded, cancel_refused=self.cancel_refused)

        return await self.no_return(promote_and_route(), f"the promotion of {target}")

    async def _source_still_down(self, source: str, control: str) -> None:
        """The monitor started this failover because ``source`` was down, and asked a human:
        the approval may come many minutes later, at 3 a.m., after the source came back (a
        frozen host, a restarted PostgreSQL). Failing over a primary that takes writes again
        fences it and loses what it wrote that the standby has not: what was approved was a
        failover away from a dead primary. Looked at from here (the control plane, as the
        monitor's own vantage point does); no answer or a fenced node is still down."""
        async with self.step(f"re-check {source} is still down") as st:
            try:
                pg: PgStatus = await self.act(PostgresActivities.postgres_status, source, queue=control, timeout=30,
                                              attempts=2)
            except ActivityError as e:
                st.detail = f"not read ({described(e)}): taken as still down"
                return
            if pg.reachable and pg.role == "primary" and not pg.read_only:
                st.status, st.detail = "failed", "answers again, as a writable primary"
                raise ApplicationError(
                    f"{source} answers again as a writable primary since the approval was asked: the automatic "
                    f"failover for its outage is not carried out (nothing was fenced or promoted). If {source} "
                    "should still be left, start a failover by hand", type="SourceRecovered", non_retryable=True)
            st.detail = "no answer" if not pg.reachable else f"answers as a {'fenced ' if pg.read_only else ''}" \
                                                             f"{pg.role or 'server of unknown role'}"

    async def _hold_old_primary(self, source: str, sq: str, target: str, notes: list[str]) -> str | None:
        """The stop fence on the old primary's own worker, after the promotion: on a server that
        is down it writes the hold (a restart comes up in recovery, following nothing); on one
        started again meanwhile it stops it first. Returns the fence's method, None if not held."""
        async with self.step(f"hold {source}'s PostgreSQL as a standby of nothing") as st:
            try:
                held = await self.act(PostgresActivities.fence_postgres, FenceRequest(
                    region=source, epoch=self.epoch, method="stop", kill_after_seconds=KILL_AFTER_S), queue=sq,
                    timeout=120, schedule_to_start=10, heartbeat=10, attempts=1,
                    summary=f"hold {source}'s old primary (it was down, not fenced)")
            except ActivityError as e:
                st.status, st.detail = "failed", f"not held: {described(e)}"
                notes.append(f"old primary in {source} was down and is NOT fenced (its worker could not hold it: "
                             f"{described(e)}); started again it would be a writable primary beside {target}: it "
                             "must stay down until failback rewinds it")
                return None
            st.detail = ("held: started again, it comes up in recovery and follows nothing" if held.method else
                         f"not held: {held.error}") + _killed(held)
            if not held.method:
                notes.append(f"old primary in {source} is NOT fenced ({held.error}): it must stay down until failback "
                             "rewinds it")
            return held.method

    async def _promote_redis(self, target: str, control: str, st, promotion):
        try:
            redis = await self.act(RedisActivities.promote_redis, RedisRegionRequest(
                region=target, epoch=self.epoch), queue=control, timeout=60)
            st.detail = f"postgres timeline {promotion.timeline}; redis master offset {redis.promotion.offset}"
            return redis
        except ActivityError as e:
            # PostgreSQL has moved: the service runs on without its cache master rather than not at all.
            st.detail = f"postgres timeline {promotion.timeline}; REDIS NOT PROMOTED"
            self.degrade(f"promoting {target}'s Redis", e.cause or e,
                         f"make {target}'s Redis the master (REPLICAOF NO ONE) and re-point the Sentinels")
            return None

    async def _reroute(self, target: str, control: str) -> None:
        async with self.step("re-route traffic") as st:
            try:
                route = await self.act(TrafficActivities.route_traffic, RouteRequest(region=target,
                                       epoch=self.epoch), queue=control, timeout=120)
                await self.act(TrafficActivities.wait_region_ready, target, queue=control, timeout=330,
                               heartbeat=30)
                st.detail = f"{route.previous_region} -> {target} via " \
                            f"{', '.join(route.changed) or 'already routed'}"
            except ActivityError as e:
                st.status = "failed"
                st.detail = f"FAILED: {e.cause or e}"
                self.degrade("re-routing", e.cause or e, f"point routing at {target} (ConfigMap active.region, "
                                                          f"DNS) and scale its services up")

    def _unfence(self, region: str) -> UnfenceRequest:
        # Lifting a fence carries the epoch like setting one: a superseded run's late
        # compensation is refused instead of unfencing next to a newer move's primary.
        return UnfenceRequest(region=region, epoch=self.epoch)

    def _redis_unfence(self, region: str) -> RedisRegionRequest:
        return RedisRegionRequest(region=region, epoch=self.epoch)

    def _lag_guard(self, inp: FailoverInput, lag: int | None, basis: str, notes: list[str]) -> None:
        lag_guard(inp, lag, basis, notes)

    async def _fence_postgres(self, source: str, source_queue: str | None, control: str,
                              local: bool = False) -> PgFence:
        """Stop it on its own worker if that worker lives; else read-only over the network.
        ``source_queue`` is None when the worker already failed to answer the preflight probe."""
        if source_queue:
            try:
                fence = await self.act(PostgresActivities.fence_postgres, FenceRequest(
                    region=source, epoch=self.epoch, method="stop", kill_after_seconds=KILL_AFTER_S),
                    # heartbeat: it beats every 2 s; a worker lost after taking it is noticed in
                    # 10 s, not at the 120 s start-to-close.
                    queue=source_queue, timeout=120, schedule_to_start=5, attempts=1, heartbeat=10)
                # Its worker answered: it reaches Temporal, so it will never fence itself (see
                # _await_self_fence); what it could not fence is a server hung on its own host.
                self.source_worker_answered = True
                return fence
            except ActivityError as e:
                if isinstance(e.cause, CancelledError):
                    raise  # a cancel request, not a dead worker: the caller undoes the fence
                # Only a fence nobody took, or whose worker went silent while it ran (crashed, or
                # cut off: then it fences itself), means a silent worker; one that failed or ran
                # out of time was taken by a worker that reaches Temporal.
                self.source_worker_answered = not _worker_silent(e)

        return await self.act(PostgresActivities.fence_postgres, FenceRequest(region=source, epoch=self.epoch,
                                  method="read_only"), queue=control, timeout=30, attempts=2, local=local)

    async def _await_self_fence(self, source: str, sq: str, tq: str, control: str, wait_for: float, local: bool,
                                notes: list[str]) -> PgFence:
        """The old primary timed out rather than refused: it may be alive behind a partition and
        taking writes from clients inside it. Its worker fences it after health.self_fence_after
        without contact (workers/self_fence.py); wait that bound out before promoting. Meanwhile
        a stop fence waits on its worker's queue for the whole bound, so a worker that reaches
        Temporal at any moment of it fences its node for us; at the end, the network fence is
        tried again from here and from the target's worker (the other side of a partition)."""
        async with self.step(f"wait for {source} to fence itself") as st:
            st.detail = (f"its PostgreSQL timed out (not refused): it may be cut off and writable; its worker fences "
                         f"it after losing all contact, so waiting up to {wait_for:.0f} s, with a stop fence queued "
                         "for that worker")
            self._details(f"wait for {source} to fence itself")
            try:
                fence = await self.act(PostgresActivities.fence_postgres, FenceRequest(
                    region=source, epoch=self.epoch, method="stop", kill_after_seconds=KILL_AFTER_S), queue=sq,
                    timeout=120, heartbeat=10,
                    schedule_to_start=wait_for, attempts=1, summary=f"stop fence, if {source}'s worker comes back")
                if fence.method:
                    st.detail = f"its worker came back and fenced it: {fence.method}" + _killed(fence)
                    return fence
            except ActivityError as e:
                if isinstance(e.cause, CancelledError):
                    raise
                if not _worker_silent(e):
                    self.source_worker_answered = True
            got = await asyncio.gather(*[
                self.act(PostgresActivities.fence_postgres, FenceRequest(region=source, epoch=self.epoch,
                                                                         method="read_only"),
                         queue=q, timeout=30, attempts=1, local=local and q == control)
                for q in (control, tq)], return_exceptions=True)
            for g in got:
                if isinstance(g, BaseException) and not (isinstance(g, ActivityError)
                                                         and not isinstance(g.cause, CancelledError)):
                    raise g
            fence = next((g for g in got if isinstance(g, PgFence) and g.method), None)
            if fence:
                st.detail = f"reachable again: fenced {fence.method}"
                return fence
            unfenced = next((g for g in got if isinstance(g, PgFence)), PgFence(reachable=False, error="unreachable"))
            if getattr(self, "source_worker_answered", False):
                st.detail = (f"its worker took the fence but could not fence it, and it stays unreachable from here: "
                             "NOT fenced, and that worker, in touch with Temporal, will not fence it itself")
                notes.append(f"old primary in {source} is NOT fenced: unreachable from here, and its worker, alive, "
                             "could not fence it; it must stay down until failback rewinds it")
                return unfenced
            st.detail = (f"no answer for {wait_for:.0f} s from it or its worker: if its worker is running, it has "
                         "fenced it read-only by health.self_fence_after (unverified until it is reachable)")
            notes.append(f"old primary in {source} was unreachable by timeout and is not fenced by this run: waited "
                         f"{wait_for:.0f} s, past its worker's self-fence bound, before promoting; fenced only if its "
                         "worker ran through the partition, unverified; it must stay down until failback rewinds it")
            return unfenced

    async def _undo_fences(self, source: str, sq: str, control: str) -> list[str]:
        """A cancel before the promotion: lift what the fence step may have done (it may have been
        cancelled half-way, so all of it, each step idempotent): PostgreSQL, Redis, the services."""
        undone: list[str] = []
        failures = len(self.undo_failures)
        async with self.step(f"undo: lift the fence on {source}") as st:
            try:
                await self.act(PostgresActivities.lift_postgres_fence, self._unfence(source), queue=sq,
                               timeout=180, schedule_to_start=30, attempts=2)
                undone.append(f"{source}'s PostgreSQL takes writes again")
            except ActivityError as e:
                try:
                    await self.act(PostgresActivities.unfence_postgres, self._unfence(source), queue=control,
                                   timeout=30, attempts=2)
                    undone.append(f"{source}'s PostgreSQL read-only fence lifted over the network")
                except ActivityError as e2:
                    undone.append(self.undo_failed(f"{source}'s PostgreSQL could NOT be unfenced ({e.cause or e}; "
                                                   f"{e2.cause or e2})"))
            try:
                await self.act(RedisActivities.unfence_redis, self._redis_unfence(source), queue=control,
                               timeout=30, attempts=2)
                undone.append(f"{source}'s Redis takes writes again")
            except ActivityError as e:
                undone.append(self.undo_failed(f"{source}'s Redis could NOT be unfenced ({e.cause or e})"))
            try:
                await self._route_back(source, control)
                undone.append(f"{source}'s services scaled back up, routing on {source}")
            except ActivityError as e:
                undone.append(self.undo_failed(f"{source}'s services could NOT be scaled back up ({e.cause or e})"))
            st.detail = "; ".join(undone)
            if len(self.undo_failures) > failures:
                st.status = "failed"  # shown as done, a cancel that left a fence on looked clean
        return undone

    async def _route_back(self, source: str, control: str) -> None:
        """Routing, and the services the scale-down stopped, back on ``source`` after a move that
        did not happen. The epoch this run took is spent: recorded where the next move reads it,
        so the routing written with it never looks newer than that move."""
        await self.act(PostgresActivities.record_epoch, EpochRequest(region=source, epoch=self.epoch),
                       queue=control, timeout=30, attempts=2)
        await self.act(TrafficActivities.route_traffic, RouteRequest(region=source, epoch=self.epoch),
                       queue=control, timeout=120, attempts=2)

    async def _abort_promotion(self, target: str, tq: str, source: str, fence: PgFence, redis_paused: bool,
                               control: str, source_queue: str, failure: ActivityError) -> Promotion:
        """Stop the target's standby until it provably cannot promote, then lift the fence;
        returns the promotion if it won the race (the caller rolls forward)."""
        async with self.step(f"stop {target}'s promotion") as st:
            try:
                aborted: PromotionAbort = await self.act(
                    PostgresActivities.abort_promotion, EpochRequest(region=target, epoch=self.epoch), queue=tq,
                    timeout=300, schedule_to_start=60, heartbeat=30, attempts=3)
            except ActivityError as e:
                # Unproven: the standby may still promote. Both stay as they are (fenced old
                # primary, standby in limbo): no writer is better than two.
                st.status = "failed"
                st.detail = f"could not stop {target}'s standby: {e.cause or e}"
                self.finish("failed")
                raise ApplicationError(
                    f"promotion of {target} failed ({described(failure)}) and its standby could not be stopped "
                    f"({described(e)}): it may still promote, so the old primary in {source} stays FENCED. Check "
                    f"{target} (pg_is_in_recovery()); stop it, then lift the fence on {source} by hand, or re-run "
                    "the failover once it is a primary.", type="PromotionFailed", non_retryable=True) from None
            st.detail = aborted.detail
        if aborted.promotion is not None:
            return aborted.promotion
        lifted = await self._compensate_fence(source, fence, redis_paused, control, source_queue)
        self.finish("failed")
        raise ApplicationError(f"promotion of {target} failed and was stopped ({aborted.detail}); {lifted} and "
                               f"routing was not changed: {failure.cause or failure}", type="PromotionFailed",
                               non_retryable=True)

    async def _compensate_fence(self, source: str, fence: PgFence, redis_paused: bool, control: str,
                                source_queue: str) -> str:
        """Lift the fences after a promotion that did not happen; returns what was done, for the error."""
        async with self.step("compensate: lift fence on old primary") as st:
            try:
                done = await self._lift_fences(source, fence, redis_paused, control, source_queue, st)
            except ActivityError as e:
                if not (isinstance(e.cause, ApplicationError) and e.cause.type == "StaleEpoch"):
                    raise
                # A newer move recorded a higher epoch: the fences are its own now. Lifting
                # them would put a writable primary next to its one.
                st.detail = f"fences LEFT in place, a newer move owns them: {e.cause}"
                return "the old primary's fence was left in place (a newer move owns it)"
            if getattr(self, "_scaled_down", False) and workflow.patched("failover-compensation-restores-services"):
                # The fence step scaled the old region's services to 0: without this the old
                # primary took writes again with no service in front of it (as after a cancel).
                try:
                    await self._route_back(source, control)
                    done += f"; {source}'s services scaled back up, routing on {source}"
                except ActivityError as e:
                    done += (f"; {source}'s services could NOT be scaled back up ({described(e)}): scale them up and "
                             f"route to {source}")
                st.detail = (st.detail + "; " if st.detail else "") + done
        return done

    async def _lift_fences(self, source: str, fence: PgFence, redis_paused: bool, control: str,
                           source_queue: str, st) -> str:
        done = "the old primary's fence was lifted"
        if fence.method == "read_only":
            await self.act(PostgresActivities.unfence_postgres, self._unfence(source), queue=control, timeout=30)
        elif fence.method == "stop":
            if workflow.patched("failover-compensation-restarts-stopped-primary"):
                # The stop fence holds it as a standby of nothing; only its own worker can
                # undo that and start it again.
                try:
                    await self.act(PostgresActivities.lift_postgres_stop_fence, self._unfence(source),
                                   queue=source_queue, timeout=180, schedule_to_start=30, attempts=2)
                    await self.act(PostgresActivities.unfence_postgres, self._unfence(source), queue=control,
                                   timeout=30)
                    st.detail = "old primary restarted and writable again"
                except ActivityError as e:
                    if isinstance(e.cause, ApplicationError) and e.cause.type == "StaleEpoch":
                        raise
                    st.detail = (f"old primary is stopped and held as a standby; its worker could not lift "
                                 f"the fence ({e.cause or e}): lift it by hand after checking why promotion "
                                 "failed")
                    done = "the old primary is still stopped (its worker could not lift the fence)"
            else:
                st.detail = "old primary was stopped; restart it by hand after checking why promotion failed"
                done = "the old primary was left stopped"
        if redis_paused:
            try:
                await self.act(RedisActivities.unfence_redis, self._redis_unfence(source), queue=control, timeout=30)
            except ActivityError as e:
                if (isinstance(e.cause, ApplicationError) and e.cause.type == "StaleEpoch") or \
                        not workflow.patched("failover-compensation-reports-redis-unfence"):
                    raise
                done += f"; {source}'s Redis could NOT be unfenced ({described(e)}): lift its fence by hand"
        return done


def _gap(fence, promotion) -> int | None:
    return redis_failover.offset_gap(fence.offset if fence.reachable else None, promotion.offset)


def check_target(target: str, t_health: RegionHealth) -> None:
    """The failover target must be a reachable standby with a reachable Redis (``--plan`` asks too),
    and a replica, not an old primary held by a stop fence."""
    if t_health.postgres.role == "primary":
        raise invalid("target_region", f"{target} is already the primary")
    if not t_health.postgres.reachable or t_health.postgres.role != "standby":
        raise ApplicationError(f"target {target} PostgreSQL is not a reachable standby: "
                               f"{t_health.postgres.error or t_health.postgres.role}",
                               type="TargetUnhealthy", non_retryable=True)
    if not t_health.redis.reachable:
        raise ApplicationError(f"target {target} Redis is unreachable: {t_health.redis.error}",
                               type="TargetUnhealthy", non_retryable=True)
    if t_health.postgres.hold == "eagle-dr":
        # A fenced old primary restarted (by a supervisor, a reboot, a human) comes up as a
        # standby of nothing: in recovery, so it looks like any standby, and with the primary
        # down its lag is unknown, which the lag guard lets through. Promoting it would throw
        # away everything written since the fence, without a word. Not even with force: it
        # still carries its read-only fence, so the run would fail after promoting it, with
        # the live primary fenced (seen). Accepting that loss is a human's act on its host.
        raise ApplicationError(
            f"target {target} is an old primary held by eagle-dr's stop fence (the fence's marker in its data "
            f"directory, no upstream), not a replica: it has none of what was written since it was fenced, and "
            f"may hold writes the current primary never had. Bring the current primary back (then eagle-dr "
            f"failback --region {target}). eagle-dr has no runbook that accepts that loss: by hand it means lifting "
            f"its fences on its host (eagle-dr unfence --region {target} --local --force), then moving Redis and "
            f"client routing to it",
            type="TargetStale", non_retryable=True)


def lag_guard(inp: FailoverInput, lag: int | None, basis: str, notes: list[str]) -> None:
    """The RPO a failover accepts: refused past max_lag_bytes unless forced (``--plan`` reports it)."""
    if lag is None:
        note = (f"replication lag unknown ({basis}): what the old primary wrote after the standby last heard "
                "from it is lost; the loss is measured after promotion or at failback")
        if note not in notes:  # checked again after the approval: said once
            notes.append(note)
        return
    if lag > inp.max_lag_bytes:
        if not inp.force:
            raise ApplicationError(
                f"replication lag {lag} bytes exceeds max_lag_bytes {inp.max_lag_bytes} ({basis}); "
                "failing over would lose that data. Re-run with force=true to accept it.",
                {"lag_bytes": lag, "max_lag_bytes": inp.max_lag_bytes}, type="LagTooHigh", non_retryable=True)
        notes.append(f"forced past lag guard: {lag} > {inp.max_lag_bytes} bytes")


def standby_lag(source, target) -> tuple[int | None, str]:
    """What failing over to ``target`` now would lose, in WAL bytes, and how that is known.

    WAL the standby received but has not replayed yet is not lost: promotion replays it
    first. With the source alive, the loss is what it wrote that the standby has not received.
    With the source gone, only what its walsender last reported is known; anything it wrote
    after that report is unknown, never counted as 0."""
    received = target.receive_lsn or target.lsn
    if received is None:
        # A target that did not answer (an approval's re-check): its lag was counted 0 here.
        return None, "the target's received LSN is unknown (it did not answer): unknown"
    if source is not None and source.role == "primary" and source.lsn:
        return max(0, lsn_diff(source.lsn, received) or 0), "source current LSN - target received LSN"
    if target.sender_end_lsn and received:
        return max(0, lsn_diff(target.sender_end_lsn, received) or 0), (
            f"source unreachable: end of WAL its walsender last reported (at {target.sender_end_at}) - target "
            "received LSN; anything written after that report is unknown")
    return None, "source unreachable and the standby has no report of its end of WAL: unknown"


def wal_rpo(rpo: Rpo, lost, fence: PgFence, replay_lsn: str | None) -> None:
    """The WAL part of the RPO, from the best evidence there is; unknown stays None."""
    if lost is not None:
        rpo.lost_wal_bytes = max(0, lost.lost_bytes) if lost.lost_bytes is not None else None
        rpo.lost_commits = lost.lost_commits
        rpo.wal_basis = (f"the old primary's own WAL read to its end ({lost.end_lsn}) from the promoted standby's "
                         f"replay LSN ({lost.fork_lsn})")
        if lost.lost_commits == 0:
            rpo.loss_window_s = 0.0
        elif lost.last_lost_commit_at and lost.last_commit_before_fork_at:
            rpo.loss_window_s = (lost.last_lost_commit_at - lost.last_commit_before_fork_at).total_seconds()
        return
    if replay_lsn is None:
        return
    if fence.method == "read_only" and fence.last_lsn:
        # The read-only fence reads pg_current_wal_lsn() once nothing can commit: the true end.
        rpo.lost_wal_bytes = max(0, lsn_diff(fence.last_lsn, replay_lsn) or 0)
        rpo.wal_basis = "old primary's WAL position once fenced read-only - promoted standby's replay LSN"
    elif fence.method == "stop" and fence.clean_shutdown and fence.last_lsn:
        rpo.lost_wal_bytes = max(0, lsn_diff(fence.last_lsn, replay_lsn) or 0)
        rpo.wal_basis = "old primary's shutdown checkpoint - promoted standby's replay LSN"
    else:
        why = "was unreachable"
        if fence.method == "stop":
            why = ("was killed when it did not stop" if fence.killed else "crashed before it was stopped") + \
                ", so its last checkpoint is not the end of its WAL"
        rpo.wal_basis = f"unknown: the old primary {why}; failback measures the loss from its WAL"


def not_carried(rpo: Rpo, notes: list[str], target: str, *seen: PgStatus | None) -> None:
    """Name the unlogged tables and sequences the move did not carry (never in WAL: the new
    primary starts with them empty). ``seen``: the old primary's preflight status first (it
    has their sizes), then the target's (a standby knows only their names)."""
    rels = next((s.unlogged for s in seen if s is not None and s.unlogged is not None), None)
    if not rels:
        return
    rpo.not_replicated = [u.name for u in rels]
    sizes = [u.bytes for u in rels if u.kind == "table"]
    rpo.not_replicated_bytes = sum(sizes) if all(b is not None for b in sizes) else None
    when = " (sizes at preflight)" if any(u.bytes for u in rels) else ""
    notes.append(f"NOT CARRIED to {target}: unlogged {describe(rels)}{when}. PostgreSQL never writes unlogged "
                 f"relations to WAL, so {target} has them empty and their sequences start again")


def _killed(fence: PgFence) -> str:
    return (" (killed: still up after the stop request)" if fence.killed else "") + (
        " [" + ", ".join(f"{k} {v:.3f} s" for k, v in fence.phases.items()) + "]" if fence.phases else "")


def verdict(met: bool | None) -> str:
    return "unknown" if met is None else "met" if met else "MISSED"


def rto_text(rto: Rto) -> str:
    return f"RTO {rto.total_s:.1f}s" if rto.met is not None or rto.serving_basis is None else \
        f"RTO unknown ({rto.serving_basis})"


def finish_measurement(rto: Rto, rpo: Rpo, verified: bool = True, routed: bool = True) -> None:
    """``routed``: the move's routing step did not fail. When it did, the clients were not
    served by the end of the run, whatever the verify (which writes to the databases
    directly) saw: the RTO is unknown, never met."""
    def secs(a, b):
        return (b - a).total_seconds() if a and b else None

    if rto.writable_at is not None:
        # writable_at is the target worker's clock, every other stamp the server's: a skewed
        # worker clock put it before the promotion began or after the service was serving,
        # and a phase went negative. The server saw it happen between those two: kept there.
        lo, hi = rto.promotion_started_at or rto.decided_at, rto.serving_at
        if lo is not None and rto.writable_at < lo:
            rto.writable_at = lo
        if hi is not None and rto.writable_at > hi:
            rto.writable_at = hi
    rto.detection_to_decision_s = secs(rto.detected_at, rto.decided_at)
    rto.decision_to_writable_s = secs(rto.decided_at, rto.writable_at)
    rto.writable_to_serving_s = secs(rto.writable_at, rto.serving_at)
    rto.total_s = secs(rto.detected_at, rto.serving_at)
    if not routed:
        rto.serving_basis = (f"routing failed: clients were not sent to the new primary by the end of the run, "
                             f"{rto.total_s:.1f} s after detection" if rto.total_s is not None else "routing failed")
        rto.met = None
    elif rto.target_s is not None and rto.total_s is not None:
        # A service that failed verification was not restored, however fast the steps ran.
        rto.met = verified and rto.total_s <= rto.target_s
    rpo.met = rpo_met(rpo)


def rpo_met(rpo: Rpo) -> bool | None:
    """Met only on evidence: nothing lost (proven), or a measured loss window within the
    target. Lost WAL whose time span is unknown is unknown, never met."""
    if rpo.target_s is None:
        return None
    if rpo.acknowledged_writes_lost:
        return rpo.loss_window_s is not None and rpo.loss_window_s <= rpo.target_s
    if rpo.lost_commits == 0 or rpo.lost_wal_bytes == 0:
        return True
    if rpo.loss_window_s is not None and rpo.lost_commits is not None:
        return rpo.loss_window_s <= rpo.target_s
    return None


def _worker_silent(e: ActivityError) -> bool:
    """A stop fence nobody took, or whose worker stopped heartbeating while it ran (crashed, or
    cut off: then it fences itself): the old primary's worker is not in touch with Temporal."""
    return not_picked_up(e) or (went_silent(e) and workflow.patched("failover-stop-fence-heartbeat"))
