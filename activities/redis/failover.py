"""Moving the Redis master between regions: promote, fence, demote, switchover, re-point Sentinels.

Cross-region promotion is the runbook's decision, not Sentinel's: replicas run with
``replica-priority 0`` so Sentinel never promotes them, and the runbook re-points the
Sentinels once it has moved the master itself (promptly: see ``repoint_sentinels``).

Every function is safe to run twice (Temporal retries activities) and takes ``RedisConfig``
objects, resolving the password inside: no secret travels in arguments or results.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis
from pydantic import BaseModel

from activities.redis.status import client, sentinel_client
from eagle_dr.config import Endpoint, RedisConfig, scrub

log = logging.getLogger(__name__)

_ERRORS = (redis.RedisError, OSError)
_INT_FIELDS = {"master_port", "connected_slaves", "master_repl_offset", "second_repl_offset", "slave_repl_offset",
               "slave_priority", "slave_read_only", "master_last_io_seconds_ago", "master_sync_in_progress"}


class SwitchoverError(RuntimeError):
    """The topology does not allow a planned switchover (the runbook must decide)."""


class RedisSplitBrain(SwitchoverError):
    """Both nodes are masters and the old one took writes after the fork: demoting it would lose them."""


class NotAMaster(RuntimeError):
    """The node a replica is to follow is itself a replica: following it would chain the two
    behind it, or, when it follows the node being demoted, loop them with no master at all."""


def require_master(master: RedisConfig) -> dict[str, Any]:
    """``master``'s replication info, if it is a master; NotAMaster otherwise."""
    info = _repl(_node(master))
    if info.get("role") != "master":
        raise NotAMaster(f"{_addr(master)} is not a master (role {info.get('role')}, following {_upstream(info)}): "
                         "making another node its replica would chain it behind a replica, or loop the two with no "
                         "master")
    return info


class SentinelQuorum(BaseModel):
    total: int
    reachable: int
    has_majority: bool
    # Sentinel address -> the master address it reports (None: it does not monitor master_name).
    masters: dict[str, str | None]
    unreachable: list[str]
    # The master a majority of *all* configured Sentinels report, if there is one.
    agreed_master: str | None = None


class RedisPromotion(BaseModel):
    address: str
    already_master: bool
    # Replication offset the new history forks from (second_repl_offset - 1): what it had received.
    offset: int
    master_repl_offset: int
    replid_before: str | None = None
    replid: str
    # Equals the old master's replid after a promotion: ties the fork offset to the old history.
    replid2: str
    link_status_before: str | None = None


class RedisFence(BaseModel):
    address: str
    reachable: bool
    # Writes refused (the name predates the write fence, which replaced CLIENT PAUSE).
    paused: bool = False
    # The fence is in redis.conf too (CONFIG REWRITE), so it survives a restart.
    durable: bool = False
    role: str | None = None
    offset: int | None = None
    replid: str | None = None
    error: str | None = None


class RedisSwitchover(BaseModel):
    old: str
    new: str
    already_done: bool
    # old's master_repl_offset once writes were paused: nothing acknowledged lies beyond it.
    old_offset: int | None = None
    new_offset_at_pause: int | None = None
    behind_bytes: int | None = None
    promoted_offset: int | None = None
    lost_bytes: int | None = None
    replid: str | None = None
    replid2: str | None = None
    # Why the DR epoch could not be recorded in the new master (None: recorded, or none given).
    epoch_note: str | None = None


def _addr(cfg: RedisConfig | Endpoint) -> str:
    return f"{cfg.host}:{cfg.port}"


def _password(cfg: RedisConfig) -> str | None:
    return cfg.password.resolve() if cfg.password else None


def _raw_info(c: redis.Redis) -> redis.Redis:
    # status's clients: no redis-py retries (it retries connection errors and timeouts 10 times
    # by default: a down node would take seconds, blackholed minutes, instead of `timeout`, and
    # retried writes can apply twice; Temporal's retry policy is the only retry layer here).
    c.set_response_callback("INFO", lambda response, **_: response)  # see _repl
    return c


