"""Redis snapshots on the real lab: the master's RDB in both regions' SeaweedFS buckets,
encrypted with SSE-C (a GET without the key, or with another, fails; the bytes at rest do
not hold the data), and snapshots past the retention pruned."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from activities import s3
from activities.backup.redis import prefix, snapshot_key, sse_c
from activities.redis.failover import sentinel_quorum
from activities.redis.status import client as redis_client
from tests.histories import record
from workflows.redis_snapshot import RedisSnapshotResult, RedisSnapshotWorkflow

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _master(cfg) -> str:
    agreed = sentinel_quorum(cfg.regions[0].redis).agreed_master
    return next(r.name for r in cfg.regions if f"{r.redis.host}:{r.redis.port}" == agreed)


def _files_containing(directory, needle: bytes) -> list[str]:
    hits = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


async def test_redis_snapshot_in_both_buckets_sse_c_enforced_and_pruned(lab, client):
    cfg = lab.cfg
    master = _master(cfg)
    canary = f"dr-canary-{uuid.uuid4().hex}"
    rc = redis_client(cfg.region(master).redis)
    rc.set("dr-test:snapshot-canary", canary)
    now = datetime.now(timezone.utc)
    # One snapshot past the retention and one inside it, in both buckets.
    old_key = snapshot_key(cfg.service, now - cfg.backup.retention - timedelta(days=1), master)
    recent_key = snapshot_key(cfg.service, now - timedelta(days=1), master)
    for r in cfg.regions:
        c = s3.client(r.s3)
        for k in (old_key, recent_key):
            c.put_object(Bucket=r.s3.bucket, Key=k, Body=b"REDIS0010 test", **sse_c(r.s3))
    try:
        handle = await client.start_workflow(RedisSnapshotWorkflow.run, {"trigger": "test"},
                                             id=f"test-redis-snapshot-{uuid.uuid4()}",
                                             task_queue=cfg.temporal.control_task_queue)
        res: RedisSnapshotResult = await handle.result()
        await record(handle, "redis_snapshot")
    finally:
        rc.delete("dr-test:snapshot-canary")
    assert res.outcome == "succeeded", res
    assert res.master_region == master
    assert res.snapshot.key.startswith(prefix(cfg.service)) and res.snapshot.key.endswith(f"-{master}.rdb")
    assert sorted(c.bucket_region for c in res.snapshot.copies if c.uri) == sorted(cfg.region_names)
    for r in cfg.regions:
        c = s3.client(r.s3)
        data = c.get_object(Bucket=r.s3.bucket, Key=res.snapshot.key, **sse_c(r.s3))["Body"].read()
        assert data.startswith(b"REDIS") and hashlib.sha256(data).hexdigest() == res.snapshot.sha256
        assert canary.encode() in data, "the snapshot is of another dataset"
        # SSE-C is enforced: no key, or another key, gets nothing.
        with pytest.raises(ClientError) as e:
            c.get_object(Bucket=r.s3.bucket, Key=res.snapshot.key)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403), e.value.response
        with pytest.raises(ClientError):
            c.get_object(Bucket=r.s3.bucket, Key=res.snapshot.key, SSECustomerAlgorithm="AES256",
                         SSECustomerKey=hashlib.sha256(b"not the key").digest())
        # Encrypted at rest: the canary is in no file of that region's SeaweedFS.
        assert not _files_containing(lab.s3(r.name).dir, canary.encode()), f"{r.name}: plaintext at rest"
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=r.s3.bucket, Prefix=prefix(cfg.service))["Contents"]]
        assert old_key not in keys and recent_key in keys and res.snapshot.key in keys
    assert all(p.deleted == [old_key] for p in res.pruned) and len(res.pruned) == 2


async def test_with_one_bucket_down_the_snapshot_is_degraded_and_in_the_other(lab, client):
    cfg = lab.cfg
    master = _master(cfg)
    down = cfg.other(master).name
    lab.s3(down).kill()
    try:
        res: RedisSnapshotResult = await client.execute_workflow(
            RedisSnapshotWorkflow.run, {"trigger": "test"}, id=f"test-redis-snapshot-{uuid.uuid4()}",
            task_queue=cfg.temporal.control_task_queue)
    finally:
        lab.s3(down).start()
    assert res.outcome == "degraded", res
    copies = {c.bucket_region: c for c in res.snapshot.copies}
    assert copies[master].uri and not copies[down].uri and copies[down].error
    assert any(f"no snapshot in {down}'s bucket" in d for d in res.degraded)
    assert [p.bucket_region for p in res.pruned] == [master]
    bucket = cfg.region(master).s3
    data = s3.client(bucket).get_object(Bucket=bucket.bucket, Key=res.snapshot.key, **sse_c(bucket))["Body"].read()
    assert hashlib.sha256(data).hexdigest() == res.snapshot.sha256
