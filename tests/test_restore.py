"""Point-in-time restores into scratch instances: real pgBackRest, SeaweedFS over TLS, PostgreSQL.

Each test makes the backups it needs (BackupWorkflow), so it runs alone or in any order.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import botocore.exceptions
import psycopg
import pytest
from temporalio.client import WorkflowFailureError

from activities.backup.activities import RestoreActivities
from activities.backup.catalog import read_catalog
from activities.backup.pgbackrest import Stanza, _write_owned
from activities.backup.restore import RestoreError, RestoreTarget, connect_scratch, restore_to_scratch, scratch_config
from tests.histories import record
from tests.lab_helpers import _primary, _until
from workflows.backup import BackupInput, BackupWorkflow
from workflows.restore import RestoreInput, RestoreResult, RestoreWorkflow

pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              # Its tests name lab.cfg.primary as the primary (tests/conftest.py).
              pytest.mark.usefixtures("configured_topology")]


async def _backup(lab, client, **kw):
    return await client.execute_workflow(BackupWorkflow.run, BackupInput(**kw), id=f"test-backup-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)


def _commit(lab, sql: str, *args) -> datetime:
    """Run one statement in its own transaction; its commit time (track_commit_timestamp)."""
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        xid = conn.execute(sql + " returning xmin::text::bigint", args).fetchone()[0]
        return conn.execute("select pg_xact_commit_timestamp(%s::text::xid)", (str(xid),)).fetchone()[0]


async def _archived_now(lab) -> None:
    """Switch WAL (a statement of its own: see notes 3) and wait until that segment is archived."""
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        # A WAL record first: with nothing written since the last switch, pg_switch_wal does not
        # switch and names the segment before, which may be archived already yet never show in
        # last_archived_wal (a backup's .backup file, of an older segment, archived after it:
        # seen as a 90 s timeout).
        conn.execute("select pg_logical_emit_message(false, 'eagle-dr-test', 'switch')")
        seg = conn.execute("select pg_walfile_name(pg_switch_wal())").fetchone()[0]

        async def archived():
            row = conn.execute("select last_archived_wal from pg_stat_archiver").fetchone()
            return row[0] is not None and row[0][:24] >= seg

        try:
            await _until(archived, 90, f"WAL segment {seg} archived", 0.3)
        except AssertionError as e:
            row = conn.execute("select last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
                               "last_failed_time, pg_walfile_name(pg_current_wal_lsn()) from pg_stat_archiver"
                               ).fetchone()
            raise AssertionError(f"{e}; pg_stat_archiver (last archived, at, failed count, last failed, at, "
                                 f"current): {row}") from None


async def _start_restore(lab, client, **kw):
    return await client.start_workflow(RestoreWorkflow.run, RestoreInput(**kw), id=f"test-restore-{uuid.uuid4()}",
                                       task_queue=lab.cfg.temporal.control_task_queue)


async def _kept(handle):
    from temporalio.client import WorkflowExecutionStatus

    async def ready():
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            await handle.result()  # raises with the reason
            raise AssertionError("the restore ended before it kept a copy")
        try:
            return await handle.query(RestoreWorkflow.scratch)
        except Exception:  # noqa: BLE001 - not started yet
            return None

    return await _until(ready, 300, "the scratch copy to be up", 0.3)


def _rows(lab, region: str, scratch, table: str, tag: str) -> list[int]:
    st = Stanza(lab.cfg, region)
    sc = scratch_config(st, Path(scratch.directory), scratch.port)
    with connect_scratch(sc) as conn:
        return [r[0] for r in conn.execute(f"select n from {table} where tag = %s order by n", (tag,))]


def _table(lab) -> None:
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create table if not exists restore_probe (n int, tag text, body text)")


async def test_pitr_to_a_time_brings_back_exactly_the_rows_committed_before_it(lab, client):
    _table(lab)
    await _backup(lab, client, type="full")
    tag = uuid.uuid4().hex
    commits = []
    for n in range(1, 5):
        commits.append(_commit(lab, "insert into restore_probe values (%s, %s, 'x')", n, tag))
        # Commit times must differ by more than the clock's grain for a target between them.
        await _until(lambda: _async_true(datetime.now(timezone.utc) > commits[-1] + timedelta(milliseconds=300)),
                     5, "the clock to move on")
    await _archived_now(lab)
    target = commits[1] + (commits[2] - commits[1]) / 2  # after row 2's commit, before row 3's
    region = lab.cfg.secondary.name
    # A big database's restore needs more than the default hour: the input's timeout is the step's.
    handle = await _start_restore(lab, client, region=region, target=RestoreTarget(kind="time", time=target),
                                  keep_minutes=30, timeout_seconds=3 * 3600)
    scratch = await _kept(handle)
    assert _rows(lab, region, scratch, "restore_probe", tag) == [1, 2]
    restore_step = [e.activity_task_scheduled_event_attributes async for e in handle.fetch_history_events()
                    if e.HasField("activity_task_scheduled_event_attributes") and
                    e.activity_task_scheduled_event_attributes.activity_type.name == "restore_scratch"]
    assert [s.start_to_close_timeout.ToSeconds() for s in restore_step] == [3 * 3600 + 300], restore_step
    assert scratch.recovered_to is not None and commits[1] <= scratch.recovered_to < commits[2]
    assert scratch.backup_label and scratch.restore_seconds > 0
    await handle.signal(RestoreWorkflow.release)
    res: RestoreResult = await handle.result()
    await record(handle, "restore-pitr-time")
    assert res.outcome == "succeeded" and res.dropped
    assert not Path(scratch.directory).exists()


async def _async_true(v):
    return v


async def test_a_cancel_while_the_copy_is_dropped_still_drops_it(lab, client):
    """A cancel that lands while the scratch copy is being dropped (the copy slow to stop: here
    its postmaster frozen): the drop ran shielded, but the run ended cancelled around it, and
    the drop's activity, cut off, was never retried: a writable copy of production data was
    left on the standby's host. The drop now goes to its end; the run says it dropped it."""
    import os
    import signal

    from lab.processes import read_pid
    from tests.lab_helpers import _progress

    await _backup(lab, client, type="incr")
    region = lab.cfg.secondary.name
    handle = await _start_restore(lab, client, region=region, keep_minutes=30)
    scratch = await _kept(handle)
    postmaster = read_pid(Path(scratch.directory) / "pgdata" / "postmaster.pid")
    assert postmaster
    os.kill(postmaster, signal.SIGSTOP)  # pg_ctl stop now waits
    try:
        await handle.signal(RestoreWorkflow.release)

        async def dropping():
            p = await _progress(handle)
            return p is not None and p.steps and p.steps[-1].name == "Stop and delete the scratch instance" \
                and p.steps[-1].status == "running"

        await _until(dropping, 60, "the drop step", 0.1)
        await handle.cancel()

        async def seen():
            # The run has taken the cancel (a workflow task after it) while the drop still waits.
            events = [e async for e in handle.fetch_history_events()]
            asked = next((e.event_id for e in events
                          if e.HasField("workflow_execution_cancel_requested_event_attributes")), None)
            return asked is not None and any(e.event_id > asked and e.HasField("workflow_task_completed_event_attributes")
                                             for e in events)

        await _until(seen, 30, "the cancel to reach the run", 0.1)
    finally:
        os.kill(postmaster, signal.SIGCONT)
    res: RestoreResult = await handle.result()
    assert res.dropped and not Path(scratch.directory).exists(), res
    await record(handle, "restore-cancel-while-dropping")
    _no_scratch_left(lab)


