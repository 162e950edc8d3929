"""Planned switchover: move the primary to the other region with zero data loss.

 1. preflight: both regions healthy, the standby streaming and close behind;
 2. next DR epoch; approval when the policy asks;
 3. stop writes: fence the primary read-only, then stop it cleanly; its shutdown
    checkpoint is the last record it will ever write;
 4. wait until the standby has replayed past that checkpoint: every committed
    transaction is now on the standby;
 5. promote it and record the epoch; switch Redis with writes paused until the replica
    has every byte;
 6. turn the old primary into a standby of the new one (no rewind: it stopped before the
    fork) and let it stream;
 7. re-route, verify, measure (acknowledged writes lost must be 0).
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities
    from activities.postgres.activities import (
        EpochRequest,
        FenceRequest,
        PostgresActivities,
        RejoinRequest,
        ReplayRequest,
    )
    from activities.postgres.lsn import lsn_diff
    from activities.redis.activities import RedisActivities, RedisMoveRequest
    from activities.traffic import RouteRequest, TrafficActivities
    from workflows.failover import finish_measurement
    from workflows.models import Rpo, Rto, RunbookResult, SwitchoverInput
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, invalid, validated


@workflow.defn
class SwitchoverWorkflow(Runbook):
    runbook = "switchover"

    @workflow.run
    async def run(self, raw: RawInput) -> RunbookResult:
        inp = validated(SwitchoverInput, raw)
        self.refuse_self_approval(inp.trigger, approval=inp.approval)
        info = workflow.info()
        control = info.task_queue
        self.service, self.target_region = inp.service, inp.target_region
        started = inp.detected_at or info.start_time
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
            lag = lsn_diff(s_health.postgres.lsn, t_health.postgres.lsn)
            st.detail = f"both healthy; lag {lag} bytes"
            if lag is not None and lag > inp.max_lag_bytes:
                raise ApplicationError(f"replication lag {lag} bytes exceeds max_lag_bytes {inp.max_lag_bytes}: "
                                       "the write pause would last too long; wait for the standby to catch up",
                                       type="LagTooHigh", non_retryable=True)

        previous = await self.take_epoch(source, sq)
        approval = await self.approval(inp.approval, f"switch {inp.service} over to {target}")
        decided_at = workflow.now()

        async with self.step("stop writes on old primary") as st:
            stopped = await self.act(PostgresActivities.fence_postgres, FenceRequest(region=source, epoch=self.epoch,
                                     method="stop"), queue=sq, timeout=180)
            st.detail = f"stopped cleanly; shutdown checkpoint at {stopped.last_lsn}"

        promotion_started = workflow.now()
        async with self.step("wait for standby to replay everything") as st:
            replayed = await self.act(PostgresActivities.wait_replayed, ReplayRequest(
                region=target, lsn=stopped.last_lsn, timeout_seconds=inp.catch_up_timeout_seconds),
                queue=tq, timeout=inp.catch_up_timeout_seconds + 30, heartbeat=15)
            st.detail = f"replayed {replayed.replay_lsn} > {replayed.target_lsn}"

        async with self.step("promote") as st:
            promotion = await self.act(PostgresActivities.promote_postgres, EpochRequest(region=target,
                                       epoch=self.epoch), queue=tq, timeout=180, heartbeat=30)
            await self.act(PostgresActivities.record_epoch, EpochRequest(region=target, epoch=self.epoch), queue=tq)
            redis = await self.act(RedisActivities.switchover_redis, RedisMoveRequest(old_region=source,
                                   new_region=target), queue=control, timeout=120, heartbeat=30)
            st.detail = f"postgres timeline {promotion.timeline}; redis lost {redis.lost_bytes or 0} bytes"

        async with self.step("re-route traffic") as st:
            route = await self.act(TrafficActivities.route_traffic, RouteRequest(region=target, epoch=self.epoch),
                                   queue=control, timeout=120)
            await self.act(TrafficActivities.scale_down_region, source, queue=control, timeout=60)
            await self.act(TrafficActivities.wait_region_ready, target, queue=control, timeout=330, heartbeat=30)
            st.detail = f"{route.previous_region} -> {target} via {', '.join(route.changed) or 'already routed'}"

        async with self.step("verify") as st:
            verification = await self.act(TrafficActivities.verify_service, target, queue=control, timeout=60)
            st.detail = "write + read OK" if verification.ok else f"FAILED: {verification.error}"
            if not verification.ok:
                st.status = "failed"
        serving_at = workflow.now()

        async with self.step("old primary becomes standby") as st:
            rejoined = await self.act(PostgresActivities.rejoin_as_standby, RejoinRequest(
                region=source, primary_region=target), queue=sq, timeout=330, heartbeat=30)
            st.detail = f"{source} streams from {rejoined.upstream} via slot {rejoined.slot}"

        async with self.step("measure RTO/RPO") as st:
            rto = Rto(detected_at=started, decided_at=decided_at, promotion_started_at=promotion_started,
                      writable_at=promotion.writable_at, serving_at=serving_at, target_s=topo.rto_target_seconds)
            rpo = Rpo(lost_wal_bytes=0, wal_basis="standby replayed past the old primary's shutdown checkpoint",
                      redis_offset_gap=redis.lost_bytes, target_s=topo.rpo_target_seconds)
            if inp.measure_client_impact:
                notes += await self.measure_clients(rto, rpo, target, previous, outage_since=decided_at)
            finish_measurement(rto, rpo)
            st.detail = f"RTO {rto.total_s:.1f}s; WAL lost 0 bytes" + (
                f"; clients saw {rto.client_outage_s}s without writes, acked writes lost "
                f"{rpo.acknowledged_writes_lost}" if inp.measure_client_impact else "")

        outcome = "succeeded" if verification.ok and not rpo.acknowledged_writes_lost else "degraded"
        self.finish(outcome)
        return RunbookResult(runbook=self.runbook, workflow_id=info.workflow_id, run_id=info.run_id,
                             service=inp.service, source_region=source, target_region=target, epoch=self.epoch,
                             outcome=outcome, trigger=inp.trigger, reason=inp.reason, approval=approval,
                             steps=self.steps, rto=rto, rpo=rpo, source_fenced="stop", notes=notes)
