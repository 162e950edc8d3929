"""Network partitions, for real: each region's PostgreSQL, Redis, Sentinel and worker in its own
network namespace (lab/netns.py), the control plane (Temporal, the control worker, the witness
Sentinel, S3) in the root, and the links cut by blackhole routes in the kernel: packets
dropped, connections timing out, as a partition does.

The invariants of issue 12, each under the partition that tests it:

- no failover without a quorum of vantage points: the regions cut from each other (the
  control plane sees both), and the primary's region cut from the control plane only (the
  other region still sees it): the monitor fails over in neither, and the primary keeps
  taking writes;
- never two writable primaries: the primary's region cut from everyone, with a client
  inside the partition writing to it all along. Its worker fences it (workers/self_fence.py),
  the failover waits for that before promoting, and the client's last acknowledged write on
  the old primary comes before the first one on the new, in PostgreSQL and in Redis;
- writes acknowledged during the partition are not lost by the runbooks: after the heal,
  failback carries every write the old primary acknowledged into the new one.

Skipped, saying why, where network namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
import yaml

from activities.postgres.status import pg_status
from eagle_dr.config import load_config
from lab import netns
from lab.osuser import make_dir
from lab.processes import kill_tree, read_pid, spawn
from tests.conftest import PORT_SHIFT, TEST_LAB_DIR, _stop_leftovers, fresh_lab_dir, write_test_config
from tests.lab_helpers import _until

pytestmark = pytest.mark.asyncio(loop_scope="session")

# A lab of its own beside the session's, with namespaces and link addresses of its own per
# xdist process: in the 350-port slots above every process's own lab (conftest), so no port of
# one is a port of another. (PORT_SHIFT + 700 put gw0's on gw2's lab once `make test` ran three.)
_PROCS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) if _PROCS else 0
SHIFT = int(os.environ.get("EAGLE_DR_TEST_BASE_SHIFT", PORT_SHIFT)) + 350 * (max(_PROCS, 2) + _INDEX)
INDEX = (SHIFT // 350) % 60
SELF_FENCE_AFTER = 5
WRITER = Path(__file__).with_name("partition_writer.py")
LAB_DIR = TEST_LAB_DIR.with_name(TEST_LAB_DIR.name + "-netns")


def _cleanup(d: Path) -> None:
    _stop_leftovers(d)
    cfg_path = d / "eagle-dr.yaml"
    if cfg_path.exists():
        try:
            cfg = load_config(cfg_path, env={})
        except Exception:  # noqa: BLE001 - an older checkout's config: Partitions.up() deletes
            return  # the namespaces by name anyway
        parts = netns.Partitions(cfg, Path(cfg.lab.state_dir), INDEX)
        _stop_writers(Path(cfg.lab.state_dir))
        parts.stop_relays()
        parts.down()


def _stop_writers(state: Path) -> None:
    # A writer left inside a namespace would keep it alive after `ip netns del`.
    for pidfile in (state / "netns").glob("writer-*.pid"):
        kill_tree(read_pid(pidfile))


@pytest.fixture(scope="module")
def plab():
    why = netns.available()
    if why:
        pytest.skip(f"network partitions: {why}")
    from eagle_dr.devserver import DevServer
    from lab.lab import Lab

    _cleanup(LAB_DIR)
    fresh_lab_dir(LAB_DIR)
    path = write_test_config(LAB_DIR, SHIFT)
    doc = yaml.safe_load(path.read_text())
    names = [r["name"] for r in doc["regions"]]
    doc["lab"]["netns"] = {n: f"edr{INDEX}{'ab'[i]}" for i, n in enumerate(names)}
    doc["health"]["self_fence_after"] = f"{SELF_FENCE_AFTER}s"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_config(path, env={})
    state = Path(cfg.lab.state_dir)
    parts = netns.Partitions(cfg, state, INDEX)
    ds, lab = DevServer(cfg), Lab(cfg, str(path))
    try:
        parts.up()
        ds.up()
        # SeaweedFS refuses a port that is taken on any address, and the root's relays listen on
        # the links on its ports: S3 first, then every relay, then the rest of the lab (whose
        # primary archives to S3 from inside its namespace, through them).
        make_dir(lab.state, lab.user, 0o755)
        lab.ensure_secrets()
        lab.tls.ensure()
        for r in cfg.regions:
            lab.s3(r.name).start()
        parts.start_relays()
        lab.up_servers()
        lab.wait_replication()
        lab.start_workers()
        yield lab, parts, ds
    finally:
        try:
            _stop_writers(state)
            lab.down()
            ds.down()
        finally:
            parts.stop_relays()
            parts.down()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pclient(plab):
    from eagle_dr.temporal import connect

    lab, _, ds = plab
    return await connect(target_host=ds.address, config=lab.cfg)


def _names(lab) -> tuple[str, str]:
    a = next(r.name for r in lab.cfg.regions if pg_status(r.postgres).role == "primary")
    return a, lab.cfg.other(a).name


class Writer:
    """tests/partition_writer.py in a region's namespace (or the root), logging its acks."""

    def __init__(self, lab, region: str, netns_name: str | None, first_id: int, tag: str, redis: bool = False):
        self.log = Path(lab.cfg.lab.state_dir) / "netns" / f"writer-{tag}.log"
        self.pidfile = self.log.with_suffix(".pid")
        argv = [sys.executable, str(WRITER), str(self.log), str(first_id), region]
        if netns_name:
            argv = ["ip", "netns", "exec", netns_name, *argv]
        env = {**os.environ, "WRITER_DSN": lab.cfg.region(region).postgres.dsn()}
        if redis:
            rcfg = lab.cfg.region(region).redis
            env |= {"WRITER_REDIS_PORT": str(rcfg.port), "WRITER_REDIS_PASSWORD": lab.secret("redis-password")}
            if rcfg.tls:
                env["WRITER_REDIS_CA"] = str(lab.tls.ca)
        self.log.unlink(missing_ok=True)
        spawn(argv, pidfile=self.pidfile, logfile=self.log.with_suffix(".out"), env=env)

    def _lines(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines() if line] if self.log.exists() else []

    def acks(self) -> list[tuple[float, int]]:
        """PostgreSQL's acknowledged inserts."""
        return [(float(x[0]), int(x[1])) for x in self._lines() if len(x) == 2]

    def redis_acks(self) -> list[tuple[float, int]]:
        return [(float(x[1]), int(x[2])) for x in self._lines() if len(x) == 3 and x[0] == "redis"]

    def stop(self) -> None:
        kill_tree(read_pid(self.pidfile))