async def test_a_copy_left_by_a_terminated_restore_is_dropped_by_the_next_restore_on_its_host(lab, client):
    """A restore terminated from the UI (a terminate runs no cleanup) left its copy for good: a
    writable PostgreSQL of production data on a port, its disk beside the standby. The next
    restore on that host drops the copies whose runs have ended, and says so. A copy of a
    restore still running (kept for an operator) stays; so do one younger than 10 minutes, one
    with no owner record (another service's sharing the folder) and one another namespace owns
    (not this worker's to judge, even when its workflow is unknown here). One whose workflow this
    namespace has never heard of is left over, and dropped."""
    import os

    from activities.backup.left_copies import CopyOwner, record_owner
    from activities.backup.restore import drop_scratch, port_free, scratch_owner_file
    from tests.lab_helpers import _progress

    await _backup(lab, client, type="incr")
    region = lab.cfg.secondary.name
    ended, young_ended, kept_by = [await _start_restore(lab, client, region=region, keep_minutes=30)
                                   for _ in range(3)]
    left, young, kept = [await _kept(h) for h in (ended, young_ended, kept_by)]
    try:
        for h in (ended, young_ended):
            await h.terminate("ended from the UI")
        assert Path(left.directory).exists() and not port_free(left.port)  # nothing dropped it
        stanza = Stanza(lab.cfg, region)
        unowned, elsewhere, unknown = (Path(left.directory).with_name(n)
                                       for n in ("r-0123456789ab", "r-0123456789ac", "r-0123456789ad"))
        for d in (unowned, elsewhere, unknown):
            d.mkdir()
        # The same workflow id in both: only the namespace decides.
        record_owner(stanza, elsewhere, CopyOwner(namespace="another", workflow_id="restore-never-run", run_id="x"))
        record_owner(stanza, unknown, CopyOwner(namespace=client.namespace, workflow_id="restore-never-run",
                                                run_id="x"))
        # Made an hour ago; ``young`` keeps its real age of seconds.
        for d in (left.directory, kept.directory, unowned, elsewhere, unknown):
            old = datetime.now().timestamp() - 3600
            os.utime(d, (old, old))
        handle = await _start_restore(lab, client, region=region, keep_minutes=0)
        res: RestoreResult = await handle.result()
        assert res.dropped, res
        assert not Path(left.directory).exists() and port_free(left.port)
        assert Path(kept.directory).exists() and not port_free(kept.port)  # its restore still runs
        assert Path(young.directory).exists() and not port_free(young.port)
        assert unowned.exists() and elsewhere.exists() and not unknown.exists()
        step = next(s for s in (await _progress(handle)).steps if s.name.startswith("Drop copies on"))
        assert Path(left.directory).name in step.detail, step
        assert not any(Path(c.directory).name in step.detail for c in (kept, young)), step
        await record(handle, "restore-drops-ended-runs-copies")
    finally:
        await kept_by.signal(RestoreWorkflow.release)
        await kept_by.result()
        drop_scratch(Stanza(lab.cfg, region), Path(young.directory), young.port, last=True)
        for n in ("r-0123456789ab", "r-0123456789ac", "r-0123456789ad"):
            d = Path(left.directory).with_name(n)
            shutil.rmtree(d, ignore_errors=True)
            scratch_owner_file(Stanza(lab.cfg, region), d).unlink(missing_ok=True)
    _no_scratch_left(lab)


