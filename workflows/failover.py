"""Unplanned failover: the primary region is lost; make the secondary the primary.

The runbook, as an SRE would do it by hand:
 1. preflight: the target is a healthy standby, and not too far behind (unless forced);
 2. take the next DR epoch (the fencing token every later step carries);
 3. approval, when the policy asks for it;
 4. fence the old primary wherever it can still be reached (stop PostgreSQL, pause Redis
    writes, scale its microservices to 0); a dead region is recorded as unfenced, not waited for;
 5. promote PostgreSQL, record the epoch in it, promote Redis and re-point the Sentinels;
 6. re-route traffic (ConfigMap, DNS, the lab's routing) and wait for the services;
 7. verify with a real write and read in the new region;
 8. measure RTO and RPO and compare them with the targets.
If promotion fails, the fence is lifted again (the old primary was intact) and nothing was
re-routed: the runbook says so and fails.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities, RegionHealth
    from activities.postgres.activities import EpochRequest, FenceRequest, PostgresActivities
    from activities.postgres.fence import PgFence
    from activities.postgres.lsn import lsn_diff
    from activities.redis import failover as redis_failover
    from activities.redis.activities import RedisActivities
    from activities.traffic import RouteRequest, TrafficActivities
    from workflows.models import FailoverInput, Rpo, Rto, RunbookResult
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, invalid, validated


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
            if t_health.postgres.role == "primary":
                raise invalid("target_region", f"{target} is already the primary")
            if not t_health.postgres.reachable or t_health.postgres.role != "standby":
                raise ApplicationError(f"target {target} PostgreSQL is not a reachable standby: "
                                       f"{t_health.postgres.error or t_health.postgres.role}",
                                       type="TargetUnhealthy", non_retryable=True)
            if not t_health.redis.reachable:
                raise ApplicationError(f"target {target} Redis is unreachable: {t_health.redis.error}",
                                       type="TargetUnhealthy", non_retryable=True)
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
            source_lsn = s_health.postgres.lsn if s_health and s_health.postgres.role == "primary" else None
            if source_lsn:
                lag = lsn_diff(source_lsn, t_health.postgres.lsn)
                lag_basis = "source current LSN - target replay LSN"
            else:
                lag = lsn_diff(t_health.postgres.receive_lsn, t_health.postgres.lsn)
                lag_basis = "source unreachable: received but not replayed WAL on the target"
            st.detail = f"target standby OK; lag {lag} bytes ({lag_basis})"
            if lag is not None and lag > inp.max_lag_bytes:
                if not inp.force:
                    raise ApplicationError(
                        f"replication lag {lag} bytes exceeds max_lag_bytes {inp.max_lag_bytes} ({lag_basis}); "
                        "failing over would lose that data. Re-run with force=true to accept it.",
                        {"lag_bytes": lag, "max_lag_bytes": inp.max_lag_bytes}, type="LagTooHigh", non_retryable=True)
                notes.append(f"forced past lag guard: {lag} > {inp.max_lag_bytes} bytes")

        previous = await self.take_epoch(target, tq)
        approval = await self.approval(inp.approval, f"fail over {inp.service} to {target}")
        decided_at = workflow.now()

        async with self.step("fence old primary") as st:
            # All three at once: each waits out its own timeout against a dead region.
            pg_fence, r_fence, scaled = await asyncio.gather(
                self._fence_postgres(source, sq if s_health else None, control),
                self.act(RedisActivities.fence_redis, source, queue=control, timeout=30, attempts=2),
                self.act(TrafficActivities.scale_down_region, source, queue=control, timeout=60, attempts=2))
            fenced = pg_fence.method or "unfenced"
            st.detail = f"postgres: {fenced}; redis: {'paused' if r_fence.reachable else 'unreachable'}; " \
                        f"services: {'scaled to 0' if scaled.reachable else 'unreachable'}"
            if not pg_fence.method:
                notes.append(f"old primary in {source} was unreachable and is NOT fenced: it must stay down "
                             "until failback rewinds it")

        promotion_started = workflow.now()
        async with self.step("promote") as st:
            try:
                promotion = await self.act(PostgresActivities.promote_postgres, EpochRequest(region=target,
                                           epoch=self.epoch), queue=tq, timeout=180, heartbeat=30)
            except ActivityError as e:
                await self._compensate_fence(source, pg_fence, r_fence.reachable, control, sq)
                self.finish("failed")
                raise ApplicationError(f"promotion of {target} failed; the old primary's fence was lifted and "
                                       f"routing was not changed: {e.cause or e}", type="PromotionFailed",
                                       non_retryable=True) from None
            await self.act(PostgresActivities.record_epoch, EpochRequest(region=target, epoch=self.epoch), queue=tq)
            redis = await self.act(RedisActivities.promote_redis, target, queue=control, timeout=60)
            st.detail = f"postgres timeline {promotion.timeline}; redis master offset {redis.promotion.offset}"

        async with self.step("re-route traffic") as st:
            route = await self.act(TrafficActivities.route_traffic, RouteRequest(region=target, epoch=self.epoch),
                                   queue=control, timeout=120)
            await self.act(TrafficActivities.wait_region_ready, target, queue=control, timeout=330, heartbeat=30)
            st.detail = f"{route.previous_region} -> {target} via {', '.join(route.changed) or 'already routed'}"

        async with self.step("verify") as st:
            verification = await self.act(TrafficActivities.verify_service, target, queue=control, timeout=60)
            st.detail = "write + read OK" if verification.ok else f"FAILED: {verification.error}"
            if not verification.ok:
                st.status = "failed"
        serving_at = workflow.now()

        async with self.step("measure RTO/RPO") as st:
            rto = Rto(detected_at=detected_at, decided_at=decided_at, promotion_started_at=promotion_started,
                      writable_at=promotion.writable_at, serving_at=serving_at, target_s=topo.rto_target_seconds)
            known_lsn = pg_fence.last_lsn or source_lsn
            rpo = Rpo(lost_wal_bytes=max(0, lsn_diff(known_lsn, promotion.replay_lsn) or 0) if known_lsn else None,
                      wal_basis=("old primary's last known LSN - promoted standby's replay LSN" if known_lsn else
                                 "old primary unreachable: lost WAL is measured at failback (pg_waldump)"),
                      redis_offset_gap=_gap(r_fence, redis.promotion), target_s=topo.rpo_target_seconds)
            if inp.measure_client_impact:
                await self.measure_clients(rto, rpo, target, previous, outage_since=detected_at)
            finish_measurement(rto, rpo)
            st.detail = f"RTO {rto.total_s:.1f}s (target {rto.target_s}s, {'met' if rto.met else 'MISSED'})"

        outcome = "succeeded" if verification.ok else "degraded"
        self.finish(outcome)
        return RunbookResult(runbook=self.runbook, workflow_id=info.workflow_id, run_id=info.run_id,
                             service=inp.service, source_region=source, target_region=target, epoch=self.epoch,
                             outcome=outcome, trigger=inp.trigger, reason=inp.reason, approval=approval,
                             steps=self.steps, rto=rto, rpo=rpo, source_fenced=pg_fence.method, notes=notes)

    async def _fence_postgres(self, source: str, source_queue: str | None, control: str) -> PgFence:
        """Stop it on its own worker if that worker lives; else read-only over the network.
        ``source_queue`` is None when the worker already failed to answer the preflight probe."""
        if source_queue:
            try:
                return await self.act(PostgresActivities.fence_postgres, FenceRequest(
                    region=source, epoch=self.epoch, method="stop"), queue=source_queue, timeout=120,
                    schedule_to_start=5, attempts=1)
            except ActivityError:
                pass
        return await self.act(PostgresActivities.fence_postgres, FenceRequest(region=source, epoch=self.epoch,
                                  method="read_only"), queue=control, timeout=30, attempts=2)

    async def _compensate_fence(self, source: str, fence: PgFence, redis_paused: bool, control: str,
                                source_queue: str) -> None:
        async with self.step("compensate: lift fence on old primary") as st:
            if fence.method == "read_only":
                await self.act(PostgresActivities.unfence_postgres, source, queue=control, timeout=30)
            elif fence.method == "stop":
                st.detail = "old primary was stopped; restart it by hand after checking why promotion failed"
            if redis_paused:
                await self.act(RedisActivities.unfence_redis, source, queue=control, timeout=30)


def _gap(fence, promotion) -> int | None:
    return redis_failover.offset_gap(fence.offset if fence.reachable else None, promotion.offset)


def finish_measurement(rto: Rto, rpo: Rpo) -> None:
    def secs(a, b):
        return (b - a).total_seconds() if a and b else None

    rto.detection_to_decision_s = secs(rto.detected_at, rto.decided_at)
    rto.decision_to_writable_s = secs(rto.decided_at, rto.writable_at)
    rto.writable_to_serving_s = secs(rto.writable_at, rto.serving_at)
    rto.total_s = secs(rto.detected_at, rto.serving_at)
    if rto.target_s is not None and rto.total_s is not None:
        rto.met = rto.total_s <= rto.target_s
    if rpo.loss_window_s is not None and rpo.target_s is not None:
        rpo.met = rpo.loss_window_s <= rpo.target_s
    elif rpo.lost_wal_bytes == 0:
        rpo.met = True
