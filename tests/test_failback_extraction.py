"""Failback reads only what diverged, on the real lab: a configured table the old primary did
not touch after the fork is not read at all, a touched one only in the blocks its post-fork WAL
names; deletions are still found on both sides, and the reads add no WAL to the old primary
(nothing more for pg_rewind to copy).

Leaves us-east-1 primary and us-west-2 streaming, as it found them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import psycopg

from tests.histories import record
from lab.processes import kill_tree, read_pid
from tests.lab_helpers import _async, _exec, _fork, _hold_pg_rewind, _primary, _until
from workflows.failback import FailbackInput, FailbackWorkflow


def _one(lab, region: str, query: str, *args):
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        return conn.execute(query, args).fetchone()[0]


async def test_failback_reads_only_the_divergence_and_finds_deletions_on_both_sides(lab, client):
    original = _primary(lab)
    base = 9_200_000_000 + (uuid.uuid4().int % 10**6) * 10
    gone_on_old, gone_on_new, edited, untouched = base, base + 1, base + 2, base + 3
    # Enough rows that the touched blocks are a small part of the table.
    _exec(lab, original, ("insert into alerts (id, region, payload) select g, 'seed', "
                          "jsonb_build_object('pad', repeat('x', 300)) from generate_series(%s::bigint, %s::bigint) g",
                          (base + 10, base + 5009)),
          ("insert into alerts (id, region, payload) values (%s, 'seed', '{}'), (%s, 'seed', '{}'), "
           "(%s, 'seed', '{}'), (%s, 'seed', '{}')", (gone_on_old, gone_on_new, edited, untouched)),
          ("insert into subscriptions (id, user_id, channel) values (%s, 'u', 'seed')", (base,)))
    old, new = await _fork(lab, client, [
        ("delete from alerts where id = %s", (gone_on_old,)),
        ("update alerts set payload = '{\"v\": \"old\"}' where id in (%s, %s)", (gone_on_new, edited))])
    # The survivor deletes a row the old primary updated after the fork: deleted and updated.
    # And changes another without moving its updated_at (its trigger bypassed): only the row's
    # xmin says the survivor changed it after the fork, so it must be a conflict, not overwritten.
    _exec(lab, new, ("delete from alerts where id = %s", (gone_on_new,)),
          "set session_replication_role = replica",
          ("update alerts set payload = '{\"v\": \"new\"}' where id = %s", (edited,)))
    pre_fork_xmin = int(_one(lab, new, "select xmin::text from alerts where id = %s", untouched))
    post_fork_xmin = int(_one(lab, new, "select xmin::text from alerts where id = %s", edited))

    wid = f"failback-{uuid.uuid4()}"
    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old),
                                         id=wid, task_queue=lab.cfg.temporal.control_task_queue)
    report = await handle.result()
    await record(handle, "failback-verify-divergence")
    assert _primary(lab) == original
    rec = report.reconciliation
    tables = {t.table: t for t in rec.tables}
    # Only alerts changed on the old primary after the fork: no other table was read, on either side.
    assert {t: x.read_mode for t, x in tables.items()} == {
        "alerts": "blocks", "alert_rules": "unchanged", "subscriptions": "unchanged", "audit_log": "unchanged",
        "metrics_snapshots": "unchanged"}, [(t.table, t.read_mode, t.full_read_why) for t in rec.tables]
    alerts = tables["alerts"]
    table_blocks = 5000 * 400 // 8192
    assert 0 < alerts.blocks_read < table_blocks // 10, alerts.blocks_read
    assert alerts.loser_rows == 2 and alerts.deleted_keys == 1
    # Read as a standby of nothing: not one byte of WAL (so no block) added for pg_rewind to copy.
    assert rec.loser_read_wal_bytes == 0

    with psycopg.connect(lab.cfg.region(original).postgres.dsn(), autocommit=True) as conn:
        q = lambda sql, *a: conn.execute(sql, a).fetchall()  # noqa: E731
        assert q("select id from alerts where id in (%s, %s)", gone_on_old, untouched) == [(untouched,)]
        assert q("select payload->>'v' from alerts where id = %s", edited) == [("old",)]
        audit = dict(q("select (primary_key->>'id')::bigint, reason from eagle_dr.conflict_audit "
                       "where workflow_id = %s and conflict", wid))
        audited = q("select count(*) from eagle_dr.conflict_audit where workflow_id = %s", wid)[0][0]
    assert set(audit) == {gone_on_new, edited}, audit
    # The survivor's xid horizon, from the old primary's WAL before the fork, separates its
    # pre-fork rows from the ones it wrote after its promotion.
    assert rec.survivor_xid_from is not None and pre_fork_xmin < rec.survivor_xid_from <= post_fork_xmin, (
        pre_fork_xmin, rec.survivor_xid_from, post_fork_xmin)
    # The verify followed the divergence (the default): every key the failback audited, compared
    # on the primary and the rebuilt standby, and not one more table read in full.
    vk = report.verify_keys
    assert report.verify is None and vk is not None, (report.verify, vk)
    assert [t.table for t in vk.tables] == ["alerts"] and vk.keys == audited == 3 and vk.differences == 0, vk
    # (steps: an untyped list in the report, so dicts here)
    step = next(s for s in report.steps if s["name"].startswith("verify the reconciled keys"))
    assert step["status"] == "done" and "3 reconciled keys (alerts) identical" in step["detail"], step
    assert f"{new} deleted it after the fork" in audit[gone_on_new]
    # Both changed it; the later stamp (the old primary's) wins, the survivor's version is audited.
    assert audit[edited] == f"conflict: {old} wrote last", audit[edited]


async def test_a_table_the_survivor_rewrote_is_judged_by_its_timestamps(lab, client):
    """A migration on the survivor during the outage rewrote a table (ALTER TABLE ... TYPE with
    USING): every row there has a new xmin, which says nothing about who changed it. A row only
    the old primary changed must stay a plain update of its, not a conflict the strategy decides
    (source-priority on the survivor would have kept the survivor's stale row)."""
    original = _primary(lab)
    row = 9_270_000_000 + uuid.uuid4().int % 10**6
    _exec(lab, original, ("insert into subscriptions (id, user_id, channel) values (%s, 'u', 'seed')", (row,)))
    old, new = await _fork(lab, client, [("update subscriptions set channel = 'old' where id = %s", (row,))])
    _exec(lab, new, "alter table subscriptions alter column channel type text using channel || ''")
    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old),
                                         id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    report = await handle.result()
    assert _primary(lab) == original
    assert _one(lab, original, "select channel from subscriptions where id = %s", row) == "old"
    audit = _one(lab, original, "select format('%%s %%s', conflict, action) from eagle_dr.conflict_audit "
                                "where workflow_id = %s and table_name = 'subscriptions' and primary_key->>'id' = %s",
                 handle.id, str(row))
    assert audit == "f apply_loser", audit  # (boolean as text: f)
    # The run's horizon stays known for the other tables; the rewritten one is named.
    assert report.reconciliation.survivor_xid_from is not None
    assert report.reconciliation.rewritten == ["subscriptions"]


