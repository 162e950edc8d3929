"""Failback never drops what the old primary wrote after the fork, on the real lab: a table
nobody listed under ``conflicts:`` stops the run before pg_rewind, with the old primary
intact; a row whose timestamp column did not change is still found (by its writer's xid).

Each test leaves us-east-1 primary and us-west-2 streaming, as it found them.
"""

from __future__ import annotations

import os
import signal
import uuid

import psycopg
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError

from activities.postgres.ctl import PgCtl
from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from tests.histories import record
from tests.lab_helpers import _async, _aux_pid, _exec, _failback, _fork, _lag_bytes, _pg, _primary, _startup_pid, \
    _until
from workflows.models import FailoverInput, SwitchoverInput


def _read_isolated(lab, region: str, query: str):
    """Read a stopped old primary's data without letting anyone write to it."""
    pg = lab.cfg.region(region).postgres
    ctl = PgCtl(pg)
    ctl.start_isolated()
    try:
        with psycopg.connect(host=pg.socket_dir, port=pg.port, dbname=pg.database, user=pg.user) as conn:
            return conn.execute(query).fetchall()
    finally:
        ctl.stop("fast")


async def test_unlisted_table_stops_failback_before_rewind(lab, client):
    """Tried as a new user would: 5 rows in a table not under conflicts: must never vanish."""
    original = _primary(lab)
    _exec(lab, original, "create table if not exists notes_unlisted (id int primary key, body text)")
    old, new = await _fork(lab, client, [
        "insert into notes_unlisted select g, 'only on the old primary' from generate_series(1, 5) g",
        ("insert into alerts (id, region, payload) values (%s, %s, '{}')", (9_100_000_001, "old"))])
    tli_before = int(PgCtl(lab.cfg.region(old).postgres).controldata()["Latest checkpoint's TimeLineID"]) \
        if not PgCtl(lab.cfg.region(old).postgres).running() else None

    with pytest.raises(WorkflowFailureError) as e:
        await _failback(lab, client, old)
    cause = e.value.cause
    while isinstance(cause, ActivityError):
        cause = cause.cause
    assert isinstance(cause, ApplicationError) and cause.type == "UnlistedTablesChanged", cause
    assert "public.notes_unlisted (insert 5)" in str(cause)
    # Not rewound: the old primary is stopped, still on its own timeline, and holds the rows.
    ctl = PgCtl(lab.cfg.region(old).postgres)
    assert not ctl.running()
    tli = int(ctl.controldata()["Latest checkpoint's TimeLineID"])
    assert tli_before is None or tli == tli_before
    assert tli < pg_status(lab.cfg.region(new).postgres).timeline
    assert _read_isolated(lab, old, "select count(*) from notes_unlisted")[0][0] == 5

    # Put the lab back: the operator's choice here is to throw the old primary away.
    lab.rebuild_standby(old)
    await _until(_async(lambda: pg_status(lab.cfg.region(old).postgres).receiver_status == "streaming"), 60,
                 f"{old} to stream again")
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                    target_region=original))).result()
    assert back.outcome == "succeeded"
    _exec(lab, original, "drop table notes_unlisted")