def _node(cfg: RedisConfig, timeout: float = 3.0) -> redis.Redis:
    return _raw_info(client(cfg, timeout))


def _sentinel(cfg: RedisConfig, sentinel: Endpoint, timeout: float) -> redis.Redis:
    # As in status.sentinel_client: the Sentinels' requirepass is the data password.
    return _raw_info(sentinel_client(cfg, sentinel, timeout))


def _repl(c: redis.Redis) -> dict[str, Any]:
    # Parsed here, not by redis-py: its INFO parser turns numeric-looking values into numbers,
    # so the unset master_replid2 ("000...0", 40 zeros) comes back as the int 0.
    raw = c.execute_command("INFO", "replication")
    info: dict[str, Any] = {}
    for line in raw.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            info[key] = int(value) if key in _INT_FIELDS else value
    return info


def _upstream(info: dict[str, Any]) -> str | None:
    return f"{info['master_host']}:{info['master_port']}" if info.get("role") == "slave" else None


def _offset(info: dict[str, Any]) -> int:
    return info["master_repl_offset"] if info["role"] == "master" else info.get("slave_repl_offset", 0)


def _fork_offset(info: dict[str, Any]) -> int | None:
    """Offset a promoted node's history forked at; None if it never was promoted."""
    second = info.get("second_repl_offset", -1)
    return second - 1 if second > 0 else None


def offset_gap(old_offset: int | None, promoted_offset: int) -> int | None:
    """Bytes of the old master's replication stream the promoted node never received (RPO)."""
    if old_offset is None:
        return None
    return max(0, old_offset - promoted_offset)


# -- Sentinels -------------------------------------------------------------------------------------


def sentinel_quorum(cfg: RedisConfig, timeout: float = 2.0) -> SentinelQuorum:
    masters: dict[str, str | None] = {}
    unreachable: list[str] = []
    for ep in cfg.sentinels:
        try:
            got = _sentinel(cfg, ep, timeout).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", cfg.master_name)
        except _ERRORS as e:
            log.warning("sentinel %s unreachable: %s", ep, e)
            unreachable.append(str(ep))
            continue
        masters[str(ep)] = f"{got[0]}:{got[1]}" if got else None
    total, reachable = len(cfg.sentinels), len(masters)
    majority = total // 2 + 1
    counts: dict[str, int] = {}
    for m in masters.values():
        if m:
            counts[m] = counts.get(m, 0) + 1
    agreed = next((m for m, n in counts.items() if n >= majority), None)
    return SentinelQuorum(total=total, reachable=reachable, has_majority=total > 0 and reachable >= majority,
                          masters=masters, unreachable=unreachable, agreed_master=agreed)


def repoint_sentinels(cfg: RedisConfig, master: RedisConfig, quorum: int = 2, down_after_ms: int = 5000,
                      failover_timeout_ms: int = 10000, timeout: float = 2.0) -> list[str]:
    """Make every reachable Sentinel monitor ``master`` as ``cfg.master_name``; returns those re-pointed.

    Unreachable Sentinels are logged and skipped: they keep their old view until a later run
    reaches them, so call this again when one comes back.

    Run it right after ``promote``: a Sentinel that still monitors a live old master (even a
    fenced one) sees the promoted node as a replica gone rogue and sends it REPLICAOF back to
    the old master (+convert-to-slave, 18 s after promotion in the lab with down-after 30 s),
    which wipes everything written to it since.
    """
    settings = ["auth-pass", _password(master)] if master.password else []
    settings += ["down-after-milliseconds", str(down_after_ms), "failover-timeout", str(failover_timeout_ms),
                 "quorum", str(quorum)]
    changed: list[str] = []
    for ep in cfg.sentinels:
        try:
            s = _sentinel(cfg, ep, timeout)
            try:
                raw = s.execute_command("SENTINEL", "MASTER", cfg.master_name)
                current = dict(zip(raw[::2], raw[1::2])) if isinstance(raw, list) else raw
            except redis.ResponseError as e:
                if "no such master" not in str(e).lower():
                    raise
                current = None
            same = current is not None and (current["ip"], int(current["port"])) == (master.host, master.port)
            if not same:
                # MONITOR refuses a name that is already monitored; REMOVE+MONITOR also drops
                # the Sentinel's stale replica/peer lists, which it rediscovers from the new master.
                if current is not None:
                    s.execute_command("SENTINEL", "REMOVE", cfg.master_name)
                s.execute_command("SENTINEL", "MONITOR", cfg.master_name, master.host, master.port, quorum)
            # Re-asserted even when the address matches: a retry after a MONITOR whose SET was
            # lost would otherwise leave the Sentinel without auth-pass. SET resets no state.
            s.execute_command("SENTINEL", "SET", cfg.master_name, *settings)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            log.warning("sentinel %s unreachable, not re-pointed: %s", ep, e)
            continue
        if not same:
            changed.append(str(ep))
    return changed


