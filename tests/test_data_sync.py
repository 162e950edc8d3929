"""DataSyncWorkflow against the real lab: a copy database on the primary's server with injected
differences is repaired key by key behind an approval (audited, then checked clean); a rejected
approval changes nothing; a physical standby is never written (the repair decided is a rebuild)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
from psycopg import sql
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.consistency.store import record_run
from activities.postgres.status import pg_status
from lab.processes import wait_for
from tests.histories import record
from tests.lab_helpers import _async, _awaiting, _exec, _lag_bytes, _pg, _primary, _progress, _until
from workflows.consistency import ConsistencyCheckWorkflow, ConsistencyResult
from workflows.data_sync import DataSyncResult, DataSyncWorkflow
from workflows.models import ApprovalDecision

COPY_DB = "eagle_ds_copy"
_DDL = ("create table if not exists ds_items (id bigint primary key, region text not null, payload jsonb not null, "
        "updated_at timestamptz not null default clock_timestamp())")
# The column list, for reading whole rows back to compare.
_ROW = "select id, region, payload, updated_at from ds_items"



@pytest.fixture(scope="module")
def copy(lab):
    """ds_items on the primary (replicated), and an identical copy in a second database there."""
    primary = _primary(lab)
    _exec(lab, primary, _DDL, "truncate ds_items",
          "insert into ds_items select g, 'r' || (g % 5), jsonb_build_object('n', g) from generate_series(1, 5000) g")
    with _pg(lab, primary) as c:
        c.execute(f"drop database if exists {COPY_DB}")
        c.execute(f"create database {COPY_DB}")
    _copy_items(lab, primary)
    return primary


def _copy_items(lab, primary: str) -> None:
    """The copy's ds_items made the primary's again."""
    with _pg(lab, primary) as src, _pg(lab, primary, COPY_DB) as dst:
        dst.execute(_DDL)
        dst.execute("truncate ds_items")
        with src.cursor().copy("copy ds_items to stdout (format binary)") as out, \
                dst.cursor().copy("copy ds_items from stdin (format binary)") as inp:
            for chunk in out:
                inp.write(chunk)


async def _check(client, lab, primary: str) -> str:
    """The standby (A, the primary's data) against the copy (B); returns the check's id."""
    standby = lab.cfg.other(primary).name
    await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to catch up")
    wid = f"check-{uuid.uuid4()}"
    await client.execute_workflow(ConsistencyCheckWorkflow.run, {"tables": ["ds_items"], "regions": [standby, primary],
                                                                 "database_b": COPY_DB},
                                  id=wid, task_queue=lab.cfg.temporal.control_task_queue,
                                  result_type=ConsistencyResult)
    return wid


async def _start_sync(client, lab, check_id: str, wid: str | None = None):
    # A recorded run's id is its history's name: the replay runs under that id, and the
    # children's ids are derived from it.
    return await client.start_workflow(DataSyncWorkflow.run, {"check_workflow_id": check_id,
                                                              "approval": {"required": True}},
                                       id=wid or f"sync-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue,
                                       result_type=DataSyncResult)


def _rows(lab, primary: str, db: str | None, ids: list[int]) -> dict:
    with _pg(lab, primary, db) as c:
        return {r[0]: r for r in c.execute(_ROW + " where id = any(%s)", (ids,)).fetchall()}


async def test_sync_repairs_exactly_the_differing_keys_behind_approval(lab, client, copy):
    primary = copy
    with _pg(lab, primary, COPY_DB) as dst:
        dst.execute("update ds_items set region = 'changed' where id in (17, 900)")  # not the timestamp
        dst.execute("update ds_items set payload = '{\"n\": -1}' where id = 4999")
        dst.execute("delete from ds_items where id in (1, 2345)")
        dst.execute("insert into ds_items values (7000, 'new', '{}'), (0, 'new', '{}')")
        # More than the check's sample cap (100): the sync must bisect again for every key.
        dst.execute("update ds_items set region = 'bulk' where id between 3000 and 3149")
    check_id = await _check(client, lab, primary)
    handle = await _start_sync(client, lab, check_id, "datasync-recopy")
    await _until(lambda: _awaiting(handle), 120, "the approval gate")
    p = await _progress(handle)
    decide = next(s for s in p.steps if s.name == "Decide the repair")
    assert decide.detail.startswith("recopy: B is writable: database eagle_ds_copy"), decide.detail
    review = next(s for s in p.steps if s.name == "Review the repair").detail
    assert "public.ds_items: +2 ~153 -2" in review and "(17)" in review, review
    assert "bisected again (at most 20000)" in review, review
    await handle.execute_update(DataSyncWorkflow.approve, ApprovalDecision(approver="tester", decision="approve"))
    res = await handle.result()
    await record(handle, handle.id)
    assert res.path == "recopy" and res.outcome == "succeeded", res
    assert res.remaining == 0 and res.verify_workflow_id == f"{handle.id}-verify"
    [s] = res.synced
    assert s.recollected and s.keys == 157
    assert (s.inserted, s.updated, s.deleted, s.flagged) == (2, 153, 2, 0), s
    assert s.audit_rows == 157
    # B now holds the primary's rows for every key, updated_at included (no restamping).
    ids = [17, 900, 4999, 1, 2345, 7000, 0, 3000, 3149]
    assert _rows(lab, primary, COPY_DB, ids) == _rows(lab, primary, None, ids)
    with _pg(lab, primary, COPY_DB) as c:
        audit = c.execute("select primary_key, action, winner_region, approved_by from eagle_dr.conflict_audit "
                          "where workflow_id = %s", (handle.id,)).fetchall()
        assert c.execute("select count(*) from ds_items").fetchone()[0] == 5000
    assert len(audit) == 157
    by_key = {json.dumps(k, sort_keys=True): (a, w, who) for k, a, w, who in audit}
    standby = lab.cfg.other(primary).name
    assert by_key[json.dumps({"id": 7000})] == ("delete", standby, "tester")
    assert by_key[json.dumps({"id": 1})] == ("insert_loser", standby, "tester")
    assert by_key[json.dumps({"id": 17})] == ("apply_loser", standby, "tester")


async def test_related_tables_are_synced_step_by_step_then_their_foreign_keys_checked(lab, client, copy):
    """Two tables a foreign key ties, both differing: B alone holds a parent and a child under
    it. Each table's step leaves the other to its own step (the parent's delete is not held
    for the child that the child's step deletes), and the run-wide check after the steps finds
    no written key breaking a foreign key: green, B as A."""
    primary = copy
    standby = lab.cfg.other(primary).name
    ddl = ("create table if not exists ds_parent (id bigint primary key, updated_at timestamptz not null)",
           "create table if not exists ds_child (id bigint primary key, parent_id bigint references ds_parent (id),"
           " updated_at timestamptz not null)")
    rows = ("truncate ds_parent, ds_child", "insert into ds_parent values (1, '2026-01-01'), (2, '2026-01-01')",
            "insert into ds_child values (10, 1, '2026-01-01')")
    _exec(lab, primary, *ddl, *rows)
    try:
        with _pg(lab, primary, COPY_DB) as dst:
            for q in (*ddl, *rows, "insert into ds_parent values (3, '2026-01-02')",
                      "insert into ds_child values (30, 3, '2026-01-02')"):
                dst.execute(q)
        await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to catch up")
        check_id = f"check-{uuid.uuid4()}"
        await client.execute_workflow(ConsistencyCheckWorkflow.run,
                                      {"tables": ["ds_parent", "ds_child"], "regions": [standby, primary],
                                       "database_b": COPY_DB},
                                      id=check_id, task_queue=lab.cfg.temporal.control_task_queue,
                                      result_type=ConsistencyResult)
        handle = await _start_sync(client, lab, check_id, "datasync-foreign-keys")
        await _until(lambda: _awaiting(handle), 120, "the approval gate")
        await handle.execute_update(DataSyncWorkflow.approve, ApprovalDecision(approver="tester", decision="approve"))
        res = await handle.result()
        await record(handle, handle.id)
        assert res.outcome == "succeeded" and res.remaining == 0, res
        assert sorted((s.table, s.deleted, s.flagged) for s in res.synced) == [
            ("public.ds_child", 1, 0), ("public.ds_parent", 1, 0)], res.synced
        step = next(s for s in (await _progress(handle)).steps
                    if s.name == "Check foreign keys across the synced tables")
        assert step.detail == "none broken", step
        with _pg(lab, primary, COPY_DB) as c:
            assert c.execute("select array_agg(id order by id) from ds_parent").fetchone()[0] == [1, 2]
            assert c.execute("select array_agg(id order by id) from ds_child").fetchone()[0] == [10]
            # A write on B after the parent's step (triggers off, as a bulk load runs): a child
            # under the parent the run deleted. The run-wide check, from this run's audit, names it.
            c.execute("set session_replication_role = replica")
            c.execute("insert into ds_child values (31, 3, '2026-01-03')")
        from dataclasses import replace

        from temporalio.testing import ActivityEnvironment

        from activities.consistency.activities import ConsistencyActivities, SyncedKeysRequest
        env = ActivityEnvironment()
        env.info = replace(env.info, workflow_id=handle.id, workflow_run_id=(await handle.describe()).run_id)
        found = env.run(ConsistencyActivities(lab.cfg).check_synced_foreign_keys,
                        SyncedKeysRequest(region_a=standby, region_b=primary, database_b=COPY_DB,
                                          tables=["public.ds_parent", "public.ds_child"]))
        assert len(found) == 1 and found[0].startswith('public.ds_parent {"id": 3}'), found
    finally:
        _exec(lab, primary, "drop table if exists ds_child", "drop table if exists ds_parent")
        with _pg(lab, primary, COPY_DB) as c:
            c.execute("drop table if exists ds_child")
            c.execute("drop table if exists ds_parent")


async def test_rejected_sync_changes_nothing_then_the_cli_repairs(lab, client, copy, lab_config_path):
    primary = copy
    with _pg(lab, primary, COPY_DB) as dst:
        dst.execute("update ds_items set region = 'rejected' where id = 42")
    check_id = await _check(client, lab, primary)
    handle = await _start_sync(client, lab, check_id)
    await _until(lambda: _awaiting(handle), 120, "the approval gate")
    await handle.execute_update(DataSyncWorkflow.approve, ApprovalDecision(approver="tester", decision="reject"))
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    assert isinstance(e.value.cause, ApplicationError) and e.value.cause.type == "Aborted"
    assert _rows(lab, primary, COPY_DB, [42])[42][1] == "rejected"
    with _pg(lab, primary, COPY_DB) as c:
        assert c.execute("select count(*) from eagle_dr.conflict_audit where workflow_id = %s",
                         (handle.id,)).fetchone()[0] == 0
    p = await _progress(handle)
    assert not any(s.name.startswith(("Re-copy", "Check again")) for s in p.steps), p.steps
    # The same check, repaired from the command line without the gate: exit 0, a clean follow-up.
    cli = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(lab_config_path), "sync", "--check", check_id,
                          "--no-approval"], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "COLUMNS": "250"})
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "path recopy" in cli.stdout and "public.ds_items: 1 keys, 0 inserted, 1 updated" in cli.stdout, cli.stdout
    assert _rows(lab, primary, COPY_DB, [42]) == _rows(lab, primary, None, [42])


async def test_bad_input_names_the_field(lab, client):
    for inp, field in (({"check_workflow_id": "x", "tables": ["ds_items"]}, "check_workflow_id"),
                       ({"check_workflow_id": f"no-such-check-{uuid.uuid4()}"}, "check_workflow_id"),
                       ({"regions": ["a", "a"]}, "regions"), ({"max_keys": 0}, "max_keys")):
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow(DataSyncWorkflow.run, inp, id=f"sync-bad-{uuid.uuid4()}",
                                          task_queue=lab.cfg.temporal.control_task_queue)
        cause = e.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "InvalidInput" and cause.non_retryable, cause
        assert cause.message.startswith(f"invalid input: {field}: "), cause.message


async def test_a_table_the_engine_cannot_decide_leaves_the_run_degraded(lab, client, copy):
    """No updated_at: the engine cannot decide its rows, so the table is not synced, and the
    follow-up check still finds its difference: the run is not green and names the table."""
    primary = copy
    standby = lab.cfg.other(primary).name
    ddl = "create table if not exists ds_plain (id int primary key, v text)"
    _exec(lab, primary, ddl, "truncate ds_plain", "insert into ds_plain select g, 'v' from generate_series(1, 50) g")
    with _pg(lab, primary, COPY_DB) as dst:
        dst.execute(ddl)
        dst.execute("truncate ds_plain")
        dst.execute("insert into ds_plain select g, 'v' from generate_series(1, 50) g")
        dst.execute("update ds_plain set v = 'x' where id = 3")
    await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to catch up")
    res = await client.execute_workflow(
        DataSyncWorkflow.run, {"tables": ["ds_plain", "ds_items"], "regions": [standby, primary],
                               "database_b": COPY_DB, "approval": {"required": False}},
        id=f"sync-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue, result_type=DataSyncResult)
    assert res.outcome == "degraded" and res.remaining == 1 and res.synced == [], res
    assert any(d.startswith("public.ds_plain not synced: ") and "no updated_at column" in d for d in res.degraded)
    assert any(d.startswith("still different after the sync: public.ds_plain ") for d in res.degraded), res.degraded


def _recorded_check(lab, primary: str, standby: str, prefix: str, **more) -> str:
    """A consistency check that found key 5 of ds_items differing on the standby, recorded in
    eagle_dr.consistency_runs as a finished check would be (``more``: other result fields)."""
    check_id = f"{prefix}-{uuid.uuid4()}"
    found = {"service": lab.cfg.service, "region_a": primary, "region_b": standby, "follower": True, **more,
             "tables": [{"table": "public.ds_items", "key": ["id"], "diff": {"updated": 1, "updated_keys": [["5"]]}}],
             "differences": 1, "outcome": "degraded"}
    record_run(lab.cfg.region(_primary(lab)).postgres.dsn(), workflow_id=check_id, run_id="r",
               started_at=datetime.now(timezone.utc), region_a=primary, region_b=standby, outcome="degraded",
               differences=1, result=found)
    return check_id


async def test_standby_is_never_written_the_repair_is_a_rebuild(lab, client, copy):
    """A physical standby cannot be made to differ by writing it: a recorded check that found a
    difference on the standby stands in for one. The sync must choose the rebuild, say why, and
    write nothing before (here: instead of) the approval."""
    primary = copy
    standby = lab.cfg.other(primary).name
    check_id = _recorded_check(lab, primary, standby, "check-fake")
    handle = await _start_sync(client, lab, check_id)
    await _until(lambda: _awaiting(handle), 120, "the approval gate")
    p = await _progress(handle)
    decide = next(s for s in p.steps if s.name == "Decide the repair")
    assert decide.detail.startswith(f"rebuild: {standby}'s server is a physical standby: never written"), decide
    assert "pg_rewind is not used" in decide.detail
    await handle.execute_update(DataSyncWorkflow.approve, ApprovalDecision(approver="tester", decision="reject"))
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    await record(handle, "datasync-standby-rejected")
    # Nothing was scheduled against the standby: no sync activity, no rebuild child.
    history = await handle.fetch_history()
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
                 if e.HasField("activity_task_scheduled_event_attributes")]
    assert "sync_table" not in scheduled, scheduled
    assert not any(e.HasField("start_child_workflow_execution_initiated_event_attributes") for e in history.events)


async def test_a_keyless_table_is_named_not_compared_in_the_result(lab, client):
    """A runbook's final verify skips tables without a primary key (nothing to compare them by):
    its result must name them, not let them pass as identical."""
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    _exec(lab, primary, "create table if not exists ds_nokey (v text)", "insert into ds_nokey values ('x')")
    try:
        await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to catch up")
        res = await client.execute_workflow(
            DataSyncWorkflow.run, {"regions": [primary, standby], "skip_tables_without_key": True},
            id=f"sync-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue, result_type=DataSyncResult)
        assert res.path == "none" and "public.ds_nokey" in res.not_compared, res
    finally:
        _exec(lab, primary, "drop table ds_nokey")


async def test_a_restore_verifys_check_is_refused_not_synced(lab, client, copy):
    """A restore verify compares the primary with a backup restored on a scratch port. Its
    differences are the backup's: taken as the standby's region's, the sync re-cloned a healthy
    standby from that very backup and its follow-up check (standby against primary) was green."""
    primary = copy
    standby = lab.cfg.other(primary).name
    check_id = _recorded_check(lab, primary, standby, "check-restore-verify",
                               scratch_b={"region": standby, "port": 18999, "socket_dir": "/tmp/gone"})
    handle = await _start_sync(client, lab, check_id)
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    cause = e.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidInput" and cause.non_retryable, cause
    assert cause.message.startswith("invalid input: check_workflow_id: ") and "restored backup" in cause.message
    history = await handle.fetch_history()
    assert not any(e.HasField("start_child_workflow_execution_initiated_event_attributes") for e in history.events)


async def test_tables_on_one_side_are_named_never_passed_as_consistent(lab, client, copy):
    """B is no physical standby here (a copy database), so its tables can differ from A's (a
    table made on one side of a split brain, a copy from before a migration). Checked with no
    tables named: each table A has and B lacks is named and left out (it used to fail the whole
    check), the table only B has is named (it was never seen), and the check, and a sync of it
    (a failback's verify is one), end degraded, never green."""
    primary = copy
    standby = lab.cfg.other(primary).name
    _copy_items(lab, primary)
    with _pg(lab, primary, COPY_DB) as dst:
        # The copy holds ds_items (identical) and ds_only_b, whatever other tests left in it.
        for (name,) in dst.execute("select tablename from pg_tables where schemaname = 'public' "
                                   "and tablename <> 'ds_items'").fetchall():
            dst.execute(sql.SQL("drop table {}").format(sql.Identifier(name)))
        dst.execute("create table ds_only_b (id int primary key)")
    try:
        await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to catch up")
        wid = f"check-one-sided-{uuid.uuid4()}"
        check = await client.start_workflow(
            ConsistencyCheckWorkflow.run, {"regions": [standby, primary], "database_b": COPY_DB, "redis": False},
            id=wid, task_queue=lab.cfg.temporal.control_task_queue, result_type=ConsistencyResult)
        res = await check.result()
        await record(check, "consistency-tables-on-one-side")
        assert res.only_on_b == ["public.ds_only_b"], res.only_on_b
        assert "public.alerts" in res.only_on_a and "public.ds_items" not in res.only_on_a, res.only_on_a
        assert [t.table for t in res.tables] == ["public.ds_items"] and res.differences == 0, res.tables
        assert set(res.only_on_a + res.only_on_b) <= set(res.not_compared)
        assert res.outcome == "degraded" and any("only on" in d and "ds_only_b" in d for d in res.degraded), \
            res.degraded
        handle = await _start_sync(client, lab, wid)
        synced = await handle.result()
        assert synced.path == "none" and synced.outcome == "degraded", synced
        assert any(d.startswith("tables on one side only") and "ds_only_b" in d for d in synced.degraded), \
            synced.degraded
    finally:
        with _pg(lab, primary, COPY_DB) as dst:
            dst.execute("drop table if exists ds_only_b")


@contextmanager
def _streaming_from_nothing(lab, region: str):
    """The region's standby cut from its primary while it still answers (primary_conninfo
    emptied and reloaded): what a held or fenced old primary is, a standby of nothing."""
    with _pg(lab, region) as c:
        was = c.execute("show primary_conninfo").fetchone()[0]
        c.execute("alter system set primary_conninfo = ''")
        c.execute("select pg_reload_conf()")
    try:
        wait_for(lambda: pg_status(lab.cfg.region(region).postgres).receiver_status is None, 30,
                 f"{region}'s WAL receiver to stop", 0.1)
        yield
    finally:
        with _pg(lab, region) as c:
            c.execute(sql.SQL("alter system set primary_conninfo = {}").format(sql.Literal(was)))
            c.execute("select pg_reload_conf()")
        wait_for(lambda: pg_status(lab.cfg.region(region).postgres).receiver_status == "streaming", 30,
                 f"{region} to stream again", 0.1)


async def test_a_check_whose_source_went_stale_is_refused_not_synced(lab, client, copy):
    """A check recorded during a split brain (both regions writable), synced after it was
    resolved the other way: its A, the source of every row, is now held (a standby streaming
    from nothing) and its B the live primary. Re-copying would write the stale side's rows into
    the primary. Refused before anything starts, naming the field."""
    primary = copy
    standby = lab.cfg.other(primary).name
    check_id = _recorded_check(lab, standby, primary, "check-stale", follower=False)
    with _streaming_from_nothing(lab, standby):
        handle = await _start_sync(client, lab, check_id)
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
    cause = e.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidInput" and cause.non_retryable, cause
    assert cause.message.startswith("invalid input: check_workflow_id: ") and \
        f"{standby}, the check's A" in cause.message and "streaming from nothing" in cause.message, cause.message
    history = await handle.fetch_history()
    assert not any(e.HasField("start_child_workflow_execution_initiated_event_attributes") for e in history.events)
    assert not [e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
                and e.activity_task_scheduled_event_attributes.activity_type.name == "sync_table"]


def test_the_sync_activity_refuses_a_source_that_went_stale_after_the_approval(lab, copy):
    """The approval can wait for hours; a failover or a split brain's resolution meanwhile can
    leave the approved source held. The write step looks at A again and refuses, writing
    nothing. A streaming standby stays a valid source (the copy-database checks use one)."""
    from temporalio.testing import ActivityEnvironment

    from activities.consistency.activities import ConsistencyActivities, SyncTableRequest
    from activities.consistency.results import KeyDiff

    primary = copy
    standby = lab.cfg.other(primary).name
    before = _pg_rows(lab, primary)
    req = SyncTableRequest(region_a=standby, region_b=primary, table="public.ds_items", max_keys=10,
                           approved=KeyDiff(updated=1, updated_keys=[["5"]]), decided_at=datetime.now(timezone.utc))
    with _streaming_from_nothing(lab, standby), pytest.raises(ApplicationError) as e:
        ActivityEnvironment().run(ConsistencyActivities(lab.cfg).sync_table, req)
    assert e.value.type == "SourceStale" and e.value.non_retryable and standby in e.value.message, e.value
    assert _pg_rows(lab, primary) == before


def test_a_table_whose_name_is_no_identifier_is_synced(lab, copy):
    """A check of every table lists them as the catalog names them, a dash or a space
    included; the sync re-copies such a table by that name (it used to refuse the name as no
    identifier, after approval)."""
    from temporalio.testing import ActivityEnvironment

    from activities.consistency.activities import ConsistencyActivities, SyncTableRequest
    from activities.consistency.results import KeyDiff

    primary = copy
    ddl = ('create table if not exists "ds-odd items" (id bigint primary key, v text not null, '
           "updated_at timestamptz not null default clock_timestamp())")
    _exec(lab, primary, ddl, 'truncate "ds-odd items"', """insert into "ds-odd items" values (1, 'a'), (2, 'b')""")
    with _pg(lab, primary, COPY_DB) as dst:
        dst.execute(ddl)
        dst.execute('truncate "ds-odd items"')
        dst.execute("""insert into "ds-odd items" values (1, 'a'), (3, 'c')""")
    req = SyncTableRequest(region_a=primary, region_b=primary, database_b=COPY_DB, table="public.ds-odd items",
                           max_keys=10, approved=KeyDiff(inserted=1, deleted=1, inserted_keys=[["3"]],
                                                         deleted_keys=[["2"]]),
                           decided_at=datetime.now(timezone.utc))
    synced = ActivityEnvironment().run(ConsistencyActivities(lab.cfg).sync_table, req)
    assert (synced.inserted, synced.deleted, synced.keys) == (1, 1, 2), synced
    with _pg(lab, primary, COPY_DB) as dst:
        assert dst.execute('select id, v from "ds-odd items" order by id').fetchall() == [(1, "a"), (2, "b")]
    _exec(lab, primary, 'drop table "ds-odd items"')


def _pg_rows(lab, region: str) -> list:
    with _pg(lab, region) as c:
        return c.execute(_ROW + " order by id").fetchall()


async def test_a_standby_corrupted_on_disk_is_found_rebuilt_from_backup_and_checks_clean(lab, client):
    """End to end, for real: a byte flipped in a row on the standby's disk (what a bad disk or
    a bug does; the lab runs without data checksums, so nothing else notices), found by the
    check, repaired by DataSync's rebuild from the standby's own bucket after approval, and a
    follow-up check finds nothing. The primary is never written by the repair."""
    from activities.postgres.ctl import PgCtl
    from activities.postgres.status import pg_status
    from workflows.backup import BackupInput, BackupWorkflow

    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    marker = f"kept-{uuid.uuid4().hex[:16]}"
    _exec(lab, primary, "create table if not exists ds_disk (id bigint primary key, v text not null)",
          "truncate ds_disk", "insert into ds_disk select g, 'v' || g from generate_series(1, 300) g",
          f"insert into ds_disk values (1000, '{marker}')")
    backup = await client.execute_workflow(BackupWorkflow.run, BackupInput(type="incr", trigger="test"),
                                           id=f"test-backup-{uuid.uuid4()}",
                                           task_queue=lab.cfg.temporal.control_task_queue)
    assert backup.outcome in ("succeeded", "degraded") and backup.backups, backup
    # Frozen before the checkpoint: a later read on the primary setting hint bits would log a
    # full-page image (wal_log_hints) whose replay on the standby heals the page before the check.
    _exec(lab, primary, "vacuum (freeze) ds_disk", "checkpoint")
    await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to replay it")
    with _pg(lab, primary) as c:
        path = c.execute("select pg_relation_filepath('ds_disk')").fetchone()[0]
        before = c.execute("select v from ds_disk where id = 1000").fetchone()[0]
    # A clean stop writes the page out and its restart replays nothing that touches it again.
    ctl = PgCtl(lab.cfg.region(standby).postgres)
    ctl.stop("fast")
    page_file = ctl.data_dir / path
    data = page_file.read_bytes()
    assert data.count(marker.encode()) == 1
    page_file.write_bytes(data.replace(marker.encode(), b"ROT-" + marker.encode()[4:]))
    ctl.start()
    await _until(_async(lambda: pg_status(lab.cfg.region(standby).postgres).receiver_status == "streaming"), 60,
                 "the standby to stream again")
    with _pg(lab, standby) as c:
        assert c.execute("select v from ds_disk where id = 1000").fetchone()[0] == "ROT-" + marker[4:]

    check_id = f"check-{uuid.uuid4()}"
    found = await client.execute_workflow(ConsistencyCheckWorkflow.run, {"tables": ["ds_disk"],
                                                                         "regions": [primary, standby]},
                                          id=check_id, task_queue=lab.cfg.temporal.control_task_queue,
                                          result_type=ConsistencyResult)
    (t,) = found.tables
    assert found.differences == 1 and t.diff.updated == 1 and t.diff.updated_keys == [["1000"]], found
    handle = await _start_sync(client, lab, check_id)
    await _until(lambda: _awaiting(handle), 120, "the approval gate")
    p = await _progress(handle)
    decide = next(s for s in p.steps if s.name == "Decide the repair")
    assert decide.detail.startswith(f"rebuild: {standby}'s server is a physical standby"), decide
    await handle.execute_update(DataSyncWorkflow.approve, ApprovalDecision(approver="tester", decision="approve"))
    res = await handle.result()
    await record(handle, "datasync-standby-rebuilt")
    assert res.outcome == "succeeded" and res.path == "rebuild" and res.remaining == 0, res
    assert res.rebuilt is not None and res.rebuilt.outcome == "succeeded", res.rebuilt
    with _pg(lab, standby) as c:
        assert c.execute("select v from ds_disk where id = 1000").fetchone()[0] == marker
    with _pg(lab, primary) as c:
        assert c.execute("select v from ds_disk where id = 1000").fetchone()[0] == before == marker
    assert pg_status(lab.cfg.region(standby).postgres).receiver_status == "streaming"