async def test_failback_keeps_an_update_that_bypassed_the_timestamp_trigger(lab, client):
    """An UPDATE with triggers off leaves updated_at as it was before the fork: only the
    writer's transaction id says the row changed after it."""
    original = _primary(lab)
    key = 9_100_000_100
    _exec(lab, original, ("insert into alerts (id, region, payload) values (%s, 'seed', '{\"v\": \"before\"}')",
                          (key,)))
    old, new = await _fork(lab, client, [
        "set session_replication_role = replica",
        ("update alerts set payload = '{\"v\": \"after, no trigger\"}' where id = %s", (key,)),
        "reset session_replication_role"])
    report = await _failback(lab, client, old)
    assert report.rewind is not None and report.rewind.method in ("pg_rewind", "pg_basebackup")
    assert _primary(lab) == original
    with psycopg.connect(lab.cfg.region(original).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select payload->>'v' from alerts where id = %s", (key,)).fetchone()[0] == \
            "after, no trigger"


async def test_failover_after_a_crash_it_did_not_cause_reports_the_real_loss(lab, client):
    """Tried as a new user would: the standby falls behind, only the primary's postmaster dies
    (its worker lives), forced failover. The report must count what the old WAL holds and
    never say "0 bytes, met"."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    # Freshly promoted, as after any switchover: until its first checkpoint completes its
    # control file names the previous timeline, and the loss must still be read on the right one.
    for to in (b, a):
        moved = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                         target_region=to))).result()
        assert moved.outcome == "succeeded"
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    receiver = _aux_pid(lab, b, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
        for i in range(200):
            conn.execute("insert into alerts (id, region, payload) values (%s, %s, '{}')", (9_200_000_000 + i, a))
    lab.postgres(a).kill()  # PostgreSQL only: its worker stays up
    startup_before = _startup_pid(lab, b)
    os.kill(receiver, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return _startup_pid(lab, b) != startup_before and pg_status(lab.cfg.region(b).postgres).role == "standby"
        except AssertionError:
            return False

    await _until(_async(restarted), 60, "the standby to restart")
    result = await (await start_move(client, lab.cfg, FailoverInput(
        service=lab.cfg.service, target_region=b, reason="crash test", force=True))).result()
    # The truth: which of the 200 acknowledged rows the new primary has.
    with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
        have = conn.execute("select count(*) from alerts where id between 9200000000 and 9200000199").fetchone()[0]
    rpo = result.rpo
    # Each row was its own transaction: the report counts exactly the ones missing.
    assert rpo.lost_commits is not None and rpo.lost_commits >= 200 - have, (have, rpo)
    if have < 200:
        assert rpo.lost_wal_bytes and rpo.lost_wal_bytes > 0, rpo
        # The loss window runs from the newest commit the new primary has to the newest it lacks;
        # "met" is judged on that measured window, never assumed from a 0.
        assert rpo.loss_window_s is not None and rpo.loss_window_s > 0
        assert rpo.met is (rpo.loss_window_s <= rpo.target_s)
    assert "own WAL" in rpo.wal_basis

    lab.rebuild_standby(a)
    await _until(_async(lambda: pg_status(lab.cfg.region(a).postgres).receiver_status == "streaming"), 60,
                 f"{a} to stream again")
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=a))
                  ).result()
    assert back.outcome == "succeeded" and back.rpo.lost_wal_bytes == 0 and back.rpo.met is True


async def test_an_unlisted_table_is_reconciled_last_write_wins_when_the_config_says_so(lab, client):
    """``unlisted_tables: last-write-wins``: a table nobody listed, changed on both sides after
    the fork, is reconciled on its primary key and updated_at, audited under its schema-qualified
    name, and the verify that follows the divergence reads those keys back on both sides. The
    activities run here with that config against the real lab (the lab's workers refuse, the
    default); the rewind and the switch back are the lab's own."""
    import dataclasses
    import uuid

    from temporalio.testing import ActivityEnvironment

    from activities.consistency.keys import compare_audited_keys
    from activities.failback import FailbackActivities, FailbackRequest, ReconcileRequest

    original = _primary(lab)
    # A uuid and a bytea column: the rows come from row_to_json as strings, which the apply's
    # typed COPY refused ("'str' object has no attribute 'int'"), failing the reconcile.
    _exec(lab, original, "create table if not exists notes_lww (id int primary key, body text, "
                         "updated_at timestamptz not null default now(), ref uuid not null default gen_random_uuid(), "
                         "blob bytea default '\\x00ff')",
          "insert into notes_lww (id, body) select g, 'seed' from generate_series(1, 4) g")
    old, new = await _fork(lab, client, [
        "update notes_lww set body = 'old', updated_at = now() where id in (1, 2)",
        "delete from notes_lww where id = 3",
        "insert into notes_lww (id, body) values (10, 'only on the old primary')"])
    # The survivor writes key 2 after the old primary did: last-write-wins keeps the survivor's.
    _exec(lab, new, "update notes_lww set body = 'new', updated_at = now() where id = 2")

    acts = FailbackActivities(lab.cfg.model_copy(update={"unlisted_tables": "last-write-wins"}))
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id=f"unlisted-{uuid.uuid4()}", workflow_run_id="run-1")
    req = FailbackRequest(region=old, primary_region=new, approved_by="test")
    divergence = env.run(acts.measure_divergence, req)
    rec = env.run(acts.reconcile_diverged_rows, ReconcileRequest(**req.model_dump(), divergence=divergence))
    assert rec.unlisted_reconciled == ["public.notes_lww"], rec
    t = next(x for x in rec.tables if x.table == "public.notes_lww")
    assert (t.strategy, t.updated, t.inserted, t.deleted, t.kept, t.conflicts) == \
        ("last-write-wins", 1, 1, 1, 1, 1), t
    with psycopg.connect(lab.cfg.region(new).postgres.dsn(), autocommit=True) as conn:
        rows = conn.execute("select id, body from notes_lww order by id").fetchall()
        audit = conn.execute("select (primary_key->>'id')::int, action from eagle_dr.conflict_audit "
                             "where workflow_id = %s and table_name = 'public.notes_lww' order by 1",
                             (env.info.workflow_id,)).fetchall()
    assert rows == [(1, "old"), (2, "new"), (4, "seed"), (10, "only on the old primary")], rows
    assert audit == [(1, "apply_loser"), (2, "keep_survivor"), (3, "delete"), (10, "insert_loser")], audit

    rewound = env.run(acts.rewind_old_primary, req)
    assert rewound.method
    await _until(_async(lambda: pg_status(lab.cfg.region(old).postgres).receiver_status == "streaming"), 60,
                 f"{old} to stream from {new}")
    vk = compare_audited_keys(lab.cfg.region(new).postgres.dsn(), lab.cfg.region(old).postgres.dsn(), new, old,
                              env.info.workflow_id, "run-1", ["public.notes_lww"], max_lag=30, cap=10,
                              beat=lambda _: None)
    assert [(x.table, x.keys, x.differences, x.missing) for x in vk.tables] == [("public.notes_lww", 4, 0, False)], vk

    env.run(acts.preserve_redis_and_rejoin, req)  # the old master's Redis follows again, as failback does
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                    target_region=original))).result()
    assert back.outcome == "succeeded"
    _exec(lab, original, "drop table notes_lww")


