"""The monitor against real faults on the lab: a dead worker in front of a healthy
database, a planned switchover while it watches; and what ``eagle-dr status`` says meanwhile.

Runs after test_lab.py and before test_runbooks.py (file order): each test leaves the
configured primary (us-east-1) primary, with every worker running.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import psycopg
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from eagle_dr.status import gather
from lab.processes import kill_tree, read_pid
from tests.histories import record
from tests.lab_helpers import _async, _awaiting, _names, _primary, _progress, _until
from workflows.models import ApprovalDecision, ApprovalPolicy, SwitchoverInput
from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow
from workflows.runbook import move_id
from workflows.switchover import SwitchoverWorkflow


async def _state(handle) -> MonitorState | None:
    try:
        return await handle.query(MonitorWorkflow.monitor_state)
    except Exception:  # noqa: BLE001 - not started yet
        return None


async def _start_monitor(client, lab, **kw):
    kw = {"interval_seconds": 1, "failure_threshold": 2, "auto_failover": True, "stop_after_failover": True, **kw}
    inp = MonitorInput(service=lab.cfg.service, **kw)
    return await client.start_workflow(MonitorWorkflow.run, inp, id=f"monitor-{uuid.uuid4()}",
                                       task_queue=lab.cfg.temporal.control_task_queue)


async def _moves_started_since(client, lab, since: float) -> list[str]:
    """Runs of the single-flight move id started after ``since`` (epoch seconds)."""
    try:
        desc = await client.get_workflow_handle(move_id(lab.cfg.service)).describe()
    except RPCError:
        return []  # never started
    return [desc.run_id] if desc.start_time.timestamp() >= since else []


async def test_dead_worker_is_not_a_dead_region(lab, client):
    a, b = _names(lab)
    assert _primary(lab) == a
    t0 = time.time()
    handle = await _start_monitor(client, lab)

    async def healthy_round():
        st = await _state(handle)
        return st if st and st.rounds >= 1 and st.votes and set(st.votes.values()) == {"up"} else None

    await _until(healthy_round, 60, "a round in which every vantage point sees the primary up")
    assert kill_tree(read_pid(lab.worker_pidfile(a)))  # kill -9 of the primary region's worker only
    try:
        # eagle-dr status: the dead worker's poller lingers in DescribeTaskQueue, but it is not polling.
        workers = {w.region: w for w in (await gather(lab.cfg)).workers}
        assert not workers[a].polling and "no worker picked up a probe" in workers[a].error, workers[a]
        assert workers[b].polling and workers["control"].polling

        async def worker_down():
            st = await _state(handle)
            return st if st and a in st.workers_down and any(f"worker down: {a}" in f for f in st.findings) else None

        seen = await _until(worker_down, 60, "the monitor's worker-down finding")
        assert seen.votes[a] == "no answer" and seen.votes["control"] == "up" and seen.votes[b] == "up"

        async def rounds_later():
            st = await _state(handle)
            return st if st and st.rounds >= seen.rounds + seen.failure_threshold + 2 else None

        later = await _until(rounds_later, 60, "more rounds than the failure threshold with the worker dead")
        assert later.failures == 0 and later.failovers_started == 0, later
        assert a in later.workers_down
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        assert await _moves_started_since(client, lab, t0) == []
        st = pg_status(lab.cfg.region(a).postgres)
        assert st.role == "primary" and not st.read_only
        assert pg_status(lab.cfg.region(b).postgres).role == "standby"
    finally:
        lab.start_worker(a)

    async def worker_back():
        st = await _state(handle)
        return st if st and not st.workers_down and any(f"worker back: {a}" in f for f in st.findings) else None

    try:
        await _until(worker_back, 60, "the monitor to see the worker back")
    finally:
        await handle.terminate("test over")
    await record(handle, "monitor-worker-down")


async def test_monitor_follows_a_switchover_and_back(lab, client):
    """A planned switchover while the monitor watches with automatic failover on: it follows
    the new primary, starts no failover, and keeps running; then the same back."""
    a, b = _names(lab)
    assert _primary(lab) == a
    handle = await _start_monitor(client, lab, stop_after_failover=False)

    async def watching(region: str, after_rounds: int = 0):
        async def pred():
            st = await _state(handle)
            return st if st and st.watched_region == region and st.rounds > after_rounds and \
                st.votes.get("control") == "up" else None
        return pred

    await _until(await watching(a), 60, f"the monitor to watch {a}")
    there = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=b))).result()
    assert there.outcome == "succeeded"
    moved = await _until(await watching(b), 60, f"the monitor to follow the primary to {b}")
    assert any(f"primary moved: {a} -> {b}" in f for f in moved.findings), moved.findings
    # More rounds than the failure threshold, watching b: nothing acts on the old primary.
    settled = await _until(await watching(b, moved.rounds + moved.failure_threshold + 1), 60, "more rounds")
    assert settled.failovers_started == 0 and settled.failures == 0, settled
    desc = await client.get_workflow_handle(move_id(lab.cfg.service)).describe()
    assert desc.workflow_type == "SwitchoverWorkflow"  # the last move is ours: no failover was started
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert (await _progress(handle)).target_region == b

    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=a))).result()
    assert back.outcome == "succeeded"
    home = await _until(await watching(a), 60, f"the monitor to follow the primary back to {a}")
    assert home.failovers_started == 0 and any(f"primary moved: {b} -> {a}" in f for f in home.findings)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    await handle.terminate("test over")
    await record(handle, "monitor-follows-switchover")
    assert _primary(lab) == a
    lab.wait_replication()


async def test_fenced_old_primary_and_master_are_not_a_split_brain(lab):
    """What a failover leaves behind on a live old primary (PostgreSQL fenced read-only, Redis
    paused with replication held) takes no writes: not a split brain."""
    from activities.postgres.fence import fence_read_only
    from activities.redis.failover import demote, fence, unfence
    from activities.redis.status import client as redis_client
    from activities.split_brain import detect

    a, b = _names(lab)
    assert _primary(lab) == a and not detect(lab.cfg).split
    ra, rb = lab.cfg.region(a).redis, lab.cfg.region(b).redis
    # b's Redis becomes a master and is fenced at once (before any Sentinel turns it back).
    redis_client(rb).replicaof("NO", "ONE")
    assert fence(rb).paused
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        conn.execute("select pg_promote()")
    try:
        await _until(_async(lambda: pg_status(lab.cfg.region(b).postgres).role == "primary"), 30, f"{b} promoted")
        assert fence_read_only(lab.cfg.region(b).postgres).method == "read_only"
        report = detect(lab.cfg)
        assert report.postgres_primaries == [a] and report.fenced_primaries == [b], report
        assert report.redis_masters == [a] and report.fenced_masters == [b], report
        assert report.all_redis_masters == sorted([a, b])
        assert report.findings == [] and not report.split
        # Lifted, the same node is a second master again: the exclusion is the fence, not the node.
        unfence(rb)
        assert sorted(detect(lab.cfg).redis_masters) == sorted([a, b])
    finally:
        unfence(rb)
        demote(rb, ra)
        lab.rebuild_standby(b)
        lab.wait_replication()
    assert not detect(lab.cfg).split


async def test_a_failover_colliding_with_a_running_move_does_not_end_the_monitor(lab, client):
    """The primary stops answering while a switchover holds the single-flight id (waiting for
    approval): the monitor's failover collides with it, which it records, and it keeps watching."""
    a, b = _names(lab)
    assert _primary(lab) == a
    move = await start_move(client, lab.cfg, SwitchoverInput(
        service=lab.cfg.service, target_region=b, approval=ApprovalPolicy(required=True, timeout_seconds=600)))
    await _until(lambda: _awaiting(move), 60, "the switchover to wait for approval")
    handle = await _start_monitor(client, lab, stop_after_failover=False)
    postmaster = lab.postgres(a).pid
    try:
        try:
            async def watching():
                st = await _state(handle)
                return st if st and st.watched_region == a and st.votes and set(st.votes.values()) == {"up"} else None

            # A round that saw the primary up first: frozen before it, the monitor never watched it.
            await _until(watching, 60, f"the monitor to see {a} up")
            os.kill(postmaster, signal.SIGSTOP)  # no new connection gets an answer: down from everywhere
            last = None

            async def collided():
                nonlocal last
                last = st = await _state(handle)
                return st if st and any(f"a move already holds {move.id}" in f for f in st.findings) else None

            try:
                seen = await _until(collided, 90, "the monitor's failover to collide with the switchover")
            except AssertionError as e:
                raise AssertionError(f"{e}; the monitor's last state: {last!r}") from None
            assert seen.failovers_started == 0
        finally:
            os.kill(postmaster, signal.SIGCONT)
            # Never left waiting: it holds the move id, and the next test's runbooks would collide.
            await move.execute_update(SwitchoverWorkflow.approve, ApprovalDecision(approver="test", decision="reject"))
    except BaseException:
        await handle.terminate("test failed")  # a monitor left watching would move the lab under later tests
        raise

    async def healthy_again():
        st = await _state(handle)
        return st if st and st.rounds > seen.rounds and st.failures == 0 and st.votes.get("control") == "up" else None

    after = await _until(healthy_again, 60, "the monitor to see the primary answer again")
    assert after.watched_region == a and after.failovers_started == 0
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    await handle.terminate("test over")
    assert _primary(lab) == a


