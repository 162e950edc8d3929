"""What failback copies from an old Redis master before it rejoins, per `redis_reconcile`, on
the real lab (its two Redis servers, Sentinels and SeaweedFS).

Each test makes the replica a second master, the way a partition does, lets both sides write,
then runs the copy-back and rejoin the failback and split-brain runbooks run; each leaves the
lab's shape behind (one master, the other its linked replica).
"""

from __future__ import annotations

import uuid

import pytest

from activities.redis.failback import RedisFailback, describe, preserve_and_rejoin, should_copy
from activities.redis.failover import NotAMaster, demote
from activities.redis.status import client as redis_client
from activities.redis.status import redis_status, sentinel_client
from activities.s3 import client as s3_client
from eagle_dr.config import RedisReconcileConfig
from lab.processes import wait_for

RULES = {
    "default": (RedisReconcileConfig(), set()),
    "copy-missing": (RedisReconcileConfig(strategy="copy-missing"),
                     {"cache:invalidated", "cache:only-loser", "session:only-loser"}),
    "none-include": (RedisReconcileConfig(include=["rf:*:session:*"]), {"session:only-loser"}),
    "copy-missing-exclude": (RedisReconcileConfig(strategy="copy-missing", exclude=["rf:*:cache:*"]),
                             {"session:only-loser"}),
}
UNIQUE = {"cache:invalidated", "cache:only-loser", "session:only-loser"}


def _master_and_replica(lab) -> tuple[str, str]:
    roles = {r.name: redis_status(r.redis).role for r in lab.cfg.regions}
    master = next(n for n, role in roles.items() if role == "master")
    return master, lab.cfg.other(master).name


def _split(lab, region: str) -> None:
    """Make the region's Redis a second master; the Sentinels lose track of it (SENTINEL RESET
    re-learns replicas from the master, which no longer lists it), so none turns it back into a
    replica, discarding its keys, before the copy-back runs."""
    cfg = lab.cfg.region(region).redis
    redis_client(cfg).replicaof("NO", "ONE")
    for ep in cfg.sentinels:
        sentinel_client(cfg, ep).execute_command("SENTINEL", "RESET", cfg.master_name)


@pytest.mark.parametrize("rule_name", list(RULES))
def test_keys_the_primary_lacks_are_copied_only_as_redis_reconcile_says(lab, rule_name):
    rule, copied = RULES[rule_name]
    survivor, loser = _master_and_replica(lab)
    s_cfg, l_cfg = lab.cfg.region(survivor).redis, lab.cfg.region(loser).redis
    s, l_ = redis_client(s_cfg), redis_client(l_cfg)
    tag = uuid.uuid4().hex[:8]
    name = {k: f"rf:{tag}:{k}" for k in UNIQUE}

    # Before the fork: a cache entry both sides hold.
    s.set(name["cache:invalidated"], "before")
    wait_for(lambda: l_.get(name["cache:invalidated"]) == "before", 20, "the replica to have the entry", 0.02)
    _split(lab, loser)
    # After it: the survivor invalidates the entry on purpose; the loser takes writes of its own.
    s.delete(name["cache:invalidated"])
    l_.set(name["cache:only-loser"], "L")
    l_.set(name["session:only-loser"], "L")

    report: RedisFailback = preserve_and_rejoin(l_cfg, s_cfg, lab.cfg.region(loser).s3, f"test/{tag}.rdb", rule)

    on_survivor = {k for k, n in name.items() if s.get(n) is not None}
    assert on_survivor == copied
    assert report.reconcile == describe(rule)
    assert report.unique_keys >= len(UNIQUE) and report.migrated_keys >= len(copied)
    if rule.strategy == "none" and not rule.include:
        assert report.migrated_keys == 0  # the default copies nothing at all
    ours = {n.removeprefix(f"rf:{tag}:") for n in report.skipped_sample if n.startswith(f"rf:{tag}:")}
    assert ours == UNIQUE - copied
    # Other keys only the loser holds (left by earlier tests, or expired on the survivor first)
    # count too: every unique key is either copied or skipped, and ours are skipped exactly.
    assert report.skipped_keys == report.unique_keys - report.migrated_keys >= len(UNIQUE - copied)
    if copied != UNIQUE:
        assert "not copied (redis_reconcile: " in report.kept(survivor)
    # The snapshot is taken whatever the rule: the only copy of what was not copied.
    bucket = lab.cfg.region(loser).s3
    key = report.snapshot.removeprefix(f"s3://{bucket.bucket}/")
    assert s3_client(bucket).head_object(Bucket=bucket.bucket, Key=key)["ContentLength"] > 0

    assert report.rejoined
    wait_for(lambda: (st := redis_status(l_cfg)).role == "slave" and st.link_status == "up"
             and st.master == f"{s_cfg.host}:{s_cfg.port}", 30, f"{loser} to replicate {survivor} again", 0.05)
    # A retry of the same run after the demote (its result lost): the keys are gone from the old
    # master, yet the report is the first attempt's, snapshot and counts, not "nothing kept".
    again = preserve_and_rejoin(l_cfg, s_cfg, bucket, f"test/{tag}.rdb", rule)
    fields = {"sentinels_stale", "sentinels_unreachable"}
    assert again.model_dump(exclude=fields) == report.model_dump(exclude=fields), (again, report)
    # Found already a replica by a run that never took its keys: said, not reported as "0 keys".
    # (And an attempt that recorded, then died before its demote: see the test below.)
    other = preserve_and_rejoin(l_cfg, s_cfg, bucket, f"test/{tag}-other.rdb", rule)
    assert other.already_replica and other.snapshot is None and other.error is None, other
    assert other.kept(survivor).startswith(f"already a replica of {survivor}"), other.kept(survivor)
    wait_for(lambda: all(n not in l_.keys(f"rf:{tag}:*") for n in (name[k] for k in UNIQUE - copied)), 30,
             "the loser to resync from the survivor", 0.05)