async def test_a_restore_point_a_backup_ended_after_restores_from_the_backup_before_it(lab, client):
    """A backup that ends between a restore point and the restore (a scheduled one, during a
    drill): pgBackRest 2.45 takes the newest backup for a name or an LSN target, replay starts
    at that backup's end, past the point, and never meets it. With the point's position (what
    pg_create_restore_point returns; the drill has it) the restore starts from the backup
    before; without it, the failure says what to give."""
    _table(lab)
    await _backup(lab, client, type="full")
    tag = uuid.uuid4().hex
    _commit(lab, "insert into restore_probe values (1, %s, 'x')", tag)
    point = f"test-{tag[:16]}"
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        lsn = str(conn.execute("select pg_create_restore_point(%s)", (point,)).fetchone()[0])
    _commit(lab, "insert into restore_probe values (2, %s, 'x')", tag)
    after = (await _backup(lab, client, type="incr")).backups  # ends past the point
    assert after, "the backup after the point"
    await _archived_now(lab)
    region = lab.cfg.secondary.name
    with pytest.raises(WorkflowFailureError) as e:
        await (await _start_restore(lab, client, region=region, keep_minutes=0,
                                    target=RestoreTarget(kind="name", name=point))).result()
    cause = e.value.cause
    assert cause.type == "InvalidInput" and "target.lsn" in str(cause) and "never met restore point" in str(cause), \
        cause
    for target in (RestoreTarget(kind="name", name=point, lsn=lsn), RestoreTarget(kind="lsn", lsn=lsn)):
        handle = await _start_restore(lab, client, region=region, target=target, keep_minutes=30)
        scratch = await _kept(handle)
        assert _rows(lab, region, scratch, "restore_probe", tag) == [1], target
        assert scratch.backup_label not in {b.label for b in after}, (scratch.backup_label, after)
        await handle.signal(RestoreWorkflow.release)
        assert (await handle.result()).outcome == "succeeded"
    _no_scratch_left(lab)


