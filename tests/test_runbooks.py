"""Failover, switchover and the drill, on the real lab.

The tests run in file order and each leaves the lab in a known topology for the next:
guards and approvals change nothing; the approved switchover moves the primary to B; the
forced failover brings it back to A; the unplanned failover moves it to B after a real
outage of A; the crash test switches back to A; the monitor detects A's loss and fails
over to B; the drill then switches to A, kills it and fails back to B.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid

import psycopg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.health import WATCH_APPLICATION
from bench.history_steps import activity_timings
from activities.postgres.epoch import epoch_history, read_epoch
from activities.postgres.promote import promote
from activities.postgres.lsn import lsn_diff
from activities.postgres.status import pg_status
from activities.redis.status import redis_status
from eagle_dr.launch import AlreadyInProgress, start_drill, start_move
from lab.app import write_log
from lab.processes import kill_tree, read_pid
from tests.histories import record
from tests.lab_helpers import _async, _aux_pid, _awaiting, _fork, _lag_bytes, _names, _primary, _progress, _resume, _scrape, _startup_pid, _until, _value
from workflows.drill import DrillInput
from workflows.runbook import monitor_id, move_id
from workflows.monitor import MonitorInput, MonitorWorkflow
from workflows.models import ApprovalDecision, ApprovalPolicy, FailoverInput, SwitchoverInput
from workflows.switchover import SwitchoverWorkflow

# Its tests name lab.cfg.primary as the primary (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("configured_topology")


def _write_bulk(lab, region: str, rows: int = 4000) -> None:
    base = 10**12 + int(uuid.uuid4().int % 10**9) * 10**4
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        conn.execute("insert into alerts (id, region, payload) select g, %s, jsonb_build_object('pad', repeat('x', 400)) "
                     "from generate_series(%s::bigint, %s::bigint) g", (region, base, base + rows))


# An unlogged table with rows and an unlogged sequence handed out to 500: never in WAL, so no
# move carries them, and the runbook must say so (Rpo.not_replicated and a NOT CARRIED note).
_UNLOGGED = ("create unlogged table if not exists rb_cache (k int primary key, v text)",
             "insert into rb_cache select g, repeat('x', 100) from generate_series(1, 2000) g on conflict do nothing",
             "create unlogged sequence if not exists rb_ids",
             "select setval('rb_ids', 500)")


def _make_unlogged(lab, region: str) -> None:
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        for stmt in _UNLOGGED:
            conn.execute(stmt)


def _unlogged_after_move(lab, region: str) -> tuple[int, int]:
    """(rows in rb_cache, the sequence's next value) on the new primary; then drops both."""
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        rows = conn.execute("select count(*) from rb_cache").fetchone()[0]
        nxt = conn.execute("select nextval('rb_ids')").fetchone()[0]
        conn.execute("drop table rb_cache")
        conn.execute("drop sequence rb_ids")
    return rows, nxt


@pytest.fixture
def unlogged(lab):
    """The unlogged pair on the primary; dropped after on whichever node is primary then, also
    when the test failed (left behind, the readiness check's "unlogged" would warn in later tests)."""
    _make_unlogged(lab, _primary(lab))
    yield
    try:
        with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
            conn.execute("drop table if exists rb_cache")
            conn.execute("drop sequence if exists rb_ids")
    except (psycopg.Error, StopIteration):
        pass  # no primary after a failed test: the lab fixture's reset rebuilds the nodes


async def _fails_with(client, lab, wf: str, raw) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow(wf, raw, id=f"test-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    assert isinstance(e.value.cause, ApplicationError), e.value.cause
    assert e.value.cause.non_retryable
    return e.value.cause


# -- guards: nothing changes ---------------------------------------------------------------------


@pytest.mark.parametrize("raw, field, reason", [
    ({"target_region": "eu-north-9"}, "target_region", "unknown region 'eu-north-9'"),
    ({"target_region": "us-east-1"}, "target_region", "already the primary"),
    ({"target_region": "us-west-2", "max_lag_bytes": "lots"}, "max_lag_bytes", "valid integer"),
    ({"target_region": "us-west-2", "trigger": "panic"}, "trigger", "Input should be"),
    ({"target": "us-west-2"}, "target_region", "Field required"),
])
async def test_bad_runbook_input_fails_at_once(lab, client, raw, field, reason):
    err = await _fails_with(client, lab, "FailoverWorkflow", raw)
    assert err.type == "InvalidInput" and field in err.message and reason in err.message, err.message
    assert _primary(lab) == lab.cfg.primary.name


async def test_lag_guard_refuses_failover(lab, client):
    a, b = _names(lab)
    # WAL the standby never received is what a failover would lose (received but unreplayed
    # WAL is replayed before promotion completes): stop its receiver.
    receiver = _aux_pid(lab, b, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    try:
        _write_bulk(lab, a)
        assert _lag_bytes(lab, a) > 4096
        before = read_epoch(lab.cfg.region(a).postgres, lab.cfg.service).epoch
        err = await _fails_with(client, lab, "FailoverWorkflow", {"target_region": b, "max_lag_bytes": 4096})
        assert err.type == "LagTooHigh" and "exceeds max_lag_bytes 4096" in err.message and "force" in err.message
        assert _primary(lab) == a and pg_status(lab.cfg.region(b).postgres).role == "standby"
        assert read_epoch(lab.cfg.region(a).postgres, lab.cfg.service).epoch == before
    finally:
        os.kill(receiver, signal.SIGCONT)


async def test_second_request_is_rejected_then_approval_rejects(lab, client):
    a, b = _names(lab)
    inp = SwitchoverInput(service=lab.cfg.service, target_region=b,
                          approval=ApprovalPolicy(required=True, timeout_seconds=600))
    handle = await start_move(client, lab.cfg, inp)
    await _until(lambda: _awaiting(handle), 30, "the approval gate")
    with pytest.raises(AlreadyInProgress) as e:
        await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b))
    assert e.value.workflow_id == handle.id and f"already in progress: {handle.id}" in str(e.value)
    await handle.execute_update(SwitchoverWorkflow.approve, ApprovalDecision(approver="bob", decision="reject",
                                                                             comment="not during peak"))
    with pytest.raises(WorkflowFailureError) as f:
        await handle.result()
    assert "approval rejected by bob: not during peak" in f.value.cause.message
    await record(handle, "switchover-rejected")
    assert _primary(lab) == a


async def test_approval_timeout_takes_the_default_action(lab, client):
    a, b = _names(lab)
    inp = SwitchoverInput(service=lab.cfg.service, target_region=b,
                          approval=ApprovalPolicy(required=True, timeout_seconds=1, default_action="abort"))
    handle = await start_move(client, lab.cfg, inp)
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    assert "timed-out-abort" in e.value.cause.message
    assert _primary(lab) == a


async def test_cli_switchover_waits_for_approval_and_cli_rejects(lab, client, lab_config_path):
    a, b = _names(lab)
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "EAGLE_DR_STATE_DIR": lab.cfg.lab.state_dir}
    cli = [sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path)]
    proc = subprocess.Popen(cli + ["switchover", "--to", b, "--require-approval", "--reason", "cli test"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        handle = client.get_workflow_handle(move_id(lab.cfg.service))
        await _until(lambda: _awaiting(handle), 60, "the CLI's switchover to wait for approval", interval=0.2)
        r = subprocess.run(cli + ["approve", handle.id, "--as", "carol", "--reject", "--comment", "freeze"],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert "rejected by carol" in r.stdout
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert "switchover started" in out and "approval rejected by carol: freeze" in out.replace("\n", " ")
    assert _primary(lab) == a


# -- moves ---------------------------------------------------------------------------------------------


async def test_a_switchover_whose_source_worker_died_at_the_approval_fails_at_the_stop_stopping_nothing(lab, client):
    """The source's worker dies while the switchover waits for its approval. The stop waited for
    a worker forever, holding the move's id (the monitor's failover, when the primary died next,
    found it taken) and any cancel's undo with it. Now it fails before the point of no return:
    nothing stopped, nothing to undo on the silent worker, the primary still takes writes."""
    a, b = _names(lab)
    assert _primary(lab) == a
    handle = await start_move(client, lab.cfg, SwitchoverInput(
        service=lab.cfg.service, target_region=b, stop_pickup_seconds=3,
        approval=ApprovalPolicy(required=True, timeout_seconds=600)))
    try:
        await _until(lambda: _awaiting(handle), 30, "the approval gate")
        assert kill_tree(read_pid(lab.worker_pidfile(a)))
        await handle.execute_update(SwitchoverWorkflow.approve, ApprovalDecision(approver="alice", decision="approve",
                                                                                 comment="window"))
        with pytest.raises(WorkflowFailureError) as e:
            await asyncio.wait_for(handle.result(), 120)
    finally:
        lab.start_worker(a)
    await record(handle, "switchover-stop-not-taken")
    assert e.value.cause.type == "SwitchoverFailed", e.value.cause
    steps = {s.name: s for s in (await _progress(handle)).steps}
    stop = steps["stop writes on old primary"]
    assert stop.status == "failed" and "nothing was stopped" in stop.detail, stop
    assert not any(n.startswith(f"undo: {a}") for n in steps), list(steps)
    with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select not pg_is_in_recovery() and not current_setting('transaction_read_only')::bool"
                            ).fetchone()[0]
    assert _primary(lab) == a


async def test_switchover_under_load_loses_nothing(lab, client, unlogged):
    a, b = _names(lab)
    lab.start_app()
    try:
        await _until(_async(lambda: len(write_log(lab.cfg).acknowledged()) > 20), 30, "sample app traffic")
        inp = SwitchoverInput(service=lab.cfg.service, target_region=b, measure_client_impact=True,
                              approval=ApprovalPolicy(required=True, timeout_seconds=600))
        handle = await start_move(client, lab.cfg, inp)
        await _until(lambda: _awaiting(handle), 30, "the approval gate")
        await handle.execute_update(SwitchoverWorkflow.approve, ApprovalDecision(approver="alice", decision="approve",
                                                                                 comment="drill window"))
        result = await handle.result()
        await record(handle, "switchover-epoch-of-both-regions")
        # The app follows routing to B and keeps writing there.
        marker = len(write_log(lab.cfg).acknowledged())
        await _until(_async(lambda: any(w.ok and w.region == b for w in write_log(lab.cfg).entries()[marker - 1:])),
                     30, "acknowledged writes in the new region")
    finally:
        lab.stop_app()
    # Lost by design of the relation, and said: named with the old primary's size for them.
    rows, nxt = _unlogged_after_move(lab, b)
    assert rows == 0 and nxt == 1, (rows, nxt)
    assert set(result.rpo.not_replicated) == {"public.rb_cache", "public.rb_ids"}, result.rpo
    assert result.rpo.not_replicated_bytes > 200_000, result.rpo
    assert any(n.startswith(f"NOT CARRIED to {b}") and "public.rb_cache" in n for n in result.notes), result.notes
    assert result.outcome == "succeeded", result
    # Without the restartpoint before promotion, PostgreSQL 15 promotes the recent unlogged
    # sequence as a zero page ("bad magic number"): nextval() above returned its start value.
    flushed = next(s for s in result.steps if s.name == "flush standby's unlogged init forks")
    assert flushed.status == "done" and "public.rb_ids" in flushed.detail, flushed
    assert result.approval.outcome == "approved" and result.approval.approver == "alice"
    assert result.rpo.acknowledged_writes_lost == 0 and result.rpo.acknowledged_writes_total > 20
    # Independently of the runbook: every acknowledged id is on the new primary.
    acked = write_log(lab.cfg).acknowledged()
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        present = conn.execute("select count(*) from alerts where id = any(%s)", (acked,)).fetchone()[0]
    assert present == len(acked)
    assert pg_status(lab.cfg.region(b).postgres).role == "primary"
    old = pg_status(lab.cfg.region(a).postgres)
    assert old.role == "standby" and old.receiver_status == "streaming"
    assert redis_status(lab.cfg.region(b).redis).role == "master"
    assert redis_status(lab.cfg.region(a).redis).role == "slave"
    assert lab.router.active_region() == b
    assert [s.status for s in result.steps] == ["done"] * len(result.steps)
    # While writes are stopped: one step waits for the replay and promotes, and records the
    # epoch; routing is asked for with it, not after it, and acts once the target is writable
    # (test_traffic_activities holds it back while it is not). Redis waits for the point of no
    # return (moving it is not undone), and routing does not wait for Redis.
    history = await handle.fetch_history()
    names = [a.name for a in activity_timings(history)]
    assert "record_epoch" not in names and "wait_replayed" not in names and "promote_postgres" not in names, names
    ids = _event_ids(history)
    assert ids["route_traffic"]["scheduled"] < ids["promote_when_replayed"]["completed"], ids
    assert ids["switchover_redis"]["scheduled"] > ids["promote_when_replayed"]["completed"], ids
    assert ids["route_traffic"]["completed"] < ids["switchover_redis"]["completed"], ids
    route = next(s for s in result.steps if s.name == "re-route traffic")
    assert f"once {b} was writable" in route.detail, route.detail
    # The old primary's slot was reserved on the standby before the stop, out of the write
    # outage, and it is the slot the old primary now streams through.
    assert next(s for s in result.steps if s.name == "reserve WAL on the standby for the old primary's return"
                ).status == "done"
    assert ids["reserve_rejoin_slots"]["completed"] < ids["fence_postgres"]["scheduled"], ids
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select active from pg_replication_slots where slot_name = %s",
                            (lab.cfg.region(a).postgres.slot_name,)).fetchone() == (True,)


def _event_ids(history) -> dict[str, dict[str, int]]:
    """Per activity name (its first run): the event ids of its schedule and its completion."""
    out: dict[str, dict[str, int]] = {}
    names: dict[int, str] = {}
    for ev in history.events:
        if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = ev.activity_task_scheduled_event_attributes.activity_type.name
            names[ev.event_id] = name
            out.setdefault(name, {"scheduled": ev.event_id})
        elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name = names[ev.activity_task_completed_event_attributes.scheduled_event_id]
            out[name].setdefault("completed", ev.event_id)
    return out


def _scheduled_by_the_task_after(history, activity_name: str) -> list[str]:
    """The activities scheduled by the first workflow task completed after ``activity_name``
    completed (its events: between that WorkflowTaskCompleted and the next task's start)."""
    names: dict[int, str] = {}
    done_at = None
    out: list[str] = []
    collecting = False
    for ev in history.events:
        et = ev.event_type
        if et == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
            if collecting:
                out.append(names[ev.event_id])
        elif et == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED and done_at is None and \
                names.get(ev.activity_task_completed_event_attributes.scheduled_event_id) == activity_name:
            done_at = ev.event_id
        elif et == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and done_at is not None and not out:
            collecting = True
        elif et == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and collecting:
            break
    return out


async def test_forced_failover_past_the_lag_guard(lab, client):
    b, a = _names(lab)  # from the primary B to A
    receiver = _aux_pid(lab, a, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    try:
        _write_bulk(lab, b)
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=a,
                                                                 max_lag_bytes=1, force=True, reason="forced test"))

        async def past_the_guard():
            p = await _progress(handle)
            return p is not None and any(s.name == "take DR epoch" for s in p.steps)

        # Let the receiver go once the guard was passed: a clean stop of the old primary waits
        # for its walsender to hand the standby everything.
        await _until(past_the_guard, 60, "the guard to be passed")
    finally:
        os.kill(receiver, signal.SIGCONT)
    result = await handle.result()
    await record(handle, "failover-forced-epoch-of-both-regions")
    assert result.outcome == "succeeded"
    # Routing does not wait for Redis's promotion (against a frozen old master its epoch check
    # waits out a read timeout): both are scheduled by the task that saw the epoch recorded (by
    # the promote step).
    assert sorted(_scheduled_by_the_task_after(await handle.fetch_history(), "promote_postgres")) == \
        ["promote_redis", "route_traffic"]
    assert any("forced past lag guard" in n for n in result.notes)
    assert result.source_fenced == "stop"
    assert pg_status(lab.cfg.region(a).postgres).role == "primary"
    assert not pg_status(lab.cfg.region(b).postgres).reachable  # fenced by stopping it
    lab.rebuild_standby(b)
    lab.wait_replication()