class SentinelAgreement(BaseModel):
    master: str
    repointed: list[str]
    # Sentinels that answered but name another master (or none) after the re-point.
    stale: dict[str, str | None] = {}
    unreachable: list[str] = []

    @property
    def all_agree(self) -> bool:
        return not self.stale and not self.unreachable


def repoint_and_verify(cfg: RedisConfig, master: RedisConfig) -> SentinelAgreement:
    """Re-point every Sentinel at ``master``, then read back what each names.

    Run it whenever a region heals or rejoins: a Sentinel that was down while the master
    moved comes back with its old view (its config file), and until it is re-pointed it
    names the old master to every client that asks it."""
    changed = repoint_sentinels(cfg, master)
    q = sentinel_quorum(cfg)
    want = _addr(master)
    return SentinelAgreement(master=want, repointed=changed, unreachable=q.unreachable,
                             stale={ep: m for ep, m in q.masters.items() if m != want})


# -- data nodes ------------------------------------------------------------------------------------


def promote(target: RedisConfig) -> RedisPromotion:
    c = _node(target)
    before = _repl(c)
    already = before["role"] == "master"
    if not already:
        _hold_replication(c, False)
        c.replicaof("NO", "ONE")
    _write_fence(c, False)
    c.config_set("replica-priority", 100)
    _persist(c)
    after = _repl(c)
    fork = _fork_offset(after)
    return RedisPromotion(
        address=_addr(target), already_master=already,
        offset=fork if fork is not None else after["master_repl_offset"],
        master_repl_offset=after["master_repl_offset"],
        replid_before=None if already else before.get("master_replid"),
        replid=after["master_replid"], replid2=after["master_replid2"],
        link_status_before=before.get("master_link_status"),
    )


# While fenced, a master's min-replicas-to-write is raised by this much (see fence); by twice
# as much when a regional worker's self-fence put it on (workers/self_fence.py), which only that
# self-fence may lift. The value on the node says whose fence it is, also after a restart.
FENCE_MIN_REPLICAS = 1_000_000
SELF_FENCE_MIN_REPLICAS = 2 * FENCE_MIN_REPLICAS


