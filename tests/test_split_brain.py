"""Split-brain resolution and the rewind fallback, on the real lab.

Runs after test_runbooks.py (file order), from whatever topology that left: one primary and
a streaming standby. Each test leaves the same shape behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from activities.postgres.divergence import fork_between
from activities.postgres.lsn import lsn_to_int
from activities.postgres.rewind import copiers, rewind_marker
from activities.postgres.status import pg_status
from activities.redis.status import client as redis_client
from activities.redis.status import redis_status
from activities.split_brain import detect
from eagle_dr.launch import start_move
from lab.processes import kill_tree, read_pid, wait_gone
from tests.histories import record
from tests.lab_helpers import _async, _awaiting, _hold_pg_rewind, _lag_bytes, _primary, _progress, _until
from workflows.failback import FailbackInput, FailbackWorkflow
from workflows.models import ApprovalDecision, ApprovalPolicy, FailoverInput
from workflows.monitor import MonitorInput, MonitorWorkflow
from workflows.runbook import move_id
from workflows.split_brain import SplitBrainInput, SplitBrainWorkflow


def _sql(lab, region: str, *statements: tuple) -> None:
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        for stmt in statements:
            conn.execute(*stmt) if isinstance(stmt, tuple) else conn.execute(stmt)


def _one(lab, region: str, query: str, *args):
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        row = conn.execute(query, args).fetchone()
    return row[0] if row else None


async def _start_split_brain(client, lab, **kw):
    return await client.start_workflow(SplitBrainWorkflow.run, SplitBrainInput(service=lab.cfg.service, **kw),
                                       id=move_id(lab.cfg.service), task_queue=lab.cfg.temporal.control_task_queue)


async def _streams_from(lab, standby: str, primary: str) -> None:
    up = lab.cfg.region(primary).postgres

    def ok():
        st = pg_status(lab.cfg.region(standby).postgres)
        return st.role == "standby" and st.receiver_status == "streaming" and st.upstream == f"{up.host}:{up.port}"

    await _until(_async(ok), 60, f"{standby} to stream from {primary}")


def _rogue_master(lab, region: str):
    """Make the region's Redis a second master, the way a partition does: the Sentinels lose
    track of it (SENTINEL RESET re-learns replicas from the master, which no longer lists it).
    Otherwise a Sentinel may turn it back into a replica within a second, discarding its keys,
    before any runbook could act: the race this test is not about."""
    from activities.redis.status import sentinel_client

    rc = redis_client(lab.cfg.region(region).redis)
    rc.replicaof("NO", "ONE")
    cfg = lab.cfg.region(region).redis
    for ep in cfg.sentinels:
        sentinel_client(cfg, ep).execute_command("SENTINEL", "RESET", cfg.master_name)
    return rc


async def test_redis_split_brain_keeps_the_losers_unique_keys(lab, client):
    """Two Redis masters, PostgreSQL healthy: the database's primary region survives, the
    loser's keys that the survivor lacks are kept in its S3 snapshot and reported (the lab's
    cache sets redis_reconcile: none: the survivor may have deleted them on purpose), then it
    replicates again."""
    survivor = _primary(lab)
    loser = lab.cfg.other(survivor).name
    s = redis_client(lab.cfg.region(survivor).redis)
    tag = uuid.uuid4().hex[:8]
    l_ = _rogue_master(lab, loser)
    l_.set(f"sb:{tag}:only-loser", "L")
    l_.set(f"sb:{tag}:both", "L")
    s.set(f"sb:{tag}:both", "S")
    handle = await _start_split_brain(client, lab)
    result = await handle.result()
    await record(handle, "split_brain-redis")

    assert result.outcome == "resolved", result.steps
    assert any(f.startswith("redis: 2 masters") for f in result.findings)
    assert result.choice.survivor == survivor and result.choice.rule == "single-primary"
    assert result.reconciliation is None and result.rewind is None
    assert f"sb:{tag}:only-loser" in result.redis.unique_sample
    assert result.redis.reconcile == "none" and f"sb:{tag}:only-loser" in result.redis.skipped_sample
    assert s.get(f"sb:{tag}:only-loser") is None  # not copied back: in the snapshot, reported
    assert s.get(f"sb:{tag}:both") == "S"  # a key both sides hold: the survivor's value stands...
    assert f"sb:{tag}:both" in result.redis.differing_sample  # ...and the loser's is reported
    bucket = lab.cfg.region(loser).s3
    key = result.redis.snapshot.removeprefix(f"s3://{bucket.bucket}/")
    from activities.s3 import client as s3_client

    assert s3_client(bucket).head_object(Bucket=bucket.bucket, Key=key)["ContentLength"] > 0
    # Two snapshots within one second (LASTSAVE alone cannot tell them apart) both finish.
    from activities.redis.failback import snapshot_to_s3

    for i in range(2):
        assert snapshot_to_s3(lab.cfg.region(loser).redis, bucket, f"test/{tag}-{i}.rdb", timeout_s=10)
    st = redis_status(lab.cfg.region(loser).redis)
    assert st.role == "slave"
    await _until(_async(lambda: l_.get(f"sb:{tag}:only-loser") is None and l_.get(f"sb:{tag}:both") == "S"), 30,
                 "the loser to resync from the survivor")
    assert not detect(lab.cfg).split


async def test_a_cancel_while_the_epoch_is_recorded_reports_the_epoch_kept(lab, client):
    """Split brain's one write before its point of no return is the survivor's new DR epoch.
    Cancelled while that write waits (here on a lock), the run must not report "nothing had
    been changed": the write lands when the lock goes, and an epoch is never taken back."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import CancelledError

    from activities.postgres.epoch import SCHEMA

    survivor = _primary(lab)
    loser = lab.cfg.other(survivor).name
    _rogue_master(lab, loser)
    try:
        with psycopg.connect(lab.cfg.region(survivor).postgres.dsn(), autocommit=True) as lock:
            lock.execute(SCHEMA)
            lock.execute("begin")
            lock.execute("lock table eagle_dr.dr_epoch in exclusive mode")
            handle = await _start_split_brain(client, lab)

            def waits() -> bool:
                return _one(lab, survivor, "select count(*) from pg_locks where not granted "
                                           "and relation = 'eagle_dr.dr_epoch'::regclass") > 0
            await _until(_async(waits), 60, "the epoch's write to wait on the lock")
            await handle.cancel()
            with pytest.raises(WorkflowFailureError) as e:
                await handle.result()
            assert isinstance(e.value.cause, CancelledError), e.value.cause
            meta = await handle.query("__temporal_workflow_metadata")
            details = (meta.get("currentDetails") if isinstance(meta, dict) else
                       getattr(meta, "current_details", "")) or ""
            assert f"kept: {survivor}'s DR epoch may have been raised to " in details, details
            assert "nothing had been changed" not in details and "LEFT AS FOUND" in details, details
            lock.execute("commit")
    finally:
        # The Redis split is still there, as the cancel said: resolve it.
        result = await (await _start_split_brain(client, lab)).result()
        assert result.outcome == "resolved", result.steps