async def test_a_fenced_old_primary_restarted_is_never_a_failover_target(lab, client):
    """A failover fences the old primary by stopping it and holding it as a standby of nothing.
    A supervisor, a reboot or a human restarts it: it comes up in recovery, so it looks like any
    standby, and with the current primary down its lag is unknown, which the lag guard lets
    through. Promoting it would throw away everything written since the fence, without a word.
    A failover to it is refused, naming why and the repair, with the new primary alive or
    declared down (the monitor's automatic failover), and nothing is touched; readiness fails
    its standby check meanwhile."""
    from activities.postgres.ctl import PgCtl
    from activities.readiness import check_standby

    a, b = _names(lab)
    first = await (await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                   reason="stale-target test"))).result()
    assert first.outcome in ("succeeded", "degraded") and first.source_fenced == "stop", first
    PgCtl(lab.cfg.region(a).postgres).start()  # what a supervisor does with a stopped server
    st = pg_status(lab.cfg.region(a).postgres, files=True)
    assert st.role == "standby" and st.hold == "eagle-dr" and st.upstream is None, st
    tag = uuid.uuid4().hex
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        conn.execute("insert into alerts (id, region, payload) values (%s, %s, %s)",
                     (9_200_000_000 + int(tag[:7], 16), b, f'{{"tag": "{tag}"}}'))
    # The source alive, declared down (the monitor's path), and forced: a forced run would
    # promote a node that still carries its read-only fence, with the live primary fenced.
    for known_down, force in ((False, False), (True, False), (True, True)):
        with pytest.raises(WorkflowFailureError) as e:
            await (await start_move(client, lab.cfg, FailoverInput(
                service=lab.cfg.service, target_region=a, source_known_down=known_down, force=force,
                reason="onto the stale node"))).result()
        cause = e.value.cause
        assert cause.type == "TargetStale" and f"eagle-dr failback --region {a}" in cause.message, cause
    # Nothing touched: b still the writable primary with its new row, a still held.
    pb = pg_status(lab.cfg.region(b).postgres)
    assert pb.role == "primary" and not pb.read_only, pb
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from alerts where payload->>'tag' = %s", (tag,)).fetchone()[0] == 1
    st = pg_status(lab.cfg.region(a).postgres, files=True)
    assert st.role == "standby" and st.hold == "eagle-dr", st
    c = check_standby(lab.cfg.region(a), st)
    assert c.state == "fail" and "held by a stop fence" in c.reason, c

    # The monitor, with b's region lost: the vantage points see a's marker, and no automatic
    # failover starts (the pager hears why, not "failover starting").
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=100,
                                          confirm_interval_seconds=0.2, confirm_rounds=3, auto_failover=True,
                                          stop_after_failover=True, watch_split_brain=False),
        id=f"monitor-stale-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    try:
        async def watching():
            p = await _progress(handle)
            return p is not None and p.target_region == b

        await _until(watching, 30, "the monitor to watch b")
        lab.kill_region(b)

        async def refused():
            st = await handle.query(MonitorWorkflow.monitor_state)
            return st if any("held by a stop fence" in f for f in st.findings) else None

        st = await _until(refused, 60, "the monitor to refuse the stale target")
        # Back before Sentinel's own down-after (5 s) could move Redis to a.
        lab.heal_region(b)
        assert st.failovers_started == 0, st
        assert any(f"automatic failover refused: the target {a} is an old primary" in f for f in st.findings), \
            st.findings
        assert pg_status(lab.cfg.region(a).postgres).role == "standby"  # never promoted
        await handle.signal(MonitorWorkflow.stop, "test over")
        await handle.result()
    finally:
        try:
            await handle.terminate("test over")
        except Exception:  # noqa: BLE001 - already ended
            pass
        lab.heal_region(b)
    await _until(_async(lambda: pg_status(lab.cfg.region(b).postgres).role == "primary"), 60, "b back as primary")
    lab.rebuild_standby(a)
    lab.wait_replication()


