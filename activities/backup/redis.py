"""Redis snapshots: an RDB of the current master into both regions' buckets, encrypted
server-side with the bucket's customer key (SSE-C), kept for the backup retention.

Keys: ``redis/<service>/<YYYYmmddTHHMMSSZ>-<master region>.rdb``: sorted by time, and the
time in the key (not the object's LastModified) is what retention reads, so a snapshot copied
between buckets keeps its age.

SSE-C: the server encrypts with a key it never stores; a GET without that key fails, so a
leaked bucket credential alone does not give the cache's contents. The 32-byte AES key is the
SHA-256 of the configured secret (``regions[].s3.sse_customer_key``): any string an operator
puts in a secret store becomes a valid key, and the key itself never leaves this process
(boto3 sends it per request over TLS, as SSE-C requires).
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime, timezone

import boto3.exceptions
import botocore.exceptions
import redis
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import s3
from activities.heartbeat import heartbeating
from activities.redis.failover import sentinel_quorum
from activities.redis.rdb import bgsave
from activities.redis.status import redis_status
from eagle_dr.config import EagleConfig, S3Config, SecretUnavailable, scrub

PREFIX = "redis"
_KEY = re.compile(r"/(?P<ts>\d{8}T\d{6}Z)-[^/]+\.rdb$")
_TS = "%Y%m%dT%H%M%SZ"


def prefix(service: str) -> str:
    return f"{PREFIX}/{service}/"


def snapshot_key(service: str, at: datetime, region: str) -> str:
    return f"{prefix(service)}{at.astimezone(timezone.utc):{_TS}}-{region}.rdb"


def key_time(key: str) -> datetime | None:
    m = _KEY.search(key)
    return datetime.strptime(m["ts"], _TS).replace(tzinfo=timezone.utc) if m else None


def sse_c(bucket: S3Config) -> dict:
    """boto3's SSE-C arguments for this bucket (it adds the key's base64 and MD5 headers)."""
    if bucket.sse_customer_key is None:
        # Never a plaintext dump of the cache in a bucket.
        raise SecretUnavailable(f"s3.sse_customer_key is not set for bucket {bucket.bucket}")
    key = hashlib.sha256(bucket.sse_customer_key.resolve().encode()).digest()
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}


class RedisMaster(BaseModel):
    region: str
    address: str
    via: str  # "sentinels" (a majority agrees) or "roles" (asked each node)


class RedisSnapshotRequest(BaseModel):
    region: str  # the master's region: its worker reads the RDB file
    address: str  # host:port the workflow found to be master (checked again here)
    key: str
    buckets: list[str]  # regions whose bucket gets the snapshot


class BucketCopy(BaseModel):
    bucket_region: str
    uri: str | None = None
    error: str | None = None


class RedisSnapshot(BaseModel):
    region: str
    key: str
    size: int
    sha256: str  # of the RDB itself (before SSE-C): a restore can check what it got
    copies: list[BucketCopy]


class PruneResult(BaseModel):
    bucket_region: str
    kept: int
    deleted: list[str] = []


class RedisBackupActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def find_redis_master(self) -> RedisMaster:
        """The master the Sentinels agree on; without a majority, the one node that says it is
        master. Two or none: no snapshot (which one is the cache is a runbook's question)."""
        by_address = {f"{r.redis.host}:{r.redis.port}": r.name for r in self.cfg.regions}
        q = sentinel_quorum(self.cfg.regions[0].redis)
        if q.agreed_master in by_address:
            return RedisMaster(region=by_address[q.agreed_master], address=q.agreed_master, via="sentinels")
        masters = [r for r in self.cfg.regions if redis_status(r.redis).role == "master"]
        if len(masters) == 1:
            r = masters[0]
            return RedisMaster(region=r.name, address=f"{r.redis.host}:{r.redis.port}", via="roles")
        raise ApplicationError(f"no single Redis master (Sentinels: {q.agreed_master or 'no majority'}; masters by "
                               f"role: {', '.join(r.name for r in masters) or 'none'})", type="NoRedisMaster")

    @activity.defn
    def snapshot_redis(self, req: RedisSnapshotRequest) -> RedisSnapshot:
        """BGSAVE on the master, then the same RDB bytes to every bucket under ``req.key``
        (a retry overwrites the same key: idempotent). A bucket that fails is reported, the
        others still get it; all failing raises (retried)."""
        node = self.cfg.region(req.region).redis
        if f"{node.host}:{node.port}" != req.address:
            raise ApplicationError(f"{req.address} is not {req.region}'s Redis", type="InvalidInput",
                                   non_retryable=True)
        st = redis_status(node)
        if st.role != "master":
            raise ApplicationError(f"{req.region}'s Redis is no longer master ({st.role or st.error})",
                                   type="TopologyChanged", non_retryable=True)
        try:
            with heartbeating():
                path = bgsave(node)
        except (redis.RedisError, OSError, RuntimeError, TimeoutError) as e:
            raise ApplicationError(f"BGSAVE on {req.region}: {scrub(str(e))}", type="SnapshotFailed") from None
        copies = []
        # One open file for every copy: a BGSAVE by someone else replaces the file by rename,
        # and this descriptor keeps reading the snapshot it opened.
        with open(path, "rb") as f, heartbeating():
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            size, digest = f.tell(), h.hexdigest()
            for name in req.buckets:
                bucket = self.cfg.region(name).s3
                try:
                    # Streamed (multipart when large; SSE-C goes with every part), from a
                    # duplicate of the descriptor: boto3 closes the file object it is given.
                    with os.fdopen(os.dup(f.fileno()), "rb") as copy:
                        copy.seek(0)
                        s3.client(bucket).upload_fileobj(copy, bucket.bucket, req.key, ExtraArgs={
                            "Metadata": {"sha256": digest, "source-region": req.region}, **sse_c(bucket)})
                    copies.append(BucketCopy(bucket_region=name, uri=f"s3://{bucket.bucket}/{req.key}"))
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, SecretUnavailable,
                        boto3.exceptions.S3UploadFailedError) as e:
                    copies.append(BucketCopy(bucket_region=name, error=scrub(str(e))[:500]))
        if not any(c.uri for c in copies):
            raise ApplicationError("the snapshot reached no bucket: " +
                                   "; ".join(f"{c.bucket_region}: {c.error}" for c in copies), type="UploadFailed")
        return RedisSnapshot(region=req.region, key=req.key, size=size, sha256=digest, copies=copies)

    @activity.defn
    def prune_redis_snapshots(self, bucket_region: str) -> PruneResult:
        """Delete this service's snapshots older than the backup retention from one bucket.
        The newest is never deleted, however old: a cache with no fresh snapshot (snapshots
        failing for a month) keeps its last one."""
        bucket = self.cfg.region(bucket_region).s3
        cutoff = datetime.now(timezone.utc) - self.cfg.backup.retention
        c = s3.client(bucket)
        try:
            keys = []
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket,
                                                                     Prefix=prefix(self.cfg.service)):
                keys += [o["Key"] for o in page.get("Contents", [])]
            dated = sorted((t, k) for k in keys if (t := key_time(k)) is not None)
            old = [k for t, k in dated[:-1] if t < cutoff]
            for i in range(0, len(old), 1000):
                c.delete_objects(Bucket=bucket.bucket,
                                 Delete={"Objects": [{"Key": k} for k in old[i:i + 1000]], "Quiet": True})
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise ApplicationError(f"{bucket_region}'s bucket: {scrub(str(e))[:500]}", type="PruneFailed") from None
        return PruneResult(bucket_region=bucket_region, kept=len(dated) - len(old), deleted=old)