async def _monitor(client, lab, **kw):
    from workflows.monitor import MonitorInput, MonitorWorkflow

    kw = {"interval_seconds": 1, "failure_threshold": 3, "auto_failover": True, "stop_after_failover": True,
          "watch_split_brain": False, **kw}
    return await client.start_workflow(MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, **kw),
                                       id=f"monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)


async def _terminate(handle) -> None:
    try:
        await handle.terminate("test over")
    except Exception:  # noqa: BLE001 - it had already ended (stop_after_failover)
        pass


async def _state(handle):
    from workflows.monitor import MonitorState, MonitorWorkflow

    try:
        return await handle.query(MonitorWorkflow.monitor_state, result_type=MonitorState)
    except Exception:  # noqa: BLE001 - not started yet
        return None


async def _rounds_pass(handle, n: int, what: str):
    """n more monitor rounds, each with at least one vote in (the monitor is deciding)."""
    first = await _until(lambda: _state(handle), 60, "the monitor to start")
    return await _until(lambda: _at_least(handle, first.rounds + n), 30 + 10 * n, what)


async def _at_least(handle, rounds: int):
    st = await _state(handle)
    return st if st and st.rounds >= rounds else None


def _writable(lab, region: str) -> bool:
    try:
        with psycopg.connect(lab.cfg.region(region).postgres.dsn(), connect_timeout=2, autocommit=True) as conn:
            return not conn.execute("select pg_is_in_recovery()").fetchone()[0]
    except psycopg.Error:
        return False