def _write_fence(c: redis.Redis, on: bool, by: str = "runbook") -> bool:
    """Refuse (or accept again) every write on a master, for every client and ACL user.

    min-replicas-to-write above any possible replica count makes a master answer each write
    with NOREPLICAS, and it needs min-replicas-max-lag > 0 to apply (0 disables the check).
    The fence adds FENCE_MIN_REPLICAS (a self-fence: SELF_FENCE_MIN_REPLICAS) to the node's own
    value instead of storing it elsewhere, so unfence restores exactly what the operator had,
    and a retry of either is a no-op. A runbook's fence over a self-fence makes it the
    runbook's (a self-fence's lift then leaves it); a self-fence never takes over another fence.
    Lifting (``on`` False, by a runbook) removes either. A replica ignores the setting; clearing
    it on promotion keeps a once-fenced node from refusing writes when it becomes master again.
    Returns whether it changed the value (it is read here, just before the change)."""
    current = int(c.config_get("min-replicas-to-write")["min-replicas-to-write"])
    if on:
        if current < FENCE_MIN_REPLICAS:
            if int(c.config_get("min-replicas-max-lag")["min-replicas-max-lag"]) == 0:
                c.config_set("min-replicas-max-lag", 10)  # the Redis default
            add = SELF_FENCE_MIN_REPLICAS if by == "self" else FENCE_MIN_REPLICAS
            c.config_set("min-replicas-to-write", current + add)
            return True
        if current >= SELF_FENCE_MIN_REPLICAS and by != "self":
            c.config_set("min-replicas-to-write", current - (SELF_FENCE_MIN_REPLICAS - FENCE_MIN_REPLICAS))
            return True
        return False
    if current >= SELF_FENCE_MIN_REPLICAS:
        c.config_set("min-replicas-to-write", current - SELF_FENCE_MIN_REPLICAS)
        return True
    if current >= FENCE_MIN_REPLICAS and by != "self":  # a self-fence's lift leaves a runbook's
        c.config_set("min-replicas-to-write", current - FENCE_MIN_REPLICAS)
        return True
    return False


def fence_holder(cfg: RedisConfig, timeout: float = 2.0) -> tuple[str, str | None] | None:
    """(role, who fenced it: "runbook", "self" or None); None when it does not answer."""
    try:
        c = _node(cfg, timeout)
        role = _repl(c)["role"]
        current = int(c.config_get("min-replicas-to-write")["min-replicas-to-write"])
    except _ERRORS:
        return None
    by = "self" if current >= SELF_FENCE_MIN_REPLICAS else "runbook" if current >= FENCE_MIN_REPLICAS else None
    return role, by


def _persist(c: redis.Redis) -> str | None:
    """CONFIG REWRITE: the running configuration (the write fence, the ACL on replication
    commands, replicaof) into redis.conf, so a restart keeps it. None when written; else why
    not (no config file, a read-only one): the fence then holds only until a restart."""
    try:
        c.config_rewrite()
        return None
    except redis.ResponseError as e:
        log.warning("CONFIG REWRITE failed, the fence will not survive a restart: %s", e)
        return str(e)


def fence(old: RedisConfig, timeout: float = 2.0, by: str = "runbook") -> RedisFence:
    """Refuse writes on a master without touching its data, so its keys can still be captured later.

    Not CLIENT PAUSE (it ends by itself, 24 h at most here, and a restart forgets it): the
    write fence above answers every write with an error, for any client, until unfence or
    demotion lifts it, and CONFIG REWRITE keeps it, and the hold on REPLICAOF, across a
    restart. A replica is left writable-as-before: it takes no writes, and is only marked
    not to be promoted by Sentinel.
    """
    try:
        c = _node(old, timeout)
        info = _repl(c)
        paused = info["role"] == "master"
        if paused:
            _write_fence(c, True, by)
            _hold_replication(c, True)
        c.config_set("replica-priority", 0)
        not_durable = _persist(c)
        info = _repl(c)
    except _ERRORS as e:
        return RedisFence(address=_addr(old), reachable=False, error=scrub(str(e)) or type(e).__name__)
    return RedisFence(address=_addr(old), reachable=True, paused=paused, role=info["role"], offset=_offset(info),
                      replid=info.get("master_replid"), durable=not_durable is None, error=not_durable)


def _hold_replication(c: redis.Redis, hold: bool) -> None:
    """While fenced, a master refuses REPLICAOF/SLAVEOF: Sentinel sends one to a master it
    thinks rogue (about 10 s after seeing it), and the full resync that follows discards every
    key the node holds before failback or split-brain resolution has copied them. Our own
    calls release it first. Deployments whose Sentinels authenticate as another ACL user need
    the same rule on that user."""
    try:
        c.execute_command("ACL", "SETUSER", "default", *(("-replicaof", "-slaveof") if hold else
                                                          ("+replicaof", "+slaveof")))
    except redis.ResponseError as e:
        log.warning("could not %s replication commands: %s", "deny" if hold else "allow", e)


