"""Before an old Redis master rejoins as a replica: keep what only it holds.

Re-parenting discards the old master's dataset (a full resync). So first, always: an RDB
snapshot of it goes to the region's S3 bucket. Then keys the new master lacks are copied over
as `redis_reconcile` says (DUMP/RESTORE, never replacing a key the new master has), and only
then REPLICAOF. The report names every key it did not copy and why: it is in the snapshot.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import redis
from botocore.exceptions import ClientError
from pydantic import BaseModel

from activities import s3
from activities.redis import failover
from activities.redis.epoch import is_own_key
from activities.redis.rdb import bgsave
from activities.redis.status import client as redis_client
from eagle_dr.config import RedisConfig, RedisReconcileConfig, S3Config, scrub


class RedisFailback(BaseModel):
    reachable: bool | None  # None: not known, the step failed (``failed`` says why)
    # The step failed after its retries: the old master was not re-attached (it keeps its keys).
    failed: str | None = None
    snapshot: str | None = None  # s3://bucket/key
    keys_on_old: int = 0
    unique_keys: int = 0  # keys the primary lacked: copied + skipped (+ any that expired meanwhile)
    migrated_keys: int = 0  # copied to the primary
    unique_sample: list[str] = []
    # The redis_reconcile rule followed. Runs recorded before the setting copied every key.
    reconcile: str = "copy-missing"
    # Keys the primary lacked and the rule did not copy: only in the snapshot now.
    skipped_keys: int = 0
    skipped_sample: list[str] = []
    # Keys both sides hold with different values: the primary's stands, the old one is in the snapshot.
    differing_keys: int = 0
    differing_sample: list[str] = []
    rejoined: bool = False
    # Already a replica of the primary when reached, with no record of an earlier attempt of
    # this run: its own keys were gone before this run (a Sentinel or a person re-attached it).
    already_replica: bool = False
    error: str | None = None
    # After re-pointing every Sentinel at the master: those still naming another, or down.
    sentinels_stale: dict[str, str | None] = {}
    sentinels_unreachable: list[str] = []

    def kept(self, primary: str) -> str:
        """What became of the old master's keys, for the step detail and the CLI."""
        if self.failed:
            # The last attempt's error; an attempt before it may have got further.
            return f"re-attaching to {primary} FAILED: {self.failed} (eagle-dr status shows where it stands)"
        if self.already_replica and self.error:
            return f"a replica of {primary} when this attempt reached it; {self.error}"
        if self.already_replica:
            return (f"already a replica of {primary} when this run reached it: its own keys had been replaced "
                    f"by {primary}'s before, so there was nothing to keep and no snapshot was taken")
        text = f"snapshot {self.snapshot}; {self.unique_keys} keys only it had: {self.migrated_keys} copied to {primary}"
        if self.skipped_keys:
            text += (f", {self.skipped_keys} not copied (redis_reconcile: {self.reconcile}; {primary} may have "
                     f"deleted them on purpose; they are in the snapshot, e.g. {', '.join(self.skipped_sample[:3])})")
        return (f"{text}; {self.differing_keys} held by both with other values kept {primary}'s "
                "(old values: the snapshot)")


def snapshot_to_s3(old: RedisConfig, bucket: S3Config, key: str, timeout_s: float = 120) -> str:
    """BGSAVE, wait, upload the RDB file (the worker runs beside this Redis: same disk)."""
    path = bgsave(old, timeout_s)
    s3.client(bucket).upload_file(str(path), bucket.bucket, key)
    return f"s3://{bucket.bucket}/{key}"


def describe(rule: RedisReconcileConfig) -> str:
    """The rule as the report names it, e.g. "none, include ['session:*']"."""
    parts = [rule.strategy]
    parts += [f"{name} {patterns}" for name, patterns in (("include", rule.include), ("exclude", rule.exclude))
              if patterns]
    return ", ".join(parts)


def should_copy(key: str, rule: RedisReconcileConfig) -> bool:
    """Whether a key the primary lacks is copied back: exclude first, then copy-missing or include."""
    if any(fnmatchcase(key, p) for p in rule.exclude):
        return False
    return rule.strategy == "copy-missing" or any(fnmatchcase(key, p) for p in rule.include)


class KeyCopy(BaseModel):
    total: int  # keys on the old master
    unique: list[str]  # keys the primary lacks
    copied: int
    skipped: list[str]  # unique keys the rule did not copy
    differing: list[str]  # keys both hold with different values


