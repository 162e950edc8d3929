"""Redis snapshot: an RDB of the current master into both regions' buckets (SSE-C), then
snapshots older than the backup retention pruned from each.

1. Find the master (the Sentinels' majority, else the one node saying so): a schedule names
   no node, so the snapshot follows Redis failovers.
2. On the master's region's worker (the RDB file is on its disk): BGSAVE, the same bytes to
   every bucket under one key per run (a retry overwrites it).
3. Prune each bucket (control worker: S3 API only).

A bucket that does not get the snapshot (its region down) makes the run "degraded"; none
getting it fails the run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.redis import (
        PruneResult,
        RedisBackupActivities,
        RedisSnapshot,
        RedisSnapshotRequest,
        snapshot_key,
    )
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TRIGGER
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, validated


class RedisSnapshotInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trigger: str = Field(default="manual", max_length=100)
    prune: bool = True


class RedisSnapshotResult(BaseModel):
    service: str
    master_region: str
    snapshot: RedisSnapshot
    pruned: list[PruneResult] = []
    degraded: list[str] = []
    outcome: str


@workflow.defn
class RedisSnapshotWorkflow(Runbook):
    runbook = "redis-snapshot"
    notifies = "failures"  # scheduled: news only when it fails (runbook.py)

    @workflow.run
    async def run(self, raw: RawInput) -> RedisSnapshotResult:
        inp = validated(RedisSnapshotInput, raw)
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        control = topo.control_task_queue
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("redis-snapshot"),
                                           DR_SERVICE.value_set(topo.service), DR_TRIGGER.value_set(inp.trigger)])

        async with self.step("Find the Redis master") as rec:
            master = await self.act(RedisBackupActivities.find_redis_master, queue=control, timeout=30, attempts=3)
            rec.detail = f"{master.region} ({master.address}, by {master.via})"
        buckets = [r.name for r in topo.regions]
        self.source_region, self.target_region = master.region, ", ".join(buckets)
        workflow.upsert_search_attributes([DR_SOURCE_REGION.value_set(master.region)])

        async with self.step("RDB snapshot to every region's bucket") as rec:
            key = snapshot_key(topo.service, workflow.now(), master.region)
            snap = await self.act(RedisBackupActivities.snapshot_redis,
                                  RedisSnapshotRequest(region=master.region, address=master.address, key=key,
                                                       buckets=buckets),
                                  queue=topo.region(master.region).task_queue, timeout=1800, heartbeat=30,
                                  schedule_to_start=120, attempts=3)
            missed = [c for c in snap.copies if not c.uri]
            rec.detail = (f"{key}: {snap.size} bytes in {len(snap.copies) - len(missed)} bucket(s)"
                          + "".join(f"; not in {c.bucket_region}'s: {c.error}" for c in missed))
            self.degraded += [f"no snapshot in {c.bucket_region}'s bucket: {c.error}" for c in missed]

        pruned: list[PruneResult] = []
        if inp.prune:
            for b in buckets:
                async with self.step(f"Prune snapshots past retention in {b}'s bucket") as rec:
                    try:
                        p = await self.act(RedisBackupActivities.prune_redis_snapshots, b, queue=control,
                                           timeout=300, attempts=3)
                    except ActivityError as e:
                        rec.status, rec.detail = "failed", str(e.cause or e)[:300]
                        self.degraded.append(f"snapshots in {b}'s bucket not pruned: {e.cause or e}")
                        continue
                    pruned.append(p)
                    rec.detail = f"{len(p.deleted)} deleted, {p.kept} kept"
        if not any(c.uri for c in snap.copies):  # the activity raises first; kept for clarity
            raise ApplicationError("the snapshot reached no bucket", type="SnapshotFailed", non_retryable=True)
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return RedisSnapshotResult(service=topo.service, master_region=master.region, snapshot=snap, pruned=pruned,
                                   degraded=self.degraded, outcome=outcome)