async def test_a_down_old_primary_is_held_so_a_restart_cannot_make_it_writable(lab, client):
    """The monitor's failover (source declared down, so no probe and no stop fence first) of a
    primary whose server died while its host and worker did not: the network fence is refused,
    and refused is not fenced. A supervisor or a reboot starting it again made a second writable
    primary. Once the target is promoted, the old primary's worker holds it as a standby of
    nothing, so that restart brings it up in recovery."""
    from activities.postgres.ctl import PgCtl

    a, b = _names(lab)
    assert _primary(lab) == a
    pa, pb = lab.cfg.region(a).postgres, lab.cfg.region(b).postgres
    ctl = PgCtl(pa)
    # The standby receives a bulk write but replays none of it (its startup process frozen)
    # until the failover has asked for the promotion, which replays all it received first. None
    # of it is lost; counted from the replay position read before pg_promote, all of it was.
    startup = _startup_pid(lab, b)
    os.kill(startup, signal.SIGSTOP)
    try:
        _write_bulk(lab, a)
        end = pg_status(pa).lsn

        def received() -> bool:
            got = lsn_diff(pg_status(pb).receive_lsn, end)
            return got is not None and got >= 0

        await _until(_async(received), 30, "the standby to receive it")
        ctl.kill()  # the server dies; its host, Redis and eagle-dr worker live on
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                 source_known_down=True, trigger="alert",
                                                                 reason="postgres died, host up"))
        await _until(_async(lambda: (PgCtl(pb).data_dir / "promote").exists()), 60, "pg_promote to be asked")
    finally:
        os.kill(startup, signal.SIGCONT)
    result = await handle.result()
    await record(handle, "failover-holds-a-down-old-primary-epoch-in-promote")
    assert result.outcome in ("succeeded", "degraded"), result
    # The epoch recorded by the promotion itself, never a step after it that a target worker
    # dying in between would leave undone (the old primary's worker then saw no newer epoch).
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name
                 async for e in handle.fetch_history_events()
                 if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    assert "promote_postgres" in scheduled and "record_epoch" not in scheduled, scheduled
    held = read_epoch(pb, lab.cfg.service)
    assert (held.epoch, held.run_id) == (result.epoch, handle.result_run_id), held
    assert result.rpo.lost_commits == 0 and result.rpo.lost_wal_bytes is not None, result.rpo
    assert result.rpo.lost_wal_bytes < 64 * 1024, result.rpo  # the bulk write was megabytes
    assert result.source_fenced == "stop", result
    hold = next(s for s in result.steps if s.name.startswith(f"hold {a}'s PostgreSQL"))
    assert hold.status == "done" and hold.detail.startswith("held"), hold
    assert not any("NOT fenced" in n for n in result.notes), result.notes
    ctl.start()  # what a supervisor does with a stopped server
    st = pg_status(lab.cfg.region(a).postgres, files=True)
    assert st.role == "standby" and st.hold == "eagle-dr" and st.upstream is None, st
    pb = pg_status(lab.cfg.region(b).postgres)
    assert pb.role == "primary" and not pb.read_only, pb
    lab.rebuild_standby(a)
    lab.wait_replication()