async def test_a_node_that_does_not_answer_makes_the_outcome_unknown_not_no_split_brain(lab, client, capsys):
    """A node detection cannot reach may be a second writer (a partition hides exactly that):
    "no split brain" would be a claim nobody checked. The standby's PostgreSQL stopped stands in
    for it."""
    from activities.postgres.ctl import PgCtl

    standby = lab.cfg.other(_primary(lab)).name
    ctl = PgCtl(lab.cfg.region(standby).postgres)
    ctl.stop("fast")
    try:
        handle = await _start_split_brain(client, lab)
        result = await handle.result()
        # Its plan says the same, never "no split brain" (nor, with the writer unseen, any
        # advice about a fence: lifting one then would make two writers).
        from workflows.dry_run import PlanInput, PlanWorkflow

        plan = await client.execute_workflow(
            PlanWorkflow.run, PlanInput(runbook="split-brain", input={"service": lab.cfg.service}),
            id=f"dr-plan-test-{uuid.uuid4().hex[:8]}", task_queue=lab.cfg.temporal.control_task_queue)
    finally:
        ctl.start()
    assert plan.steps[0].action.startswith("nothing: split brain unknown"), plan.steps
    assert plan.notes == [n for n in result.notes if n.startswith("cannot tell")] and plan.notes, plan.notes
    assert result.outcome == "unknown" and result.findings == [], result
    assert f"{standby}/postgres" in result.detection.unreachable
    assert any(n.startswith(f"cannot tell: {standby}/postgres did not answer") for n in result.notes), result.notes
    detect_step = next(s for s in result.steps if s.name == "detect")
    assert detect_step.detail == f"none seen, but {standby}/postgres did not answer", detect_step
    # What `eagle-dr split-brain` prints of it: the note saying what to do, not a pointer to it.
    from eagle_dr.cli import _split_brain_report

    capsys.readouterr()
    _split_brain_report(result)
    shown = " ".join(capsys.readouterr().out.split())
    assert "split brain unknown" in shown and f"note: cannot tell: {standby}/postgres did not answer" in shown, shown
    await record(handle, "split-brain-unknown-when-a-node-is-silent")
    await _until(_async(lambda: pg_status(lab.cfg.region(standby).postgres).receiver_status == "streaming"), 60,
                 f"{standby} to stream again")


