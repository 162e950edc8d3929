"""A switchover whose zero-loss Redis switch fails after PostgreSQL has moved, on the real lab.

The switch refuses a replica whose link to the master is down (pausing writes for a replica
that cannot catch up would only cost availability): its writes are unpaused and the old
master takes them again. The runbook, past its point of no return, promotes the target's
Redis anyway: that made two writable Redis masters, clients of either writing apart. The old
master is fenced first now, and the repair the report names (failback --standby-only)
re-attaches it.
"""

from __future__ import annotations

import uuid

import pytest

from activities.redis.status import client as redis_client
from activities.redis.status import redis_status
from eagle_dr.launch import start_move
from tests.histories import record
from tests.lab_helpers import _async, _failback, _names, _primary, _until
from workflows.models import SwitchoverInput


def _write(cfg, key: str) -> str | None:
    """None if the write was taken, else why not."""
    try:
        redis_client(cfg).set(key, "x", ex=600)
        return None
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        return str(e)


@pytest.mark.usefixtures("configured_topology")
async def test_a_failed_redis_switch_fences_the_old_master_before_promoting_the_target(lab, client):
    a, b = _names(lab)
    assert _primary(lab) == a
    a_redis, b_redis = lab.cfg.region(a).redis, lab.cfg.region(b).redis
    target = redis_client(b_redis)
    masterauth = target.config_get("masterauth")["masterauth"]
    # The target's link to the master goes down and stays down (it cannot authenticate again):
    # the preflight reads roles, which still say replica of a; the switch reads the link.
    target.config_set("masterauth", f"wrong-{uuid.uuid4().hex}")
    target.execute_command("CLIENT", "KILL", "TYPE", "master")
    try:
        await _until(_async(lambda: redis_status(b_redis).link_status != "up"), 30, "the replica's link down")
        handle = await start_move(client, lab.cfg, SwitchoverInput(
            service=lab.cfg.service, target_region=b, reason="test: the Redis switch fails"))
        result = await handle.result()
    finally:
        target.config_set("masterauth", masterauth)
    await record(handle, "switchover-redis-fallback-fences-old")
    assert result.outcome == "degraded", result
    assert _primary(lab) == b
    assert any("Redis zero-loss switch failed" in d for d in result.degraded), result.degraded
    assert any(f"{a}'s Redis was fenced first" in d for d in result.degraded), result.degraded
    assert redis_status(b_redis).role == "master" and _write(b_redis, f"sw:{uuid.uuid4().hex}") is None
    # One writable master: the old one refuses writes (before the fix: it took them, a split brain).
    assert redis_status(a_redis).role == "master"
    refused = _write(a_redis, f"sw:{uuid.uuid4().hex}")
    assert refused is not None, "the old Redis master takes writes beside the promoted one"

    # The repair the report names: failback --standby-only re-attaches it as a replica.
    back = await _failback(lab, client, a, switch_back=False)
    assert back.outcome in ("succeeded", "degraded"), back
    await _until(_async(lambda: (s := redis_status(a_redis)).role == "slave" and s.link_status == "up"), 60,
                 f"{a}'s Redis to follow {b}'s")
    lab.wait_replication()