async def test_unplanned_failover_after_region_loss(lab, client, unlogged):
    a, b = _names(lab)
    assert _primary(lab) == a

    def known_on_b() -> bool:  # the catalog is in WAL: the standby knows their names, not their rows
        with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
            return conn.execute("select to_regclass('rb_cache') is not null and to_regclass('rb_ids') is not null"
                                ).fetchone()[0]

    await _until(_async(known_on_b), 30, "the standby to replay the unlogged relations' catalog rows")
    lab.start_app()
    try:
        await _until(_async(lambda: len(write_log(lab.cfg).acknowledged()) > 20), 30, "sample app traffic")
        killed = lab.kill_region(a)
        assert {"postgres", "redis", "worker"} <= set(killed)
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                 trigger="alert", reason="region lost",
                                                                 measure_client_impact=True))
        result = await handle.result()
        await record(handle, "failover-unplanned-unlogged-hold")
        marker = len(write_log(lab.cfg).entries())
        await _until(_async(lambda: any(w.ok and w.region == b for w in write_log(lab.cfg).entries()[marker:])),
                     30, "the app writing in the new region")
    finally:
        lab.stop_app()
    # Degraded only by an unlogged sequence PostgreSQL promoted unreadable (checked below).
    assert result.outcome == "succeeded" or all("rb_ids" in d for d in result.degraded), result
    assert pg_status(lab.cfg.region(b).postgres).role == "primary"
    assert redis_status(lab.cfg.region(b).redis).role == "master"
    assert lab.router.active_region() == b
    assert result.source_fenced is None  # the old region was dead: recorded as unfenced
    # Named from the standby's catalog; their size died with the old primary: unknown, not 0.
    # A failover takes no restartpoint before promoting (it would add I/O to the outage), so a
    # sequence created since the standby's last one comes up unreadable (PostgreSQL 15): then
    # the runbook must say so, with the repair.
    broken = [d for d in result.degraded if "rb_ids" in d]
    try:
        rows, nxt = _unlogged_after_move(lab, b)
        assert rows == 0 and nxt == 1 and not broken, (rows, nxt, result.degraded)
    except psycopg.errors.InternalError_ as e:
        assert "bad magic number" in str(e) and len(broken) == 1 and "crash recovery" in broken[0], (e, broken)
        assert result.outcome == "degraded"
    assert set(result.rpo.not_replicated) == {"public.rb_cache", "public.rb_ids"}, result.rpo
    assert result.rpo.not_replicated_bytes is None, result.rpo
    assert any(n.startswith(f"NOT CARRIED to {b}") for n in result.notes), result.notes
    assert any("NOT fenced" in n for n in result.notes)
    # The RPO the runbook reports is what is actually missing.
    entries = write_log(lab.cfg).entries()
    acked_before = [w.id for w in entries if w.ok and w.region == a]
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        present = conn.execute("select count(*) from alerts where id = any(%s)", (acked_before,)).fetchone()[0]
    assert result.rpo.acknowledged_writes_lost == len(acked_before) - present
    assert result.rto.total_s is not None and result.rto.met
    # With the source's worker dead, the three fences are local activities: no task queue
    # round trip between the decision and the promotion.
    # (After the promotion, a stop fence to hold the down old primary goes to its worker's
    # queue, where nobody takes it: the region is dead, so the note above stands.)
    timings = activity_timings(await handle.fetch_history())
    promoted = next(t.scheduled_s for t in timings if t.name == "promote_postgres")
    remote = {t.name for t in timings if t.outcome != "local" and t.scheduled_s < promoted}
    assert not remote & {"fence_postgres", "fence_redis", "scale_down_region"}, remote
    hold = next(s for s in result.steps if s.name.startswith(f"hold {a}'s PostgreSQL"))
    assert hold.status == "failed" and "no worker took the step" in hold.detail, hold
    assert sum(t.name == "(marker core_local_activity)" for t in timings) >= 3, [t.name for t in timings]
    lab.rebuild_standby(a)
    lab.wait_replication()


