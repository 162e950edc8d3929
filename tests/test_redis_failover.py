"""Redis master moves on real redis-server/redis-sentinel processes (ports 17701-17713).

Each test gets a fresh master (17701), replica (17702, replica-priority 0) and three Sentinels
(17711-17713), all killed in teardown. As in production and in the lab, every link is TLS
(clients, replication, Sentinel to node and to Sentinel) under a CA of the tests' own, verified
by name, with AUTH on.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from activities.redis.failover import (
    RedisSplitBrain,
    SwitchoverError,
    demote,
    fence,
    offset_gap,
    promote,
    repoint_sentinels,
    sentinel_quorum,
    switchover,
    unfence,
)
from activities.redis.status import redis_status
from eagle_dr.config import Endpoint, RedisConfig, SecretRef
from lab.osuser import ensure_lab_user
from lab.processes import is_running, read_pid, wait_for
from lab.redis import RedisNode, SentinelNode
from lab.tls import LabTls
from tests.conftest import PORT_SHIFT

HOST = "127.0.0.1"
# Moved with the lab's EAGLE_DR_TEST_PORT_SHIFT (default 2000), so checkouts side by side do not collide.
_SHIFT = PORT_SHIFT - 2000
MASTER_PORT, REPLICA_PORT = 17701 + _SHIFT, 17702 + _SHIFT
SENTINEL_PORTS = (17711 + _SHIFT, 17712 + _SHIFT, 17713 + _SHIFT)
MASTER_NAME = "eagle-cache-test"
DOWN_AFTER_MS = 5000
# Fixed, so a run killed before its teardown can be cleaned up by the next one.
BASE = Path(tempfile.gettempdir()) / f"eagle-dr-test-redis-failover{'-' + str(_SHIFT) if _SHIFT else ''}"
# Kept between tests (BASE is not): one CA and certificate per machine, made once.
TLS_DIR = BASE.with_name(BASE.name + "-tls")


@dataclass
class RedisLab:
    password: str
    a: RedisConfig  # starts as master
    b: RedisConfig  # starts as replica of a
    node_a: RedisNode
    node_b: RedisNode
    sentinels: list[SentinelNode] = field(default_factory=list)

    def client(self, cfg: RedisConfig, timeout: float = 3.0, name: str | None = None) -> redis.Redis:
        return redis.Redis(host=cfg.host, port=cfg.port, password=self.password, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True, retry=Retry(NoBackoff(), 0),
                           client_name=name, **self.a.tls_kwargs)

    def sentinel_client(self, s: SentinelNode) -> redis.Redis:
        return redis.Redis(host=s.host, port=s.port, password=self.password, socket_timeout=3,
                           socket_connect_timeout=3, decode_responses=True, retry=Retry(NoBackoff(), 0),
                           **self.a.tls_kwargs)

    def sentinel_master(self, s: SentinelNode) -> dict:
        raw = self.sentinel_client(s).execute_command("SENTINEL", "MASTER", MASTER_NAME)
        return dict(zip(raw[::2], raw[1::2])) if isinstance(raw, list) else raw

    def wait_linked(self, replica: RedisConfig, master: RedisConfig) -> None:
        want = f"{master.host}:{master.port}"
        wait_for(lambda: (st := redis_status(replica)).role == "slave" and st.master == want
                 and st.link_status == "up", 20, f"{replica.port} linked to {want}", 0.02)

    def wait_caught_up(self, replica: RedisConfig, offset: int) -> None:
        wait_for(lambda: (redis_status(replica).offset or 0) >= offset, 20, f"{replica.port} at offset {offset}", 0.02)

    def wait_sentinels_discovered(self) -> None:
        wait_for(lambda: all(int(self.sentinel_master(s)["num-other-sentinels"]) == len(self.sentinels) - 1
                             for s in self.sentinels), 30, "Sentinels to discover each other", 0.2)


def _kill_all(pids: list[int | None]) -> None:
    # All at once, then one wait: the daemonized servers are reaped by PID 1, which here takes
    # ~2 s per zombie, and kill_tree waits for each pid to vanish from /proc in turn.
    live = [p for p in pids if is_running(p)]
    for p in live:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(is_running(p) for p in live), 15, f"redis processes {live} to die", 0.02)


def _kill_leftovers(base: Path) -> None:
    """Servers of a run killed before its teardown; the title check guards against a reused pid."""
    ports = [f"{HOST}:{p}".encode() for p in (MASTER_PORT, REPLICA_PORT, *SENTINEL_PORTS)]
    ours = []
    for pidfile in base.glob("*/*.pid"):
        pid = read_pid(pidfile)
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes() if is_running(pid) else b""
        except OSError:
            continue
        if b"redis" in title and any(port in title for port in ports):
            ours.append(pid)
    _kill_all(ours)


@pytest.fixture
def rlab():
    _kill_leftovers(BASE)
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    # The servers run as an unprivileged user when we are root: it must enter the directory.
    os.chmod(BASE, 0o755)
    user = ensure_lab_user("eagle-dr")
    password = secrets.token_hex(16)
    pw_file = BASE / "redis-password"
    pw_file.write_text(password + "\n")
    os.chmod(pw_file, 0o600)
    sentinels = [Endpoint(host=HOST, port=p) for p in SENTINEL_PORTS]

    tls = LabTls(TLS_DIR, user)
    tls.ensure()

    def cfg(port: int) -> RedisConfig:
        return RedisConfig(host=HOST, port=port, password=SecretRef(file=str(pw_file)), master_name=MASTER_NAME,
                           sentinels=sentinels, tls=True, ca_file=str(tls.ca))

    node_a = RedisNode(HOST, MASTER_PORT, BASE / "a", user, password, "a", tls=tls)
    node_b = RedisNode(HOST, REPLICA_PORT, BASE / "b", user, password, "b", tls=tls)
    lab = RedisLab(password, cfg(MASTER_PORT), cfg(REPLICA_PORT), node_a, node_b,
                   [SentinelNode(HOST, p, BASE / f"s{i}", user, password, f"s{i}", tls=tls)
                    for i, p in enumerate(SENTINEL_PORTS)])
    try:
        node_a.start()
        node_b.start(replica_of=(HOST, MASTER_PORT))
        for s in lab.sentinels:
            s.write_config(MASTER_NAME, (HOST, MASTER_PORT), quorum=2, down_after_ms=DOWN_AFTER_MS)
            s.start()
        lab.wait_linked(lab.b, lab.a)
        yield lab
    finally:
        _kill_all([proc.pid for proc in (*lab.sentinels, node_a, node_b)])


def _status(cfg: RedisConfig):
    st = redis_status(cfg)
    assert st.reachable, st.error
    return st


def test_offset_gap():
    assert offset_gap(None, 10) is None
    assert offset_gap(100, 100) == 0
    assert offset_gap(150, 100) == 50
    assert offset_gap(90, 100) == 0


def test_promote_after_master_killed_and_repoint_sentinels(rlab: RedisLab):
    a, b = rlab.a, rlab.b
    rlab.wait_sentinels_discovered()
    q = sentinel_quorum(a)
    assert (q.reachable, q.total, q.has_majority) == (3, 3, True)
    assert set(q.masters.values()) == {f"{HOST}:{MASTER_PORT}"} and q.agreed_master == f"{HOST}:{MASTER_PORT}"

    ca = rlab.client(a)
    for i in range(100):
        ca.set(f"k:{i}", i)
    old = _status(a)
    rlab.wait_caught_up(b, old.offset)
    rlab.node_a.kill()
    rlab.sentinels[2].kill()
    wait_for(lambda: _status(b).link_status == "down", 10, "b to notice a is gone", 0.02)

    q = sentinel_quorum(a)
    assert (q.reachable, q.total, q.has_majority) == (2, 3, True)
    assert q.unreachable == [f"{HOST}:{SENTINEL_PORTS[2]}"]

    p = promote(b)
    assert not p.already_master and p.link_status_before == "down"
    assert p.replid2 == old.replid == p.replid_before and p.replid != old.replid
    assert offset_gap(old.offset, p.offset) == 0
    assert rlab.client(b).set("after", "promotion")
    assert rlab.client(b).get("k:99") == "99"
    assert rlab.client(b).config_get("replica-priority")["replica-priority"] == "100"

    again = promote(b)
    assert again.already_master and (again.offset, again.replid, again.replid2) == (p.offset, p.replid, p.replid2)
    assert rlab.password not in p.model_dump_json() + again.model_dump_json()

    live = [f"{HOST}:{port}" for port in SENTINEL_PORTS[:2]]
    assert sorted(repoint_sentinels(a, b)) == live
    q = sentinel_quorum(a)
    assert q.masters == {s: f"{HOST}:{REPLICA_PORT}" for s in live}
    assert q.agreed_master == f"{HOST}:{REPLICA_PORT}"
    # The re-pointed Sentinels reach the new master with auth-pass and find each other again through it.
    wait_for(lambda: all(int((m := rlab.sentinel_master(s))["num-other-sentinels"]) == 1 and "s_down" not in m["flags"]
                         and m["role-reported"] == "master" for s in rlab.sentinels[:2]),
             30, "re-pointed Sentinels to see the new master and each other", 0.2)
    assert repoint_sentinels(a, b) == []

    # Without a majority nothing changes for us: Sentinel's own failover is not used.
    rlab.sentinels[1].kill()
    q = sentinel_quorum(a)
    assert (q.reachable, q.has_majority, q.agreed_master) == (1, False, None)
    assert q.masters == {live[0]: f"{HOST}:{REPLICA_PORT}"}
    assert repoint_sentinels(a, b) == []


class Writer(threading.Thread):
    """INCRs and SETs in a loop on whichever node ``active`` names, following it on READONLY."""

    def __init__(self, rlab: RedisLab, active: RedisConfig):
        super().__init__(daemon=True)
        self.rlab, self.active = rlab, active
        self.stop = threading.Event()
        self.acked_sets: list[int] = []
        self.acked_incrs = 0
        self.readonly_errors = 0
        self.ambiguous = 0  # connection errors/timeouts: the write may or may not have applied
        self.failure: BaseException | None = None

    def run(self) -> None:
        clients: dict[int, redis.Redis] = {}
        i, step = 0, "set"
        try:
            while not self.stop.is_set():
                cfg = self.active
                # Long timeout: a write held by CLIENT PAUSE must wait for the verdict, not give up.
                c = clients.setdefault(cfg.port, self.rlab.client(cfg, timeout=60, name="writer"))
                try:
                    if step == "set":
                        c.set(f"w:{i}", i)
                        self.acked_sets.append(i)
                        step = "incr"
                    else:
                        c.incr("w:counter")
                        self.acked_incrs += 1
                        i, step = i + 1, "set"
                except redis.ReadOnlyError:
                    self.readonly_errors += 1
                    self.stop.wait(0.002)
                except (redis.ConnectionError, redis.TimeoutError):
                    self.ambiguous += 1
                    self.stop.wait(0.002)
        except BaseException as e:  # surfaced by the test
            self.failure = e

    @property
    def acked(self) -> int:
        return len(self.acked_sets) + self.acked_incrs


def test_switchover_under_writer_loses_no_acknowledged_write(rlab: RedisLab):
    a, b = rlab.a, rlab.b
    writer = Writer(rlab, a)
    writer.start()
    try:
        wait_for(lambda: writer.acked >= 200, 20, "writes before the switchover", 0.01)
        held: list[int] = []

        def writer_held() -> bool:
            # Sentinel's hello PUBLISH is held too, so look for the writer's own connection.
            return any(c.get("name") == "writer" and "b" in c["flags"] for c in rlab.client(a).client_list())

        def heartbeat(details):
            # Called while a's writes are paused: make sure the writer really is held by the pause.
            held.append(wait_for(writer_held, 10, "the writer to be held by CLIENT PAUSE", 0.005))

        res = switchover(a, b, timeout_s=10, heartbeat=heartbeat)
        writer.active = b
        assert held
        before = writer.acked
        wait_for(lambda: writer.acked >= before + 200, 20, "writes after the switchover", 0.01)
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.failure is None, writer.failure
    assert not res.already_done and res.lost_bytes == 0
    assert res.behind_bytes is not None and res.behind_bytes >= 0
    assert res.promoted_offset is not None and res.promoted_offset >= res.old_offset
    assert writer.readonly_errors >= 1  # the held write was refused by the demoted node, not applied

    cb = rlab.client(b)
    values = cb.mget([f"w:{i}" for i in writer.acked_sets])
    missing = [i for i, v in zip(writer.acked_sets, values) if v != str(i)]
    assert missing == [], f"{len(missing)} acknowledged SETs lost"
    counter = int(cb.get("w:counter"))
    assert writer.acked_incrs <= counter <= writer.acked_incrs + writer.ambiguous

    assert _status(b).role == "master"
    rlab.wait_linked(a, b)
    assert rlab.client(a).config_get("replica-priority")["replica-priority"] == "0"
    assert cb.config_get("replica-priority")["replica-priority"] == "100"
    with pytest.raises(redis.ReadOnlyError):
        rlab.client(a).set("direct", 1)

    again = switchover(a, b, timeout_s=10)
    assert again.already_done and again.replid == res.replid
    assert rlab.password not in res.model_dump_json() + again.model_dump_json()
    # What a restart reads agrees with the roles: b a master, a its replica (not a loop).
    assert _conf_replicaof(rlab.client(b)) is None
    assert _conf_replicaof(rlab.client(a)) == f"{b.host} {b.port}"


def _conf_replicaof(c) -> str | None:
    path = c.info("server")["config_file"]
    lines = [ln.split(None, 1)[1].strip() for ln in open(path).read().splitlines()
             if ln.strip().startswith(("replicaof ", "slaveof "))]
    return lines[-1] if lines else None


def test_switchover_to_the_current_master_is_already_done(rlab: RedisLab):
    res = switchover(rlab.b, rlab.a, timeout_s=5)
    assert res.already_done and res.new == f"{HOST}:{MASTER_PORT}"
    assert _status(rlab.a).role == "master"


def test_switchover_refuses_when_new_is_not_a_replica_of_old(rlab: RedisLab):
    # Following a node that does not exist: the topology the runbook expected is not there.
    rlab.client(rlab.b).replicaof(HOST, 17799)
    with pytest.raises(SwitchoverError, match="not a replica"):
        switchover(rlab.a, rlab.b, timeout_s=5)
    assert rlab.client(rlab.a, timeout=2).set("still", "writable")


def test_switchover_aborted_during_catch_up_leaves_old_master_writable(rlab: RedisLab):
    a, b = rlab.a, rlab.b

    def cancelled(details):
        raise RuntimeError("activity cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        switchover(a, b, timeout_s=30, heartbeat=cancelled)
    # Unpaused: a write completes well within a timeout far shorter than the 35 s pause.
    assert rlab.client(a, timeout=2).set("after-abort", 1)
    assert _status(a).role == "master" and _status(b).role == "slave"


def test_switchover_retry_after_crash_between_promote_and_demote(rlab: RedisLab):
    a, b = rlab.a, rlab.b
    rlab.client(a).set("before", 1)
    f = fence(a)
    rlab.wait_caught_up(b, f.offset)
    promote(b)  # ...and the worker died here: two masters, a still paused
    res = switchover(a, b, timeout_s=10)
    assert not res.already_done and res.lost_bytes == 0
    rlab.wait_linked(a, b)
    assert rlab.client(a).get("before") == "1"


def test_switchover_refuses_to_demote_an_old_master_that_took_writes(rlab: RedisLab):
    a, b = rlab.a, rlab.b
    promote(b)
    rlab.client(a).set("only-on-a", 1)
    with pytest.raises(RedisSplitBrain):
        switchover(a, b, timeout_s=5)
    assert _status(a).role == "master"
    assert rlab.client(a, timeout=2).set("still", "writable")


def _restart(node: RedisNode) -> None:
    """kill -9 and start again from its redis.conf, as a crash and reboot would (no persistence:
    the data is gone, only the configuration file counts)."""
    _kill_all([node.pid])
    node.start()


def test_fence_refuses_writes_across_a_restart_and_unfence_releases_them(rlab: RedisLab):
    a, b = rlab.a, rlab.b
    ca = rlab.client(a)
    ca.set("k", "v")

    f = fence(a)
    assert f.reachable and f.paused and f.durable and f.role == "master"
    assert f.offset <= int(ca.info("replication")["master_repl_offset"])  # a replication PING may follow
    assert ca.get("k") == "v"  # reads still served
    assert ca.config_get("replica-priority")["replica-priority"] == "0"
    # What Sentinel sends a master it thinks rogue is refused: a resync would discard its keys.
    with pytest.raises(redis.ResponseError, match="no permissions"):
        rlab.client(a, timeout=2).replicaof(HOST, REPLICA_PORT)
    assert ca.info("replication")["role"] == "master"
    # Refused at once, in a transaction and from a script too; not held until a timeout.
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        rlab.client(a, timeout=2).set("k", "written")
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        rlab.client(a, timeout=2).eval("return redis.call('set', 'k', 'script')", 0)
    with pytest.raises(redis.ResponseError):
        pipe = rlab.client(a, timeout=2).pipeline(transaction=True)
        pipe.set("k", "multi").execute()
    assert fence(a).paused  # idempotent
    assert ca.get("k") == "v"

    # A restart (the lab's Redis keeps no data) comes back fenced: the fence is in redis.conf.
    _restart(rlab.node_a)
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        rlab.client(a, timeout=2).set("k", "after restart")
    with pytest.raises(redis.ResponseError, match="no permissions"):
        rlab.client(a, timeout=2).replicaof(HOST, REPLICA_PORT)

    u = unfence(a)
    assert u.reachable and not u.paused
    assert rlab.client(a, timeout=2).set("k", "free")
    assert rlab.client(a).config_get("min-replicas-to-write")["min-replicas-to-write"] == "0"
    # ...and unfenced for good: a restart does not bring the fence back.
    _restart(rlab.node_a)
    assert rlab.client(a, timeout=2).set("k", "free again")

    # A replica takes no writes: it is not write-fenced (that would outlive a promotion).
    rlab.wait_linked(b, a)
    fb = fence(b)
    assert fb.reachable and not fb.paused and fb.role == "slave"
    assert rlab.client(a, timeout=2).set("k2", "v2")
    wait_for(lambda: rlab.client(b).get("k2") == "v2", 10, "replica still replicating", 0.02)

    rlab.node_b.kill()
    gone = fence(b, timeout=0.5)
    assert not gone.reachable and not gone.paused and gone.error
    assert not unfence(b, timeout=0.5).reachable


def test_a_fence_redis_conf_cannot_keep_is_reported_as_lifted_by_a_restart(rlab: RedisLab):
    """redis.conf not writable by the server (a read-only config mount, a package's root-owned
    file): the fence holds in memory only. The step said "paused" all the same, and nobody
    knew a restart of that Redis would make it a second writable master."""
    from workflows.runbook import redis_fence_state

    a, node = rlab.a, rlab.node_a
    conf_mode, dir_mode = node.conf.stat().st_mode & 0o777, node.dir.stat().st_mode & 0o777
    os.chmod(node.conf, 0o400)
    os.chmod(node.dir, 0o500)  # CONFIG REWRITE writes a temporary file beside it
    try:
        f = fence(a)
        assert f.reachable and f.paused and not f.durable and f.error, f
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
            rlab.client(a, timeout=2).set("k", "fenced in memory")
        state = redis_fence_state(f)
        assert state.startswith("paused, NOT persisted") and "a restart lifts the fence" in state, state
    finally:
        os.chmod(node.dir, dir_mode)
        os.chmod(node.conf, conf_mode)
        unfence(a)
    assert rlab.client(a, timeout=2).set("k", "free")
    assert redis_fence_state(fence(a)) == "paused"  # kept in redis.conf: the plain word
    unfence(a)


def test_promotion_lifts_a_fence_the_node_kept(rlab: RedisLab):
    """Fenced, then demoted and later promoted again (a failback): it must take writes."""
    a, b = rlab.a, rlab.b
    f = fence(a)
    rlab.wait_caught_up(b, f.offset)
    promote(b)
    demote(a, b)
    rlab.wait_linked(a, b)
    promote(a)
    assert rlab.client(a, timeout=2).set("writable", "again")


def test_demote_makes_old_master_a_replica_of_new(rlab: RedisLab):
    a, b = rlab.a, rlab.b
    ca = rlab.client(a)
    for i in range(50):
        ca.set(f"d:{i}", i)
    f = fence(a)
    rlab.wait_caught_up(b, f.offset)
    promote(b)
    rlab.client(b).set("new-only", 1)

    d = demote(a, b)
    assert d["already_replica"] is False and d["discarded_bytes"] == 0
    assert d["master"] == f"{HOST}:{REPLICA_PORT}"
    rlab.wait_linked(a, b)
    assert rlab.client(a, timeout=2).get("d:49") == "49"
    wait_for(lambda: rlab.client(a).get("new-only") == "1", 10, "a to follow b", 0.02)
    # The fence is gone: writes fail fast with READONLY instead of hanging.
    with pytest.raises(redis.ReadOnlyError):
        rlab.client(a, timeout=2).set("x", 1)
    assert rlab.client(a).config_get("replica-priority")["replica-priority"] == "0"

    again = demote(a, b)
    assert again["already_replica"] is True and again["link_status"] == "up"
    assert rlab.password not in str(d) + str(again)
