"""RestoreWorkflow's other modes, on the real lab: rebuild a region's standby from backup,
and copy rows from a point-in-time copy back into the live primary (data-corruption recovery).

Each test makes the backups it needs (BackupWorkflow), so it runs alone or in any order, and
leaves the lab healthy (a streaming standby) for the tests after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle

from activities.backup.pgbackrest import Stanza
from activities.backup.rebuild import aside_dir, rebuild_standby, undo_rebuild
from activities.backup.recover import RowSelection
from activities.backup.restore import RestoreError, RestoreTarget
from activities.postgres.ctl import FENCE_MARKER, PgCtl, PgCtlError
from activities.postgres.rewind import rewind_marker
from activities.postgres.status import pg_status
from eagle_dr.config import PostgresConfig
from tests.histories import record
from tests.lab_helpers import _primary, _progress, _resume, _until
from tests.test_restore import _archived_now, _async_true, _async_true_of, _backup, _commit, _kept, _no_scratch_left, \
    _start_restore, _table
from workflows.models import ApprovalDecision
from workflows.restore import RestoreInput, RestoreResult, RestoreWorkflow

pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              # Its tests name lab.cfg.primary as the primary (tests/conftest.py).
              pytest.mark.usefixtures("configured_topology")]


async def test_pitr_history(lab, client):
    """A plain PITR run, recorded: the default mode's command sequence must keep replaying."""
    await _backup(lab, client, type="incr")
    handle = await _start_restore(lab, client, keep_minutes=30)
    await _kept(handle)
    await handle.signal(RestoreWorkflow.release)
    res = await handle.result()
    assert res.outcome == "succeeded"
    await record(handle, "restore-pitr")


async def _wait_awaiting(handle):
    from tests.lab_helpers import _awaiting

    async def ready():
        from temporalio.client import WorkflowExecutionStatus

        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            await handle.result()
            raise AssertionError("the restore ended before its approval gate")
        return await _awaiting(handle)

    await _until(ready, 300, "the approval gate", 0.3)


def _decide(decision: str):
    return ApprovalDecision(approver="alice", decision=decision, comment="test")


async def test_rebuild_standby_from_backup_after_its_data_dir_is_broken(lab, client):
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    _table(lab)
    await _backup(lab, client, type="full")
    tag = uuid.uuid4().hex
    _commit(lab, "insert into restore_probe values (1, %s, 'before the break')", tag)
    # Refused for the primary's region, before anything is touched.
    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow(RestoreWorkflow.run, RestoreInput(mode="rebuild-standby", region=primary),
                                      id=f"test-rebuild-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    assert e.value.cause.type == "InvalidInput" and "region" in str(e.value.cause) and "primary" in str(e.value.cause)
    # Break the standby for real: stopped, its control file deleted; it cannot start again.
    pg = lab.cfg.region(standby).postgres
    ctl = PgCtl(pg)
    ctl.stop("immediate")
    (ctl.data_dir / "global" / "pg_control").unlink()
    with pytest.raises(PgCtlError):
        ctl.start(timeout=10)
    _commit(lab, "insert into restore_probe values (2, %s, 'while it was broken')", tag)
    # A pg_rewind interrupted on the old directory left its marker: the rebuild replaces the
    # directory whole, so the marker must go, or the next failback re-clones a healthy standby.
    rewind_marker(ctl.data_dir).write_text("pg_rewind started (test)\n")
    # Started as from the UI, with only the approval's timeout given: still an approval (the
    # policy's own default, not required, turned the gate off).
    handle = await client.start_workflow("RestoreWorkflow", {"mode": "rebuild-standby", "region": standby,
                                                             "approval": {"timeout_seconds": 1800}},
                                         id=f"test-rebuild-{uuid.uuid4()}", result_type=RestoreResult,
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    # Nothing was replaced before the approval: the broken directory is still there, as it was.
    assert ctl.data_dir.exists() and not (ctl.data_dir / "global" / "pg_control").exists()
    await handle.execute_update("approve", _decide("approve"))
    res: RestoreResult = await handle.result()
    assert res.outcome in ("succeeded", "degraded") and res.rebuilt and res.rebuilt.backup_label
    assert res.approval and res.approval.approver == "alice"
    st = pg_status(pg)
    assert st.role == "standby" and st.receiver_status == "streaming", st
    assert not aside_dir(ctl.data_dir).exists() and not rewind_marker(ctl.data_dir).exists()
    # It streams: a row written now arrives, with the ones from before and during the break.
    _commit(lab, "insert into restore_probe values (3, %s, 'after the rebuild')", tag)

    async def caught_up():
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            return [r[0] for r in conn.execute("select n from restore_probe where tag = %s order by n", (tag,))] \
                == [1, 2, 3]

    await _until(caught_up, 60, "the rebuilt standby to have the primary's rows", 0.2)
    await record(handle, "restore-rebuild_standby")


class _Rebuild(NamedTuple):
    primary: str
    standby: str
    pg: PostgresConfig
    data: Path
    stanza: Stanza
    marker: str
    handle: WorkflowHandle


async def _standby_with_a_backup(lab, client, type_: str) -> tuple[str, str, PostgresConfig, Path]:
    """(primary, standby, the standby's PostgreSQL, its data directory), after a fresh backup
    of ``type_`` with the probe table in it: what a rebuild of the standby starts from."""
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    _table(lab)
    await _backup(lab, client, type=type_)
    pg = lab.cfg.region(standby).postgres
    return primary, standby, pg, PgCtl(pg).data_dir


async def _rebuild_at_its_approval(lab, client, name: str) -> _Rebuild:
    """A rebuild of the streaming standby from a fresh full backup, started and waiting for its
    approval. The standby's data directory carries a marker file (ignored by PostgreSQL) that
    tells the original directory from a restored one."""
    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "full")
    st = pg_status(pg)
    assert st.role == "standby" and st.receiver_status == "streaming", st
    marker = uuid.uuid4().hex
    (data / "eagle-dr-test-original").write_text(marker)
    handle = await client.start_workflow(RestoreWorkflow.run, RestoreInput(mode="rebuild-standby", region=standby),
                                         id=f"test-{name}-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    return _Rebuild(primary, standby, pg, data, Stanza(lab.cfg, standby), marker, handle)


@contextlib.asynccontextmanager
async def _signalling_every_restore(stanza: Stanza, sig: int):
    """While inside: every pgbackrest restore process of the stanza gets ``sig`` as soon as it
    appears (the fault). Yields the set of pids signalled."""
    hit: set[int] = set()

    async def loop() -> None:
        while True:
            for pid in stanza.processes("restore"):
                if pid not in hit:
                    try:
                        os.kill(pid, sig)
                        hit.add(pid)
                    except ProcessLookupError:
                        pass
            await asyncio.sleep(0.005)  # the fault's own loop, not a wait for the test

    task = asyncio.ensure_future(loop())
    try:
        yield hit
    finally:
        task.cancel()


async def test_a_rebuild_that_fails_leaves_the_standby_as_it_found_it(lab, client):
    """Before anything is kept, a failed rebuild is undone: the original directory back in
    place and the standby running and streaming again, as it was (it used to be left stopped,
    its directory put back but never started). Every restore attempt's pgbackrest is killed,
    so all three attempts fail; each puts the original back itself, and the runbook's undo step
    then says where the node stands."""
    primary, standby, pg, data, stanza, marker, handle = await _rebuild_at_its_approval(lab, client, "rebuild-fails")
    async with _signalling_every_restore(stanza, signal.SIGKILL) as killed:
        await handle.execute_update("approve", _decide("approve"))
        with pytest.raises(WorkflowFailureError) as e:
            await asyncio.wait_for(handle.result(), 600)
    assert killed
    cause = e.value.cause
    assert cause.type == "RebuildFailed" and "undone:" in cause.message, cause
    assert f"{standby} now: a standby" in cause.message, cause.message
    steps = [s.name for s in (await _progress(handle)).steps]
    assert any(n.startswith(f"Undo: {standby}'s original data directory") for n in steps), steps
    assert not aside_dir(data).exists()
    assert (data / "eagle-dr-test-original").read_text() == marker  # the original, not a restore

    async def streaming() -> bool:
        s = pg_status(pg)
        return s.role == "standby" and s.receiver_status == "streaming"

    await _until(streaming, 120, "the original standby to stream again", 0.2)
    with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select active from pg_replication_slots where slot_name = %s",
                            (pg.slot_name,)).fetchone() == (True,)
    (data / "eagle-dr-test-original").unlink()
    await record(handle, "restore-rebuild-failed-undone")


async def test_a_cancel_reaches_a_stalled_restore_and_the_rebuild_is_undone(lab, client):
    """A cancel while pgbackrest restore runs, stalled (frozen here, as on a bucket that stops
    answering: it writes nothing): every pgBackRest process of the restore is stopped and the
    original standby streams again. Waited on with subprocess.run, the cancel never reached the
    blocked thread, and the run hung until the step's 70-minute timeout."""
    primary, standby, pg, data, stanza, marker, handle = await _rebuild_at_its_approval(lab, client, "rebuild-cancel")
    async with _signalling_every_restore(stanza, signal.SIGSTOP) as frozen:
        await handle.execute_update("approve", _decide("approve"))
        await _until(lambda: _async_true(bool(frozen)), 120, "pgbackrest restore to start (and be frozen)")
    await handle.cancel()
    try:
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 180)
    finally:
        _resume(frozen)  # whatever the outcome
    assert not stanza.processes("restore"), "a pgbackrest restore outlived the cancel"
    assert not aside_dir(data).exists()
    assert (data / "eagle-dr-test-original").read_text() == marker  # the original, not a restore

    async def streaming() -> bool:
        s = pg_status(pg)
        return s.role == "standby" and s.receiver_status == "streaming"

    await _until(streaming, 120, "the original standby to stream again", 0.2)
    (data / "eagle-dr-test-original").unlink()


