"""Cancel requests and the point of no return, on the real lab (the UI's "Request
Cancellation"): before the point of no return a cancel undoes what was done and the run
ends cancelled; after it, the cancel is refused and the move finishes.

Each test leaves the lab as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import psycopg
import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import CancelledError

from activities.postgres.ctl import PgCtl
from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from tests.lab_helpers import _awaiting, _failback, _fork, _names, _primary, _progress, _startup_pid, _until
from tests.histories import record
from workflows.models import ApprovalPolicy, SwitchoverInput


async def _step_running(handle, name: str) -> bool:
    p = await _progress(handle)
    return p is not None and any(s.name == name and s.status == "running" for s in p.steps)


async def _cancelled(handle) -> None:
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    assert isinstance(e.value.cause, CancelledError), e.value.cause
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED


@contextlib.asynccontextmanager
async def _owned(handle):
    """A test that fails part-way must not leave its run holding the one-move lock: every later
    test would fail with AlreadyInProgress. Cancel it (the runbook undoes what it did), and
    terminate it only if the cancel does not end it."""
    try:
        yield handle
    except BaseException:
        try:  # what the run was doing when the test gave up (shown with the failure)
            p = await _progress(handle)
            print("run progress at failure:", p and [(st.name, st.status, st.detail) for st in p.steps])
            print("run status:", (await handle.describe()).status)
        except Exception as e:  # noqa: BLE001
            print("run progress unreadable:", e)
        try:
            await handle.cancel()
            await asyncio.wait_for(handle.result(), 120)
        except asyncio.TimeoutError:
            await handle.terminate("cancel test failed and its run did not end on cancel")
        except Exception:
            pass  # the run ended (cancelled or failed): the lock is free
        raise


def _writable(lab, region: str) -> bool:
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create temp table cancel_probe (x int)")
        return not conn.execute("select pg_is_in_recovery()").fetchone()[0]


async def test_cancel_while_waiting_for_approval_changes_nothing(lab, client):
    a, b = _names(lab)
    handle = await start_move(client, lab.cfg, SwitchoverInput(
        service=lab.cfg.service, target_region=b, approval=ApprovalPolicy(required=True, timeout_seconds=600)))
    async with _owned(handle):
        await _until(lambda: _awaiting(handle), 60, "the approval gate")
        await handle.cancel()
        await _cancelled(handle)
    p = await _progress(handle)
    assert p.outcome == "cancelled"
    assert _primary(lab) == a and _writable(lab, a)


async def test_cancel_before_the_point_of_no_return_undoes_the_stop(lab, client):
    """The old primary was stopped and the standby is still replaying: a cancel starts the old
    primary again as the primary, and the standby is never promoted."""
    a, b = _names(lab)
    startup = _startup_pid(lab, b)
    os.kill(startup, signal.SIGSTOP)  # replay stalls: the promote step waits for it
    try:
        # With replay stalled, an archive_timeout WAL switch (a jump to the next 16 MB segment)
        # can put the standby past the default lag guard and the preflight would refuse: this
        # test is about the cancel, so the guard is out of the way.
        handle = await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=b,
                                                                   catch_up_timeout_seconds=600,
                                                                   max_lag_bytes=1 << 30))
        async with _owned(handle):
            await _until(lambda: _step_running(handle, "promote"), 60, "the promote step's replay wait")
            await handle.cancel()
            await _cancelled(handle)
    finally:
        os.kill(startup, signal.SIGCONT)
    await record(handle, "switchover-cancel-in-promote-step")
    p = await _progress(handle)
    assert p.outcome == "cancelled"
    assert any(s.name == f"undo: {a} takes writes again" and s.status == "done" for s in p.steps), p.steps
    # The slot reserved on the standby before the stop is dropped again: left, it would pin
    # the standby's WAL forever.
    assert any(s.name == f"undo: drop the slots reserved on {b}" and s.status == "done"
               and lab.cfg.region(a).postgres.slot_name in s.detail for s in p.steps), p.steps
    assert _slots(lab, b) == []
    # Seen by the promote step itself, short of the checkpoint: proven not promoted, so no
    # abort_promotion was needed, and routing was never changed.
    promote = next(s for s in p.steps if s.name == "promote")
    assert promote.status == "failed" and "not promoted (cancelled" in promote.detail, promote
    assert not any(s.name.startswith("stop ") and "promotion" in s.name for s in p.steps), p.steps
    assert lab.router.active_region() == a
    assert _primary(lab) == a and _writable(lab, a)
    assert pg_status(lab.cfg.region(b).postgres).role == "standby"
    await _until(lambda: _async_streaming(lab, b), 60, f"{b} to stream again")


async def _switchover_short_of_the_checkpoint(lab, client, b: str):
    """A switchover to ``b`` (its replay frozen by the caller) with a 2 s catch-up deadline,
    run to its failure: (its handle, the WorkflowFailureError)."""
    handle = await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=b,
                                                               catch_up_timeout_seconds=2, max_lag_bytes=1 << 30))
    async with _owned(handle):
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    return handle, e.value


async def test_a_standby_that_does_not_catch_up_in_time_is_never_promoted_and_the_stop_is_undone(lab, client):
    """The catch-up deadline passes with the standby short of the old primary's shutdown
    checkpoint: the promote step proves it never asked for a promotion, so the old primary is
    started again as the primary without touching the standby, and routing never moved."""
    a, b = _names(lab)
    startup = _startup_pid(lab, b)
    os.kill(startup, signal.SIGSTOP)
    try:
        handle, e = await _switchover_short_of_the_checkpoint(lab, client, b)
        # Still frozen at the end: the standby was never stopped or restarted by the runbook.
        assert _startup_pid(lab, b) == startup
    finally:
        os.kill(startup, signal.SIGCONT)
    await record(handle, "switchover-not-caught-up")
    assert e.cause.type == "SwitchoverFailed", e.cause
    assert "not promoted (not replayed past" in e.cause.message, e.cause.message
    p = await _progress(handle)
    assert p.outcome == "failed"
    assert any(s.name == f"undo: {a} takes writes again" and s.status == "done" for s in p.steps), p.steps
    assert not any(s.name.startswith("stop ") and "promotion" in s.name for s in p.steps), p.steps
    route = next(s for s in p.steps if s.name == "re-route traffic")
    # Called off by the runbook when the promotion failed: cancelled, not a failure of its own.
    assert route.status == "cancelled" and "not changed" in route.detail, route
    assert _slots(lab, b) == []
    assert lab.router.active_region() == a
    assert _primary(lab) == a and _writable(lab, a)
    assert pg_status(lab.cfg.region(b).postgres).role == "standby"
    await _until(lambda: _async_streaming(lab, b), 60, f"{b} to stream again")


async def test_a_promotion_that_may_be_pending_is_stopped_before_the_stop_is_undone(lab, client):
    """The standby is short of the checkpoint at the deadline, but a ``promote`` file is pending
    in its data directory, as an earlier attempt that asked for the promotion and died would
    leave it (a startup process restarted after a backend crash reads it again). Nothing is
    proven, so the runbook stops the standby until it provably cannot promote
    (abort_promotion) before it starts the old primary again as the primary."""
    a, b = _names(lab)
    startup = _startup_pid(lab, b)
    promote_file = Path(lab.cfg.region(b).postgres.data_dir) / "promote"
    os.kill(startup, signal.SIGSTOP)
    try:
        promote_file.touch()  # no signal sent: nothing reads it until a startup process does
        handle, e = await _switchover_short_of_the_checkpoint(lab, client, b)
    finally:
        promote_file.unlink(missing_ok=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(startup, signal.SIGCONT)  # abort_promotion killed it, or it is still ours
    await record(handle, "switchover-promotion-settled-by-abort")
    assert e.cause.type == "SwitchoverFailed", e.cause
    p = await _progress(handle)
    promote = next(s for s in p.steps if s.name == "promote")
    assert promote.status == "failed" and "unknown" in promote.detail and "promote file" in promote.detail, promote
    settled = next(s for s in p.steps if s.name == f"stop {b}'s promotion")
    assert settled.status == "done", settled
    names = [s.name for s in p.steps]
    # The standby is settled first, then the old primary takes writes again.
    assert names.index(settled.name) < names.index(f"undo: {a} takes writes again"), names
    assert next(s for s in p.steps if s.name == f"undo: {a} takes writes again").status == "done"
    assert lab.router.active_region() == a
    assert _slots(lab, b) == []
    assert _primary(lab) == a and _writable(lab, a)
    assert pg_status(lab.cfg.region(b).postgres).role == "standby"
    assert not promote_file.exists()
    await _until(lambda: _async_streaming(lab, b), 60, f"{b} to stream again")


def _slots(lab, region: str) -> list[str]:
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        return [r[0] for r in conn.execute("select slot_name from pg_replication_slots order by 1")]


async def _async_streaming(lab, region: str) -> bool:
    return pg_status(lab.cfg.region(region).postgres).receiver_status == "streaming"


async def test_cancel_after_the_point_of_no_return_is_refused(lab, client):
    a, b = _names(lab)
    handle = await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=b))
    async with _owned(handle):
        # Redis moves once PostgreSQL is promoted: past the point of no return for sure.
        await _until(lambda: _step_running(handle, "move Redis"), 60, "the Redis step")
    await handle.cancel()
    result = await handle.result()
    assert result.outcome == "succeeded", result
    assert result.cancel_refused and "point of no return" in result.cancel_refused
    assert _primary(lab) == b
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=a))
                  ).result()
    assert back.outcome == "succeeded" and _primary(lab) == a


async def _failover_cancelled_while_fencing(lab, client, reason: str, frozen_through_undo: bool):
    """A failover cancelled while it fences the old primary, whose Redis is frozen so the fence
    step stays in flight (its fence hangs on a socket timeout); thawed as soon as the cancel is
    asked, or only once the run has ended (so the undo cannot reach it either)."""
    from workflows.models import FailoverInput

    a, b = _names(lab)
    rd = lab.redis(a)
    os.kill(rd.pid, signal.SIGSTOP)
    try:
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                 reason=reason))
        async with _owned(handle):
            await _until(lambda: _step_running(handle, "fence old primary"), 60, "the fence step")
        await handle.cancel()
        if frozen_through_undo:
            await _cancelled(handle)
    finally:
        os.kill(rd.pid, signal.SIGCONT)
    if not frozen_through_undo:
        await _cancelled(handle)
    return handle


async def test_failover_cancelled_while_fencing_lifts_every_fence(lab, client):
    """A cancel that lands while the old primary is being fenced: whatever the fence step did
    is undone (PostgreSQL takes writes again, Redis too) and the standby is never promoted."""
    a, b = _names(lab)
    rd = lab.redis(a)
    handle = await _failover_cancelled_while_fencing(lab, client, "cancel test", frozen_through_undo=False)
    # The fences all end before the undo starts (workflow.patched "failover-fences-settle-before-undo").
    await record(handle, "failover-cancel-fences-settle")
    p = await _progress(handle)
    assert p.outcome == "cancelled"
    undo = next(s for s in p.steps if s.name == f"undo: lift the fence on {a}")
    assert undo.status == "done" and "could NOT" not in undo.detail, undo.detail
    assert not any(s.name == "promote" for s in p.steps)
    assert _primary(lab) == a and _writable(lab, a)
    assert pg_status(lab.cfg.region(b).postgres).role == "standby"
    rd.client().set("eagle-dr:cancel-test", "writable")  # the Redis fence is off too
    await _until(lambda: _async_streaming(lab, b), 60, f"{b} to stream again")


async def test_a_failover_cancel_whose_undo_cannot_reach_redis_marks_the_undo_failed(lab, client):
    """The same cancel, with the old primary's Redis still frozen when the undo runs: its fence
    cannot be lifted. The undo step said so in its text only and showed as done, and the run
    ended a clean-looking "cancelled" (its end resolved the incident) while that Redis refused
    writes. The step now fails, naming what is left (and the end pages: test_notify)."""
    from activities.redis.failover import unfence as redis_unfence

    a, b = _names(lab)
    rd = lab.redis(a)
    handle = await _failover_cancelled_while_fencing(lab, client, "cancel test, Redis frozen throughout",
                                                     frozen_through_undo=True)
    p = await _progress(handle)
    undo = next(s for s in p.steps if s.name == f"undo: lift the fence on {a}")
    assert undo.status == "failed" and f"{a}'s Redis could NOT be unfenced" in undo.detail, undo
    assert f"{a}'s PostgreSQL takes writes again" in undo.detail, undo
    assert not any(s.name == "promote" for s in p.steps)
    assert _primary(lab) == a and _writable(lab, a)
    # What the undo could not do, by hand (a fence that landed once Redis thawed, if any).
    assert redis_unfence(lab.cfg.region(a).redis).reachable
    rd.client().set("eagle-dr:cancel-test", "writable")
    await _until(lambda: _async_streaming(lab, b), 60, f"{b} to stream again")


async def test_failback_cancelled_at_review_keeps_the_old_primary_fenced_then_a_rerun_keeps_its_rows(lab, client):
    """Before anything is applied a cancel leaves the old primary stopped and fenced with its
    data intact (never writable again: that would be a split brain); the next run keeps its rows."""
    from temporalio.common import WorkflowIDConflictPolicy

    from eagle_dr.launch import AlreadyInProgress
    from workflows.failback import FailbackInput, FailbackWorkflow
    from workflows.models import FailoverInput
    from workflows.runbook import move_id

    key = 9_300_000_001
    old, new = await _fork(lab, client, [("insert into alerts (id, region, payload) values (%s, 'old', '{}')",
                                          (key,))])
    # Started as the CLI starts it: holding the service's move id.
    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(
        service=lab.cfg.service, region=old, reconcile_approval=ApprovalPolicy(required=True, timeout_seconds=600)),
        id=move_id(lab.cfg.service), task_queue=lab.cfg.temporal.control_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL)
    await _until(lambda: _awaiting(handle), 120, "the reconciliation review")
    with pytest.raises(AlreadyInProgress):  # no failover of the same service while failback runs
        await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=old))
    await handle.cancel()
    await _cancelled(handle)
    assert not PgCtl(lab.cfg.region(old).postgres).running()
    with psycopg.connect(lab.cfg.region(new).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from alerts where id = %s", (key,)).fetchone()[0] == 0

    report = await _failback(lab, client, old)
    assert report.outcome == "succeeded", (report.switchover.degraded, report.switchover.steps, report.notes)
    assert _primary(lab) == old
    with psycopg.connect(lab.cfg.region(old).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select region from alerts where id = %s", (key,)).fetchone()[0] == "old"