async def test_a_monitor_that_never_saw_the_primary_up_finds_it_down(lab, client):
    """The primary is already down when a monitor starts, and the monitor's guess is the
    standby (a service monitor carried over a stale primary, or the configured primary after a
    failover). No region is writable, the standby answers as a standby and the other region is
    down: the monitor must watch that one, the primary it lost, so its outage counts. Before,
    it watched the healthy standby forever and never declared anything down (seen in CI as the
    colliding-move test's monitor never colliding)."""
    a, b = _names(lab)
    postmaster = lab.postgres(a).pid
    os.kill(postmaster, signal.SIGSTOP)  # down from every vantage point
    handle = None
    try:
        handle = await _start_monitor(client, lab, primary_region=b, auto_failover=False, stop_after_failover=False,
                                      watch_split_brain=False)

        async def counting():
            st = await _state(handle)
            return st if st and st.watched_region == a and st.failures >= 2 else None

        st = await _until(counting, 90, f"the monitor to watch {a} and count its outage")
        assert any(f"{a} is the primary lost" in f for f in st.findings), st.findings
        assert st.failovers_started == 0 and st.votes and set(st.votes.values()) == {"down"}, st.votes
        await record(handle, "monitor-follow-down-primary")
    finally:
        os.kill(postmaster, signal.SIGCONT)
        if handle is not None:
            await handle.terminate("test over")
    assert _primary(lab) == a