def _primary_conn(lab):
    return psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True)


async def test_recover_rows_after_corruption_approved_and_rejected(lab, client):
    table = f"orders_{uuid.uuid4().hex[:8]}"
    with _primary_conn(lab) as conn:
        conn.execute(f"create table {table} (id int primary key, body text not null, "
                     "updated_at timestamptz not null default now(), created_at timestamptz not null default now())")
    await _backup(lab, client, type="incr")
    good = {i: f"order {i}" for i in range(1, 6)}
    for i, body in good.items():
        last_good = _commit(lab, f"insert into {table} (id, body) values (%s, %s)", i, body)
    await _until(lambda: _async_true(datetime.now(timezone.utc) > last_good + timedelta(milliseconds=300)), 5,
                 "the clock to move on")
    before = datetime.now(timezone.utc)
    await _until(lambda: _async_true(datetime.now(timezone.utc) > before + timedelta(milliseconds=300)), 5,
                 "the clock to move on")
    # The corruption: two rows overwritten (as an application would, stamping updated_at), one deleted,
    # and a legitimate new row after it that recovery must not touch.
    _commit(lab, f"update {table} set body = 'CORRUPT', updated_at = now() where id in (1, 2)")
    _commit(lab, f"delete from {table} where id = 3")
    _commit(lab, f"insert into {table} (id, body) values (6, 'new after the corruption')")
    await _archived_now(lab)

    def live() -> dict[int, str]:
        with _primary_conn(lab) as conn:
            return dict(conn.execute(f"select id, body from {table} order by id").fetchall())

    corrupted = live()
    inp = RestoreInput(mode="recover-rows", target=RestoreTarget(kind="time", time=before, inclusive=False),
                       tables=[RowSelection(table=table, where="id <= 4")])
    # Rejected: the counts and a sample were shown, nothing was written, the copy is gone.
    handle = await client.start_workflow(RestoreWorkflow.run, inp, id=f"test-recover-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    review = await handle.query(RestoreWorkflow.review)
    t = review.tables[0]
    assert (t.inserted, t.updated, t.deleted, t.kept, t.rows_in_copy) == (1, 2, 0, 1, 4), t
    assert {s["action"] for s in t.sample} >= {"apply_loser", "insert_loser"}
    await handle.execute_update("approve", _decide("reject"))
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    assert "rejected" in str(e.value.cause)
    assert live() == corrupted
    _no_scratch_left(lab)
    with _primary_conn(lab) as conn:
        if conn.execute("select to_regclass('eagle_dr.conflict_audit')").fetchone()[0] is not None:
            assert not conn.execute("select count(*) from eagle_dr.conflict_audit where workflow_id = %s",
                                    (handle.id,)).fetchone()[0]
    # Cancelled at the gate: the same, and the copy is dropped all the same.
    handle = await client.start_workflow(RestoreWorkflow.run, inp, id=f"test-recover-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    assert live() == corrupted
    _no_scratch_left(lab)
    # Approved: the rows are back as they were before the corruption, the new row stays, the audit says so.
    handle = await client.start_workflow(RestoreWorkflow.run, inp, id=f"test-recover-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    await handle.execute_update("approve", _decide("approve"))
    res: RestoreResult = await handle.result()
    assert res.outcome == "succeeded" and res.dropped, res
    assert live() == {**good, 6: "new after the corruption"}
    with _primary_conn(lab) as conn:
        audit = conn.execute("select primary_key->>'id', action, approved_by, winner_region, conflict from "
                             "eagle_dr.conflict_audit where workflow_id = %s and table_name = %s order by 1",
                             (handle.id, table)).fetchall()
    assert audit == [("1", "apply_loser", "alice", "backup", True), ("2", "apply_loser", "alice", "backup", True),
                     ("3", "insert_loser", "alice", "backup", False), ("4", "keep_survivor", "alice", "backup", False)]
    _no_scratch_left(lab)
    await record(handle, "restore-recover_rows")


# -- eagle-dr restore ------------------------------------------------------------------------------


def _cli(lab, lab_config_path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "300", "EAGLE_DR_STATE_DIR": lab.cfg.lab.state_dir}
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


async def test_cli_name_with_lsn_is_a_named_target_at_that_position():
    """--name N --lsn L: the restore point N, whose position L picks the backup to start from;
    the LSN was tested first and the name dropped (an LSN target, stopping elsewhere)."""
    from eagle_dr.cli.restore import _target

    t = _target(None, "0/3000060", "before-migration", False)
    assert (t.kind, t.name, t.lsn) == ("name", "before-migration", "0/3000060"), t
    assert _target(None, "0/3000060", None, False).kind == "lsn"


@pytest.mark.parametrize("args, says", [
    (["pitr", "--time", "yesterday"], "--time: not a time"),
    (["pitr", "--time", "2026-12-01T10:00:00"], "no time zone"),
    (["pitr", "--latest", "--lsn", "0/1"], "exactly one of"),
    (["pitr", "--latest", "--repo", "eu-north-9"], "unknown region 'eu-north-9'"),
    (["pitr", "--latest", "--keep", "forever"], "--keep"),
    (["rebuild-standby", "--region", "eu-north-9"], "unknown region 'eu-north-9'"),
    (["verify", "--repo", "eu-north-9"], "unknown region 'eu-north-9'"),
    (["verify", "--region", "eu-north-9"], "unknown region 'eu-north-9'"),
    (["rebuild-standby"], "--region"),
    (["recover-rows", "--table", "t"], "--before"),
    (["recover-rows", "--before", "2026-12-01T10:00:00Z"], "--table"),
    (["recover-rows", "--before", "2026-12-01T10:00:00Z", "--table", "a", "--table", "b", "--where", "x = 1"],
     "TABLE=PREDICATE"),
])
async def test_cli_bad_input_exits_2_with_a_clear_message(lab, lab_config_path, args, says):
    r = _cli(lab, lab_config_path, "restore", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert says in " ".join(r.stderr.split()), r.stderr


async def test_cli_bad_input_only_the_repo_can_judge_exits_2(lab, client, lab_config_path):
    await _backup(lab, client, type="incr")
    r = _cli(lab, lab_config_path, "restore", "pitr", "--time", "2999-01-01T00:00:00Z", "--keep", "0")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "target.time" in r.stderr and "future" in " ".join(r.stderr.split())
    _no_scratch_left(lab)


async def test_cli_pitr_prints_how_to_connect_and_release_drops_it(lab, client, lab_config_path):
    _table(lab)
    await _backup(lab, client, type="incr")
    tag = uuid.uuid4().hex
    _commit(lab, "insert into restore_probe values (1, %s, 'x')", tag)
    await _archived_now(lab)
    r = _cli(lab, lab_config_path, "restore", "pitr", "--latest", "--keep", "30m")
    assert r.returncode == 0, (r.stdout, r.stderr)
    text = " ".join(r.stdout.split())
    m = re.search(r'psql "host=(\S+) port=(\d+) dbname=(\S+) user=(\S+)"', text)
    assert m, text
    with psycopg.connect(host=m.group(1), port=int(m.group(2)), dbname=m.group(3), user=m.group(4),
                         password=lab.cfg.region(lab.cfg.secondary.name).postgres.password.resolve()) as conn:
        assert conn.execute("select count(*) from restore_probe where tag = %s", (tag,)).fetchone()[0] == 1
    wid = re.search(r"eagle-dr restore release (\S+)", text).group(1)
    r = _cli(lab, lab_config_path, "restore", "release", wid)
    assert r.returncode == 0 and "dropped" in r.stdout, (r.stdout, r.stderr)
    _no_scratch_left(lab)


async def test_rebuild_refuses_a_fenced_old_primary_and_leaves_it_alone(lab_cfg, tmp_path):
    """Its writes after a failover exist nowhere else: failback keeps them, a restore would not."""
    data = tmp_path / "pgdata"
    data.mkdir()
    (data / FENCE_MARKER).write_text("{}")
    region = lab_cfg.secondary
    pg = region.postgres.model_copy(update={"data_dir": str(data),
                                            "pgbackrest_config": str(tmp_path / "pgbackrest" / "pgbackrest.conf")})
    cfg = lab_cfg.model_copy(update={"regions": [r.model_copy(update={"postgres": pg}) if r.name == region.name else r
                                                 for r in lab_cfg.regions]})
    with pytest.raises(RestoreError) as e:
        rebuild_standby(Stanza(cfg, region.name), lab_cfg.primary.postgres, region.name, region.name, "slot_x")
    assert e.value.field == "region" and "failback" in str(e.value)
    assert (data / FENCE_MARKER).exists() and not aside_dir(data).exists()


def _attempt_process(lab_config_path, region: str, body: str) -> subprocess.Popen:
    """An attempt in a process of its own (one that can be killed or cut off alone): Python
    ``body`` run with ``cfg``, ``st`` (``region``'s stanza, its configs written), ``Path`` and
    ``pause(held, go)``, which touches ``held`` and waits (at most 300 s) until ``go`` exists."""
    return subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from pathlib import Path\n"
        "from activities.backup.pgbackrest import Stanza\n"
        "from eagle_dr.config import load_config\n"
        f"cfg = load_config({str(lab_config_path)!r}, env={{}})\n"
        f"st = Stanza(cfg, {region!r})\n"
        "st.write_configs()\n"
        "def pause(held, go):\n"
        "    Path(held).touch()\n"
        "    deadline = time.monotonic() + 300\n"
        "    while not Path(go).exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n" + body)], cwd=Path(__file__).parent.parent)


@contextlib.asynccontextmanager
async def _orphaned_restore(stanza: Stanza, lab_config_path, attempt: str, owner: str | None = None):
    """A first attempt (``attempt``: Python run with ``cfg`` and ``st``, the node's stanza) in a
    process of its own, killed alone (an OOM kill, a kill -9 of the worker) while its pgbackrest
    restore (tagged ``owner`` if given) runs: yields that restore's pid, an orphan left frozen
    so that it cannot end by itself before the retry looks. Never continued afterwards: it would
    write into whatever directory is there now."""
    from activities.postgres.ctl import alive

    first = _attempt_process(lab_config_path, stanza.region.name, attempt)

    async def restoring() -> int | None:
        if first.poll() is not None:
            raise AssertionError(f"the first attempt ended ({first.returncode}) before its restore was seen")
        return next((pid for pid, tag in stanza.processes("restore").items() if owner is None or tag == owner),
                    None)

    orphan = None
    try:
        orphan = await _until(restoring, 120, "the first attempt's pgbackrest restore to run", 0.01)
        os.kill(orphan, signal.SIGSTOP)
        first.kill()
        first.wait()
        assert alive(orphan)
        yield orphan
    finally:
        if first.poll() is None:
            first.kill()
        if orphan is not None and alive(orphan):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(orphan), signal.SIGKILL)


