"""The DR epoch on the Redis side: recorded in the Redis master itself, checked before a Redis step acts.

Where it lives, and why: a hash ``eagle-dr:epoch:<service>`` in the master's keyspace, with the
same fields as PostgreSQL's ``eagle_dr.dr_epoch`` row (epoch, region, workflow id, run id).

- The token is checked at the resource it guards, as fencing tokens must be: a Redis step reads
  it from the Redis nodes it is about to change, so it needs no other system. The Redis steps
  run on the control worker and must work when the region's PostgreSQL (or its worker) is gone.
- It rides Redis's own replication, as the PostgreSQL row rides WAL: a replica holds the epoch
  its master recorded, so a promoted replica already knows it; the fenced old master keeps the
  older one, which is what marks it superseded. Nothing else has to be kept in step (a file on
  a worker or a ConfigMap would be one more place that can disagree after a region outage).
- Not in CONFIG (Redis takes no custom settings) and not in a Sentinel (Sentinel keeps only
  its own config epoch, which moves on every Sentinel failover, not per runbook).

What it costs, said plainly: the key is in the application's keyspace. Under an ``allkeys-*``
eviction policy, or after a FLUSHALL, it can disappear; a missing key reads as epoch 0 and the
check then cannot refuse anything (PostgreSQL's epoch, checked by the PostgreSQL steps of the
same run, still guards the move). Failback's key copy-back skips it (``is_own_key``).

Checks read every reachable Redis node of the service and keep the highest record: the node
acted on may be a fenced old master or a replica whose link is down, and the newest record
anywhere is what says a newer move exists.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

import redis
from pydantic import BaseModel

from activities.redis.status import client
from eagle_dr.config import RedisConfig

PREFIX = "eagle-dr:epoch:"

# Compare-and-set in one step: refuse to go back, and refuse the same epoch from another run
# (workflow ids are reused by every incident; the run id is what identifies a move).
_ADVANCE = """
local held = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local run = redis.call('HGET', KEYS[1], 'run_id')
local want = tonumber(ARGV[1])
if held > want or (held == want and run and run ~= ARGV[4]) then
  return {held, run or ''}
end
if held < want then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'region', ARGV[2], 'workflow_id', ARGV[3], 'run_id', ARGV[4],
             'updated_at', ARGV[5])
end
return {want, ARGV[4]}
"""


class RedisEpoch(BaseModel):
    service: str
    epoch: int
    region: str | None = None
    workflow_id: str | None = None
    run_id: str | None = None
    updated_at: datetime | None = None
    # The node it was read from ("host:port"); None when no node answered or none holds one.
    node: str | None = None


class StaleEpoch(RuntimeError):
    """A newer runbook already recorded a higher epoch (or this epoch, in another run)."""


def key(service: str) -> str:
    return PREFIX + service


def is_own_key(name: str | bytes) -> bool:
    """eagle-dr's bookkeeping, not application data: never copied between masters."""
    return (name.decode(errors="replace") if isinstance(name, bytes) else name).startswith(PREFIX)


def read_epoch(node: RedisConfig, service: str, timeout: float = 2.0) -> RedisEpoch:
    """Works on a replica and on a fenced master (a read); epoch 0 when none is recorded."""
    got = client(node, timeout).hgetall(key(service))
    if not got:
        return RedisEpoch(service=service, epoch=0, node=f"{node.host}:{node.port}")
    at = got.get("updated_at")
    return RedisEpoch(service=service, epoch=int(got["epoch"]), region=got.get("region"),
                      workflow_id=got.get("workflow_id"), run_id=got.get("run_id"),
                      updated_at=datetime.fromisoformat(at) if at else None, node=f"{node.host}:{node.port}")


def highest_epoch(nodes: Iterable[RedisConfig], service: str, timeout: float = 2.0) -> RedisEpoch:
    """The highest record on any node that answers; an unreachable node is no evidence either way."""
    best = RedisEpoch(service=service, epoch=0)
    for node in nodes:
        try:
            got = read_epoch(node, service, timeout)
        except (redis.RedisError, OSError):
            continue
        if got.epoch > best.epoch:
            best = got
    return best


def refuse_stale(held: RedisEpoch, epoch: int, run_id: str | None = None) -> None:
    """Raise ``StaleEpoch`` when ``held`` is newer than ``epoch``. With ``run_id`` (steps that
    record the epoch: promote, switchover), the same epoch held by another run is stale too."""
    other_run = run_id is not None and held.run_id is not None and held.run_id != run_id
    if held.epoch > epoch or (held.epoch == epoch and other_run):
        raise StaleEpoch(f"stale epoch {epoch}: Redis {held.node} records epoch {held.epoch} from "
                         f"{held.workflow_id} (run {held.run_id})")


def record_epoch(master: RedisConfig, service: str, epoch: int, region: str, workflow_id: str,
                 run_id: str) -> RedisEpoch:
    """Record ``epoch`` on the (writable) master; idempotent for the same run, never goes back."""
    c = client(master, 5)
    held, run = c.eval(_ADVANCE, 1, key(service), epoch, region, workflow_id, run_id,
                       datetime.now(timezone.utc).isoformat())
    held = int(held)
    if held != epoch or run != run_id:
        raise StaleEpoch(f"{service}: Redis {master.host}:{master.port} already records epoch {held} "
                         f"(run {run}); refusing epoch {epoch}")
    return read_epoch(master, service)