def test_an_attempt_that_copied_and_died_before_its_demote_is_reported_by_its_record(lab):
    """The first attempt copied the keys and wrote its record, then its worker died before the
    demote. The retry finds the old master still a master, but what was unique is on both sides
    now: its own counts would say nothing was kept. The record's figures stand."""
    survivor, loser = _master_and_replica(lab)
    s_cfg, l_cfg = lab.cfg.region(survivor).redis, lab.cfg.region(loser).redis
    tag = uuid.uuid4().hex[:8]
    _split(lab, loser)
    l_ = redis_client(l_cfg)
    l_.set(f"rf:{tag}:only-loser", "L")
    bucket, key = lab.cfg.region(loser).s3, f"test/{tag}.rdb"
    rule = RedisReconcileConfig(strategy="copy-missing")
    # What the first attempt recorded: it copied the key (done here as it did), then died.
    redis_client(s_cfg).set(f"rf:{tag}:only-loser", "L")
    first = RedisFailback(reachable=True, snapshot=f"s3://{bucket.bucket}/{key}", keys_on_old=7, unique_keys=1,
                          migrated_keys=1, unique_sample=[f"rf:{tag}:only-loser"], reconcile=describe(rule),
                          rejoined=True)
    s3_client(bucket).put_object(Bucket=bucket.bucket, Key=key + ".json", Body=first.model_dump_json().encode())
    report = preserve_and_rejoin(l_cfg, s_cfg, bucket, key, rule)
    assert (report.unique_keys, report.migrated_keys, report.unique_sample) == (1, 1, [f"rf:{tag}:only-loser"]), \
        report
    assert report.rejoined and not report.already_replica
    wait_for(lambda: (st := redis_status(l_cfg)).role == "slave" and st.link_status == "up", 30,
             f"{loser} to replicate {survivor} again", 0.05)


def test_an_old_master_is_never_made_to_follow_a_replica(lab):
    """Failback names the primary region's Redis as the master to rejoin, but that one is a
    replica (here: of the very node being re-attached, as when a Sentinel or a person turned
    it back). Following it would loop the two with no master, every write refused and each
    resyncing from the other. Refused before anything is copied, snapshotted or re-pointed;
    demote() itself refuses the same."""
    master, replica = _master_and_replica(lab)
    m_cfg, r_cfg = lab.cfg.region(master).redis, lab.cfg.region(replica).redis
    m = redis_client(m_cfg)
    tag = uuid.uuid4().hex[:8]
    m.set(f"rf:{tag}:kept", "M")
    bucket, key = lab.cfg.region(master).s3, f"test/{tag}.rdb"
    try:
        with pytest.raises(NotAMaster, match=f"{r_cfg.host}:{r_cfg.port} is not a master"):
            preserve_and_rejoin(m_cfg, r_cfg, bucket, key, RedisReconcileConfig(strategy="copy-missing"))
        with pytest.raises(NotAMaster):
            demote(m_cfg, r_cfg)
        assert redis_status(m_cfg).role == "master" and m.get(f"rf:{tag}:kept") == "M"
        wait_for(lambda: redis_client(r_cfg).get(f"rf:{tag}:kept") == "M", 20, f"{replica} to still follow {master}",
                 0.02)
        names = [o["Key"] for o in s3_client(bucket).list_objects_v2(Bucket=bucket.bucket,
                                                                     Prefix=f"test/{tag}").get("Contents", [])]
        assert names == [], names  # no snapshot, no record: nothing was started
    finally:
        # Had it followed: the loop broken, the lab's master a master again.
        if redis_status(m_cfg).role != "master":
            m.replicaof("NO", "ONE")
            wait_for(lambda: redis_status(r_cfg).link_status == "up", 30, f"{replica} to follow {master} again", 0.05)


def test_the_rule_exclude_first_then_copy_missing_or_include():
    none = RedisReconcileConfig()
    assert not should_copy("alert:1", none) and describe(none) == "none"
    rule = RedisReconcileConfig(include=["session:*", "cart:[0-9]*"], exclude=["session:tmp:*"])
    assert [should_copy(k, rule) for k in ("session:9", "cart:7", "cart:x", "session:tmp:1")] == \
        [True, True, False, False]
    assert describe(rule) == "none, include ['session:*', 'cart:[0-9]*'], exclude ['session:tmp:*']"
    everything = RedisReconcileConfig(strategy="copy-missing", exclude=["alert:*"])
    assert should_copy("x", everything) and not should_copy("alert:2", everything)