async def test_a_failed_epoch_record_after_the_promotion_degrades_the_failover_and_it_rolls_forward(lab, client):
    """Past the point of no return (the target promoted) a failure rolls forward: the epoch
    record on the new primary failing (a trigger refuses it here) used to fail the run before
    Redis and routing moved, leaving a writable primary nobody was routed to. Now the run goes
    on to Redis and routing and ends degraded, naming what to do."""
    a, b = _names(lab)
    assert _primary(lab) == a
    pa = lab.cfg.region(a).postgres
    from activities.postgres import epoch as epochs

    with psycopg.connect(pa.dsn(), autocommit=True) as conn:
        held = epochs.read_epoch_on(conn, lab.cfg.service).epoch
    epochs.advance_epoch(pa, lab.cfg.service, held + 1, a, "test-epoch-prep", uuid.uuid4().hex)  # tables exist
    refuse = ("create or replace function eagle_dr_test_refuse() returns trigger language plpgsql as "
              "$$ begin raise exception 'epoch record refused (test)'; end $$",
              "create trigger eagle_dr_test_refuse before insert on eagle_dr.dr_epoch_history "
              "for each row execute function eagle_dr_test_refuse()")
    with psycopg.connect(pa.dsn(), autocommit=True) as conn:
        for q in refuse:
            conn.execute(q)
    lab.wait_replication()  # the standby, promoted, carries the trigger
    try:
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                 reason="epoch record refused"))
        result = await handle.result()
    finally:
        with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
            conn.execute("drop trigger if exists eagle_dr_test_refuse on eagle_dr.dr_epoch_history")
            conn.execute("drop function if exists eagle_dr_test_refuse()")
    assert result.outcome == "degraded", result
    assert any("recording epoch" in d and "epoch record refused" in d for d in result.degraded), result.degraded
    # The record, asked of the promote step, failed there without failing the step: no retries
    # and no abort of a promotion that had happened.
    assert not any(s.name == f"stop {b}'s promotion" for s in result.steps), [s.name for s in result.steps]
    assert pg_status(lab.cfg.region(b).postgres).role == "primary"
    # Rolled forward: Redis and routing moved to the new primary all the same.
    route = next(s for s in result.steps if s.name == "re-route traffic")
    assert route.status == "done", route
    lab.rebuild_standby(a)
    lab.wait_replication()

    # The next move: the failover's epoch is in Redis only. Reading PostgreSQL alone, a
    # switchover took that epoch again, Redis refused it and both Redis nodes ended as each
    # other's replica (CI). It reads Redis's record too.
    from activities.redis import epoch as redis_epochs

    in_redis = redis_epochs.highest_epoch([r.redis for r in lab.cfg.regions], lab.cfg.service).epoch
    assert read_epoch(lab.cfg.region(b).postgres, lab.cfg.service).epoch < in_redis
    back = await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=a))
    switched = await back.result()
    await record(back, "switchover-after-an-epoch-in-redis-only")
    assert switched.outcome == "succeeded", switched
    assert read_epoch(lab.cfg.region(a).postgres, lab.cfg.service).epoch > in_redis
    assert redis_status(lab.cfg.region(a).redis).role == "master"
    await _until(_async(lambda: redis_status(lab.cfg.region(b).redis).link_status == "up"), 60,
                 "b's Redis to replicate from a's")