async def test_a_restore_left_writing_by_a_dead_attempt_is_stopped_before_the_retry_restores(lab, client,
                                                                                           lab_config_path):
    """The process running a rebuild dies alone (an OOM kill, a kill -9 of the worker), and its
    pgbackrest restore, in a session of its own, goes on writing the data directory. The retry
    must stop it before touching the directory: restored beside it, the directory has two
    writers, and the orphan's last files land in a standby already running. Here the orphan is
    frozen, so it cannot end by itself before the retry looks."""
    from activities.postgres.ctl import alive

    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "incr")
    stanza = Stanza(lab.cfg, standby)
    async with _orphaned_restore(stanza, lab_config_path, (
            "from activities.backup.rebuild import rebuild_standby\n"
            f"rebuild_standby(st, cfg.region({primary!r}).postgres, {standby!r}, application_name={standby!r}, "
            f"slot={pg.slot_name!r})\n")) as orphan:
        assert aside_dir(data).exists()  # the original aside

        rebuilt = await asyncio.to_thread(rebuild_standby, stanza, lab.cfg.region(primary).postgres, standby,
                                          application_name=standby, slot=pg.slot_name)
        assert rebuilt.stopped_restores == [orphan], rebuilt
        assert not alive(orphan)
        assert stanza.processes("restore") == {} and not aside_dir(data).exists()
        st = pg_status(pg)
        assert st.role == "standby" and st.receiver_status == "streaming", st