async def test_the_netns_lab_streams_and_every_vantage_point_votes(plab, pclient):
    lab, parts, _ = plab
    a, b = _names(lab)
    st = pg_status(lab.cfg.region(b).postgres)
    assert st.role == "standby" and st.receiver_status == "streaming", st
    # The servers really are in their namespaces: the root reaches A's PostgreSQL only through
    # the relay into A's namespace, and nothing of it listens in the root's own stack.
    for what, pid in (("PostgreSQL", lab.postgres(a).pid), ("Redis", lab.redis(a).pid),
                      ("Redis", lab.redis(b).pid)):
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net"), what
    assert lab.redis(b).client().info("replication")["master_link_status"] == "up"
    handle = await _monitor(pclient, lab, auto_failover=False, stop_after_failover=False)
    try:
        st = await _all_up(handle)
        assert st.failovers_started == 0
    finally:
        await _terminate(handle)


async def _all_up(handle):
    last = []

    async def up():
        st = await _state(handle)
        last[:] = [st]
        return st if st and len(st.votes) >= 3 and set(st.votes.values()) == {"up"} else None

    try:
        return await _until(up, 60, "a round with all three vantage points up")
    except AssertionError as e:
        raise AssertionError(f"{e}; the monitor's last state: {last!r}") from None


async def _quorum_holds(lab, pclient, cut, heal, what: str, inside_writes: bool) -> None:
    """Cut, let the monitor (automatic failover on) run rounds well past its threshold, and
    check it never failed over and the primary kept taking writes; then heal."""
    a, b = _names(lab)
    inside = Writer(lab, a, lab.cfg.lab.netns[a], 5_000_000_000 + int(time.time()) % 1_000_000 * 100, f"quorum-{a}")
    handle = None
    try:
        handle = await _monitor(pclient, lab)
        await _all_up(handle)
        cut()
        cut_at = time.time()
        # Rounds under the cut: at least three times the threshold. A failover would show in
        # the monitor's count (and end the run: stop_after_failover).
        st = await _rounds_pass(handle, 9, f"nine monitor rounds with {what}")
        assert st.failovers_started == 0, (st.votes, st.findings)
        assert (await handle.describe()).status.name == "RUNNING"
        down = [v for v, seen in st.votes.items() if seen != "up"]
        assert down, f"the cut showed in no vote: {st.votes}"  # the partition really was there
        if inside_writes:
            # The primary was never fenced: its own clients kept writing through the cut.
            acks = [t for t, _ in inside.acks() if t > cut_at]
            assert acks and max(acks) > time.time() - 3, "writes inside the primary's region stopped"
    finally:
        heal()
        inside.stop()
        if handle is not None:
            await _terminate(handle)
    # After the heal: the same primary, and its standby streaming from it again.
    await _until(lambda: asyncio.to_thread(lambda: pg_status(lab.cfg.region(b).postgres).receiver_status
                                           == "streaming"), 90, "the standby streaming again")
    assert pg_status(lab.cfg.region(a).postgres).role == "primary"


async def test_regions_cut_from_each_other_do_not_fail_over(plab, pclient):
    """The control plane sees both regions: no quorum says the primary is down."""
    lab, parts, _ = plab
    a, b = _names(lab)
    await _quorum_holds(lab, pclient, lambda: parts.cut_between(a, b), parts.heal,
                        "the regions cut from each other", inside_writes=True)


async def test_the_primary_cut_from_the_control_plane_only_is_not_failed_over_nor_fenced(plab, pclient):
    """The control worker cannot see the primary and the primary's worker cannot reach
    Temporal, but the other region sees it: one vote down of two is no majority, and the
    primary's worker, hearing from the other region, does not fence it."""
    lab, parts, _ = plab
    a, _b = _names(lab)
    await _quorum_holds(lab, pclient, lambda: parts.cut_from_root(a), parts.heal,
                        "the primary's region cut from the control plane", inside_writes=True)