async def test_split_brain_resolution_keeps_both_sides_writes(lab, client):
    """A real split brain: the standby promoted while the primary keeps taking writes, with
    divergent rows on both sides for every strategy. The loser's worker is killed while the
    reconciliation waits on a lock and again during the rewind; the run still ends with one
    primary, every write kept or resolved as its strategy says, one audit row per conflict."""
    a = _primary(lab)  # routing names it active: it survives
    b = lab.cfg.other(a).name
    east = "us-east-1"
    n = 9_100_000_000 + (uuid.uuid4().int % 10**6) * 100
    c, d, e, ia, ib, r, s, lg, la, lb, m = (n + i for i in range(11))
    _sql(lab, a,
         ("insert into alerts (id, region, payload) values (%s, 'seed', '{}'), (%s, 'seed', '{}'), "
          "(%s, 'seed', '{}')", (c, d, e)),
         ("insert into alert_rules (id, name, threshold, enabled) values (%s, 'seed', 1, true)", (r,)),
         ("insert into subscriptions (id, user_id, channel) values (%s, 'u', 'seed')", (s,)),
         ("insert into audit_log (id, actor, action) values (%s, 'seed', 'seed')", (lg,)),
         ("insert into metrics_snapshots (id, metric, value) values (%s, 'cpu', 0)", (m,)))
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    await _until(_async(lambda: _one(lab, b, "select count(*) from metrics_snapshots where id = %s", m) == 1), 30,
                 "the seed rows to replay")
    tli_before = pg_status(lab.cfg.region(b).postgres).timeline
    # b pinned to the timeline it follows, as a standby rebuilt from a backup is (rebuild.py):
    # the pin outlives the promotion, and the loser held as a standby of nothing must still
    # start (it waited forever for WAL of the pinned timeline, and the preview hung).
    _sql(lab, b, f"alter system set recovery_target_timeline = '{tli_before}'")
    _sql(lab, b, "select pg_promote()")  # the split: b writable too, a still writable
    # Not tli_before + 1: a promotion takes one past the newest history file it can find, and an
    # earlier test's abandoned promotion (a loser later rewound) leaves its file in the archive.
    loser_tli = pg_status(lab.cfg.region(b).postgres).timeline
    assert loser_tli > tli_before, (loser_tli, tli_before)
    # The survivor-to-be writes first, the loser after: the loser's versions are newer.
    _sql(lab, a,
         ("update alerts set payload = '{\"side\": \"a\"}' where id = %s", (c,)),
         ("insert into alerts (id, region, payload) values (%s, 'a', '{}')", (ia,)),
         ("delete from alerts where id = %s", (e,)),
         ("update alert_rules set name = 'a', threshold = 10.5, enabled = false where id = %s", (r,)),
         ("update subscriptions set channel = 'a' where id = %s", (s,)),
         ("update audit_log set action = 'a-edit' where id = %s", (lg,)),
         ("insert into audit_log (id, actor, action) values (%s, 'a', 'a')", (la,)),
         ("update metrics_snapshots set value = 1 where id = %s", (m,)))
    _sql(lab, b,
         ("update alerts set payload = '{\"side\": \"b\"}' where id = %s", (c,)),
         ("insert into alerts (id, region, payload) values (%s, 'b', '{}')", (ib,)),
         ("delete from alerts where id = %s", (d,)),
         ("update alert_rules set name = 'b', threshold = 20.25, enabled = true where id = %s", (r,)),
         ("update subscriptions set channel = 'b' where id = %s", (s,)),
         ("update audit_log set action = 'b-edit' where id = %s", (lg,)),
         ("insert into audit_log (id, actor, action) values (%s, 'b', 'b')", (lb,)),
         ("update metrics_snapshots set value = 2 where id = %s", (m,)))
    loser_redis = _rogue_master(lab, b)
    loser_redis.set(f"sb:{n}:only-b", "b")
    assert sorted(detect(lab.cfg).postgres_primaries) == sorted([a, b])

    handle = await _start_split_brain(client, lab, reason="test split", approval=ApprovalPolicy(
        required=True, timeout_seconds=600))
    try:
        await _until(lambda: _awaiting(handle), 60, "the review before applying")
    except AssertionError:
        p = await _progress(handle)
        raise AssertionError(f"no review; {(await handle.describe()).status}: "
                             f"{[(x.name, x.status, x.detail) for x in p.steps] if p else None}") from None
    review = await handle.query(SplitBrainWorkflow.review)
    by_table = {t.table: t for t in review.tables}
    assert review.preview and by_table["alerts"].conflicts == 1 and by_table["audit_log"].flagged == 1
    assert any(x["action"] == "flag" for x in by_table["audit_log"].sample)
    progress = await _progress(handle)
    preview_step = next(st for st in progress.steps if st.name == "preview the reconciliation")
    assert "would be written" in preview_step.detail and "5 conflicts" in preview_step.detail
    # The preview wrote nothing.
    assert _one(lab, a, "select payload->>'side' from alerts where id = %s", c) == "a"

    # Kill the loser's worker while the reconciliation waits on a lock on the survivor.
    blocker = psycopg.connect(lab.cfg.region(a).postgres.dsn())
    blocker.execute("lock table alerts in access exclusive mode")
    try:
        await handle.execute_update(SplitBrainWorkflow.approve, ApprovalDecision(approver="dana", decision="approve"))
        await _until(_async(lambda: _one(
            lab, a, "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and pid <> %s "
            "and query ilike '%%alerts%%'", blocker.info.backend_pid) > 0), 60, "the reconciliation to wait on the lock")
        assert kill_tree(read_pid(lab.worker_pidfile(b)))
    finally:
        blocker.rollback()
        blocker.close()
    lab.start_worker(b)

    # Kill it again during the rewind: catch its pg_rewind and freeze it, then kill the worker
    # alone, so the frozen pg_rewind lives on. The retry must end that orphan before it
    # touches the data directory again.
    b_data = lab.cfg.region(b).postgres.data_dir
    orphan = await asyncio.to_thread(_hold_pg_rewind, b_data)
    assert orphan, "pg_rewind never ran"
    worker = read_pid(lab.worker_pidfile(b))
    os.kill(worker, signal.SIGKILL)
    wait_gone([worker])
    lab.start_worker(b)

    result = await handle.result()
    # split_brain-resolution.json (before the verify step) and split_brain-verify-by-data.json
    # (before verify: divergence) stay: running resolutions of those versions must replay.
    await record(handle, "split_brain-verify-divergence")
    assert result.outcome == "resolved", [(x.name, x.status, x.detail) for x in result.steps]
    # The loser's data checked where it diverged: every key the reconcile audited (the worker
    # kills above retried it), identical on the survivor and the rewound loser.
    # This run's rows only: every move shares the workflow id dr-move-<service>, and the audit
    # keeps earlier runs' rows (another test's failback in this session, say).
    run_id = (await handle.describe()).run_id
    with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
        audited = conn.execute("select count(*) from eagle_dr.conflict_audit where workflow_id = %s and run_id = %s",
                               (handle.id, run_id)).fetchone()[0]
    vk = result.verify_keys
    assert result.verify is None and vk is not None and vk.differences == 0, (result.verify, vk)
    assert vk.keys == audited >= 5, (vk, audited)  # the five conflicts at least
    # The result carries every step of the run (its report's timeline), not only the first.
    assert [x.name for x in result.steps][:2] == ["detect", "decide the survivor"] and len(result.steps) > 4, \
        [x.name for x in result.steps]
    assert orphan not in copiers(b_data)
    # That pg_rewind was stopped at an unknown point of its copy: the retry must not rewind the
    # partly rewound directory again (it reads as the old primary still, and can copy too
    # little), but re-clone it, and say why.
    assert result.rewind.method == "pg_basebackup" and "was interrupted" in result.rewind.fallback_reason, \
        result.rewind
    assert not rewind_marker(Path(b_data)).exists()
    assert result.choice.survivor == a and result.choice.loser == b and result.choice.rule == "active-region"
    assert result.approval.outcome == "approved" and result.approval.approver == "dana"
    assert result.divergence.fork.loser_timeline == loser_tli > result.divergence.fork.old_timeline
    assert result.divergence.lost.lost_commits >= 8
    assert result.single_writer_at <= result.resolved_at

    # One primary; the loser streams from it; Redis has one master; routing agrees.
    assert _primary(lab) == a
    await _streams_from(lab, b, a)
    assert not detect(lab.cfg).split
    # The loser's own Redis key is not copied back (the lab's cache: redis_reconcile none): it is
    # in the snapshot and reported.
    assert redis_client(lab.cfg.region(a).redis).get(f"sb:{n}:only-b") is None
    assert result.redis.snapshot and f"sb:{n}:only-b" in result.redis.skipped_sample

    # Every write from both sides is there, or resolved as its table's strategy says.
    q = lambda sql, *args: _one(lab, a, sql, *args)  # noqa: E731
    assert q("select payload->>'side' from alerts where id = %s", c) == "b"  # last-write-wins: b wrote last
    assert q("select count(*) from alerts where id in (%s, %s)", ia, ib) == 2  # inserts on both sides
    assert q("select count(*) from alerts where id in (%s, %s)", d, e) == 0  # each side's delete
    # (fractional thresholds: numeric must travel as Decimal, a float would not COPY back)
    version = {a: ("a", Decimal("10.5"), False), b: ("b", Decimal("20.25"), True)}
    assert q("select name from alert_rules where id = %s", r) == "b"  # merge: non-priority fields from the newer
    assert q("select threshold from alert_rules where id = %s", r) == version[east][1]  # threshold: east first
    west = lab.cfg.other(east).name
    assert q("select enabled from alert_rules where id = %s", r) == version[west][2]  # enabled: west first
    assert q("select channel from subscriptions where id = %s", s) == version[east][0]  # source-priority: east
    assert q("select action from audit_log where id = %s", lg) == "a-edit"  # append-only: flagged, survivor kept
    assert q("select count(*) from audit_log where id in (%s, %s)", la, lb) == 2
    assert q("select value from metrics_snapshots where id = %s", m) == 2  # freshness: both fresh, newer wins

    # Exactly one audit row per conflict, whatever the retries did.
    with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
        rows = conn.execute("select table_name, primary_key->>'id', action, approved_by from eagle_dr.conflict_audit "
                            "where workflow_id = %s and conflict order by 1", (handle.id,)).fetchall()
    assert sorted((t, int(k)) for t, k, _, _ in rows) == sorted(
        [("alerts", c), ("alert_rules", r), ("subscriptions", s), ("audit_log", lg), ("metrics_snapshots", m)])
    assert {t: act for t, _, act, _ in rows}["audit_log"] == "flag"
    assert {who for *_, who in rows} == {"dana"}
    conflicts = sum(t.conflicts for t in result.reconciliation.tables)
    assert conflicts == 5
    # Only alerts has a creation column; the report says what the others could not tell.
    assert {t.table: t.created_column for t in result.reconciliation.tables}["alerts"] == "created_at"
    assert any(x.startswith("1 changes were flagged for a human") for x in result.notes), result.notes
    blind = next(x for x in result.notes if x.startswith("no creation column"))
    assert "alert_rules" in blind and "alerts," not in blind