async def test_a_retry_of_a_rebuild_that_finished_reports_it_and_restores_nothing(lab, client):
    """An attempt that finished (the new standby streams, the original gone) and died before
    saying so (its completion lost: a heartbeat timeout in a network blip): the retry found
    nothing aside, set the healthy new standby aside and restored again (hours at scale,
    without a standby), then reported 0 s. It now finds this run's record and reports the
    rebuild as the attempt that made it measured it."""
    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "incr")
    stanza = Stanza(lab.cfg, standby)
    run = f"test-rebuild/{uuid.uuid4()}"

    def rebuild():
        return rebuild_standby(stanza, lab.cfg.region(primary).postgres, standby, application_name=standby,
                               slot=pg.slot_name, attempt_of=run)

    def started_at():
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            return conn.execute("select pg_postmaster_start_time()").fetchone()[0]

    first = await asyncio.to_thread(rebuild)
    assert first.restore_seconds and first.restore_seconds > 0 and first.backup_label, first
    (data / "eagle-dr-test-rebuilt").write_text("a restore would replace the directory, and this with it")
    # And the first attempt died in its last steps: the original half removed, its record of
    # how it found the node still there (a later rebuild would take them for its original).
    from activities.backup.rebuild import _found_file

    aside_dir(data).mkdir()
    (aside_dir(data) / "PG_VERSION").write_text("15\n")
    _found_file(data).write_text('{"was_running": true, "slot_created": false}')
    was = started_at()
    again = await asyncio.to_thread(rebuild)
    assert again == first, (again, first)
    assert (data / "eagle-dr-test-rebuilt").exists() and started_at() == was  # untouched, never restarted
    assert not aside_dir(data).exists() and not _found_file(data).exists()
    st = pg_status(pg)
    assert st.role == "standby" and st.receiver_status == "streaming", st
    # A cancel that crossed the finished rebuild, while the original was being removed: its
    # undo says the rebuild stands, and finishes the removal instead of putting the half-removed
    # original back over the new standby. Then once it is gone (the same); another run's undo
    # finds only "nothing set aside".
    aside_dir(data).mkdir()
    (aside_dir(data) / "PG_VERSION").write_text("15\n")
    _found_file(data).write_text('{"was_running": true, "slot_created": false}')
    for _ in range(2):
        said = await asyncio.to_thread(undo_rebuild, stanza, lab.cfg.region(primary).postgres, pg.slot_name, run)
        assert said.startswith("NOT undone: the rebuild had finished") and first.backup_label in said, said
        assert not aside_dir(data).exists() and not _found_file(data).exists()
        assert (data / "eagle-dr-test-rebuilt").exists() and started_at() == was
    other = await asyncio.to_thread(undo_rebuild, stanza, lab.cfg.region(primary).postgres, pg.slot_name, "x/y")
    assert "nothing to put back" in other, other
    assert (data / "eagle-dr-test-rebuilt").exists() and started_at() == was