async def test_a_truncate_on_the_old_primary_is_refused_or_reconciled_never_dropped(lab, client):
    """Below wal_level logical (the lab runs replica) a TRUNCATE logs no record of its own, only
    the table's new file. A table truncated after the fork, nothing written since, showed no
    changed block: read as unchanged, the old primary's TRUNCATE was rewound away without a
    word. Now its new file marks it changed: refused as an unlisted table, or (last-write-wins)
    read in full, its rows deleted on the survivor and audited."""
    import dataclasses
    import uuid

    from temporalio.testing import ActivityEnvironment

    from activities.failback import FailbackActivities, FailbackRequest, ReconcileRequest

    original = _primary(lab)
    _exec(lab, original, "create table if not exists notes_trunc (id int primary key, body text, "
                         "updated_at timestamptz not null default now())",
          "truncate notes_trunc", "insert into notes_trunc (id, body) select g, 'seed' from generate_series(1, 4) g")
    old, new = await _fork(lab, client, ["truncate notes_trunc"])
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id=f"truncate-{uuid.uuid4()}", workflow_run_id="run-1")
    req = FailbackRequest(region=old, primary_region=new, approved_by="test")

    refusing = FailbackActivities(lab.cfg)  # unlisted_tables: refuse (the default)
    divergence = env.run(refusing.measure_divergence, req)
    with pytest.raises(ApplicationError) as e:
        env.run(refusing.reconcile_diverged_rows, ReconcileRequest(**req.model_dump(), divergence=divergence))
    assert e.value.type == "UnlistedTablesChanged" and "public.notes_trunc" in str(e.value), e.value

    acts = FailbackActivities(lab.cfg.model_copy(update={"unlisted_tables": "last-write-wins"}))
    rec = env.run(acts.reconcile_diverged_rows, ReconcileRequest(**req.model_dump(), divergence=divergence))
    t = next(x for x in rec.tables if x.table == "public.notes_trunc")
    assert (t.read_mode, t.deleted, t.inserted, t.updated) == ("full", 4, 0, 0), t
    assert "created on the loser after the fork" in t.full_read_why, t
    with psycopg.connect(lab.cfg.region(new).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from notes_trunc").fetchone()[0] == 0
        audit = conn.execute("select count(*) from eagle_dr.conflict_audit where workflow_id = %s and "
                             "table_name = 'public.notes_trunc' and action = 'delete'",
                             (env.info.workflow_id,)).fetchone()[0]
    assert audit == 4

    env.run(acts.rewind_old_primary, req)
    await _until(_async(lambda: pg_status(lab.cfg.region(old).postgres).receiver_status == "streaming"), 60,
                 f"{old} to stream from {new}")
    env.run(acts.preserve_redis_and_rejoin, req)
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                    target_region=original))).result()
    assert back.outcome == "succeeded"
    _exec(lab, original, "drop table notes_trunc")


