"""The monitor against real faults on the lab: a dead worker in front of a healthy
database, a planned switchover while it watches; and what ``eagle-dr status`` says meanwhile.

Runs after test_lab.py and before test_runbooks.py (file order): each test leaves the
configured primary (us-east-1) primary, with every worker running.
"""

from __future__ import annotations

import time
import uuid

from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from activities.postgres.status import pg_status
from eagle_dr.status import gather
from lab.processes import kill_tree, read_pid
from tests.histories import record
from tests.lab_helpers import _names, _primary, _until
from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow
from workflows.runbook import move_id


async def _state(handle) -> MonitorState | None:
    try:
        return await handle.query(MonitorWorkflow.monitor_state)
    except Exception:  # noqa: BLE001 - not started yet
        return None


async def _start_monitor(client, lab, **kw):
    inp = MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2, auto_failover=True,
                       stop_after_failover=True, **kw)
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