async def test_a_rebuild_attempt_that_outlasts_the_undos_wait_rebuilds_nothing_after_it(
        lab, client, lab_config_path, tmp_path, monkeypatch):
    """A rebuild attempt cut off from its run, or frozen while it holds the data directory,
    where the runbook's undo step cannot stop it: the undo gave up waiting, said "NOT undone:
    move it back and start it", and the attempt, once awake, restored over the directory (or
    over the original an operator had moved back). The undo now marks the run undone first,
    and the attempt looks for the mark before each step: it puts its original back instead."""
    from activities.backup import rebuild

    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "incr")
    stanza = Stanza(lab.cfg, standby)
    (data / "eagle-dr-test-original").write_text("a restore would replace the directory, and this with it")
    run = f"test-rebuild/{uuid.uuid4()}"
    held, go = tmp_path / "held", tmp_path / "go"
    # Paused where it has set the original aside and is about to restore.
    late = _attempt_process(lab_config_path, standby, (
        "from activities.backup.rebuild import rebuild_standby\n"
        "def beat(d):\n"
        "    if d.get('phase') == 'pgbackrest restore':\n"
        f"        pause({str(held)!r}, {str(go)!r})\n"
        f"rebuild_standby(st, cfg.region({primary!r}).postgres, {standby!r}, application_name={standby!r}, "
        f"slot={pg.slot_name!r}, beat=beat, attempt_of={run!r})\n"))
    try:
        await _until(_async_true_of(held.exists), 120, "the attempt to set the original aside", 0.01)
        assert aside_dir(data).exists()
        monkeypatch.setattr(rebuild, "UNDO_WAIT_S", 1)  # the production wait is 300 s
        with pytest.raises(RestoreError) as e:
            await asyncio.to_thread(undo_rebuild, stanza, lab.cfg.region(primary).postgres, pg.slot_name, run)
        assert e.value.kind == "AttemptAlive", e.value
        go.touch()
        assert await asyncio.to_thread(late.wait, 120) != 0, "the attempt rebuilt after the undo"
        # Its own undo on failure put the original back, running as it was found.
        assert (data / "eagle-dr-test-original").exists() and not aside_dir(data).exists()
        said = await asyncio.to_thread(undo_rebuild, stanza, lab.cfg.region(primary).postgres, pg.slot_name, run)
        assert "NOT undone" not in said, said

        async def streaming():
            st = pg_status(pg)
            return st.role == "standby" and st.receiver_status == "streaming"

        await _until(streaming, 60, "the original standby to stream again")
        assert (data / "eagle-dr-test-original").exists()
    finally:
        if late.poll() is None:
            late.kill()
            late.wait()


async def test_a_scratch_restore_left_writing_by_a_dead_attempt_is_stopped_before_its_directory_goes(
        lab, client, lab_config_path):
    """As for a rebuild (above), for a copy into a scratch directory: the attempt's process dies
    alone and its pgbackrest restore goes on writing the copy. The retry's drop (and the run's
    cleanup, the same drop) deleted the directory under it and left it writing: a copy of
    production data refilling a directory nobody would drop again, or a second writer beside
    the retry's restore. The drop now stops it first."""
    from activities.backup.activities import RestoreActivities
    from activities.backup.orphans import owner_tag
    from activities.backup.restore import drop_scratch, port_free, scratch_attempt
    from activities.postgres.ctl import alive

    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "incr")
    stanza = Stanza(lab.cfg, standby)
    directory = RestoreActivities(lab.cfg).scratch_dir(standby, f"test-orphan-{uuid.uuid4().hex[:8]}")
    port = next(p for p in range(lab.cfg.backup.scratch_port, lab.cfg.backup.scratch_port + 50) if port_free(p))
    try:
        # The first attempt as the activity runs it.
        async with _orphaned_restore(stanza, lab_config_path, (
                "from activities.backup.restore import RestoreTarget, restore_to_scratch, scratch_attempt\n"
                f"with scratch_attempt(st, Path({str(directory)!r})):\n"
                f"    restore_to_scratch(st, Path({str(directory)!r}), {port}, RestoreTarget(), {standby!r})\n"),
                owner=owner_tag("scratch", directory)) as orphan:
            assert directory.exists()

            def retry() -> bool:
                with scratch_attempt(stanza, directory):  # the dead attempt's lock died with it
                    return drop_scratch(stanza, directory, port)

            assert await asyncio.to_thread(retry)
            assert not alive(orphan)
            assert stanza.processes("restore") == {} and not directory.exists()
    finally:
        drop_scratch(stanza, directory, port, last=True)  # the run's own drop: its lock file too


async def test_a_lock_folder_the_worker_cannot_write_refuses_the_copy_but_never_keeps_one(lab_cfg, tmp_path):
    """The attempts' lock files live in the node's pgBackRest folder. A worker that cannot
    write there (here the folder's name taken by a file; in production an unprivileged worker
    user) got a raw OSError. It now gets a refusal that says where; and the run's final drop
    removes the copy all the same: production data never stays for want of a lock file."""
    from activities.backup.restore import drop_scratch, scratch_attempt

    region = lab_cfg.secondary
    pg = region.postgres.model_copy(update={"pgbackrest_config": str(tmp_path / "pgbackrest" / "pgbackrest.conf")})
    cfg = lab_cfg.model_copy(update={"regions": [r.model_copy(update={"postgres": pg}) if r.name == region.name else r
                                                 for r in lab_cfg.regions]})
    stanza = Stanza(cfg, region.name)
    stanza.dir.mkdir(parents=True)
    (stanza.dir / "scratch-locks").write_text("not a folder")
    copy = tmp_path / "scratch" / "r-0123456789ab"
    copy.mkdir(parents=True)
    (copy / "PG_VERSION").write_text("15\n")
    with pytest.raises(RestoreError) as e:
        with scratch_attempt(stanza, copy):
            pass
    assert e.value.kind == "LockUnavailable" and str(stanza.dir) in str(e.value), e.value
    assert drop_scratch(stanza, copy, 1024, last=True) and not copy.exists()