async def test_failback_does_not_switch_back_to_a_region_whose_data_was_not_verified(lab, client):
    """The full verify after the rewind did not end green (here it fails: its consistency
    check's workflow id is taken, so the check cannot start; a refused or timed-out repair ends
    the same way). The switch back must not happen: made the primary, the region would serve
    rows nobody compared, or rows known to differ, as the truth. It stays a streaming standby,
    the survivor the primary, and the run says what to do."""
    import uuid

    from workflows.failback import FailbackInput, FailbackWorkflow

    original = _primary(lab)
    old, new = await _fork(lab, client, [
        ("insert into alerts (id, region, payload) values (%s, %s, '{}')", (9_100_000_777, "old"))])
    wid = f"failback-{uuid.uuid4()}"
    blocker = await client.start_workflow("ConsistencyCheckWorkflow", {}, id=f"{wid}-verify-check",
                                          task_queue=f"nobody-polls-{uuid.uuid4().hex[:8]}")
    try:
        res = await client.execute_workflow(
            FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old, verify="full"),
            id=wid, task_queue=lab.cfg.temporal.control_task_queue)
    finally:
        await blocker.terminate("test over")

    assert res.outcome == "degraded" and res.switchover is None and res.verify is None, res
    verify = next(s for s in res.steps if s["name"] == f"verify {old}'s data against {new}")
    assert verify["status"] == "failed", verify
    step = next(s for s in res.steps if s["name"] == f"switch over back to {old}")
    assert step["status"] == "skipped" and "not verified identical" in step["detail"], step
    assert any(n.startswith(f"switch back to {old} not done") and f"eagle-dr check --regions {new},{old}" in n
               for n in res.notes), res.notes
    assert pg_status(lab.cfg.region(new).postgres).role == "primary"
    assert pg_status(lab.cfg.region(old).postgres).receiver_status == "streaming"
    await record(client.get_workflow_handle(wid), "failback-unverified-no-switch-back")

    # Put the lab back.
    _exec(lab, new, "delete from alerts where id = 9100000777")
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                    target_region=original))).result()
    assert back.outcome == "succeeded"