def unfence(node: RedisConfig, timeout: float = 2.0, by: str = "runbook") -> RedisFence:
    """Lift the write fence: a runbook's call lifts any; ``by="self"`` only a self-fence."""
    try:
        c = _node(node, timeout)
        # A self-lift removes its write fence first: only once its own is gone is the REPLICAOF
        # hold released (a runbook's fence landing just before keeps both).
        if by == "self" and not _write_fence(c, False, by):
            info = _repl(c)
            current = int(c.config_get("min-replicas-to-write")["min-replicas-to-write"])
            held = current >= FENCE_MIN_REPLICAS
            return RedisFence(address=_addr(node), reachable=True, paused=held, role=info["role"],
                              offset=_offset(info), replid=info.get("master_replid"),
                              error="fenced by a runbook, not by itself" if held else None)
        _hold_replication(c, False)
        if by != "self":
            _write_fence(c, False, by)
        c.client_unpause()  # a fence from before the write fence paused clients
        _persist(c)
        info = _repl(c)
    except _ERRORS as e:
        return RedisFence(address=_addr(node), reachable=False, error=scrub(str(e)) or type(e).__name__)
    return RedisFence(address=_addr(node), reachable=True, paused=False, role=info["role"], offset=_offset(info),
                      replid=info.get("master_replid"))


def _replicate_from(c: redis.Redis, master: RedisConfig) -> None:
    _hold_replication(c, False)
    if master.password:
        c.config_set("masterauth", _password(master))
    c.replicaof(master.host, master.port)
    c.config_set("replica-priority", 0)
    _write_fence(c, False)
    _persist(c)


def _discarded_bytes(node: dict[str, Any], master: dict[str, Any]) -> int | None:
    """What the node holds beyond the master's history (lost when it resyncs); None if unrelated."""
    fork = _fork_offset(master)
    if node["master_replid"] == master.get("master_replid2") and fork is not None:
        return max(0, node["master_repl_offset"] - fork)
    if node["master_replid"] == master["master_replid"]:
        return max(0, node["master_repl_offset"] - master["master_repl_offset"])
    return None


def demote(node: RedisConfig, master: RedisConfig) -> dict:
    """Make ``node`` a replica of ``master``, then release any fence so its clients get READONLY.

    Returns address, master, already_replica, discarded_bytes (bytes of ``node``'s stream that
    ``master`` never had and the resync drops; None when the histories are unrelated and a
    full resync replaces everything), link_status (right after the command; poll for "up").
    """
    c = _node(node)
    info = _repl(c)
    already = _upstream(info) == _addr(master)
    discarded: int | None = 0
    if not already:
        discarded = _discarded_bytes(info, require_master(master))
        _replicate_from(c, master)
    else:
        c.config_set("replica-priority", 0)
    # After REPLICAOF: clients held by a fence re-run their writes and get READONLY, not success.
    c.client_unpause()
    return {"address": _addr(node), "master": _addr(master), "already_replica": already,
            "discarded_bytes": discarded, "link_status": _repl(c).get("master_link_status")}