async def test_a_final_drop_prunes_old_records_of_copies_gone_and_keeps_the_rest(lab_cfg, tmp_path):
    """Each copy leaves small records beside the node's pgBackRest files (its dropped mark, its
    owner record, its lock file). A final drop removes those older than 30 days whose copy's
    folder is gone; a copy still there keeps its records, and so do recent ones."""
    import os
    import time as _time

    from activities.backup.restore import drop_scratch

    region = lab_cfg.secondary
    pg = region.postgres.model_copy(update={"pgbackrest_config": str(tmp_path / "pgbackrest" / "pgbackrest.conf")})
    cfg = lab_cfg.model_copy(update={"regions": [r.model_copy(update={"postgres": pg}) if r.name == region.name else r
                                                 for r in lab_cfg.regions]})
    stanza = Stanza(cfg, region.name)
    records, base = stanza.dir / "scratch-locks", tmp_path / "scratch"
    records.mkdir(parents=True)
    (base / "r-00000000000a").mkdir(parents=True)  # a copy still there
    old = _time.time() - 31 * 86400
    made = {}
    for name, age in (("r-00000000000a", old), ("r-00000000000b", old), ("r-00000000000c", _time.time())):
        for kind in ("dropped", "owner.json", "lock"):
            made[name, kind] = f = records / f"{name}.{kind}"
            f.write_text("{}")
            os.utime(f, (age, age))
    drop_scratch(stanza, base / "r-00000000000d", 1024, last=True)
    assert not any(made["r-00000000000b", k].exists() for k in ("dropped", "owner.json", "lock"))
    assert all(made[n, k].exists() for n in ("r-00000000000a", "r-00000000000c")
               for k in ("dropped", "owner.json", "lock"))


async def test_an_attempt_that_outlives_its_run_restores_nothing_after_the_runs_final_drop(
        lab, client, lab_config_path, tmp_path):
    """An attempt cut off from Temporal (its worker partitioned: it never hears that its run
    gave up on it) still holds the copy's directory when the run's final drop comes, and
    restores after that drop: a writable copy of production data that nobody drops again. The
    final drop now waits for the attempt to let go, stopping what it runs meanwhile; an
    attempt that comes after the drop finds the copy dropped and restores nothing."""
    from activities.backup.restore import _dropped_mark, drop_scratch, port_free, scratch_attempt

    stanza, directory, port, late, go = await _late_attempt(lab, client, lab_config_path, tmp_path)
    try:
        drop = asyncio.ensure_future(asyncio.to_thread(drop_scratch, stanza, directory, port, True))
        await _until(_async_true_of(_dropped_mark(stanza, directory).exists), 60, "the final drop to begin", 0.01)
        go.touch()
        await asyncio.wait_for(drop, 300)
        assert await asyncio.to_thread(late.wait, 120) is not None
        assert not directory.exists(), "a copy restored after the run's final drop was left"
        assert stanza.processes("restore") == {} and port_free(port)
        # Its retry (or any attempt after the drop) refuses, before it writes anything.
        with pytest.raises(RestoreError) as e:
            with scratch_attempt(stanza, directory):
                pass
        assert e.value.kind == "ScratchDropped" and not directory.exists()
    finally:
        if late.poll() is None:
            late.kill()
            late.wait()
        drop_scratch(stanza, directory, port, last=True)


async def test_an_attempt_that_outlasts_the_final_drops_wait_makes_no_copy_after_it(
        lab, client, lab_config_path, tmp_path, monkeypatch):
    """The attempt holding the copy's directory is frozen (a paused VM) where the final drop
    cannot stop it: the drop gives up waiting and its retries run out. When the attempt wakes,
    it used to restore, start and hand over a copy nobody drops. It now looks for the drop's
    mark at each step, and drops what it made instead."""
    from activities.backup import restore
    from activities.backup.restore import drop_scratch, port_free

    monkeypatch.setattr(restore, "LAST_DROP_WAIT_S", 1)  # the production wait is 90 s
    stanza, directory, port, late, go = await _late_attempt(lab, client, lab_config_path, tmp_path)
    try:
        with pytest.raises(RestoreError) as e:
            await asyncio.to_thread(drop_scratch, stanza, directory, port, True)
        assert e.value.kind == "AttemptAlive", e.value
        go.touch()
        assert await asyncio.to_thread(late.wait, 120) != 0
        assert not directory.exists(), "the attempt made its copy after the run's final drop"
        assert stanza.processes("restore") == {} and port_free(port)
    finally:
        if late.poll() is None:
            late.kill()
            late.wait()
        drop_scratch(stanza, directory, port, last=True)


async def _late_attempt(lab, client, lab_config_path, tmp_path):
    """A scratch restore attempt cut off from its run (its worker partitioned, it never hears
    that the run gave up on it), in a process of its own: it holds the copy's directory and
    restores into it once the test touches ``go``. Returns (stanza, directory, port, process, go)."""
    from activities.backup.activities import RestoreActivities
    from activities.backup.restore import port_free

    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "incr")
    stanza = Stanza(lab.cfg, standby)
    directory = RestoreActivities(lab.cfg).scratch_dir(standby, f"test-late-{uuid.uuid4().hex[:8]}")
    port = next(p for p in range(lab.cfg.backup.scratch_port, lab.cfg.backup.scratch_port + 50) if port_free(p))
    held, go = tmp_path / "held", tmp_path / "go"
    late = _attempt_process(lab_config_path, standby, (
        "from activities.backup.restore import RestoreTarget, restore_to_scratch, scratch_attempt\n"
        f"with scratch_attempt(st, Path({str(directory)!r})):\n"
        f"    pause({str(held)!r}, {str(go)!r})\n"
        f"    restore_to_scratch(st, Path({str(directory)!r}), {port}, RestoreTarget(), {standby!r})\n"))
    try:
        await _until(_async_true_of(held.exists), 120, "the late attempt to hold the directory", 0.01)
    except BaseException:
        late.kill()
        late.wait()
        raise
    return stanza, directory, port, late, go