async def test_a_partitioned_region_with_its_worker_is_declared_down_without_waiting_for_that_worker(lab, client):
    """A region cut off whole: its PostgreSQL and Redis stop answering (SIGSTOP: they time out,
    no refusal) and its worker dies in the middle of its watch. The rounds must not wait for the
    dead worker's activity: a majority of all vantage points seeing the primary down decides
    each round, and the failover starts before that activity has even timed out."""
    from temporalio.api.enums.v1 import TimeoutType

    from lab.processes import children

    from workflows.models import FailoverInput  # noqa: F401 - the failover the monitor starts

    a = _primary(lab)
    b = lab.cfg.other(a).name
    handle = await _start_monitor(client, lab, failure_threshold=3, confirm_interval_seconds=0.25, confirm_rounds=3,
                                  watch_split_brain=False)

    def watch_sessions() -> int:
        with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
            return conn.execute("select count(*) from pg_stat_activity where application_name = %s",
                                ("eagle-dr monitor watch",)).fetchone()[0]

    # Every vantage point, the primary region's own worker among them, waits on its watch.
    await _until(_async(lambda: watch_sessions() >= 3), 60, "all three vantage points watching")
    frozen = [lab.postgres(a).pid, lab.redis(a).pid]
    frozen += children(frozen[0])

    def signal_all(sig: int) -> None:
        for pid in frozen:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass  # a backend that ended between the listing and the signal

    try:
        signal_all(signal.SIGSTOP)
        kill_tree(read_pid(lab.worker_pidfile(a)))
        report = await handle.result()
    finally:
        signal_all(signal.SIGKILL)  # a frozen node must never wake as a second primary
    assert report.failover is not None and report.failover.outcome == "succeeded", report
    assert "refused" not in (report.failover.reason or ""), report.failover.reason  # the timeout path
    # Timed out, not refused: it may be alive behind a partition, so the failover waited out its
    # self-fence bound (workers/self_fence.py) before promoting, and says so.
    waited = [s for s in report.failover.steps if s.name == f"wait for {a} to fence itself"]
    assert waited and waited[0].status == "done", [(s.name, s.status, s.detail) for s in report.failover.steps]
    names = [s.name for s in report.failover.steps]
    assert names.index(waited[0].name) < names.index("promote"), names
    assert any("self-fence bound" in n for n in report.failover.notes), report.failover.notes
    await record(client.get_workflow_handle(move_id(lab.cfg.service)), "failover-waits-self-fence")
    assert pg_status(lab.cfg.region(b).postgres).role == "primary"
    # In the monitor's history: the dead worker's watch ended (timed out) only after the
    # failover had started; no round waited for it.
    dead_queue, started_child, timed_out = lab.cfg.region(a).temporal.task_queue, None, []
    scheduled = {}
    async for e in handle.fetch_history_events():
        if e.HasField("activity_task_scheduled_event_attributes"):
            scheduled[e.event_id] = e.activity_task_scheduled_event_attributes.task_queue.name
        elif e.HasField("start_child_workflow_execution_initiated_event_attributes") and started_child is None:
            started_child = e.event_id
        elif e.HasField("activity_task_timed_out_event_attributes"):
            t = e.activity_task_timed_out_event_attributes
            # Not the later rounds' probes nobody picked up (schedule-to-start, a second each):
            # the watch the worker was running when it died.
            if scheduled.get(t.scheduled_event_id) == dead_queue and \
                    t.failure.timeout_failure_info.timeout_type != TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START:
                timed_out.append(e.event_id)
    assert started_child is not None
    assert all(t > started_child for t in timed_out), (started_child, timed_out)
    # Put the lab back: the old primary rebuilt as a standby, then switched back.
    lab.rebuild_standby(a)
    lab.wait_replication()
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=a))).result()
    assert back.outcome == "succeeded" and _primary(lab) == a