def switchover(old: RedisConfig, new: RedisConfig, timeout_s: float = 30,
               heartbeat: Callable[..., Any] | None = None) -> RedisSwitchover:
    """Planned move of the master from ``old`` to ``new`` losing no acknowledged write.

    Writes on ``old`` are paused, ``new`` catches up to old's offset, ``new`` is promoted and
    ``old`` follows it, then old's clients are released (they get READONLY and must follow
    routing). A retry after a crash between promotion and demotion finishes the job if old
    took no write since the fork, and raises RedisSplitBrain if it did.
    """
    o, n = _node(old), _node(new)
    oi, ni = _repl(o), _repl(n)
    old_addr, new_addr = _addr(old), _addr(new)

    if ni["role"] == "master" and _upstream(oi) == new_addr:
        n.config_set("replica-priority", 100)
        o.config_set("replica-priority", 0)
        o.client_unpause()
        return RedisSwitchover(old=old_addr, new=new_addr, already_done=True, promoted_offset=_fork_offset(ni),
                               replid=ni["master_replid"], replid2=ni["master_replid2"])

    resuming = ni["role"] == "master" and oi["role"] == "master"
    if not resuming:
        if _upstream(ni) != old_addr:
            raise SwitchoverError(f"{new_addr} is {ni['role']} of {_upstream(ni)}, not a replica of {old_addr}")
        if oi["role"] != "master":
            raise SwitchoverError(f"{old_addr} is not a master (role {oi['role']})")
        if ni.get("master_link_status") != "up":
            # Pausing writes for a replica that cannot catch up would only cost availability.
            raise SwitchoverError(f"{new_addr} replication link is {ni.get('master_link_status')}")

    # The pause must outlast the whole operation; if this worker dies it still ends by itself.
    o.client_pause(int(timeout_s * 1000) + 5000, all=False)
    promoted = demoted = False
    try:
        oi = _repl(o)
        old_offset = oi["master_repl_offset"]
        ni = _repl(n)
        new_at_pause = None if resuming else _offset(ni)
        if resuming:
            fork = _fork_offset(ni)
            if ni.get("master_replid2") != oi["master_replid"] or fork is None:
                raise RedisSplitBrain(f"{old_addr} and {new_addr} are both masters with unrelated histories")
            if old_offset > fork:
                # Could be client writes or only Sentinel hellos (PUBLISH is replicated): the
                # stream does not say which, so the runbook decides (demote() reports the bytes).
                raise RedisSplitBrain(f"{old_addr} and {new_addr} are both masters and {old_addr} has "
                                      f"{old_offset - fork} bytes beyond the fork: demoting it would drop them")
            promoted = True
        else:
            # old_offset is read once: every acknowledged write lies at or below it, and what
            # can still advance it while paused (replication PINGs) reaches the replica as well.
            deadline = time.monotonic() + timeout_s
            while True:
                if heartbeat:
                    heartbeat({"phase": "catch-up", "target": old_offset, "replica": new_at_pause})
                ni = _repl(n)
                if ni.get("master_replid") != oi["master_replid"] or _upstream(ni) != old_addr:
                    raise SwitchoverError(f"{new_addr} stopped replicating from {old_addr} during the switchover")
                current = _offset(ni)
                if current >= old_offset:
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{new_addr} at offset {current} did not reach {old_offset} "
                                       f"within {timeout_s}s")
                time.sleep(0.01)
            promoted = True  # from here on, a failed REPLICAOF NO ONE may still have been applied
            n.replicaof("NO", "ONE")
            n.config_set("replica-priority", 100)
        # The new master's redis.conf must say master too: left saying "replicaof <old>" while
        # old's says "replicaof <new>", a restart of both (a region outage) is a loop with no master.
        _persist(n)
        _replicate_from(o, new)
        demoted = True
    finally:
        # Release old's clients unless that would make two writable masters: if new may be
        # promoted but old is still master, the pause (which ends by itself) is the only fence.
        if demoted or not promoted:
            try:
                o.client_unpause()
            except _ERRORS:
                if demoted:
                    raise
                log.warning("could not unpause %s; its pause ends by itself", old_addr)
    ni = _repl(n)
    fork = _fork_offset(ni)
    return RedisSwitchover(
        old=old_addr, new=new_addr, already_done=False, old_offset=old_offset, new_offset_at_pause=new_at_pause,
        behind_bytes=None if new_at_pause is None else max(0, old_offset - new_at_pause), promoted_offset=fork,
        lost_bytes=offset_gap(old_offset, fork) if fork is not None else None,
        replid=ni["master_replid"], replid2=ni["master_replid2"],
    )