async def test_latest_restore_from_the_other_bucket_when_the_regions_own_is_lost(lab, client):
    _table(lab)
    await _backup(lab, client, type="full")
    tag = uuid.uuid4().hex
    _commit(lab, "insert into restore_probe values (1, %s, 'x')", tag)
    await _archived_now(lab)
    lost = lab.cfg.secondary
    s3 = lab.s3(lost.name).client()
    objects = s3.get_paginator("list_objects_v2").paginate(Bucket=lost.s3.bucket)
    for page in objects:
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=lost.s3.bucket, Key=o["Key"])
    s3.delete_bucket(Bucket=lost.s3.bucket)
    try:
        # Asked for the lost bucket by name: refused, clearly, with nothing left behind.
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow(RestoreWorkflow.run, RestoreInput(region=lost.name, repo=lost.name,
                                                                              keep_minutes=0),
                                          id=f"test-restore-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
        assert "repo" in str(e.value.cause)
        # Unnamed: the region's own bucket is gone, so the other region's serves, and it says so.
        handle = await _start_restore(lab, client, region=lost.name, keep_minutes=30)
        scratch = await _kept(handle)
        assert scratch.repo_region == lab.cfg.other(lost.name).name
        assert _rows(lab, lost.name, scratch, "restore_probe", tag) == [1]
        await handle.signal(RestoreWorkflow.release)
        res = await handle.result()
        await record(handle, "restore-own-bucket-lost")
        assert res.outcome == "degraded" and any("restored from" in d for d in res.degraded)

        # The region's S3 endpoint down too (a lost region): seen in a connect, at once. pgBackRest
        # retried it for a minute in the check and a minute in the restore's space check.
        server = lab.s3(lost.name)
        server.stop()
        try:
            res = await client.execute_workflow(RestoreWorkflow.run, RestoreInput(region=lost.name, keep_minutes=0),
                                                id=f"test-restore-{uuid.uuid4()}",
                                                task_queue=lab.cfg.temporal.control_task_queue)
        finally:
            server.start()
        assert res.outcome == "degraded" and res.scratch.repo_region == lab.cfg.other(lost.name).name, res
        assert any("restored from" in d and "its endpoint" in d for d in res.degraded), res.degraded
    finally:
        # The bucket back, its stanza re-made and a full backup in it (later tests need both repos).
        s3.create_bucket(Bucket=lost.s3.bucket)
        res = await _backup(lab, client, type="full", repos=[lost.name])
        assert res.outcome == "succeeded"


def _push_dead_branch(lab) -> int:
    """Archive the history file a split brain's loser pushes when it is promoted: timeline T+1,
    forked from the live primary's timeline T at its current LSN, while the primary goes on
    writing on T. The same bytes, by the same ``archive-push``, as the loser's archive_command."""
    region = _primary(lab)
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        lsn = conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        cur = int(conn.execute("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)").fetchone()[0], 16)
        parent = conn.execute("select pg_read_file('pg_wal/' || %s)", (f"{cur:08X}.history",)).fetchone()[0] \
            if cur > 1 else ""
    dead = cur + 1
    st = Stanza(lab.cfg, region)
    path = st.dir / f"{dead:08X}.history"
    _write_owned(path, parent + f"{cur}\t{lsn}\tno recovery target specified\n", st.region.postgres)
    try:
        st.run("archive-push", "--no-archive-async", args=(str(path),), timeout=120)
    finally:
        path.unlink()
    for repo in (1, 2):
        assert st.has_history(repo, dead), f"the dead branch's history is not in repo{repo}"
    assert st.has_history(1, dead + 100) is False  # a timeline nobody made: not found, not "unknown"
    return cur


async def test_a_split_brain_losers_timeline_in_the_archive_does_not_derail_restores(lab, client):
    # PostgreSQL's default recovery_target_timeline, "latest", follows the newest history file in
    # the archive: here a dead branch ("requested timeline N is not a child of this server's
    # history"). Restores follow the live primary's timeline instead.
    _table(lab)
    live = _push_dead_branch(lab)
    # A backup taken after the fork: its checkpoint lies past the dead branch's switch point,
    # which is where following that branch fails. (One taken before it would replay into the
    # live timeline's segments anyway, the dead branch having none of its own.)
    await _backup(lab, client, type="full")
    tag = uuid.uuid4().hex
    _commit(lab, "insert into restore_probe values (1, %s, 'after the fork')", tag)
    await _archived_now(lab)
    region = lab.cfg.secondary.name
    handle = await _start_restore(lab, client, region=region, keep_minutes=30)
    scratch = await _kept(handle)
    assert _rows(lab, region, scratch, "restore_probe", tag) == [1]
    # Promoted at the end of the live timeline: one past it (the dead branch's number is taken
    # in the archive, so PostgreSQL skips it).
    assert scratch.timeline is not None and scratch.timeline > live
    await handle.signal(RestoreWorkflow.release)
    assert (await handle.result()).outcome == "succeeded"


@pytest.mark.long  # 70-85 s each: `make test-long` (CI's 30 minutes)
async def test_repos_hold_no_plaintext_and_a_wrong_passphrase_is_named(lab, client):
    _table(lab)
    canary = f"CANARY-{uuid.uuid4().hex}"
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        conn.execute("insert into restore_probe select g, 'canary', %s from generate_series(1, 2000) g", (canary,))
    await _archived_now(lab)
    await _backup(lab, client, type="incr")
    needle = canary.encode()
    seen = 0
    for r in lab.cfg.regions:
        s3 = lab.s3(r.name).client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=r.s3.bucket):
            for o in page.get("Contents", []):
                seen += 1
                try:
                    body = s3.get_object(Bucket=r.s3.bucket, Key=o["Key"])["Body"].read()
                except botocore.exceptions.ClientError as e:
                    # SSE-C objects (the Redis snapshots) refuse a GET without their key.
                    assert o["Key"].startswith("redis/"), (o["Key"], e)
                    continue
                assert needle not in body, o["Key"]
    assert seen > 20
    # The same configuration with a wrong passphrase: info says the repos are unreadable, and a
    # restore fails naming the cause instead of "no backup".
    # Under the lab's state dir: pgBackRest runs as the lab user, who cannot enter pytest's tmp.
    tmp_path = lab.state / f"wrong-pass-{uuid.uuid4().hex[:8]}"
    tmp_path.mkdir(mode=0o755)
    wrong = tmp_path / "wrong-pass"
    wrong.write_text("not-the-passphrase")
    wrong.chmod(0o644)
    regions = []
    for r in lab.cfg.regions:
        regions.append(r.model_copy(update={"s3": r.s3.model_copy(update={"cipher_pass": type(r.s3.cipher_pass)(file=str(wrong))}),
                                            "postgres": r.postgres.model_copy(update={
                                                "pgbackrest_config": str(tmp_path / r.name / "pgbackrest.conf")})}))
    bad_cfg = lab.cfg.model_copy(update={"regions": regions})
    st = Stanza(bad_cfg, lab.cfg.secondary.name)
    st.write_configs()
    cat = read_catalog(st)
    assert not cat.ok and all(not r.ok for r in cat.repos)
    with pytest.raises(RestoreError) as e:
        from activities.backup.restore import check_target, utcnow

        check_target(RestoreTarget(), cat, lab.cfg.secondary.name, utcnow())
    assert "passphrase" in str(e.value)
    with pytest.raises(RestoreError) as e:
        restore_to_scratch(st, tmp_path / "scratch", lab.cfg.backup.scratch_port + 40, RestoreTarget(),
                           lab.cfg.secondary.name)
    assert "passphrase" in str(e.value) and not (tmp_path / "scratch").exists()
    shutil.rmtree(tmp_path)