async def test_a_verify_that_reads_back_no_audited_key_checks_every_table_instead(lab, client):
    """The run's audit rows are gone before its verify (deleted while its pg_rewind is held
    stopped): the divergence verify compares nothing, so it must not pass; it says why and
    the full verify of every table runs and decides."""
    original = _primary(lab)
    row = 9_250_000_000 + uuid.uuid4().int % 10**6
    _exec(lab, original, ("insert into alerts (id, region, payload) values (%s, 'seed', '{}')", (row,)))
    old, new = await _fork(lab, client, [("update alerts set payload = '{\"v\": \"old\"}' where id = %s", (row,))])
    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old),
                                         id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    held = await asyncio.to_thread(_hold_pg_rewind, lab.cfg.region(old).postgres.data_dir)
    assert held, "pg_rewind never ran"
    try:
        # The reconcile is done (pg_rewind runs after it): its audit rows are on the primary.
        _exec(lab, new, ("delete from eagle_dr.conflict_audit where workflow_id = %s", (handle.id,)))
    finally:
        os.kill(held, signal.SIGCONT)
    report = await handle.result()
    assert _primary(lab) == original
    vk = report.verify_keys
    assert vk is not None and vk.keys == 0, vk
    step = next(s for s in report.steps if s["name"].startswith("verify the reconciled keys"))
    assert step["status"] == "failed" and "no audited key of alerts could be read back" in step["detail"], step
    assert report.verify is not None and report.verify.outcome == "succeeded" and report.verify.path == "none", \
        report.verify
    assert report.outcome == "succeeded", report.notes