async def test_an_isolated_primary_fences_itself_before_the_standby_is_promoted(plab, pclient):
    """The primary's region loses everyone while a client inside it writes on. Its worker
    fences it after health.self_fence_after; the monitor's failover waits for that before it
    promotes the standby; so the last write the old primary acknowledged comes before the first
    the new one did. After the heal, failback (switch_back off) carries every one of those
    acknowledged writes into the new primary."""
    from workflows.failback import FailbackInput, FailbackWorkflow

    lab, parts, _ = plab
    a, b = _names(lab)
    base = 6_000_000_000 + int(time.time()) % 1_000_000 * 100
    inside = Writer(lab, a, lab.cfg.lab.netns[a], base, f"isolated-{a}", redis=True)
    outside = Writer(lab, b, None, base + 50_000_000, f"promoted-{b}", redis=True)
    handle = None
    try:
        handle = await _monitor(pclient, lab)
        await _all_up(handle)
        await _until(lambda: asyncio.sleep(0, len(inside.acks()) >= 5), 30, "the inside client writing")
        parts.isolate(a)
        cut_at = time.time()
        report = await asyncio.wait_for(handle.result(), 300)
        assert report.failover is not None and report.failover.outcome in ("succeeded", "degraded"), report
        steps = [s.name for s in report.failover.steps]
        assert f"wait for {a} to fence itself" in steps, steps
        await _until(lambda: asyncio.sleep(0, bool(outside.acks())), 60, f"a write acknowledged by {b}")
        first_new = outside.acks()[0][0]
        old = [t for t, _ in inside.acks()]
        assert old and max(old) > cut_at, "the old primary took no write in the partition: nothing was tested"
        assert max(old) < first_new, (f"two writable primaries: {a} acknowledged a write at {max(old):.3f}, "
                                      f"{b} had from {first_new:.3f}")
        # The same for Redis: its own worker fenced the isolated master before the failover
        # promoted the other region's replica.
        await _until(lambda: asyncio.sleep(0, bool(outside.redis_acks())), 60, f"a SET acknowledged by {b}'s Redis")
        first_new_cache = outside.redis_acks()[0][0]
        old_cache = [t for t, _ in inside.redis_acks()]
        assert old_cache and max(old_cache) > cut_at, "the old Redis master took no write in the partition"
        assert max(old_cache) < first_new_cache, (
            f"two writable Redis masters: {a}'s acknowledged a SET at {max(old_cache):.3f}, "
            f"{b}'s had from {first_new_cache:.3f}")
        acked_inside = {i for _, i in inside.acks()}
    except BaseException:
        outside.stop()
        raise
    finally:
        parts.heal()
        inside.stop()
        if handle is not None:
            await _terminate(handle)  # automatic failover on: never left watching the lab
    try:
        # Back: its worker reaches Temporal again and keeps its fence (a move ran); failback
        # rewinds it under the new primary and reconciles what it wrote after the fork.
        wlog = Path(lab.cfg.lab.state_dir) / "workers" / f"{a}.log"
        await _until(lambda: asyncio.sleep(0, "self_fence.kept" in wlog.read_text()), 120,
                     f"{a}'s worker back in touch, keeping its fence")
        assert "self_fence.fenced" in wlog.read_text(), "the old primary was not fenced by its own worker"
        assert "self_fence.redis_fenced" in wlog.read_text(), "the old Redis master was not fenced by its worker"
        fb = await pclient.execute_workflow(
            FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=a, switch_back=False),
            id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue,
            execution_timeout=timedelta(minutes=10))
        assert fb.outcome in ("succeeded", "degraded"), fb
        with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
            have = {r[0] for r in conn.execute("select id from alerts where id >= %s and id < %s",
                                              (base, base + 50_000_000))}
        lost = sorted(acked_inside - have)
        assert not lost, f"{len(lost)} writes {a} acknowledged are not on {b} after failback: {lost[:10]}"
        st = pg_status(lab.cfg.region(a).postgres)
        assert st.role == "standby", st
    finally:
        outside.stop()
