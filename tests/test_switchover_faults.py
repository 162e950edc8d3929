"""Switchovers that go wrong past their point of no return, on the real lab.

- The old primary crashes while it is being stopped: its last checkpoint, which the standby
  replayed past, is not the end of its WAL. What it wrote after that never reached the
  target: measured from its own WAL (the RPO was reported unknown), and the node is left for
  failback instead of a rejoin that cannot follow the new timeline.
- The zero-loss Redis switch fails after PostgreSQL has moved. The switch refuses a replica
  whose link to the master is down (pausing writes for a replica that cannot catch up would
  only cost availability): its writes are unpaused and the old master takes them again. The
  runbook, past its point of no return, promotes the target's Redis anyway: that made two
  writable Redis masters, clients of either writing apart. The old master is fenced first
  now, and the repair the report names (failback --standby-only) re-attaches it.
"""

from __future__ import annotations

import os
import signal
import uuid

import psycopg
import pytest

from activities.redis.status import client as redis_client
from activities.redis.status import redis_status
from eagle_dr.launch import start_move
from tests.histories import record
from tests.lab_helpers import _async, _aux_pid, _exec, _failback, _lag_bytes, _names, _pg, _primary, _until
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


def _checkpoint_running(lab, region: str) -> bool:
    try:
        with _pg(lab, region) as conn:
            return conn.execute("select count(*) from pg_stat_activity where state = 'active' and "
                                "query ilike 'checkpoint%%' and pid <> pg_backend_pid()").fetchone()[0] > 0
    except psycopg.Error:
        return False


@pytest.mark.usefixtures("configured_topology")
async def test_an_old_primary_crashing_while_stopped_has_its_lost_writes_measured_and_kept(lab, client):
    a, b = _names(lab)
    assert _primary(lab) == a
    node = lab.postgres(a)
    base = 9_400_000_000 + uuid.uuid4().int % 10**6
    # The standby holds everything up to a checkpoint; then a's WAL stops reaching it (its
    # walsender frozen) while a commits three rows, and a's checkpointer freezes too.
    _exec(lab, a, "checkpoint")
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    walsender, checkpointer = _aux_pid(lab, a, b"walsender"), _aux_pid(lab, a, b"checkpointer")
    os.kill(walsender, signal.SIGSTOP)
    try:
        _exec(lab, a, *[("insert into alerts (id, region, payload) values (%s, 'crash', '{}')", (base + i,))
                        for i in range(3)])
        os.kill(checkpointer, signal.SIGSTOP)
        handle = await start_move(client, lab.cfg, SwitchoverInput(
            service=lab.cfg.service, target_region=b, reason="test: the old primary crashes while stopped"))
        # The stop step's checkpoint waits on the frozen checkpointer: a's crash lands in the stop.
        await _until(_async(lambda: _checkpoint_running(lab, a)), 60, "the stop step's checkpoint")
    finally:
        node.kill()  # a crash the runbook did not cause (SIGKILL reaches the frozen ones too)
    result = await handle.result()
    await record(handle, "switchover-crashed-stop-measured")
    assert _primary(lab) == b
    assert result.outcome == "degraded", result
    # The three rows, and the epoch the switchover recorded on a (its own commit, also never sent).
    assert result.rpo.lost_commits >= 3 and result.rpo.lost_wal_bytes, result.rpo
    assert result.rpo.wal_basis.startswith("the old primary's own WAL"), result.rpo
    assert any("crashed while being stopped" in d and f"{result.rpo.lost_commits} commits" in d
               for d in result.degraded), result.degraded
    rejoin = next(s for s in result.steps if s.name == "old primary becomes standby")
    assert rejoin.status == "failed" and "never received" in rejoin.detail, rejoin

    # The repair it names keeps the three rows: failback reads them before it rewinds a.
    back = await _failback(lab, client, a, switch_back=False)
    assert back.outcome in ("succeeded", "degraded"), back
    with _pg(lab, b) as conn:
        kept = conn.execute("select count(*) from alerts where id >= %s and id < %s", (base, base + 3)).fetchone()[0]
    assert kept == 3, back
    lab.wait_replication()