async def test_a_timeline_lookup_that_cannot_list_the_repo_follows_the_primarys_timeline(lab):
    """Which timeline a restore follows asks the repo for the live primary's history file. A
    listing that fails (a throttled or timed-out S3 listing; here a refused endpoint) was read
    as "not there": the restore followed the backup's own timeline, replayed to the fork and
    promoted a copy missing everything since, reported as reached. It follows the primary's
    timeline instead: were the file really missing, PostgreSQL would refuse to start, loudly."""
    from activities.backup.pgbackrest import repo_key
    from activities.backup.restore import timeline_to_follow

    region = lab.cfg.secondary.name
    other = lab.cfg.other(region).name
    # Under the lab's state dir: pgBackRest runs as the lab user, who cannot enter pytest's tmp.
    tmp_path = lab.state / f"dead-repo-{uuid.uuid4().hex[:8]}"
    tmp_path.mkdir(mode=0o755)
    with socket.socket() as s:  # a port nothing listens on: refused
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    regions = [r.model_copy(update={
        "s3": r.s3.model_copy(update={"endpoint_url": f"https://127.0.0.1:{dead}"}) if r.name == other else r.s3,
        "postgres": r.postgres.model_copy(update={"pgbackrest_config": str(tmp_path / r.name / "pgbackrest.conf")})})
        for r in lab.cfg.regions]
    st = Stanza(lab.cfg.model_copy(update={"regions": regions}), region)
    try:
        st.write_configs()
        # pgBackRest retries a refused endpoint past these bounds: could not tell, in time.
        assert st.has_history(repo_key(st.cfg, region, other), 7, timeout=5) is None
        assert timeline_to_follow(st, other, 7, timeout=5) == "7"
    finally:
        shutil.rmtree(tmp_path)