async def test_a_hung_old_primary_with_its_worker_alive_is_killed_by_the_stop_fence(lab, client):
    """A frozen host (every PostgreSQL process SIGSTOPped; its worker alive): the stop fence's
    pg_ctl stop is never acted on. The fence kills it instead of waiting out its 120 s timeout
    (the bench's frozen-host failover took 148 s before), holds it as a standby of nothing, and
    the RPO says the kill leaves it unproven."""
    from activities.postgres.ctl import alive
    from lab.processes import children

    a, b = _names(lab)
    assert _primary(lab) == a
    postmaster = lab.postgres(a).pid
    frozen = [postmaster, *children(postmaster)]
    try:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass  # a backend that ended between the listing and the signal
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                 trigger="alert", reason="primary host hung"))
        # Well inside the stop fence's 120 s timeout: only the kill can have ended the fence.
        result = await asyncio.wait_for(handle.result(), 100)
    finally:
        _resume(frozen)
    try:
        assert result.outcome in ("succeeded", "degraded"), result
        assert result.source_fenced == "stop"
        assert any("killed" in (s.detail or "") for s in result.steps), [(s.name, s.detail) for s in result.steps]
        # The fence's epoch read timed out against it: the read-only fence was not tried (and its
        # connection timeout waited out) a second time before the stop and the kill.
        fence = next(s for s in result.steps if "killed" in (s.detail or ""))
        assert "read_only skipped (unresponsive)" in fence.detail and "read_only 0" not in fence.detail, fence.detail
        assert not alive(postmaster)
        # The kill ends its WAL anywhere after its last checkpoint: the loss is what its own WAL
        # shows once read to the end (its worker does that), never the checkpoint's figure.
        basis = result.rpo.wal_basis
        assert "own WAL read to its end" in basis or (
            result.rpo.lost_wal_bytes is None and "was killed when it did not stop" in basis), result.rpo
        assert pg_status(lab.cfg.region(b).postgres).role == "primary"
        # Held: a restart brings it up as a standby of nothing, not as a second primary.
        lab.postgres(a).start()
        st = pg_status(lab.cfg.region(a).postgres)
        assert st.role == "standby" and st.upstream is None
    finally:
        lab.rebuild_standby(a)
        lab.wait_replication()


async def test_control_worker_killed_during_promotion(lab, client):
    b, a = _names(lab)  # switchover from the primary B to A
    timeline_before = pg_status(lab.cfg.region(a).postgres).timeline
    epoch_before = read_epoch(lab.cfg.region(b).postgres, lab.cfg.service).epoch
    handle = await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=a))

    async def promoting():
        p = await _progress(handle)
        return p is not None and p.steps and p.steps[-1].name in ("promote", "re-route traffic")

    await _until(promoting, 60, "the promote step", interval=0.01)
    assert kill_tree(read_pid(lab.worker_pidfile(None)))  # kill -9, and wait until it is gone
    lab.start_worker(None)
    result = await handle.result()
    await record(handle, "switchover-control-crash-promote-when-replayed")
    assert result.outcome == "succeeded"
    st = pg_status(lab.cfg.region(a).postgres)
    # Promoted exactly once: its timeline's parent is the one it followed. (Not timeline_before
    # + 1: a promotion goes one past the newest history file in the archive, which an earlier
    # test's abandoned promotion may have left.)
    assert st.role == "primary" and st.timeline > timeline_before, (st, timeline_before)
    with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
        tl_history = conn.execute("select pg_read_file(%s)", (f"pg_wal/{st.timeline:08X}.history",)).fetchone()[0]
    parents = [int(line.split()[0]) for line in tl_history.splitlines() if line.strip() and not line.startswith("#")]
    assert parents[-1] == timeline_before, (tl_history, timeline_before)
    history = [e for e in epoch_history(lab.cfg.region(a).postgres, lab.cfg.service) if e.epoch > epoch_before]
    assert [(e.epoch, e.workflow_id) for e in history] == [(epoch_before + 1, handle.id)]
    # Promoting a node that is already primary is a no-op success.
    assert promote(lab.cfg.region(a).postgres, timeout_s=10).already_primary


async def test_monitor_detects_region_loss_and_fails_over(lab, client):
    """A killed region's ports refuse connections: the monitor confirms that in quick rounds
    and fails over. The failure threshold is out of reach (100 rounds), so only the fast
    confirmation of refused connections can have declared it down."""
    a, b = _names(lab)
    assert _primary(lab) == a
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=5, failure_threshold=100,
                                          confirm_interval_seconds=0.2, confirm_rounds=3,
                                          auto_failover=True, stop_after_failover=True),
        id=f"monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)

    async def watching():
        p = await _progress(handle)
        return p is not None and p.target_region == a

    await _until(watching, 30, "the monitor to watch the primary")

    def watch_sessions() -> int:
        with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
            return conn.execute("select count(*) from pg_stat_activity where application_name = %s",
                                (WATCH_APPLICATION,)).fetchone()[0]

    # The vantage points wait for the next round on idle sessions to the primary: the kill
    # lands while a majority of them watch.
    await _until(_async(lambda: watch_sessions() >= 2), 30, "the vantage points' watch sessions")
    lab.kill_region(a)
    report = await asyncio.wait_for(handle.result(), 120)
    # monitor-auto-failover.json (the threshold path), monitor-fast-confirm.json (confirmation
    # in workflow rounds) and monitor-confirm-in-probe.json (next round on a timer) stay:
    # recorded before later patches.
    await record(handle, "monitor-watch-in-probe")
    # The kill closed the watched sessions: the probe ran at once, not when the interval ran out.
    asked, woke = {}, []
    async for e in handle.fetch_history_events():
        if e.HasField("activity_task_scheduled_event_attributes"):
            # Through the client's converter: with the payload codec on, payloads are ciphertext.
            args = await client.data_converter.decode(list(e.activity_task_scheduled_event_attributes.input.payloads))
            req = args[0] if args else None
            asked[e.event_id] = req.get("watch_seconds", 0) if isinstance(req, dict) else 0
        elif e.HasField("activity_task_completed_event_attributes"):
            done = e.activity_task_completed_event_attributes
            outs = await client.data_converter.decode(list(done.result.payloads))
            out = outs[0] if outs else None
            if isinstance(out, dict) and any(s["region"] == a and s["refused"] for s in out.get("sightings", [])):
                woke.append((out.get("watched_seconds"), asked[done.scheduled_event_id]))
    # Asked to watch for most of the 5 s interval; the kill ended the watch well before that.
    assert any(w is not None and w < ask - 1 for w, ask in woke), woke
    assert report.watched_region == a
    assert report.first_failure_at <= report.detected_at
    assert report.failover.outcome == "succeeded" and report.failover.trigger == "automatic"
    assert "refused connections in 3 rounds" in report.failover.reason, report.failover.reason
    assert report.failover.rto.detected_at == report.first_failure_at
    assert pg_status(lab.cfg.region(b).postgres).role == "primary"
    # The control worker ran the failover: its metrics endpoint has the outcome and the RTO.
    text = _scrape(lab.cfg.temporal.metrics_port)
    assert _value(text, "eagle_dr_runbook_runs_total", runbook="failover", outcome="succeeded") >= 1, text
    assert _value(text, "eagle_dr_last_rto_seconds", runbook="failover") == pytest.approx(report.failover.rto.total_s)
    lab.rebuild_standby(a)
    lab.wait_replication()


