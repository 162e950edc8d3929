"""Planned switchover: move the primary to the other region with zero data loss.

 1. preflight: both regions healthy, the standby streaming and close behind;
 2. next DR epoch; approval when the policy asks; with unlogged sequences, a restartpoint
    on the standby (PostgreSQL 15 would promote a recent one unreadable);
 3. stop writes: fence the primary read-only, then stop it cleanly; its shutdown
    checkpoint is the last record it will ever write;
 4. wait until the standby has replayed past that checkpoint: every committed
    transaction is now on the standby;
 5. promote it and record the epoch, then re-route clients at once; beside both, switch
    Redis with writes paused until the replica has every byte;
 6. verify; turn the old primary into a standby of the new one (no rewind: it stopped
    before the fork) and let it stream;
 7. measure (acknowledged writes lost must be 0).

Point of no return: the promotion of the standby (step 5). Before it, a failure or a
cancel request undoes what was done (the old primary is started again as the primary,
nothing else had changed) and the run ends failed or cancelled. From it on, the runbook
rolls forward: a part that fails (Redis, routing, the old primary's rejoin) is reported
as degraded with the command that repairs it, and a cancel request is refused.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities
    from activities.postgres.activities import (
        EpochRequest,
        FenceRequest,
        FlushInitForksRequest,
        PostgresActivities,
        PromoteRequest,
        RejoinRequest,
        ReplayRequest,
        UnfenceRequest,
    )
    from activities.postgres.lsn import lsn_diff
    from activities.redis.activities import RedisActivities, RedisMoveRequest, RedisRegionRequest
    from activities.traffic import RouteRequest, ScaleDownRequest, TrafficActivities
    from workflows.failover import finish_measurement, not_carried
    from workflows.models import Rpo, Rto, RunbookResult, SwitchoverInput
    from workflows.plan import switchover_plan
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, invalid, validated


@workflow.defn
class SwitchoverWorkflow(Runbook):
    runbook = "switchover"

    @workflow.run
    async def run(self, raw: RawInput) -> RunbookResult:
        inp = validated(SwitchoverInput, raw)
        self.refuse_self_approval(inp.trigger, approval=inp.approval)
        control = workflow.info().task_queue
        self.service, self.target_region = inp.service, inp.target_region
        started = inp.detected_at or workflow.info().start_time
        notes: list[str] = []

        async with self.step("preflight") as st:
            where = await self.place(inp)
            topo, source, target, tq, sq = where.topology, where.source, where.target, where.target_queue, \
                where.source_queue
            try:
                t_health = await self.act(HealthActivities.probe_region, target, queue=tq, timeout=30,
                                          schedule_to_start=30, attempts=2)
                s_health = await self.act(HealthActivities.probe_region, source, queue=sq, timeout=30,
                                          schedule_to_start=30, attempts=2)
            except ActivityError as e:
                raise ApplicationError(f"a planned switchover needs both regions' workers: {e.cause or e}",
                                       type="RegionUnhealthy", non_retryable=True) from None
            lag = check_preflight(inp, topo, source, target, s_health, t_health)
            self._unlogged_seen = (s_health.postgres, t_health.postgres)
            st.detail = f"both healthy; lag {lag} bytes"
            lag_guard(inp, lag)
            self.plan_text = switchover_plan(inp.service, source, target, lag=lag,
                                             max_lag_bytes=inp.max_lag_bytes).summary()

        stopped = None
        # Set when the stop is asked for: a cancel (or failure) that lands while the stop runs
        # leaves no result, but the server may be stopped all the same, so the undo must run.
        # (Found by the fault suite: cancel during the stop left no writable primary.)
        fence_asked = False
        try:
            previous = await self.take_epoch(source, sq)
            approval = await self.approval(inp.approval, f"switch {inp.service} over to {target}")
            decided_at = workflow.now()
            await self._flush_init_forks(source, target, control, notes)
            async with self.step("stop writes on old primary") as st:
                fence_asked = workflow.patched("switchover-undo-fence-in-flight")
                # drain_archive_seconds: a fast shutdown waits for every segment the archiver has
                # not pushed yet; pushing them first, while clients still write, keeps that out
                # of the write outage (fence.drain_archive). at_checkpoint: the segment the
                # shutdown itself closes is pushed after its checkpoint, and nothing until the
                # old primary's rejoin needs it gone, so the fence returns at the checkpoint and
                # that push overlaps the promotion (the rejoin waits for the exit). The
                # activity's input only: the command sequence is unchanged.
                stopped = await self.act(PostgresActivities.fence_postgres, FenceRequest(
                    region=source, epoch=self.epoch, method="stop", drain_archive_seconds=10, at_checkpoint=True),
                    queue=sq, timeout=180, heartbeat=10)
                st.detail = f"stopped cleanly; shutdown checkpoint at {stopped.last_lsn}" + (
                    "; still exiting (archiving the segment the shutdown closed)" if stopped.exiting else "") + (
                    " (" + ", ".join(f"{k} {v:.3f} s" for k, v in stopped.phases.items()) + ")" if stopped.phases else "")

            promotion_started = workflow.now()
            async with self.step("wait for standby to replay everything") as st:
                replayed = await self.act(PostgresActivities.wait_replayed, ReplayRequest(
                    region=target, lsn=stopped.last_lsn, timeout_seconds=inp.catch_up_timeout_seconds),
                    queue=tq, timeout=inp.catch_up_timeout_seconds + 30, heartbeat=15)
                st.detail = f"replayed {replayed.replay_lsn} > {replayed.target_lsn}"
        except asyncio.CancelledError:
            raise self.cancelled(await self._undo_stop(source, sq, stopped is not None or fence_asked)) from None
        except ActivityError as e:
            undone = await self._undo_stop(source, sq, stopped is not None or fence_asked)
            if isinstance(e.cause, CancelledError):  # the step in flight saw the cancel request
                raise self.cancelled(undone) from None
            self.finish("failed")
            raise ApplicationError(f"switchover failed before the point of no return ({e.cause or e}); undone: "
                                   f"{'; '.join(undone) or 'nothing had changed'}", type="SwitchoverFailed",
                                   non_retryable=True) from None

        return await self.no_return(self._promote_and_route(
            inp, topo, source, target, sq, tq, control, notes, previous, approval, started, decided_at,
            promotion_started, stopped), f"promotion of {target}")

    async def _flush_init_forks(self, source: str, target: str, control: str, notes: list[str]) -> None:
        """With unlogged sequences: a restartpoint on the target first, while clients still
        write, or PostgreSQL 15 promotes a recently created one as a zero page and every
        nextval() on it fails (activities/postgres/unlogged.py). Best effort: a failure is noted,
        and the verify step still finds a broken sequence."""
        seqs = sorted({u.name for st in self._unlogged_seen for u in (st.unlogged or []) if u.kind == "sequence"})
        if not seqs or not workflow.patched("switchover-flush-init-forks"):
            return
        async with self.step("flush standby's unlogged init forks") as st:
            try:
                # The primary's CHECKPOINT is immediate (SQL has no spread one): on a busy
                # primary an I/O burst, bounded here, and only when unlogged sequences exist.
                lsn = await self.act(PostgresActivities.flush_init_forks, FlushInitForksRequest(
                    primary=source, standby=target, timeout_seconds=300), queue=control, timeout=600, heartbeat=15,
                    attempts=2)
                st.detail = f"restartpoint on {target} past {source}'s checkpoint at {lsn}, for " + ", ".join(seqs[:5])
            except ActivityError as e:
                if isinstance(e.cause, CancelledError):
                    raise
                st.status, st.detail = "failed", f"not flushed: {e.cause or e}"
                notes.append(f"{target}'s unlogged sequences were not flushed before promotion ({e.cause or e}): "
                             "the verify step says if any came up unreadable")

    async def _undo_stop(self, source: str, sq: str, stopped: bool) -> list[str]:
        """Before the point of no return only the old primary was touched: start it again as the
        primary it still is (its fence lifted). Nothing else had changed."""
        if not stopped:
            return []
        async with self.step(f"undo: {source} takes writes again") as st:
            await self.act(PostgresActivities.lift_postgres_fence, UnfenceRequest(region=source, epoch=self.epoch),
                           queue=sq, timeout=180)
            st.detail = f"{source} restarted as the primary, its fence lifted"
        return [st.detail]

    async def _promote_and_route(self, inp, topo, source, target, sq, tq, control, notes, previous, approval,
                                 started, decided_at, promotion_started, stopped) -> RunbookResult:
        info = workflow.info()
        routing: asyncio.Future | None = None
        async with self.step("promote") as st:
            if workflow.patched("switchover-route-beside-redis"):
                # Clients follow routing and write to PostgreSQL; the Redis cache is theirs only
                # through Sentinel and never holds an acknowledged write alone. So routing waits
                # for PostgreSQL to be writable (its epoch recorded) and not for Redis, whose
                # zero-loss switch (pause, catch up, promote, re-point every Sentinel) was the
                # longer of the two and so the end of the write outage. Until Redis finishes,
                # the target's clients see a read-only replica cache, as the old region's saw
                # a paused master: the same as before, minus the wait.
                # Routing is its own step, started here and awaited once this one ends, so that
                # this step's outcome and time are the promotion's and Redis's alone.
                async def postgres_then_route():
                    nonlocal routing
                    done = await self.act(PostgresActivities.promote_postgres, PromoteRequest(
                        region=target, epoch=self.epoch, record_epoch=True), queue=tq, timeout=180, heartbeat=30)
                    routing = asyncio.ensure_future(self._reroute(source, target, control))
                    return done

                promotion, redis_lost = await self._both(postgres_then_route(),
                                                         self._move_redis(source, target, control))
            elif workflow.patched("switchover-redis-beside-promotion"):
                # Writes are stopped until routing changes, so this step is all outage. Redis
                # moves beside PostgreSQL, not after it: both start only once the standby has
                # replayed past the old primary's shutdown checkpoint, and each is zero-loss on
                # its own (Redis pauses its master's writes until the replica has every byte and
                # checks its own epoch record), so neither's safety depends on the other's order.
                # The epoch is recorded inside the promote step (one round trip fewer), after
                # writable_at.
                async def postgres():
                    return await self.act(PostgresActivities.promote_postgres, PromoteRequest(
                        region=target, epoch=self.epoch, record_epoch=True), queue=tq, timeout=180, heartbeat=30)

                promotion, redis_lost = await self._both(postgres(), self._move_redis(source, target, control))
            else:
                promotion = await self.act(PostgresActivities.promote_postgres, EpochRequest(region=target,
                                           epoch=self.epoch), queue=tq, timeout=180, heartbeat=30)
                await self.act(PostgresActivities.record_epoch, EpochRequest(region=target, epoch=self.epoch),
                               queue=tq)
                redis_lost = await self._move_redis(source, target, control)
            st.detail = f"postgres timeline {promotion.timeline}" + (
                " (" + ", ".join(f"{k} {v:.3f} s" for k, v in promotion.phases.items()) + ")"
                if promotion.phases else "") + \
                f"; redis lost {redis_lost if redis_lost is not None else 'unknown'} bytes"

        await (routing if routing is not None else self._reroute(source, target, control))

        verification = await self.verify(target, control)
        serving_at = workflow.now()

        async with self.step("old primary becomes standby") as st:
            try:
                rejoined = await self.act(PostgresActivities.rejoin_as_standby, RejoinRequest(
                    region=source, primary_region=target, epoch=self.epoch), queue=sq, timeout=330, heartbeat=30)
                st.detail = f"{source} streams from {rejoined.upstream} via slot {rejoined.slot}"
            except ActivityError as e:
                st.status = "failed"
                self.degrade(f"{source} rejoining as a standby", e.cause or e,
                             f"eagle-dr failback --region {source} --standby-only")

        async with self.step("measure RTO/RPO") as st:
            rto = Rto(detected_at=started, decided_at=decided_at, promotion_started_at=promotion_started,
                      writable_at=promotion.writable_at, serving_at=serving_at, target_s=topo.rto_target_seconds)
            # Zero only when proven: the old primary's last stop was a clean shutdown (its checkpoint
            # is the last record it wrote) and the standby replayed past that checkpoint.
            proven = stopped.clean_shutdown is not False
            rpo = Rpo(lost_wal_bytes=0 if proven else None, lost_commits=0 if proven else None,
                      wal_basis="standby replayed past the old primary's shutdown checkpoint" if proven else
                      "unknown: the old primary did not shut down cleanly (a crash while it was being stopped); "
                      "its WAL after the last checkpoint was not compared",
                      redis_offset_gap=redis_lost, target_s=topo.rpo_target_seconds)
            not_carried(rpo, notes, target, *self._unlogged_seen)
            if inp.measure_client_impact:
                notes += await self.measure_clients(rto, rpo, target, previous, outage_since=decided_at)
            finish_measurement(rto, rpo, verified=verification.ok)
            self.measured(rto, rpo)
            st.detail = f"RTO {rto.total_s:.1f}s; WAL lost {rpo.lost_wal_bytes if proven else 'unknown'} bytes" + (
                f"; clients saw {_secs(rto.client_outage_s)} without writes, acked writes lost "
                f"{_or_unknown(rpo.acknowledged_writes_lost)}" if inp.measure_client_impact else "")

        outcome = "succeeded" if verification.ok and not rpo.acknowledged_writes_lost and not self.degraded \
            else "degraded"
        self.finish(outcome)
        return RunbookResult(runbook=self.runbook, workflow_id=info.workflow_id, run_id=info.run_id,
                             service=inp.service, source_region=source, target_region=target, epoch=self.epoch,
                             outcome=outcome, trigger=inp.trigger, reason=inp.reason, approval=approval,
                             steps=self.steps, rto=rto, rpo=rpo, source_fenced="stop", notes=notes,
                             degraded=self.degraded, cancel_refused=self.cancel_refused)

    @staticmethod
    async def _both(first, second) -> tuple:
        """Both run to their end before the error (if any) is raised: a step left running
        behind a failed run would act with nobody watching it."""
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return tuple(outcomes)

    async def _reroute(self, source: str, target: str, control: str) -> None:
        async with self.step("re-route traffic") as st:
            try:
                route = await self.act(TrafficActivities.route_traffic, RouteRequest(region=target, epoch=self.epoch),
                                       queue=control, timeout=120)
            except ActivityError as e:
                st.status = "failed"
                self.degrade("re-routing", e.cause or e, f"point routing at {target} (ConfigMap active.region, DNS) "
                                                          "and scale its services up; the data already moved")
                route = None
            ready = True
            if workflow.patched("switchover-scale-failures-degrade"):
                # Past the point of no return: the data moved, so a cluster that does not scale
                # as asked is reported with its repair, as a failed re-route is, not a failed run.
                try:
                    await self.act(TrafficActivities.scale_down_region, ScaleDownRequest(region=source,
                                   epoch=self.epoch), queue=control, timeout=60)
                except ActivityError as e:
                    ready = False
                    self.degrade(f"scaling {source}'s services down", e.cause or e,
                                 f"scale {source}'s services to 0 (eagle-dr stays off their replicas)")
                try:
                    await self.act(TrafficActivities.wait_region_ready, target, queue=control, timeout=330,
                                   heartbeat=30)
                except ActivityError as e:
                    ready = False
                    self.degrade(f"{target}'s services becoming ready", e.cause or e,
                                 f"check {target}'s deployments (kubectl rollout status) and their replicas")
            else:
                await self.act(TrafficActivities.scale_down_region, ScaleDownRequest(region=source,
                               epoch=self.epoch), queue=control, timeout=60)
                await self.act(TrafficActivities.wait_region_ready, target, queue=control, timeout=330, heartbeat=30)
            if not ready:
                st.status = "failed"
            if route is not None:
                st.detail = f"{route.previous_region} -> {target} via {', '.join(route.changed) or 'already routed'}"

    async def _move_redis(self, source: str, target: str, control: str) -> int | None:
        """Zero-loss Redis switch; if that fails, promote the target anyway (what it lacks is
        counted), and if even that fails, report Redis degraded: PostgreSQL has moved already."""
        try:
            redis = await self.act(RedisActivities.switchover_redis, RedisMoveRequest(
                old_region=source, new_region=target, epoch=self.epoch), queue=control, timeout=120, heartbeat=30)
            return redis.lost_bytes
        except ActivityError as e:
            first = e.cause or e
        if not workflow.patched("switchover-redis-roll-forward"):
            raise ApplicationError(f"switchover_redis failed: {first}", non_retryable=True)
        try:
            await self.act(RedisActivities.promote_redis, RedisRegionRequest(region=target, epoch=self.epoch),
                           queue=control, timeout=60)
            self.degraded.append(f"Redis zero-loss switch failed ({first}); {target}'s Redis was promoted instead, "
                                 f"what it had not received from {source} is lost (see the Redis offset gap); "
                                 f"repair: none needed, re-attach {source}'s Redis with eagle-dr failback --region "
                                 f"{source} --standby-only")
            return None
        except ActivityError as e:
            self.degrade("Redis move", f"{first}; then promote: {e.cause or e}",
                         f"make {target}'s Redis the master (REPLICAOF NO ONE) and re-point the Sentinels to it")
            return None


def check_preflight(inp: SwitchoverInput, topo, source: str, target: str, s_health, t_health) -> int | None:
    """Both regions ready for a zero-loss switch; returns the lag (``--plan`` asks the same)."""
    if t_health.postgres.role == "primary":
        raise invalid("target_region", f"{target} is already the primary")
    if s_health.postgres.role != "primary":
        raise ApplicationError(f"source {source} PostgreSQL is not a reachable primary "
                               f"({s_health.postgres.error or s_health.postgres.role}); use failover",
                               type="RegionUnhealthy", non_retryable=True)
    if t_health.postgres.receiver_status != "streaming":
        raise ApplicationError(f"target {target} is not streaming ({t_health.postgres.receiver_status})",
                               type="RegionUnhealthy", non_retryable=True)
    if not (t_health.redis.reachable and s_health.redis.reachable):
        raise ApplicationError("both Redis nodes must be reachable for a zero-loss switchover",
                               type="RegionUnhealthy", non_retryable=True)
    # Roles, not only reachability: a zero-loss switch needs the source's master with the
    # target as its replica. Anything else (a stale Sentinel's doing, a replication loop) is
    # found here, before anything is stopped, not after PostgreSQL has moved.
    s_addr = topo.region(source).redis_address
    if s_addr and (s_health.redis.role != "master" or t_health.redis.role != "slave"
                   or t_health.redis.master != s_addr):
        raise ApplicationError(
            f"Redis is not ready for a zero-loss switchover: {source} is {s_health.redis.role}, {target} is "
            f"{t_health.redis.role}" + (f" of {t_health.redis.master}" if t_health.redis.master else "") +
            f" (needs {source} master, {target} its replica); eagle-dr status shows the Sentinels' view",
            type="RegionUnhealthy", non_retryable=True)
    return lsn_diff(s_health.postgres.lsn, t_health.postgres.lsn)


def lag_guard(inp: SwitchoverInput, lag: int | None) -> None:
    """A switchover loses nothing; the guard bounds how long writes pause while the standby catches up."""
    if lag is not None and lag > inp.max_lag_bytes:
        raise ApplicationError(f"replication lag {lag} bytes exceeds max_lag_bytes {inp.max_lag_bytes}: "
                               "the write pause would last too long; wait for the standby to catch up",
                               type="LagTooHigh", non_retryable=True)


def _secs(v: float | None) -> str:
    return f"{v:.2f}s" if v is not None else "an unknown time"


def _or_unknown(v) -> str:
    return "unknown" if v is None else str(v)