@pytest.mark.long  # ~90 s: the retry waits out the activity's 60 s heartbeat timeout
async def test_worker_killed_mid_rebuild_the_retry_finishes_and_the_standby_streams(lab, client):
    """kill -9 of the standby's regional worker while ``pgbackrest restore`` writes the new data
    directory: the retry (another attempt, on the restarted worker) finds the original aside and
    its own half-made restore in place, restores again and streams; nothing is left aside."""
    from lab.processes import kill_tree, read_pid

    primary, standby, pg, data = await _standby_with_a_backup(lab, client, "full")
    tag = uuid.uuid4().hex
    _commit(lab, "insert into restore_probe values (1, %s, 'before the rebuild')", tag)
    stanza = Stanza(lab.cfg, standby)
    handle = await client.start_workflow(RestoreWorkflow.run, RestoreInput(mode="rebuild-standby", region=standby),
                                         id=f"test-rebuild-crash-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    await handle.execute_update("approve", _decide("approve"))

    async def restoring() -> int | None:
        pids = list(stanza.processes("restore"))
        return pids[0] if pids else None

    pid = await _until(restoring, 120, "pgbackrest restore to run on the standby's node", 0.01)
    # Frozen mid-restore so it cannot finish before the worker dies, whatever the machine's speed.
    os.kill(pid, signal.SIGSTOP)
    try:
        assert aside_dir(data).exists()  # the original was moved aside before the restore began
        killed = kill_tree(read_pid(lab.worker_pidfile(standby)))  # kill -9: the worker and pgbackrest
        assert pid in killed
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    lab.start_worker(standby)
    res: RestoreResult = await handle.result()
    assert res.outcome in ("succeeded", "degraded") and res.rebuilt and res.rebuilt.backup_label, res
    attempts = [e.activity_task_started_event_attributes.attempt async for e in handle.fetch_history_events()
                if e.HasField("activity_task_started_event_attributes")]
    assert max(attempts) >= 2, attempts  # the killed attempt was retried, not finished before the kill
    st = pg_status(pg)
    assert st.role == "standby" and st.receiver_status == "streaming", st
    assert not aside_dir(data).exists() and stanza.processes("restore") == {}
    _commit(lab, "insert into restore_probe values (2, %s, 'after the rebuild')", tag)

    async def caught_up():
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            return [r[0] for r in conn.execute("select n from restore_probe where tag = %s order by n", (tag,))] \
                == [1, 2]

    await _until(caught_up, 60, "the rebuilt standby to have the primary's rows", 0.2)


async def test_a_rebuilt_standby_promoted_past_a_dead_branch_keeps_its_standby_streaming(lab, client):
    """A standby rebuilt from backup keeps the archive in its settings, so its promotion picks a
    timeline past every history file there, a split brain's dead branch included (no reuse).
    The skipped number's history file must then be on the new primary: the old primary, made a
    standby of it, asks it over replication for every history file in between and, without
    it, retried forever (seen in CI after the DataSync rebuild test: "could not receive
    timeline history file ... 0000000C.history")."""
    from eagle_dr.launch import start_move
    from lab.osuser import make_dir
    from workflows.models import SwitchoverInput

    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    await _backup(lab, client, type="incr")
    handle = await client.start_workflow(RestoreWorkflow.run, RestoreInput(mode="rebuild-standby", region=standby),
                                         id=f"test-rebuild-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    await _wait_awaiting(handle)
    await handle.execute_update("approve", _decide("approve"))
    res: RestoreResult = await handle.result()
    assert res.outcome in ("succeeded", "degraded") and res.rebuilt, res
    # A dead branch in the stanza: the history file of the next timeline number, as a split
    # brain's promoted loser leaves it.
    tli = pg_status(lab.cfg.region(primary).postgres).timeline
    dead = tli + 1
    wal = PgCtl(lab.cfg.region(primary).postgres).data_dir / "pg_wal"
    parent = (wal / f"{tli:08X}.history")
    branch = lab.region_dir(primary) / "dead-branch"
    make_dir(branch, lab.user, 0o755)
    text = (parent.read_text() if parent.exists() else "") + f"{tli}\t0/1000000\tdead branch (test)\n"
    (branch / f"{dead:08X}.history").write_text(text)
    lab.user.own(branch / f"{dead:08X}.history")
    Stanza(lab.cfg, primary).run("archive-push", "--no-archive-async", args=(str(branch / f"{dead:08X}.history"),),
                                 timeout=120)

    auto = PgCtl(lab.cfg.region(standby).postgres).data_dir / "postgresql.auto.conf"
    assert "recovery_target_timeline" in auto.read_text()  # the rebuild's pin
    sw = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                  target_region=standby))).result()
    try:
        assert sw.outcome == "succeeded", sw
        # Gone once it is the primary: a copy of its settings (pg_basebackup -R, a restore of
        # its backups) would otherwise start towards the timeline it has left.
        assert "recovery_target_timeline" not in auto.read_text()
        new_tli = pg_status(lab.cfg.region(standby).postgres).timeline
        assert new_tli > dead, (tli, new_tli)  # past the dead branch: no timeline number reused
        assert (PgCtl(lab.cfg.region(standby).postgres).data_dir / "pg_wal" / f"{dead:08X}.history").exists()

        def follows() -> bool:
            st = pg_status(lab.cfg.region(primary).postgres)
            return st.role == "standby" and st.receiver_status == "streaming"

        await _until(lambda: _async_true(follows()), 120, "the old primary to stream on the new timeline", 0.3)
    finally:
        back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                        target_region=primary))).result()
        assert back.outcome == "succeeded", back


async def test_verify_restores_the_newest_backup_follows_the_primary_and_finds_every_table_identical(lab, client):
    """Restore mode verify on the real lab: the copy replays the archive alone to the primary's
    newest archived segment, then streams; every table is compared with the primary key by key
    (the sample app writing on): no difference, the same rows on both sides, the copy dropped.
    A table without a primary key (restore_probe) is said to be not compared, never passed."""
    _table(lab)
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create table if not exists verify_probe (id bigint primary key, tag text)")
    await _backup(lab, client, type="incr")
    tag = uuid.uuid4().hex
    base = int(datetime.now(timezone.utc).timestamp() * 1000)
    for n in range(50):  # after the backup: in the copy only through the archive and the stream
        _commit(lab, "insert into verify_probe values (%s, %s)", base + n, tag)
    await _archived_now(lab)
    # Only the newest backup to the end of the archive can follow the primary.
    with pytest.raises(WorkflowFailureError) as e:
        await (await _start_restore(lab, client, mode="verify", keep_minutes=0,
                                    target=RestoreTarget(kind="lsn", lsn="0/1"))).result()
    assert e.value.cause.type == "InvalidInput" and "target" in str(e.value.cause), e.value.cause
    handle = await _start_restore(lab, client, mode="verify", keep_minutes=0)
    res = await handle.result()
    chk = res.check
    assert chk is not None and chk.follower and chk.scratch_b is not None and chk.differences == 0, chk
    assert chk.not_compared == ["public.restore_probe"], chk.not_compared
    assert res.outcome == "degraded" and all("NOT COMPARED" in d and "restore_probe" in d for d in res.degraded), \
        res.degraded
    assert chk.region_a == _primary(lab) and chk.scratch_b.region == res.scratch.region
    tables = {t.table: t for t in chk.tables}
    probe = tables["public.verify_probe"]
    assert probe.rows_a == probe.rows_b >= 50 and probe.ranges_checked >= 1, probe
    assert tables["public.alerts"].differences == 0
    f = res.following
    assert f.archived_segment and f.archive_replayed_to and f.upstream.endswith(
        f":{lab.cfg.region(_primary(lab)).postgres.port}")
    assert res.dropped
    _no_scratch_left(lab)
    await record(handle, "restore-verify")


