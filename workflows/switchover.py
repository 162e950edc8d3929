"""Planned switchover: move the primary to the other region with zero data loss.

 1. preflight: both regions healthy, the standby streaming and close behind;
 2. next DR epoch; approval when the policy asks; with unlogged sequences, a restartpoint
    on the standby (PostgreSQL 15 would promote a recent one unreadable);
 3. reserve, on the standby, the slot the old primary will stream through (outside the write
    outage); stop writes: fence the primary read-only, then stop it cleanly; its shutdown
    checkpoint is the last record it will ever write;
 4. promote, in one step on the standby's worker: wait until the standby has replayed past
    that checkpoint (every committed transaction is now on it), then promote it and record the
    epoch. Routing, asked for with this step, changes the moment the standby is writable;
 5. switch Redis with writes paused until the replica has every byte;
 6. verify; turn the old primary into a standby of the new one (no rewind: it stopped
    before the fork) and let it stream;
 7. measure (acknowledged writes lost must be 0).

Point of no return: the standby has replayed past the old primary's shutdown checkpoint, which
the promote step itself sees, and then promotes. Before it, a failure or a cancel request undoes
what was done (the old primary is started again as the primary, the reserved slot is dropped,
routing is never changed) and the run ends failed or cancelled; a promote step that ends without
proof of where the standby stands has it stopped until it provably cannot promote first. From it
on, the runbook rolls forward: a part that fails (Redis, routing, the old primary's rejoin) is
reported as degraded with the command that repairs it, and a cancel request is refused.
(Runs started before switchover-promote-when-replayed waited for the replay as a step of its
own and promoted in the next one; they replay as they ran.)
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities
    from activities.postgres.activities import (
        EpochRequest,
        FenceRequest,
        FlushInitForksRequest,
        LostWalRequest,
        PostgresActivities,
        PromoteRequest,
        PromoteWhenReplayedRequest,
        RejoinRequest,
        ReplayRequest,
        UnfenceRequest,
    )
    from activities.postgres.lsn import lsn_diff
    from activities.postgres.promote import Promotion
    from activities.redis.activities import RedisActivities, RedisMoveRequest, RedisRegionRequest
    from activities.traffic import RouteRequest, ScaleDownRequest, TrafficActivities
    from workflows.failover import finish_measurement, not_carried, rto_text, wal_rpo
    from workflows.models import Rpo, Rto, RunbookResult, SwitchoverInput
    from workflows.plan import switchover_plan
    from workflows.runbook import RETRY, Runbook, described, not_picked_up, redis_fence_state
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
        slots_asked = False
        self._reserved_slots: list[str] = []
        try:
            previous = await self.take_epoch(source, sq, others=[target])
            approval = await self.approval(inp.approval, f"switch {inp.service} over to {target}")
            decided_at = workflow.now()
            await self._flush_init_forks(source, target, control, notes)
            if workflow.patched("switchover-slots-before-stop"):
                # The promote step made these inside the write outage; now, while clients still
                # write, and undone with the stop if the switchover is.
                slots_asked = True
                async with self.step("reserve WAL on the standby for the old primary's return") as st:
                    # schedule_to_start: the target's worker died during an approval wait; nothing
                    # is stopped yet, so the run fails here instead of hanging.
                    self._reserved_slots = await self.act(PostgresActivities.reserve_rejoin_slots, target, queue=tq,
                                                          timeout=30, schedule_to_start=60, attempts=3)
                    st.detail = f"slot {', '.join(self._reserved_slots)} on {target}" if self._reserved_slots else \
                        f"none on {target}: its max_slot_wal_keep_size is unset (failback re-clones)"
            async with self.step("stop writes on old primary") as st:
                fence_asked = workflow.patched("switchover-undo-fence-in-flight")
                # Bounded in the queue: a source worker that died (during the approval wait, say)
                # left the stop pending forever, holding the move's id, so the monitor could not
                # fail over when the primary died next; and a cancel's undo waited on it too.
                bounded = workflow.patched("switchover-stop-bounded")
                # drain_archive_seconds: a fast shutdown waits for every segment the archiver has
                # not pushed yet; pushing them first, while clients still write, keeps that out
                # of the write outage (fence.drain_archive). at_checkpoint: the segment the
                # shutdown itself closes is pushed after its checkpoint, and nothing until the
                # old primary's rejoin needs it gone, so the fence returns at the checkpoint and
                # that push overlaps the promotion (the rejoin waits for the exit). The
                # activity's input only: the command sequence is unchanged.
                try:
                    stopped = await self.act(PostgresActivities.fence_postgres, FenceRequest(
                        region=source, epoch=self.epoch, method="stop", drain_archive_seconds=10, at_checkpoint=True),
                        queue=sq, timeout=180, heartbeat=10, schedule_to_start=inp.stop_pickup_seconds if bounded else None)
                except ActivityError as e:
                    if bounded and not_picked_up(e) and (e.cause is None or e.cause.cause is None):
                        # No attempt ran (none failed before this one): nothing was stopped.
                        fence_asked = False
                        st.detail = (f"{source}'s worker did not take the stop within {inp.stop_pickup_seconds:.0f} "
                                     "s: nothing was stopped")
                    raise
                st.detail = f"stopped cleanly; shutdown checkpoint at {stopped.last_lsn}" + (
                    "; still exiting (archiving the segment the shutdown closed)" if stopped.exiting else "") + (
                    " (" + ", ".join(f"{k} {v:.3f} s" for k, v in stopped.phases.items()) + ")" if stopped.phases else "")

            promotion_started = workflow.now()
            merged = workflow.patched("switchover-promote-when-replayed")
            if not merged:
                await self._wait_replayed(inp, target, tq, stopped)
        except asyncio.CancelledError:
            raise self.cancelled(await self._undo_stop(source, sq, stopped is not None or fence_asked,
                                                 inp.stop_pickup_seconds)
                                 + await self._undo_slots(target, tq, slots_asked)) from None
        except ActivityError as e:
            undone = await self._undo_stop(source, sq, stopped is not None or fence_asked, inp.stop_pickup_seconds) \
                + await self._undo_slots(target, tq, slots_asked)
            if isinstance(e.cause, CancelledError):  # the step in flight saw the cancel request
                raise self.cancelled(undone) from None
            self.finish("failed")
            raise ApplicationError(f"switchover failed before the point of no return ({e.cause or e}); undone: "
                                   f"{'; '.join(undone) or 'nothing had changed'}", type="SwitchoverFailed",
                                   non_retryable=True) from None

        promotion = routing = None
        if merged:
            # Routing is asked for together with the promotion and acts the moment the target
            # leaves recovery: the route activity polls it itself, so the workflow round trip
            # between the promotion's end and the re-route (~30 ms of the write gap: the epoch
            # record, the completion, a workflow task, the dispatch) is gone, and routing still
            # never points clients at a node that refuses their writes. Routing is stamped with
            # this run's epoch, not the database's. If the promotion does not happen, the wait
            # is called off and routing is unchanged.
            routing = asyncio.ensure_future(self._reroute(
                source, target, control, after_writable_s=inp.catch_up_timeout_seconds + 200))
            promotion, cancel_asked, why, unknown = await self._promote_when_replayed(inp, target, tq, stopped)
            if unknown:
                # Nothing proves the standby did not promote (an earlier attempt may have asked):
                # stop it until it provably cannot, or learn that it did and roll forward. Run
                # to its end whatever is asked: cut short, it would leave the service half-moved.
                (promotion, why), asked = await self.settled(self._settle_promotion(source, target, tq, why,
                                                                                    routing))
                cancel_asked = cancel_asked or asked
            if promotion is None:
                undone, asked = await self.settled(self._undo_unpromoted(source, sq, target, tq, slots_asked,
                                                                         routing))
                if cancel_asked or asked:
                    raise self.cancelled(undone)
                self.finish("failed")
                raise ApplicationError(f"switchover failed before the point of no return ({why}); undone: "
                                       f"{'; '.join(undone) or 'nothing had changed'}", type="SwitchoverFailed",
                                       non_retryable=True)
            if cancel_asked:
                self.cancel_refused = (f"cancel requested during the promotion was refused: {target} had replayed "
                                       "everything and was promoted (past the point of no return), the runbook "
                                       "finishes the move")
        return await self.no_return(self._promote_and_route(
            inp, topo, source, target, sq, tq, control, notes, previous, approval, started, decided_at,
            promotion_started, stopped, promotion, routing), f"promotion of {target}")

    async def _wait_replayed(self, inp, target: str, tq: str, stopped) -> None:
        """Before switchover-promote-when-replayed: the replay wait as a step of its own."""
        async with self.step("wait for standby to replay everything") as st:
            replayed = await self.act(PostgresActivities.wait_replayed, ReplayRequest(
                region=target, lsn=stopped.last_lsn, timeout_seconds=inp.catch_up_timeout_seconds),
                queue=tq, timeout=inp.catch_up_timeout_seconds + 30, heartbeat=15)
            st.detail = f"replayed {replayed.replay_lsn} > {replayed.target_lsn}"

    async def _promote_when_replayed(self, inp, target: str, tq: str,
                                     stopped) -> tuple[Promotion | None, bool, str, bool]:
        """The replay wait and the promotion as one activity on the target's worker, which
        decides the point of no return itself (PostgresActivities.promote_when_replayed).
        Returns (the promotion or None, whether a cancel was asked, why not promoted, whether
        that is unknown). None and known: proven by the activity's NotPromoted."""
        cancel_asked = False
        async with self.step("promote") as st:
            st.detail = f"once {target} has replayed past {stopped.last_lsn}"
            step = asyncio.ensure_future(workflow.execute_activity_method(
                PostgresActivities.promote_when_replayed, PromoteWhenReplayedRequest(
                    region=target, epoch=self.epoch, record_epoch=True, lsn=stopped.last_lsn,
                    catch_up_timeout_seconds=inp.catch_up_timeout_seconds),
                task_queue=tq, start_to_close_timeout=timedelta(seconds=inp.catch_up_timeout_seconds + 180),
                # A dead worker must not hold the write outage open forever: this ends as
                # unknown (an earlier attempt may have run), which abort_promotion settles.
                schedule_to_start_timeout=timedelta(seconds=60),
                heartbeat_timeout=timedelta(seconds=10), retry_policy=RETRY,
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED))
            while True:
                try:
                    promotion = await asyncio.shield(step)
                    break
                except asyncio.CancelledError:
                    cancel_asked = True
                    if not step.done():
                        # Passed on, and honoured only while the standby is still short of the
                        # checkpoint; the step runs to its end either way.
                        self._details(f"cancel requested: {target} is promoted unless it has not replayed "
                                      "everything yet")
                        step.cancel()
                        continue
                    if step.cancelled():
                        # It ended in the very activation the cancel came in, and the SDK kept
                        # its result from us: where the node stands is asked next.
                        st.status, st.detail = "failed", "outcome unknown: the step ended as the cancel arrived"
                        return None, True, "the promote step ended as the cancel request arrived", True
                    try:
                        promotion = step.result()
                        break
                    except ActivityError as e:
                        error = e
                except ActivityError as e:
                    error = e
                proven = isinstance(error.cause, ApplicationError) and error.cause.type == "NotPromoted"
                why = error.cause.message if isinstance(error.cause, ApplicationError) else described(error)
                st.status, st.detail = "failed", why if proven else f"outcome unknown: {why}"
                return None, cancel_asked, why, not proven
            st.detail = (f"replayed {promotion.replay_lsn} > {stopped.last_lsn}" if promotion.replay_lsn else
                         "already promoted (a retry)") + f"; postgres timeline {promotion.timeline}" + (
                " (" + ", ".join(f"{k} {v:.3f} s" for k, v in promotion.phases.items()) + ")"
                if promotion.phases else "")
            return promotion, cancel_asked, "", False

    async def _settle_promotion(self, source: str, target: str, tq: str, failure: str,
                                routing: asyncio.Future) -> tuple[Promotion | None, str]:
        """After a promote step whose outcome is unknown: abort_promotion stops the standby until
        it provably cannot promote, or reports that it did (then its epoch is recorded and the
        run rolls forward). Returns (the promotion or None, why not)."""
        async with self.step(f"stop {target}'s promotion") as st:
            try:
                aborted = await self.act(PostgresActivities.abort_promotion, EpochRequest(
                    region=target, epoch=self.epoch), queue=tq, timeout=300, schedule_to_start=60, heartbeat=30,
                    attempts=3)
            except ActivityError as e:
                # Unproven: no writer is better than two. Routing's wait is called off: it
                # would point clients at the target if it promoted, with nobody watching.
                st.status, st.detail = "failed", f"could not stop {target}'s standby: {described(e)}"
                routed = await self._call_off(routing)
                self.finish("failed")
                raise ApplicationError(
                    f"promotion of {target} failed ({failure}) and its standby could not be stopped ({described(e)}): "
                    f"it may still promote, so the old primary in {source} stays STOPPED; routing "
                    + (f"already points at {target}" if routed else
                       "was called off (check it: a routing call in flight may have completed)") +
                    f". Check {target} with pg_is_in_recovery(). Still a standby: stop it (pg_ctl stop), then "
                    f"`eagle-dr unfence --region {source}` and route back to {source} if needed. A primary: route "
                    f"to {target} (ConfigMap active.region, DNS) and bring {source} back with "
                    f"`eagle-dr failback --region {source} --standby-only`.", type="PromotionFailed",
                    non_retryable=True) from None
            st.detail = aborted.detail
        if aborted.promotion is None:
            return None, f"{failure}; {target} {aborted.detail}"
        try:
            # Bounded in the queue: past the point of no return a dead target worker degrades it.
            await self.act(PostgresActivities.record_epoch, EpochRequest(region=target, epoch=self.epoch), queue=tq,
                           schedule_to_start=30)
        except ActivityError as e:
            # Promoted: past the point of no return, so reported, not raised.
            self.degrade(f"recording epoch {self.epoch} on {target}", e.cause or e,
                         f"record it on {target} before any other move (activities/postgres/epoch.py advance_epoch); "
                         "until then an older runbook's epoch check reads a lower one there")
        return aborted.promotion, ""

    async def _undo_unpromoted(self, source: str, sq: str, target: str, tq: str, slots_asked: bool,
                               routing: asyncio.Future) -> list[str]:
        """Proven not promoted: the old primary takes writes again first, then routing's wait
        is called off (it can never act on a node proven a standby), then the slots go."""
        undone = await self._undo_stop(source, sq, True)
        await self._call_off(routing)
        return undone + await self._undo_slots(target, tq, slots_asked)

    @staticmethod
    async def _call_off(routing: asyncio.Future) -> bool:
        """Cancel routing's wait for the target and wait for it to end; True if it had routed."""
        if not routing.done():
            routing.cancel()
        await workflow.wait([routing])
        return not routing.cancelled() and routing.exception() is None and routing.result() is True

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

    async def _undo_stop(self, source: str, sq: str, stopped: bool, pickup: float = 60.0) -> list[str]:
        """Before the point of no return only the old primary was touched: start it again as the
        primary it still is (its fence lifted). Nothing else had changed."""
        if not stopped:
            return []
        async with self.step(f"undo: {source} takes writes again") as st:
            bounded = workflow.patched("switchover-stop-bounded")
            try:
                await self.act(PostgresActivities.lift_postgres_fence, UnfenceRequest(region=source, epoch=self.epoch),
                               queue=sq, timeout=180, schedule_to_start=pickup if bounded else None)
            except ActivityError as e:
                if not (bounded and not_picked_up(e)):
                    raise
                # The source's worker is silent: waiting on it would hold the move's id (and a
                # cancel) for as long as it stays down. Said, with the repair.
                st.status = "failed"
                st.detail = self.undo_failed(
                    f"NOT undone: {source}'s worker did not take the undo within {pickup:.0f} s. {source}'s "
                    f"PostgreSQL may be stopped: once its worker runs, re-run this undo by hand on {source}'s "
                    f"database host: eagle-dr unfence --region {source} --local")
                return [st.detail]
            st.detail = f"{source} restarted as the primary, its fence lifted"
        return [st.detail]

    async def _undo_slots(self, target: str, tq: str, asked: bool) -> list[str]:
        """After the stop's undo (writes first): the slots reserved on the standby, which would
        pin its WAL forever. Best effort: a failure is reported with its repair, not raised
        over the undo that matters."""
        if not asked:
            return []
        async with self.step(f"undo: drop the slots reserved on {target}") as st:
            try:
                # schedule_to_start: with the target's worker dead this undo must not hang the
                # one that matters (the old primary already takes writes again).
                dropped = await self.act(PostgresActivities.drop_rejoin_slots, target, queue=tq, timeout=30,
                                         schedule_to_start=60, attempts=3)
                st.detail = f"dropped {', '.join(dropped)} on {target}" if dropped else f"none left on {target}"
            except ActivityError as e:
                st.status = "failed"
                names = ", ".join(f"'{n}'" for n in self._reserved_slots) or "<the other regions' postgres.slot>"
                st.detail = (f"slots on {target} not dropped ({e.cause or e}): drop them by hand on {target}: select "
                             "pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name in "
                             f"({names}) and not active")
        return [st.detail]

    async def _promote_and_route(self, inp, topo, source, target, sq, tq, control, notes, previous, approval,
                                 started, decided_at, promotion_started, stopped, promotion=None,
                                 routing: asyncio.Future | None = None) -> RunbookResult:
        info = workflow.info()
        if promotion is not None:
            # switchover-promote-when-replayed: PostgreSQL is promoted, and routing, asked for
            # with it, acts as soon as it is writable. Redis waited for the point of no return
            # (moving it is not undone); clients never hold an acknowledged write in it alone.
            async with self.step("move Redis") as st:
                redis_lost = await self._move_redis(source, target, control)
                st.detail = f"lost {redis_lost if redis_lost is not None else 'unknown'} bytes"
        else:
            routing_box: list = []
            promotion, redis_lost = await self._promote_step(source, target, tq, control, routing_box)
            routing = routing_box[0] if routing_box else None

        if routing is None:
            await self._reroute(source, target, control)
        elif await routing is False:  # its wait failed before the promotion was known
            await self._reroute(source, target, control)

        verification = await self.verify(target, control)
        serving_at = workflow.now()

        lost = None
        if stopped.clean_shutdown is False and promotion.replay_lsn and \
                workflow.patched("switchover-measures-a-crashed-stop"):
            lost = await self._measure_crashed_stop(source, target, sq, promotion.replay_lsn, notes)
        async with self.step("old primary becomes standby") as st:
            if lost is not None and lost.lost_bytes:
                # Its WAL runs past the fork: it cannot follow the new timeline without a rewind,
                # which would discard what it alone holds. Failback reads those rows first.
                st.status, st.detail = "failed", f"not tried: {source} holds WAL {target} never received"
                self.degrade(f"{source} rejoining as a standby", f"it crashed while being stopped and holds "
                             f"{lost.lost_commits} commits ({lost.lost_bytes} WAL bytes) {target} never received",
                             f"eagle-dr failback --region {source} --standby-only (it keeps those rows by the "
                             "conflict rules, then rewinds the node to follow)")
            else:
                await self._rejoin(source, target, sq, st)

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
            if lost is not None:
                wal_rpo(rpo, lost, stopped, promotion.replay_lsn)
            not_carried(rpo, notes, target, *self._unlogged_seen)
            if inp.measure_client_impact:
                notes += await self.measure_clients(rto, rpo, target, previous, outage_since=decided_at)
            finish_measurement(rto, rpo, verified=verification.ok, routed=self.routed())
            self.measured(rto, rpo)
            st.detail = f"{rto_text(rto)}; WAL lost " \
                        f"{rpo.lost_wal_bytes if rpo.lost_wal_bytes is not None else 'unknown'} bytes" + (
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

    async def _rejoin(self, source: str, target: str, sq: str, st) -> None:
        try:
            # Bounded in the queue: a source worker that died after the promotion would hold
            # the run (and the move's id) forever; the rejoin is then degraded, for failback.
            rejoined = await self.act(PostgresActivities.rejoin_as_standby, RejoinRequest(
                region=source, primary_region=target, epoch=self.epoch), queue=sq, timeout=330, heartbeat=30,
                schedule_to_start=60)
            st.detail = f"{source} streams from {rejoined.upstream} via slot {rejoined.slot}"
        except ActivityError as e:
            st.status = "failed"
            self.degrade(f"{source} rejoining as a standby", e.cause or e,
                         f"eagle-dr failback --region {source} --standby-only")

    async def _measure_crashed_stop(self, source: str, target: str, sq: str, replay_lsn: str, notes: list[str]):
        """The old primary did not shut down cleanly (a crash, or killed when it did not stop):
        its last checkpoint, which the standby replayed past, is not the end of its WAL. What it
        wrote after the promoted standby's replay position is read from its own WAL, before
        anything (a rejoin) touches it: the RPO measured, never assumed 0 nor left unknown."""
        async with self.step(f"measure what {source} wrote past the promotion") as st:
            try:
                lost = await self.act(PostgresActivities.measure_lost_wal, LostWalRequest(
                    region=source, from_lsn=replay_lsn), queue=sq, timeout=300, schedule_to_start=30, attempts=2)
            except ActivityError as e:
                st.status, st.detail = "failed", f"not read: {described(e)}"
                notes.append(f"{source} crashed while being stopped and its WAL could not be read ({described(e)}): "
                             "the RPO is unknown; failback measures it")
                return None
            size = lost.lost_bytes if lost.lost_bytes is not None else "unknown"
            st.detail = f"{lost.lost_commits} commits, {size} WAL bytes {target} never received"
            return lost

    async def _promote_step(self, source: str, target: str, tq: str, control: str, routing_box: list) -> tuple:
        """Before switchover-promote-when-replayed: the promotion as its own step after the replay
        wait, Redis beside it; routing, when started inside, is put in ``routing_box``."""
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
        if routing is not None:
            routing_box.append(routing)
        return promotion, redis_lost

    @staticmethod
    async def _both(first, second) -> tuple:
        """Both run to their end before the error (if any) is raised: a step left running
        behind a failed run would act with nobody watching it."""
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return tuple(outcomes)

    async def _reroute(self, source: str, target: str, control: str, after_writable_s: float | None = None) -> bool:
        """Route to ``target``, then scale ``source`` down and wait for ``target``'s services.
        ``after_writable_s``: asked for with the promotion (routing waits until the target
        takes writes); a failed wait changes nothing, scales nothing and returns False, and the
        runbook routes again once the promotion is known."""
        async with self.step("re-route traffic") as st:
            try:
                if after_writable_s is not None:
                    # Bounded past the promotion's own deadlines; it heartbeats so that a cancel
                    # (the promotion did not happen) reaches it.
                    route = await self.act(TrafficActivities.route_traffic, RouteRequest(
                        region=target, epoch=self.epoch, after_writable=True,
                        after_writable_timeout_seconds=after_writable_s),
                        queue=control, timeout=after_writable_s + 30, heartbeat=5)
                else:
                    route = await self.act(TrafficActivities.route_traffic, RouteRequest(region=target,
                                           epoch=self.epoch), queue=control, timeout=120)
            except asyncio.CancelledError:
                st.detail = f"not changed: called off, {target} was not promoted"
                raise
            except ActivityError as e:
                if after_writable_s is not None:
                    # Nothing is known of the promotion yet: scaling the old region down now could
                    # outlive an undo. The runbook routes again once it knows.
                    st.status, st.detail = "failed", f"waiting for {target} to take writes failed ({e.cause or e}): " \
                        "routed again once the promotion is known"
                    return False
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
                st.detail = f"{route.previous_region} -> {target} via {', '.join(route.changed) or 'already routed'}" \
                    + (f", {route.waited_writable_s:.3f} s after asked, once {target} was writable"
                       if route.waited_writable_s is not None else "")
            return route is not None

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
        fenced, paused = "", False
        if workflow.patched("switchover-redis-fallback-fences-old"):
            # A switch that failed before its promotion unpaused the old master: it takes writes
            # again. Promoted beside it, the target would be a second writable master.
            fenced, paused = await self._fence_old_redis(source, target, control)
        try:
            await self.act(RedisActivities.promote_redis, RedisRegionRequest(region=target, epoch=self.epoch),
                           queue=control, timeout=60)
            self.degraded.append(f"Redis zero-loss switch failed ({first}); {target}'s Redis was promoted instead, "
                                 f"what it had not received from {source} is lost (see the Redis offset gap)"
                                 f"{fenced}; repair: re-attach {source}'s Redis with eagle-dr failback --region "
                                 f"{source} --standby-only")
            return None
        except ActivityError as e:
            self.degrade("Redis move", f"{first}; then promote: {e.cause or e}" + (
                f"; {source}'s Redis was fenced first: NO Redis master takes writes" if paused else ""),
                f"make {target}'s Redis the master (REPLICAOF NO ONE) and re-point the Sentinels to it")
            return None

    async def _fence_old_redis(self, source: str, target: str, control: str) -> tuple[str, bool]:
        """The old Redis master's write fence, before the target's promotion: what to report,
        and whether it refuses writes now."""
        try:
            f = await self.act(RedisActivities.fence_redis, RedisRegionRequest(region=source, epoch=self.epoch),
                               queue=control, timeout=30, attempts=2)
        except ActivityError as e:
            f = None
            why = described(e)
        else:
            why = f.error or "unreachable"
        if f is not None and f.reachable and f.paused:
            return f"; {source}'s Redis was fenced first ({redis_fence_state(f)}; writes refused until failback " \
                   "re-attaches it)", True
        if f is not None and f.reachable and f.role != "master":
            return f"; {source}'s Redis is a {f.role}, no second master", False
        return f"; {source}'s Redis could NOT be fenced ({why}): if it is a master, its clients write beside " \
               f"{target}'s, a Redis split brain: resolve it with eagle-dr split-brain", False


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
