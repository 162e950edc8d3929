"""The DR epoch on the Redis steps, against real redis-server processes (the rlab fixture of
test_redis_failover): a step carrying an older epoch than a Redis node records is refused and
changes nothing; the current one acts and records its epoch in the new master."""

from __future__ import annotations

import dataclasses

import pytest
import redis
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.redis import epoch as epochs
from activities.redis.activities import RedisActivities, RedisMoveRequest, RedisRegionRequest
from activities.redis.status import redis_status
from eagle_dr.config import EagleConfig, load_config
from lab.processes import wait_for
from tests.conftest import write_test_config
from tests.test_redis_failover import RedisLab, rlab  # noqa: F401 - the fixture


def _config(tmp_path, rlab: RedisLab) -> EagleConfig:
    """The test config, its two regions' Redis replaced by rlab's master (a) and replica (b)."""
    cfg = load_config(write_test_config(tmp_path), env={})
    regions = [r.model_copy(update={"redis": node}) for r, node in zip(cfg.regions, (rlab.a, rlab.b))]
    return cfg.model_copy(update={"regions": regions})


def _run(run_id: str, fn, *args):
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id="dr-move-test", workflow_run_id=run_id)
    return env.run(fn, *args)


def _stale(run_id: str, fn, *args) -> ApplicationError:
    with pytest.raises(ApplicationError) as e:
        _run(run_id, fn, *args)
    assert e.value.type == "StaleEpoch" and e.value.non_retryable, e.value
    return e.value


def _writable(rlab: RedisLab, node) -> bool:
    try:
        rlab.client(node).set("epoch-test:probe", "x")
        return True
    except redis.ResponseError:  # NOREPLICAS (the fence) or READONLY (a replica)
        return False


def test_a_stale_redis_step_is_refused_and_the_current_one_acts(tmp_path, rlab: RedisLab):
    cfg = _config(tmp_path, rlab)
    acts = RedisActivities(cfg)
    east, west = cfg.regions[0].name, cfg.regions[1].name
    service = cfg.service

    # Move 5 (run-5): fence east's master, promote west's replica. Nothing was recorded before.
    assert _run("run-5", acts.fence_redis, RedisRegionRequest(region=east, epoch=5)).paused
    promoted = _run("run-5", acts.promote_redis, RedisRegionRequest(region=west, epoch=5))
    assert promoted.epoch_note is None
    held = epochs.read_epoch(rlab.b, service)
    assert (held.epoch, held.region, held.run_id) == (5, west, "run-5")
    assert not _writable(rlab, rlab.a) and _writable(rlab, rlab.b)

    # A superseded run (epoch 4) tries to act: each step is refused and nothing changes.
    _stale("run-4", acts.fence_redis, RedisRegionRequest(region=west, epoch=4))
    _stale("run-4", acts.unfence_redis, RedisRegionRequest(region=east, epoch=4))
    _stale("run-4", acts.promote_redis, RedisRegionRequest(region=east, epoch=4))
    # The same epoch from another run of the reused workflow id is stale too; a retry of run-5 is not.
    _stale("run-5b", acts.promote_redis, RedisRegionRequest(region=west, epoch=5))
    assert _run("run-5", acts.promote_redis, RedisRegionRequest(region=west, epoch=5)).promotion.already_master
    assert redis_status(rlab.a).role == "master" and redis_status(rlab.b).role == "master"
    assert not _writable(rlab, rlab.a), "a stale unfence lifted the fence: two writable masters"
    assert _writable(rlab, rlab.b), "a stale fence fenced the current master"

    # Move 6 (run-6) brings the master back to east with a zero-loss switchover and records 6 there.
    acts.demote_redis(RedisMoveRequest(old_region=east, new_region=west))
    rlab.wait_linked(rlab.a, rlab.b)
    sw = _run("run-6", acts.switchover_redis, RedisMoveRequest(old_region=west, new_region=east, epoch=6))
    assert sw.epoch_note is None and not sw.already_done
    assert redis_status(rlab.a).role == "master" and _writable(rlab, rlab.a)
    # The record rides replication: the new replica knows the newest epoch too.
    wait_for(lambda: epochs.read_epoch(rlab.b, service).epoch == 6, 10, "epoch 6 replicated to west", 0.02)

    # Move 5's late switchover back to west is refused; east stays the master.
    _stale("run-5", acts.switchover_redis, RedisMoveRequest(old_region=east, new_region=west, epoch=5))
    assert redis_status(rlab.a).role == "master" and redis_status(rlab.b).role == "slave"
    # The current epoch acts: fence east, then lift that fence.
    assert _run("run-7", acts.fence_redis, RedisRegionRequest(region=east, epoch=7)).paused
    assert not _writable(rlab, rlab.a)
    _run("run-7", acts.unfence_redis, RedisRegionRequest(region=east, epoch=7))
    assert _writable(rlab, rlab.a)


def test_a_history_without_an_epoch_still_acts(tmp_path, rlab: RedisLab):
    """What workflows recorded before the Redis steps carried the epoch (a bare region name)."""
    cfg = _config(tmp_path, rlab)
    acts = RedisActivities(cfg)
    east = cfg.regions[0].name
    epochs.record_epoch(rlab.a, cfg.service, 3, east, "dr-move-test", "run-3")
    assert _run("old", acts.fence_redis, east).paused
    assert not _writable(rlab, rlab.a)
    _run("old", acts.unfence_redis, east)
    assert _writable(rlab, rlab.a)


def test_the_epoch_record_never_goes_back(rlab: RedisLab):
    epochs.record_epoch(rlab.a, "svc", 4, "east", "wf", "run-4")
    assert epochs.record_epoch(rlab.a, "svc", 4, "east", "wf", "run-4").epoch == 4  # a retry
    for epoch, run in ((3, "run-3"), (4, "run-4b")):
        with pytest.raises(epochs.StaleEpoch):
            epochs.record_epoch(rlab.a, "svc", epoch, "east", "wf", run)
    assert epochs.read_epoch(rlab.a, "svc").run_id == "run-4"
    assert epochs.is_own_key(epochs.key("svc")) and not epochs.is_own_key("app:epoch")


def test_a_stale_failback_does_not_re_attach_a_master_a_newer_move_promoted(tmp_path, rlab: RedisLab):
    """Failback's Redis step (snapshot, then REPLICAOF: the resync drops the node's keys) carries
    the epoch too: run with an older one, it leaves the current master alone."""
    from activities.failback import FailbackActivities, FailbackRequest

    cfg = _config(tmp_path, rlab)
    east, west = cfg.regions[0].name, cfg.regions[1].name
    epochs.record_epoch(rlab.a, cfg.service, 5, east, "dr-move-test", "run-5")
    rlab.client(rlab.a).set("epoch-test:only-here", "1")
    err = _stale("run-4", FailbackActivities(cfg).preserve_redis_and_rejoin,
                 FailbackRequest(region=east, primary_region=west, epoch=4))
    assert "not re-attaching" in err.message
    assert redis_status(rlab.a).role == "master" and rlab.client(rlab.a).get("epoch-test:only-here") == "1"