async def test_verify_names_a_gap_in_the_archive_instead_of_streaming_over_it(lab, client):
    """A WAL segment lost from the bucket between the backup and the newest one: replay of the
    archive stops there, and verify fails with ArchiveGap, saying where the archive ends,
    instead of letting streaming from the primary fill the hole unnoticed."""
    from activities.postgres.lsn import lsn_to_int
    from activities.postgres.wal import segment_start

    _table(lab)
    await _backup(lab, client, type="incr")
    segments = []
    for i in range(3):
        _commit(lab, "insert into restore_probe values (%s, %s, 'gap')", i, uuid.uuid4().hex)
        with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
            segments.append(conn.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0])
        await _archived_now(lab)
    region = lab.cfg.other(_primary(lab)).name  # the copy's host, and its own bucket
    bucket = lab.cfg.region(region).s3.bucket
    s3 = lab.s3(region).client()
    lost = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", []) if re.search(rf"/{segments[1]}-[0-9a-f]{{40}}", o["Key"])]
    assert len(lost) == 1, lost
    body = s3.get_object(Bucket=bucket, Key=lost[0])["Body"].read()
    s3.delete_object(Bucket=bucket, Key=lost[0])
    try:
        handle = await _start_restore(lab, client, mode="verify", region=region, keep_minutes=0)
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
        cause = e.value.cause
        assert cause.type == "ArchiveGap", cause
        assert f"{region}'s bucket has a gap" in cause.message and f"segment {segments[1]} is not in the bucket" \
            in cause.message, cause.message
        # Replay stopped before the segment after the lost one: it never got past the hole.
        reached = re.search(r"stopped at ([0-9A-F]+/[0-9A-F]+)", cause.message).group(1)
        assert lsn_to_int(reached) < segment_start(segments[2], 16 * 1024 * 1024), (reached, segments)
        _no_scratch_left(lab)
    finally:
        s3.put_object(Bucket=bucket, Key=lost[0], Body=body)  # the archive whole again for later tests



async def test_verify_finds_a_row_rotted_on_the_primarys_disk_since_the_backup(lab, client):
    """What restore verify is for: a row changed on the primary's disk after the backup, by no
    write (a bad disk or a bug; the lab runs without data checksums, so PostgreSQL does not
    notice). The copy, built from the backup and the WAL, still has the row as it was written:
    the check names exactly that key, the compare step fails, the run is degraded and says the
    copy differs, and the copy is dropped. Nothing is repaired: which side is right is for a
    human (restore mode recover-rows writes the copy's rows back)."""
    primary = _primary(lab)
    marker = f"kept-{uuid.uuid4().hex[:16]}"
    rotten = "ROT-" + marker[4:]
    with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create table if not exists verify_rot (id bigint primary key, v text not null)")
        conn.execute("truncate verify_rot")
        conn.execute("insert into verify_rot select g, 'v' || g from generate_series(1, 300) g")
        conn.execute("insert into verify_rot values (1000, %s)", (marker,))
        # Frozen and checkpointed before the rot: no later hint-bit write logs the page again
        # (wal_log_hints), which would carry the rotten row into the WAL and so into the copy.
        conn.execute("vacuum (freeze) verify_rot")
        conn.execute("checkpoint")
        path = conn.execute("select pg_relation_filepath('verify_rot')").fetchone()[0]
    try:
        await _backup(lab, client, type="incr")
        # A clean stop writes the page out; the restart replays nothing that touches it.
        ctl = PgCtl(lab.cfg.region(primary).postgres)
        ctl.stop("fast")
        try:
            page_file = ctl.data_dir / path
            data = page_file.read_bytes()
            assert data.count(marker.encode()) == 1
            page_file.write_bytes(data.replace(marker.encode(), rotten.encode()))
        finally:
            ctl.start()
        with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), autocommit=True) as conn:
            assert conn.execute("select v from verify_rot where id = 1000").fetchone()[0] == rotten
        await _archived_now(lab)

        handle = await _start_restore(lab, client, mode="verify", keep_minutes=0)
        res = await handle.result()
        chk = res.check
        assert chk is not None and chk.follower and chk.differences == 1, chk
        rot = {t.table: t for t in chk.tables}["public.verify_rot"]
        assert rot.diff.updated == 1 and rot.diff.updated_keys == [["1000"]], rot.diff
        assert rot.diff.inserted == rot.diff.deleted == 0 and rot.rows_a == rot.rows_b == 301, rot
        # Only that key: every other table the same (the sample app writing on).
        assert all(t.differences == 0 for t in chk.tables if t.table != "public.verify_rot"), chk.tables
        assert res.outcome == "degraded" and any(d.startswith("the restored copy differs") for d in res.degraded), \
            res.degraded
        progress = await _progress(handle)
        compare = next(s for s in progress.steps if s.name.startswith("Compare every table"))
        assert compare.status == "failed" and compare.detail.startswith("1 differing keys"), compare
        assert res.dropped
        _no_scratch_left(lab)
    finally:
        with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), autocommit=True) as conn:
            conn.execute("drop table if exists verify_rot")
        await _until(lambda: _async_true(pg_status(lab.cfg.region(lab.cfg.other(primary).name).postgres)
                                         .receiver_status == "streaming"), 60, "the standby to stream again", 0.3)