@pytest.mark.parametrize("target, field", [
    ({"kind": "time", "time": "2999-01-01T00:00:00+00:00"}, "target.time"),
    ({"kind": "time", "time": "2001-01-01T00:00:00+00:00"}, "target.time"),
    ({"kind": "time", "time": "yesterday, around tea"}, "target.time"),
    ({"kind": "lsn", "lsn": "not-an-lsn"}, "target.lsn"),
    ({"kind": "lsn", "lsn": "0/1"}, "target.lsn"),  # before the end of every backup
])
async def test_bad_restore_targets_are_refused_naming_the_field(lab, client, target, field):
    await _backup(lab, client, type="incr")
    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow("RestoreWorkflow", {"target": target, "keep_minutes": 0},
                                      id=f"test-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    cause = e.value.cause
    assert cause.type == "InvalidInput" and cause.non_retryable and field in str(cause), cause
    _no_scratch_left(lab)


async def test_unknown_repo_and_taken_port_are_refused_with_nothing_left(lab, client):
    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow("RestoreWorkflow", {"repo": "eu-north-9"}, id=f"test-{uuid.uuid4()}",
                                      task_queue=lab.cfg.temporal.control_task_queue)
    assert e.value.cause.type == "InvalidInput" and "repo" in str(e.value.cause)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow("RestoreWorkflow", {"port": port, "keep_minutes": 0},
                                          id=f"test-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    assert "port" in str(e.value.cause) and str(port) in str(e.value.cause)
    _no_scratch_left(lab)


def _no_scratch_left(lab) -> None:
    for r in lab.cfg.regions:
        d = RestoreActivities(lab.cfg).scratch_dir(r.name, "x").parent
        assert not d.exists() or not any(d.iterdir()), list(d.iterdir())



async def test_a_restore_with_no_primary_to_name_the_timeline_says_it_followed_the_latest(lab, client):
    """The primary's server is down (a disaster is when a restore is run): nothing names the live
    branch, recovery follows PostgreSQL's default, the repo's latest timeline, which may be a
    dead branch a fenced old primary or a split brain's loser archived. The copy is made, and
    the run says so instead of reporting plain success."""
    from activities.postgres.ctl import PgCtl
    from activities.postgres.status import pg_status

    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    _table(lab)
    # The backup alone (its WAL archived before it ends): waiting for a later segment as well
    # timed out in CI after this file's other tests (noted; not what this test is about).
    await _backup(lab, client, type="incr")
    ctl = PgCtl(lab.cfg.region(primary).postgres)
    ctl.kill()
    try:
        handle = await _start_restore(lab, client, region=standby, keep_minutes=0)
        res = await handle.result()
    finally:
        ctl.start()
    await record(handle, "restore-says-latest-timeline")
    # Alone, the repo's latest timeline is the primary's own; after this file's other tests it
    # is a branch the backup is not on (which recovery refuses: it failed the restore), and the
    # backup's own timeline is followed instead. Either way the run says what it followed.
    assert res.scratch is not None and res.scratch.followed in ("latest", "current"), res
    said = [d for d in res.degraded if d.startswith("no single reachable primary named the live timeline")]
    assert res.outcome == "degraded" and said, res.degraded
    assert ("followed the backup's own" in said[0]) == (res.scratch.followed == "current"), said
    await _until(_async_true_of(lambda: pg_status(lab.cfg.region(primary).postgres).role == "primary"), 60,
                 "the primary back")
    lab.wait_replication()


def _async_true_of(fn):
    async def run():
        return fn()
    return run


async def test_a_restore_its_scratch_volume_cannot_hold_is_refused_before_anything_is_written(lab, client, tmp_path):
    """By default the scratch copy is made on a standby's host, beside its data directory: a
    restore that fills that volume stops the standby's replication, every day a drill runs.
    The volume here is a real 64 MiB tmpfs, smaller than the backup plus the replay's WAL."""
    import asyncio
    import subprocess

    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.backup.activities import RestoreRequest

    _table(lab)
    await _backup(lab, client, type="full")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        cfg = lab.cfg.model_copy(update={"backup": lab.cfg.backup.model_copy(update={"scratch_dir": str(small)})})
        region = lab.cfg.secondary.name
        req = RestoreRequest(region=region, repo_region=region, target=RestoreTarget(kind="latest"),
                             name=f"nospace-{uuid.uuid4().hex[:8]}")
        with pytest.raises(ApplicationError) as e:
            await asyncio.to_thread(ActivityEnvironment().run, RestoreActivities(cfg).restore_scratch, req)
        assert e.value.type == "NoSpace" and e.value.non_retryable, e.value
        assert f"{small} on {region}'s host has" in str(e.value) and "backup.scratch_dir" in str(e.value), e.value
        assert list(small.iterdir()) == []  # refused before anything was written
    finally:
        subprocess.run(["umount", str(small)], check=False)


async def test_a_gap_recorded_on_the_primarys_host_stops_a_restore_on_another(lab, client, lab_config_path, tmp_path):
    """The archive guard records a WAL gap in a bucket beside the pgBackRest files of the node
    it runs on, the primary's. A restore runs on the standby's node, which on separate hosts
    has none of those files: here its worker is given that view (its config puts the primary's
    pgBackRest files where its host has nothing). It used to read only its own host's files,
    restore across the gap, stop there and promote the copy as if that were the target. The
    primary's worker reads the primary's records now, and the restore is refused. And when that
    worker is down with its region (the usual reason to restore), the files the restoring host
    has of it are still read: on one host, or a shared volume, the gap still refuses."""
    import yaml

    from activities.backup.archive import WalGap, _write_gaps, read_gaps
    from lab.processes import kill_tree, read_pid

    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    done = await _backup(lab, client, type="incr")
    stopped = max(b.stopped for b in done.backups if b.repo_region == standby)
    st = Stanza(lab.cfg, primary)
    found = st.gaps_file.read_text() if st.gaps_file.exists() else None
    gap = WalGap(repo_region=standby, since=stopped, until=datetime.now(timezone.utc), cause="dropped")
    doc = yaml.safe_load(Path(lab_config_path).read_text())
    for r in doc["regions"]:
        if r["name"] == primary:
            r["postgres"]["pgbackrest_config"] = str(tmp_path / "not-on-this-host" / "pgbackrest.conf")
    other_host = tmp_path / "standby-host.yaml"
    other_host.write_text(yaml.safe_dump(doc, sort_keys=False))
    kill_tree(read_pid(lab.worker_pidfile(standby)))
    lab.config_path, path = str(other_host), lab.config_path
    try:
        lab.start_worker(standby)
        _write_gaps(st, read_gaps(st) + [gap])
        handle = await _start_restore(lab, client, region=standby, repo=standby, keep_minutes=0)
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
        cause = e.value.cause
        assert cause.type == "InvalidInput" and f"{standby}'s bucket lacks the WAL" in cause.message, cause
        await record(handle, "restore-gap-read-on-each-host")

        # The primary's worker gone; the restoring host sees every file (the lab's one host).
        kill_tree(read_pid(lab.worker_pidfile(standby)))
        lab.config_path = path
        lab.start_worker(standby)
        kill_tree(read_pid(lab.worker_pidfile(primary)))
        handle = await _start_restore(lab, client, region=standby, repo=standby, keep_minutes=0)
        with pytest.raises(WorkflowFailureError) as e:
            await handle.result()
        assert f"{standby}'s bucket lacks the WAL" in e.value.cause.message, e.value.cause
    finally:
        lab.start_worker(primary)
        if found is None:
            st.gaps_file.unlink(missing_ok=True)
        else:
            _write_owned(st.gaps_file, found, st.region.postgres)
        kill_tree(read_pid(lab.worker_pidfile(standby)))
        lab.config_path = path
        lab.start_worker(standby)