def migrate_unique_keys(old: RedisConfig, master: RedisConfig, rule: RedisReconcileConfig,
                        batch: int = 500) -> KeyCopy:
    """Copies the keys the new master lacks that ``rule`` selects. A key both hold keeps the
    master's value (a cache's newest writer is the serving side); the old one is in the
    snapshot and reported, as is every key not copied."""
    src, dst = redis_client(old, 10), redis_client(master, 10)
    raw_src, raw_dst = redis_client(old, 10, decode=False), redis_client(master, 10, decode=False)
    unique: list[str] = []
    skipped: list[str] = []
    differing: list[str] = []
    migrated = 0
    # The DR epoch record is eagle-dr's, not the application's: each master keeps its own.
    keys = [k for k in src.scan_iter(count=batch) if not is_own_key(k)]
    total = len(keys)
    for i in range(0, len(keys), batch):
        chunk = keys[i:i + batch]
        pipe = dst.pipeline(transaction=False)
        for k in chunk:
            pipe.exists(k)
        missing = [k for k, there in zip(chunk, pipe.execute()) if not there]
        unique += missing
        absent = set(missing)
        shared = [k for k in chunk if k not in absent]
        if shared:
            # DUMP payloads are equal for equal values of the same type and encoding.
            ps, pd = raw_src.pipeline(transaction=False), raw_dst.pipeline(transaction=False)
            for k in shared:
                ps.dump(k)
                pd.dump(k)
            differing += [k for k, a, b in zip(shared, ps.execute(), pd.execute()) if a != b]
        for k in missing:
            if not should_copy(k, rule):
                skipped.append(k)
                continue
            dumped, ttl = raw_src.dump(k), src.pttl(k)
            if dumped is None:
                continue  # expired meanwhile
            try:
                dst.restore(k, max(ttl, 0), dumped)
                migrated += 1
            except redis.ResponseError as e:
                if "BUSYKEY" not in str(e):
                    raise
    return KeyCopy(total=total, unique=unique, copied=migrated, skipped=skipped, differing=differing)


def preserve_and_rejoin(old: RedisConfig, master: RedisConfig, bucket: S3Config, snapshot_key: str,
                        rule: RedisReconcileConfig) -> RedisFailback:
    try:
        redis_client(old, 3).ping()
    except (redis.RedisError, OSError) as e:
        # Nothing to keep: a restarted cache without persistence comes back empty.
        return RedisFailback(reachable=False, error=scrub(str(e)), reconcile=describe(rule))
    info = redis_client(old, 3).info("replication")
    if info.get("role") == "slave" and f"{info.get('master_host')}:{info.get('master_port')}" == \
            f"{master.host}:{master.port}":
        # A retry after this run's own demote (its result lost: a timeout, a killed worker): the
        # keys are gone now, but the attempt that took them recorded what it kept.
        prior, unread = _recorded(bucket, snapshot_key)
        if prior is not None:
            return _with_sentinels(prior, old, master)
        return _with_sentinels(RedisFailback(
            reachable=True, rejoined=True, already_replica=True, reconcile=describe(rule),
            error=unread and f"an earlier attempt's record could not be read, so whether this run took a snapshot "
                             f"is unknown: {unread}"), old, master)
    # Before anything is copied to it or made to follow it: a primary region whose Redis is a
    # replica (a Sentinel turned it back, a person re-pointed it) has no master to rejoin.
    failover.require_master(master)
    prior, _ = _recorded(bucket, snapshot_key)
    # The snapshot first, whatever the rule: it is the only copy of every key not copied.
    snap = snapshot_to_s3(old, bucket, snapshot_key)
    moved = migrate_unique_keys(old, master, rule)
    if prior is not None:
        # An attempt before this one copied and recorded, then died before its demote: what it
        # copied is on both sides now, so this attempt's own counts would find nothing unique.
        done = prior.model_copy(update={"snapshot": snap, "migrated_keys": prior.migrated_keys + moved.copied})
    else:
        done = RedisFailback(
            reachable=True, snapshot=snap, keys_on_old=moved.total, unique_keys=len(moved.unique),
            migrated_keys=moved.copied, unique_sample=moved.unique[:20], reconcile=describe(rule),
            skipped_keys=len(moved.skipped), skipped_sample=moved.skipped[:20],
            differing_keys=len(moved.differing), differing_sample=moved.differing[:20], rejoined=True)
    # Before the demote, after which nothing on the server tells what it held.
    s3.client(bucket).put_object(Bucket=bucket.bucket, Key=snapshot_key + _RECORD,
                                 Body=done.model_dump_json().encode())
    failover.demote(old, master)
    try:
        redis_client(old, 3).config_rewrite()  # so a restart keeps it a replica
    except redis.RedisError:
        pass
    return _with_sentinels(done, old, master)


# Beside the snapshot: what the attempt that took it kept (key names, counts; never values).
_RECORD = ".json"


def _recorded(bucket: S3Config, snapshot_key: str) -> tuple[RedisFailback | None, str | None]:
    """An earlier attempt's record of this run, if there is one; else why it could not be read."""
    try:
        body = s3.client(bucket).get_object(Bucket=bucket.bucket, Key=snapshot_key + _RECORD)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        return None, scrub(str(e))
    return RedisFailback.model_validate_json(body), None


def _with_sentinels(result: RedisFailback, old: RedisConfig, master: RedisConfig) -> RedisFailback:
    """A Sentinel that was down during the move (in the region now coming back, typically)
    still names the old master: re-point them all now, and report any that still disagree."""
    agreement = failover.repoint_and_verify(old, master)
    result.sentinels_stale, result.sentinels_unreachable = agreement.stale, agreement.unreachable
    return result