async def test_monitor_sees_a_split_brain_and_resolves_it(lab, client):
    """The monitor's split-brain watch: someone promotes the standby by hand and it takes a
    write; the monitor notices within two rounds and the runbook keeps that write."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    # An automatic failover a moment ago (its cooldown running): an old primary back writable
    # after one is the likeliest split brain, and a failover's cooldown must not hold it.
    handle = await client.start_workflow(MonitorWorkflow.run, MonitorInput(
        service=lab.cfg.service, interval_seconds=0.5, auto_resolve_split_brain=True, stop_after_failover=True,
        last_auto_move_at=datetime.now(timezone.utc)),
        id=f"monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)

    async def watching():
        p = await _progress(handle)
        return p is not None and p.target_region == a

    await _until(watching, 30, "the monitor to watch the primary")
    row = 9_300_000_000 + uuid.uuid4().int % 10**6
    # A segment switch right before the fork: the fork's own segment holds no commit before
    # it, and the time of the fork must come from an earlier one (or the insert below would
    # look older than the fork, as if the survivor had deleted it).
    _sql(lab, a, ("insert into alerts (id, region, payload) values (%s, 'seed', '{}')", (row + 1,)),
         "select pg_switch_wal()")
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    _sql(lab, b, "select pg_promote()")
    await _until(_async(lambda: not pg_status(lab.cfg.region(b).postgres).read_only and
                        pg_status(lab.cfg.region(b).postgres).role == "primary"), 30, "the promotion")
    _sql(lab, b, ("insert into alerts (id, region, payload) values (%s, %s, '{}')", (row, b)))
    try:
        # b's worker must leave b to the monitor: its superseded-primary check once fenced it
        # (routing names a active), the split vanished from detection and this waited forever.
        report = await asyncio.wait_for(handle.result(), 240)
    finally:
        with contextlib.suppress(Exception):  # ended already, as it should have
            await handle.terminate("test over: a monitor left running would resolve later tests' splits")
    await record(handle, "monitor-split-brain")
    sb = report.split_brain
    assert sb is not None and sb.outcome == "resolved", sb
    assert sb.choice.survivor == a and sb.choice.loser == b
    assert report.first_failure_at is not None and sb.detected_at == report.first_failure_at
    assert sb.divergence.lost.last_commit_before_fork_at is not None, sb.divergence
    # the loser's write is kept
    assert _one(lab, a, "select region from alerts where id = %s", row) == b, (sb.divergence, sb.reconciliation,
                                                                               [(x.name, x.detail) for x in sb.steps])
    await _streams_from(lab, b, a)
    assert not detect(lab.cfg).split


async def test_the_monitor_leaves_a_split_brain_alone_within_the_cooldown_of_its_last_attempt(lab, client):
    """The cooldown after an automatic resolution holds the next, as a failover's holds the
    next failover: the monitor reported a failed resolution (a node left for a human to fence)
    and started another one the next round, while that human worked. Within the cooldown it
    says so and starts nothing; past it, it resolves."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    move = client.get_workflow_handle(move_id(lab.cfg.service))
    before = await _run_of(move)
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    _sql(lab, b, "select pg_promote()")
    # Started after the split, its cooldown from now: the split is seen within seconds of it.
    handle = await client.start_workflow(MonitorWorkflow.run, MonitorInput(
        service=lab.cfg.service, interval_seconds=0.5, auto_resolve_split_brain=True, stop_after_failover=True,
        last_split_attempt_at=datetime.now(timezone.utc), auto_failover_cooldown_seconds=40),
        id=f"monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    try:
        async def refused():
            st = await handle.query(MonitorWorkflow.monitor_state)
            return [f for f in st.findings if "SPLIT BRAIN" in f and "automatic split-brain resolution refused: "
                    "within the cooldown" in f and "eagle-dr split-brain" in f]

        assert await _until(refused, 35, "the monitor to report the split brain and leave it")
        assert await _run_of(move) == before  # no resolution started
        report = await asyncio.wait_for(handle.result(), 240)  # past the cooldown: resolved
    finally:
        with contextlib.suppress(Exception):
            await handle.terminate("test over: a monitor left running would resolve later tests' splits")
    await record(handle, "monitor-split-brain-after-cooldown")
    sb = report.split_brain
    assert sb is not None and sb.outcome == "resolved" and sb.choice.survivor == a, sb
    await _streams_from(lab, b, a)
    assert not detect(lab.cfg).split


async def _run_of(handle) -> str | None:
    """The id of the newest run under ``handle``'s workflow id (None: none yet)."""
    try:
        return (await handle.describe()).run_id
    except Exception:  # noqa: BLE001 - no run under that id yet
        return None


async def test_failback_falls_back_to_pg_basebackup_when_rewind_is_impossible(lab, client):
    """The WAL pg_rewind needs (back to the last common checkpoint) is gone from the old
    primary: failback re-clones it with pg_basebackup and says why."""
    old = _primary(lab)
    new = lab.cfg.other(old).name
    # The last checkpoint before the fork lands two WAL segments before it.
    _sql(lab, old, "checkpoint", "insert into audit_log (id, actor, action) values (9200000000001, 't', 'x')",
         "select pg_switch_wal()", "insert into audit_log (id, actor, action) values (9200000000002, 't', 'x')",
         "select pg_switch_wal()", "insert into audit_log (id, actor, action) values (9200000000003, 't', 'x')")
    await _until(_async(lambda: _lag_bytes(lab, old) == 0), 30, "the standby to catch up")
    lab.kill_region(old)
    failover = await (await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=new,
                                                                      reason="rewind fallback test"))).result()
    assert failover.outcome == "succeeded"
    fork = fork_between(lab.cfg.region(new).postgres, lab.cfg.region(old).postgres)
    lab.heal_region(old)

    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(
        service=lab.cfg.service, region=old, switch_back=False,
        reconcile_approval=ApprovalPolicy(required=True, timeout_seconds=600)),
        id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    await _until(lambda: _awaiting(handle), 60, "the review (the old primary is stopped by then)")
    lsn = lsn_to_int(fork.fork_lsn)
    fork_segment = f"{lsn >> 32:08X}{(lsn & 0xFFFFFFFF) >> 24:08X}"
    wal = Path(lab.cfg.region(old).postgres.data_dir) / "pg_wal"
    removed = [f for f in wal.iterdir() if len(f.name) == 24 and f.name[8:] < fork_segment]
    for f in removed:
        f.unlink()
    assert removed
    await handle.execute_update(FailbackWorkflow.approve, ApprovalDecision(approver="erin", decision="approve"))
    report = await handle.result()
    await record(handle, "failback-reviewed-basebackup")
    assert report.rewind.method == "pg_basebackup", report.rewind
    assert list(report.rewind.phases) == ["stop", "source checks", "checkpoint", "pg_basebackup", "start",
                                          "until streaming"], report.rewind.phases
    assert report.rewind.fallback_reason and "pg_wal" in report.rewind.fallback_reason, report.rewind
    assert any("pg_rewind was impossible" in n for n in report.notes)
    await _streams_from(lab, old, new)
    # What the old primary had before the fork is all on the rebuilt standby.
    await _until(_async(lambda: _one(lab, old, "select count(*) from audit_log where id between 9200000000001 and "
                                              "9200000000003") == 3), 30, "the rebuilt standby to replay")

    # Running it again is harmless: the region already streams, so nothing is stopped or rewound.
    again = await client.execute_workflow(FailbackWorkflow.run, FailbackInput(
        service=lab.cfg.service, region=old, switch_back=False), id=f"failback-{uuid.uuid4()}",
        task_queue=lab.cfg.temporal.control_task_queue)
    assert again.rewind is None and again.divergence is None
    assert [s["status"] for s in again.steps if s["name"].startswith(("measure", "reconcile", "rewind"))] == \
        ["skipped"] * 3
    await _streams_from(lab, old, new)