async def test_a_redis_that_cannot_rejoin_degrades_the_failback_and_a_second_run_repairs_it(lab, client):
    """Past the point of no return PostgreSQL is rewound; then the primary region's Redis turns
    out not to be a master (here it follows an address nobody answers on; a Sentinel or a
    person can leave it so). Re-attaching the old Redis to it would chain or loop them with no
    master. The run must not fail as if nothing was done, nor re-point Redis: it reports the
    Redis part degraded with its repair, keeps PostgreSQL's part, and does not switch back.
    The repair it names (failback again, once the Redis is a master) finishes the job."""
    import socket
    import uuid

    from activities.redis.status import client as redis_client
    from activities.redis.status import redis_status, sentinel_client
    from workflows.failback import FailbackInput, FailbackWorkflow

    original = _primary(lab)
    old, new = await _fork(lab, client, [
        ("insert into alerts (id, region, payload) values (%s, %s, '{}')", (9_100_000_778, "old"))])
    n_cfg = lab.cfg.region(new).redis
    sentinels = {(ep.host, ep.port): (r.redis, ep) for r in lab.cfg.regions for ep in r.redis.sentinels}

    def down_after(ms: int) -> None:
        # Sentinels count a master that reports itself a replica as down after down-after + 20 s,
        # and would fail it over: not the race this test is about.
        for cfg, ep in sentinels.values():
            sentinel_client(cfg, ep).execute_command("SENTINEL", "SET", cfg.master_name,
                                                     "down-after-milliseconds", str(ms))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    down_after(600_000)
    try:
        redis_client(n_cfg).replicaof("127.0.0.1", nobody)
        wid = f"failback-{uuid.uuid4()}"
        res = await client.execute_workflow(
            FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old), id=wid,
            task_queue=lab.cfg.temporal.control_task_queue)
        assert res.outcome == "degraded", res
        step = next(s for s in res.steps if s["name"] == "preserve and re-attach Redis")
        assert step["status"] == "failed" and f"{n_cfg.host}:{n_cfg.port} is not a master" in step["detail"], step
        assert res.redis is not None and res.redis.failed and not res.redis.rejoined, res.redis
        assert any(n.startswith(f"re-attaching {old}'s Redis to {new}'s failed") and
                   f"eagle-dr failback --region {old}" in n for n in res.notes), res.notes
        switch = next(s for s in res.steps if s["name"] == f"switch over back to {old}")
        assert switch["status"] == "skipped" and res.switchover is None, switch
        # PostgreSQL's part stands: rewound and streaming, its row kept; the primary unchanged.
        assert res.reconciliation is not None and res.rewind is not None
        assert pg_status(lab.cfg.region(new).postgres).role == "primary"
        assert pg_status(lab.cfg.region(old).postgres).receiver_status == "streaming"
        with _pg(lab, new) as conn:
            assert conn.execute("select count(*) from alerts where id = 9100000778").fetchone()[0] == 1
        # As the test left it: the runbook re-pointed nothing.
        assert (st := redis_status(n_cfg)).role == "slave" and st.master == f"127.0.0.1:{nobody}", st
        await record(client.get_workflow_handle(wid), "failback-redis-not-rejoined-degrades")

        # The repair the run named.
        redis_client(n_cfg).replicaof("NO", "ONE")
        again = await _failback(lab, client, old)
        assert again.outcome == "succeeded" and again.divergence is None, again
        assert again.redis is not None and again.redis.rejoined and not again.redis.failed, again.redis
        assert again.switchover is not None and again.switchover.outcome == "succeeded"
    finally:
        if redis_status(n_cfg).master == f"127.0.0.1:{nobody}":
            redis_client(n_cfg).replicaof("NO", "ONE")
        down_after(5_000)
    assert _primary(lab) == original == old
    _exec(lab, old, "delete from alerts where id = 9100000778")


async def test_a_newer_move_seen_at_the_redis_step_stops_the_failback(lab, client):
    """A failback past its point of no return finds, at its Redis step, that a newer move has
    recorded a higher DR epoch (here in the primary region's Redis only, so the rewind before
    it still goes ahead). That move owns the service now: the failback must stop acting
    (StaleEpoch), not report a degraded Redis and carry on to its switch back."""
    from activities.redis import epoch as redis_epochs
    from activities.redis.status import client as redis_client
    from workflows.failback import FailbackInput, FailbackWorkflow

    original = _primary(lab)
    old, new = await _fork(lab, client, [
        ("insert into alerts (id, region, payload) values (%s, %s, '{}')", (9_100_000_780, "old"))])
    n = redis_client(lab.cfg.region(new).redis)
    key = redis_epochs.key(lab.cfg.service)
    held = n.hgetall(key)
    n.hset(key, mapping={"epoch": int(held.get("epoch", 0)) + 5, "workflow_id": "test-a-newer-move",
                         "run_id": "test-run"})
    try:
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow(
                FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old),
                id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
        cause = e.value.cause
        while cause is not None and not (isinstance(cause, ApplicationError) and cause.type == "StaleEpoch"):
            cause = cause.cause
        assert cause is not None and "test-a-newer-move" in cause.message, e.value
        assert pg_status(lab.cfg.region(new).postgres).role == "primary"
    finally:
        n.delete(key)
        if held:
            n.hset(key, mapping=held)
    # The repair: failback again (PostgreSQL already streams; Redis re-attached), and back.
    again = await _failback(lab, client, old)
    assert again.outcome == "succeeded" and again.redis is not None and again.redis.rejoined, again
    assert _primary(lab) == original == old
    _exec(lab, old, "delete from alerts where id = 9100000780")