async def test_the_verify_survives_its_worker_killed_mid_compare(lab, client):
    """A crash the runbook did not cause, in its last check: the control worker is killed
    (kill -9) while the divergence verify reads the run's audited keys (held there by a lock
    the test takes on the audit table). The activity's heartbeats stop, a retry on the
    restarted worker compares every audited key again, and the run ends green on the
    divergence path: not escalated to the full check, not passed on a half-read."""
    original = _primary(lab)
    row = 9_260_000_000 + uuid.uuid4().int % 10**6
    _exec(lab, original, ("insert into alerts (id, region, payload) values (%s, 'seed', '{}'), (%s, 'seed', '{}')",
                          (row, row + 1)))
    old, new = await _fork(lab, client, [
        ("update alerts set payload = '{\"v\": \"old\"}' where id in (%s, %s)", (row, row + 1))])
    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old),
                                         id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    held = await asyncio.to_thread(_hold_pg_rewind, lab.cfg.region(old).postgres.data_dir)
    assert held, "pg_rewind never ran"
    # The reconcile is done (pg_rewind runs after it); the verify will wait on this lock.
    blocker = psycopg.connect(lab.cfg.region(new).postgres.dsn())
    try:
        blocker.execute("lock table eagle_dr.conflict_audit in access exclusive mode")
        os.kill(held, signal.SIGCONT)
        await _until(_async(lambda: _one(
            lab, new, "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and pid <> %s "
            "and query ilike '%%primary_key::text%%conflict_audit%%'", blocker.info.backend_pid) > 0), 120,
            "the verify to read the audited keys")
        assert kill_tree(read_pid(lab.worker_pidfile(None)))
    finally:
        blocker.rollback()
        blocker.close()
    lab.start_worker(None)

    report = await handle.result()
    assert _primary(lab) == original
    # The compare ran again after the kill: a second attempt of the same activity.
    compares, attempts = set(), []
    async for e in handle.fetch_history_events():
        if e.HasField("activity_task_scheduled_event_attributes") and \
                e.activity_task_scheduled_event_attributes.activity_type.name == "compare_audited_keys":
            compares.add(e.event_id)
        elif e.HasField("activity_task_started_event_attributes") and \
                e.activity_task_started_event_attributes.scheduled_event_id in compares:
            attempts.append(e.activity_task_started_event_attributes.attempt)
    assert len(compares) == 1 and max(attempts) >= 2, (compares, attempts)
    audited = _one(lab, new, "select count(*) from eagle_dr.conflict_audit where workflow_id = %s", handle.id)
    vk = report.verify_keys
    assert report.verify is None and vk is not None, (report.verify, vk)
    assert vk.keys == audited == 2 and vk.differences == 0, vk
    step = next(s for s in report.steps if s["name"].startswith("verify the reconciled keys"))
    assert step["status"] == "done", step
    assert report.outcome == "succeeded", report.notes