async def test_drill(lab, client):
    a, b = _names(lab)  # the drill moves from the primary A to B and back
    # The always-on monitor, armed to fail over fast on its own: the drill's kill would start
    # its failover too (one move id: the drill's own failover step would collide) unless the
    # drill holds it, which it does for its duration.
    monitor = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=3,
                                          confirm_interval_seconds=0.2, auto_failover=True, watch_split_brain=False),
        id=monitor_id(lab.cfg.service), task_queue=lab.cfg.temporal.control_task_queue)
    lab.start_app()
    # What lab up runs: the alert -> workflow latency goes through them.
    lab.start_receiver()
    lab.start_alertmanager()
    try:
        await _until(_async(lambda: len(write_log(lab.cfg).acknowledged()) > 10), 30, "sample app traffic")
        handle = await start_drill(client, lab.cfg, DrillInput(service=lab.cfg.service))
        report = await handle.result()
        # drill.json, drill-restore-drill.json, drill-holds-monitor.json, drill-alert-latency.json
        # and drill-hold-and-alert-latency.json stay: drills recorded before later patches must replay.
        await record(handle, "drill-consistency-check")
        st = await monitor.query(MonitorWorkflow.monitor_state)
    finally:
        lab.stop_app()
        await monitor.terminate("test over")
    assert any(f"held by {handle.id}" in f for f in st.findings), st.findings
    assert any(f"released by {handle.id}" in f for f in st.findings) and not st.holds, st.findings
    assert st.failovers_started == 0, st.findings
    assert report.primary_before == a and report.outage_region == b
    assert report.switchover.outcome == "succeeded" and report.switchover.rpo.acknowledged_writes_lost == 0
    assert report.switchover.approval.outcome == "auto-approved"
    assert report.failover.outcome == "succeeded"
    assert report.failover.rpo.acknowledged_writes_lost is not None
    # The killed region came back and failback rebuilt it: the topology the drill started from.
    assert report.failback is not None and report.failback.rewind.method == "pg_rewind", report.failback.rewind
    assert pg_status(lab.cfg.region(a).postgres).role == "primary"
    st = pg_status(lab.cfg.region(b).postgres)
    assert st.role == "standby" and st.receiver_status == "streaming"
    assert lab.router.active_region() == a
    # The rebuilt standby holds the primary's data, table by table and in Redis, checked while
    # the app kept writing (rows in flight are not differences).
    cc = report.consistency
    assert report.consistency_error is None and cc is not None, report.consistency_error
    assert cc.region_a == a and cc.region_b == b and cc.follower and cc.differences == 0, cc
    assert any(t.table.endswith("alerts") and t.rows_a > 0 for t in cc.tables), cc.tables
    assert cc.redis is not None and cc.redis.differences == 0, cc.redis
    # The report states the backup RPO, the newest recoverable point and the restore drill's
    # result: a backup and a restore drill of it, checked against the primary under the app's writes.
    rd = report.restore_drill
    assert report.restore_drill_error is None and rd is not None and rd.outcome == "succeeded", \
        report.restore_drill_error
    assert rd.rpo_seconds is not None and rd.newest_recoverable is not None and rd.rto_seconds
    assert rd.tables and all(t.match for t in rd.tables), rd.tables
    # Alert -> workflow latency, measured during the outage, named by its two ends.
    al = report.alert_latency
    assert al is not None and al.error is None and al.seconds is not None and 0 < al.seconds < 10, al
    assert al.group_wait == "0s" and "Alertmanager -> workflow signalled" in al.summary()
    # The HTML evidence of this very run: one bar per step of the drill and of its runbooks,
    # the failover's RTO phases with the clients' write gap placed in time, the latency.
    from eagle_dr.cli.report import fetch_report
    from eagle_dr.report.html import render

    r = await fetch_report(client, lab.cfg, handle.id, handle.result_run_id)
    page = render(r)
    steps = len(report.steps) + sum(len(x.steps) for x in (report.switchover, report.failover, report.failback))
    assert len(r.bars) == steps and page.count('<rect class="bar ') == steps
    assert [b.label for b in r.bars if b.depth == 0] == [st.name for st in report.steps]
    fo = next(x for x in r.rtos if x.title.startswith("failover"))
    assert fo.total_s == pytest.approx(report.failover.rto.total_s) and fo.client_gap_end is not None
    assert page.count('class="client-gap"') >= 1 and "Alertmanager -&gt; workflow signalled" in page


async def test_failback_keeps_what_the_old_primary_wrote_after_the_fork(lab, client):
    """Fork with divergent writes on both sides, then failback: nothing is silently lost."""
    from workflows.failback import FailbackInput, FailbackWorkflow

    only_old, both = 9_000_000_001, 9_000_000_002
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        conn.execute("insert into alerts (id, region, payload) values (%s, 'seed', '{}')", (both,))
    old, new = await _fork(lab, client, [
        ("insert into alerts (id, region, payload) values (%s, %s, '{\"side\": \"old\"}')",
         (only_old, _primary(lab))),
        ("update alerts set payload = '{\"side\": \"old\"}' where id = %s", (both,))])
    with psycopg.connect(lab.cfg.region(new).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from alerts where id = %s", (only_old,)).fetchone()[0] == 0
        conn.execute("update alerts set payload = '{\"side\": \"new\"}' where id = %s", (both,))

    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(
        service=lab.cfg.service, region=old, measure_client_impact=True, verify="full"),
        id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    report = await handle.result()
    # failback.json (before the verify step) and failback-verify-by-data.json (before verify:
    # divergence) stay: they prove running failbacks of those versions still replay.
    await record(handle, "failback-verify-full")
    assert report.divergence.lost.lost_commits >= 2
    # verify: full: the last step checked the rewound standby against the primary by data,
    # every table identical, and the divergence's own compare did not run.
    assert report.verify_keys is None
    assert report.verify is not None and report.verify.outcome == "succeeded" and report.verify.path == "none", \
        report.verify
    assert report.rewind.method == "pg_rewind" and report.rewind.fallback_reason is None, report.rewind
    # Where the rewind's time went, in order, adding up to its total.
    phases = report.rewind.phases
    assert list(phases) == ["stop", "source checks", "checkpoint", "pg_rewind", "start", "until streaming"], phases
    assert abs(sum(phases.values()) - report.rewind.seconds) < 0.05, report.rewind
    alerts = next(t for t in report.reconciliation.tables if t.table == "alerts")
    assert alerts.conflicts >= 1 and alerts.inserted >= 1
    assert report.switchover.outcome == "succeeded" and report.switchover.rpo.acknowledged_writes_lost == 0
    # Back to the original topology, with the old primary's post-fork insert kept and the
    # conflicting update resolved last-write-wins (the newer update, made on `new`, wins).
    assert _primary(lab) == old
    st = pg_status(lab.cfg.region(new).postgres)
    assert st.role == "standby" and st.receiver_status == "streaming"
    with psycopg.connect(lab.cfg.region(old).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select region from alerts where id = %s", (only_old,)).fetchone()[0] == old
        assert conn.execute("select payload->>'side' from alerts where id = %s", (both,)).fetchone()[0] == "new"
        audit = conn.execute("select count(*) from eagle_dr.conflict_audit where table_name = 'alerts' "
                             "and workflow_id = %s and conflict and primary_key->>'id' = %s",
                             (handle.id, str(both))).fetchone()[0]
        conflicts = conn.execute("select count(*) from eagle_dr.conflict_audit where workflow_id = %s and conflict",
                                 (handle.id,)).fetchone()[0]
    assert audit == 1 and conflicts == alerts.conflicts
    # The worker that reconciled exports them by strategy (counters: at least this run's).
    ports = [lab.cfg.temporal.metrics_port, *(r.temporal.metrics_port for r in lab.cfg.regions)]
    counted = [_value(_scrape(p), "eagle_dr_conflicts_total", table="alerts", strategy="last-write-wins")
               for p in ports if p]
    assert max(c or 0 for c in counted) >= alerts.conflicts, counted


async def test_split_brain_detection_names_what_is_split(lab):
    """Last: a real split brain (the standby promoted while the primary still takes writes,
    and a second Redis master), detected and named; the lab then rebuilds the loser."""
    from activities.redis.status import client as redis_client
    from activities.split_brain import detect

    primary = _primary(lab)
    other = lab.cfg.other(primary)
    assert not detect(lab.cfg).split
    with psycopg.connect(other.postgres.dsn(), autocommit=True) as conn:
        conn.execute("select pg_promote()")
    redis_client(other.redis).replicaof("NO", "ONE")
    try:
        report = detect(lab.cfg)
        assert sorted(report.postgres_primaries) == sorted([primary, other.name])
        assert sorted(report.redis_masters) == sorted([primary, other.name])
        assert f"postgres: 2 writable primaries ({', '.join(report.postgres_primaries)})" in report.findings
        assert any(f.startswith("redis: 2 masters") for f in report.findings)
    finally:
        lab.rebuild_standby(other.name)
        lab.wait_replication()
    assert not detect(lab.cfg).split


async def test_promotion_that_times_out_leaves_exactly_one_writable_primary(lab, client):
    """The standby's startup process is frozen, so pg_promote(wait => false) cannot finish in
    time. The runbook gives up; then the standby is released. Whatever happens, exactly one
    node may accept writes: the old primary (fence lifted) and never both."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    startup = _startup_pid(lab, b)
    os.kill(startup, signal.SIGSTOP)
    try:
        handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=b,
                                                                 promote_timeout_seconds=5, reason="slow promotion"))
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    finally:
        try:
            os.kill(startup, signal.SIGCONT)  # if the runbook had left it frozen, a late promotion now runs
        except ProcessLookupError:
            pass
    assert e.value.cause.type == "PromotionFailed", e.value.cause
    assert "fence was lifted" in e.value.cause.message
    # The fence scaled a's services to 0; the compensation brings them back with routing.
    assert f"{a}'s services scaled back up, routing on {a}" in e.value.cause.message, e.value.cause.message
    assert lab.router.active_region() == a

    def writable(region: str) -> bool:
        try:
            with psycopg.connect(lab.cfg.region(region).postgres.dsn(), connect_timeout=2, autocommit=True) as c:
                c.execute("begin read write")
                c.execute("create temp table t (x int)")
                c.execute("rollback")
                return True
        except psycopg.Error:
            return False

    # A pending promotion finishes within a second or two of SIGCONT on this lab; give it far more.
    await _until(_async(lambda: writable(a)), 60, "the old primary to take writes again")
    deadline = asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        assert [r.name for r in lab.cfg.regions if writable(r.name)] == [a]
        await asyncio.sleep(0.5)
    st = pg_status(lab.cfg.region(b).postgres)
    assert st.role == "standby"
    # Leave the topology as it was: a streaming standby in b.
    lab.rebuild_standby(b)
    lab.wait_replication()
