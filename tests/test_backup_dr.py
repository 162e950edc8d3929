"""Backups through DR events, on the real lab (pgBackRest, SeaweedFS over TLS, PostgreSQL):

- the other region's bucket down while the primary writes: the archive guard keeps pg_wal
  bounded, says archiving is degraded, and takes the bucket back (with a full backup) when
  it returns;
- backup -> switchover -> backup: both valid, the second on the new timeline, PITR to after
  the switch through RestoreWorkflow, whose copy goes on the host that is not the primary now;
- the regional worker killed mid-backup: the retry finishes one valid backup per repo.

Each test leaves the primary where it found it.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from activities.backup.archive import pitr_blocked, read_archiver, read_gaps
from activities.backup.catalog import parse_info, read_catalog
from activities.backup.pgbackrest import Stanza, repo_key
from activities.backup.restore import RestoreTarget, connect_scratch, scratch_config
from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from eagle_dr.status import archive_line, archive_view
from lab.processes import kill_tree, read_pid
from tests.histories import record
from tests.lab_helpers import _async, _exec, _primary, _until
from workflows.archive_guard import ArchiveGuardInput, ArchiveGuardResult, ArchiveGuardWorkflow, gap_backup_id
from workflows.backup import BackupInput, BackupResult, BackupWorkflow
from workflows.models import SwitchoverInput
from workflows.restore import RestoreInput, RestoreWorkflow

# Its tests name lab.cfg.primary as the primary (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("configured_topology")

SEGMENT = 16 << 20
BOUND = 2 * SEGMENT


async def _backup(lab, client, **kw) -> BackupResult:
    return await client.execute_workflow(BackupWorkflow.run, BackupInput(trigger="test", **kw),
                                         id=f"test-backup-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)


async def _guard(lab, client, record_as: str | None = None, **kw) -> ArchiveGuardResult:
    handle = await client.start_workflow(ArchiveGuardWorkflow.run, ArchiveGuardInput(trigger="test", **kw),
                                         id=f"test-archive-guard-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    res = await handle.result()
    if record_as:
        await record(handle, record_as)
    return res


def _switch_wal(lab, region: str, rows: int = 1) -> str:
    """Commit, then switch in a statement of its own (one string would be one transaction and
    the commit would land in the next segment): the name of the segment just closed."""
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create table if not exists backup_dr (id bigserial primary key, at timestamptz default "
                     "clock_timestamp(), note text)")
        conn.execute("insert into backup_dr (note) select 'wal' from generate_series(1, %s)", (rows,))
        return conn.execute("select pg_walfile_name(pg_switch_wal())").fetchone()[0]


def _archived_to(lab, node: str, bucket: str) -> str | None:
    # That repo alone: ``info`` on both would wait out the dead one's timeouts on every poll.
    st = Stanza(lab.cfg, node)
    cat = parse_info(st.info(f"--repo={repo_key(lab.cfg, node, bucket)}"), st)
    return max((a.max_wal or "" for a in cat.archive if a.repo_region == bucket), default=None)


def _ready_bytes(lab, region: str) -> int:
    return read_archiver(lab.cfg.region(region).postgres).ready_bytes


# -- the other region's bucket down --------------------------------------------------------------


def test_pitr_across_a_wal_gap_is_refused_only_where_the_gap_is(lab):
    from datetime import timedelta, timezone

    from activities.backup.archive import WalGap

    t = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    gaps = [WalGap(repo_region="us-west-2", since=t, until=t + timedelta(hours=1))]
    # A backup before the gap cannot reach past its start, in that bucket only.
    assert pitr_blocked(gaps, "us-west-2", t - timedelta(hours=2), t + timedelta(hours=2)) is gaps[0]
    assert pitr_blocked(gaps, "us-east-1", t - timedelta(hours=2), t + timedelta(hours=2)) is None
    # Before the gap, or from a backup after it, PITR is continuous.
    assert pitr_blocked(gaps, "us-west-2", t - timedelta(hours=2), t - timedelta(minutes=1)) is None
    assert pitr_blocked(gaps, "us-west-2", t + timedelta(hours=1, minutes=5), t + timedelta(hours=2)) is None
    # A gap still open blocks everything after its start.
    still = [WalGap(repo_region="us-west-2", since=t)]
    assert pitr_blocked(still, "us-west-2", t - timedelta(hours=2), datetime.now(timezone.utc)) is still[0]
    # archive-push.conf carries the last resort, pgbackrest.conf (backups, restores) does not.
    st = Stanza(lab.cfg, lab.cfg.primary.name)
    assert f"archive-push-queue-max={lab.cfg.backup.archive_queue_limit}" in st.render(for_archive_push=True)
    assert "archive-push-queue-max" not in st.render()


@pytest.mark.long  # 70-85 s each: `make test-long` (CI's 30 minutes)
@pytest.mark.asyncio(loop_scope="session")
async def test_other_region_down_keeps_pg_wal_bounded_and_archiving_catches_up(lab, client):
    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    st = Stanza(lab.cfg, primary)

    def archiving_ok() -> bool:
        # A lab just up has failed its first segments (before the stanza existed); a reload
        # wakes the archiver out of its back-off.
        _exec(lab, primary, "select pg_reload_conf()")
        return not read_archiver(lab.cfg.region(primary).postgres).failing

    await _until(_async(archiving_ok), 120, "archiving to succeed", interval=1)
    healthy = await _guard(lab, client, backlog_max_bytes=BOUND)
    assert healthy.outcome == "succeeded", (healthy.report.repos, healthy.degraded)
    assert healthy.primary_region == primary and healthy.report.dropped == []
    before = await _backup(lab, client, type="full", repos=[other])

    lab.s3(other).kill()
    try:
        last = ""
        for _ in range(4):  # 4 segments waiting: past the 2-segment bound
            last = _switch_wal(lab, primary)
        await _until(_async(lambda: _ready_bytes(lab, primary) > BOUND), 30, "WAL to pile up for the dead bucket")
        # Below the bound nothing happens (a blip of the other region costs no gap); past it
        # the guard drops the dead bucket, and says so.
        res = await _guard(lab, client, record_as="archive_guard-drop", backlog_max_bytes=BOUND)
        assert res.outcome == "degraded", res
        assert res.report.newly_dropped == [other] and res.report.dropped == [other]
        assert {p.region: p.reachable for p in res.report.repos} == {primary: True, other: False}
        assert any("dropped from WAL archiving" in a for a in res.degraded)
        assert st.dropped() == [other]
        assert f"s3-bucket={lab.cfg.region(other).s3.bucket}" not in st.archive_conf.read_text()
        # The archiver catches up to the surviving bucket: pg_wal shrinks below the bound...
        await _until(_async(lambda: _ready_bytes(lab, primary) <= SEGMENT), 180,
                     "the backlog to drain into the surviving bucket", interval=1)
        # ...and the surviving bucket's archive is continuous up to the newest segment.
        assert (_archived_to(lab, primary, primary) or "") >= last
        # The primary keeps taking writes, and WAL stays bounded while the bucket stays down.
        for _ in range(3):
            last = _switch_wal(lab, primary, rows=100)
        await _until(_async(lambda: (_archived_to(lab, primary, primary) or "") >= last), 120,
                     "new WAL archived to the surviving bucket", interval=1)
        assert _ready_bytes(lab, primary) <= BOUND
        again = await _guard(lab, client, backlog_max_bytes=BOUND)
        assert again.outcome == "degraded" and again.report.newly_dropped == [] and again.report.dropped == [other]
        # `eagle-dr status` says so too.
        view = archive_view(lab.cfg, primary)
        assert view.degraded and view.dropped == [other]
        assert "DEGRADED" in archive_line(primary, view) and "DROPPED" in archive_line(primary, view)
    finally:
        lab.s3(other).start()

    # The bucket is back: archived to again, with a gap a full backup closes.
    back = await _guard(lab, client, record_as="archive_guard-readmit", backlog_max_bytes=BOUND)
    assert back.report.readmitted == [other] and back.report.dropped == [] and st.dropped() == []
    assert back.report.needs_full == [other] and back.backups_started == [gap_backup_id(lab.cfg.service, other)]
    assert back.outcome == "degraded"  # until the full backup is in
    gaps = [g for g in read_gaps(st) if g.repo_region == other]
    assert len(gaps) == 1 and gaps[0].until is not None
    # A restore from that bucket, starting from the backup before the gap, must not claim a
    # point after it; the surviving bucket has no gap.
    after_gap = datetime.now(gaps[0].until.tzinfo)
    assert pitr_blocked(read_gaps(st), other, before.backups[0].stopped, after_gap) is not None
    assert pitr_blocked(read_gaps(st), primary, before.backups[0].stopped, after_gap) is None
    full = await client.get_workflow_handle(gap_backup_id(lab.cfg.service, other), result_type=BackupResult).result()
    assert full.outcome == "succeeded" and [(b.repo_region, b.type) for b in full.backups] == [(other, "full")]
    last = _switch_wal(lab, primary)
    await _until(_async(lambda: (_archived_to(lab, primary, other) or "") >= last), 120,
                 "WAL archived to the returned bucket again", interval=1)
    healed = await _guard(lab, client, backlog_max_bytes=BOUND)
    assert healed.outcome == "succeeded", healed
    assert [g.healed_by for g in read_gaps(st) if g.repo_region == other] == [full.backups[0].label]
    assert not archive_view(lab.cfg, primary).degraded


def _rebuild_bucket(lab, region: str, create: bool) -> None:
    """The region's bucket deleted (every object, then the bucket), or recreated empty: what a
    region lost and rebuilt gives back."""
    bucket, s3 = lab.cfg.region(region).s3.bucket, lab.s3(region).client()
    if create:
        s3.create_bucket(Bucket=bucket)
        return
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
    s3.delete_bucket(Bucket=bucket)


@pytest.mark.long  # ~90 s: `make test-long`
@pytest.mark.asyncio(loop_scope="session")
async def test_a_bucket_wiped_while_dropped_is_readmitted_only_once_usable_and_the_survivor_stays_continuous(
        lab, client):
    """The other region's bucket is dropped from archiving, and comes back without its data
    (deleted, then recreated empty). The guard must not archive to it while it has no bucket
    or no stanza; it takes it back once stanza-create made it usable, with a gap a full backup
    closes. Meanwhile the surviving bucket's WAL stays continuous: a PITR from a backup taken
    before the outage replays across the whole of it."""

    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    st = Stanza(lab.cfg, primary)

    def archiving_ok() -> bool:
        _exec(lab, primary, "select pg_reload_conf()")
        return not read_archiver(lab.cfg.region(primary).postgres).failing

    await _until(_async(archiving_ok), 120, "archiving to succeed", interval=1)
    assert (await _guard(lab, client, backlog_max_bytes=BOUND)).report.dropped == []
    started = datetime.now(timezone.utc)
    before = (await _backup(lab, client, type="full", repos=[primary])).backups[0]
    tag = uuid.uuid4().hex

    def new_gaps():
        # This test's: earlier tests' records may be pruned meanwhile (by the full's expire).
        return [g for g in read_gaps(st) if g.repo_region == other and g.since >= started]

    lab.s3(other).kill()
    try:
        for _ in range(4):
            _switch_wal(lab, primary)
        await _until(_async(lambda: _ready_bytes(lab, primary) > BOUND), 30, "WAL to pile up for the dead bucket")
        res = await _guard(lab, client, backlog_max_bytes=BOUND)
        assert res.report.newly_dropped == [other], res
    finally:
        lab.s3(other).start()
    # Written while the other bucket is out of archiving: only the survivor has this WAL.
    _exec(lab, primary, f"insert into backup_dr (note) values ('{tag}-during')")

    # Back, but its bucket deleted: not usable, so still dropped, and no stanza-create tried.
    _rebuild_bucket(lab, other, create=False)
    res = await _guard(lab, client, backlog_max_bytes=BOUND)
    assert {p.region: p.usable for p in res.report.repos} == {primary: True, other: False}, res.report.repos
    assert res.report.readmitted == [] and res.report.dropped == [other] and st.dropped() == [other]
    assert f"s3-bucket={lab.cfg.region(other).s3.bucket}" not in st.archive_conf.read_text()
    assert res.backups_started == [] and res.outcome == "degraded"

    # Recreated empty: the guard makes the stanza there, then archives to it again, with a gap
    # (nothing from before is in it) and a full backup started to close it.
    _rebuild_bucket(lab, other, create=True)
    res = await _guard(lab, client, backlog_max_bytes=BOUND)
    assert res.report.readmitted == [other] and res.report.dropped == [] and st.dropped() == [], res.report
    assert {p.region: p.usable for p in res.report.repos} == {primary: True, other: True}
    assert f"s3-bucket={lab.cfg.region(other).s3.bucket}" in st.archive_conf.read_text()
    assert res.report.needs_full == [other] and res.backups_started == [gap_backup_id(lab.cfg.service, other)]
    gaps = new_gaps()
    assert sorted(g.cause for g in gaps) == ["dropped", "stanza-recreated"] and all(g.until for g in gaps), gaps
    full = await client.get_workflow_handle(gap_backup_id(lab.cfg.service, other), result_type=BackupResult).result()
    assert full.outcome == "succeeded" and [(b.repo_region, b.type) for b in full.backups] == [(other, "full")]
    # The full is the only backup in that bucket, and it ended after both gaps closed: no restore
    # from there can cross them, and the full's own expire dropped their records.
    notes = [n for e in full.expired if e.repo_region == other for n in e.notes]
    assert any(re.search(r"\d+ WAL-gap record\(s\) dropped", n) for n in notes), full.expired
    assert new_gaps() == []
    last = _switch_wal(lab, primary)
    await _until(_async(lambda: (_archived_to(lab, other, other) or "") >= last), 120,
                 "WAL archived to the recreated bucket", interval=1)
    healed = await _guard(lab, client, backlog_max_bytes=BOUND)
    assert healed.outcome == "succeeded", healed.degraded
    assert healed.report.needs_full == [] and new_gaps() == []

    # The survivor: from the backup before the outage to a point after it, no gap.
    with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), autocommit=True) as conn:
        target = conn.execute("select clock_timestamp()").fetchone()[0]
    _exec(lab, primary, f"insert into backup_dr (note) values ('{tag}-after')")
    last = _switch_wal(lab, primary)
    await _until(_async(lambda: (_archived_to(lab, primary, primary) or "") >= last), 120,
                 "the target's WAL archived to the surviving bucket", interval=1)
    assert pitr_blocked(read_gaps(st), primary, before.stopped, target) is None
    handle = await client.start_workflow(
        RestoreWorkflow.run, RestoreInput(region=primary, repo=primary, target=RestoreTarget(kind="time", time=target),
                                          keep_minutes=30, trigger="test"),
        id=f"test-restore-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)

    async def kept():
        try:
            return await handle.query(RestoreWorkflow.scratch)
        except Exception:  # noqa: BLE001 - not up yet
            return None

    scratch = await _until(kept, 300, "the scratch copy to be up", 0.5)
    try:
        assert scratch.backup_label == before.label and scratch.repo_region == primary
        with connect_scratch(scratch_config(st, Path(scratch.directory), scratch.port)) as conn:
            notes = sorted(r[0] for r in conn.execute("select note from backup_dr where note like %s", (f"{tag}-%",)))
        assert notes == [f"{tag}-during"]
    finally:
        await handle.signal(RestoreWorkflow.release)
        await handle.result()


# -- backup, switchover, backup, PITR after the switch -------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_backup_switchover_backup_then_pitr_past_the_switch(lab, client):
    a = _primary(lab)
    b = lab.cfg.other(a).name
    first = await _backup(lab, client, type="full")
    assert first.outcome == "succeeded" and first.primary_region == a, first
    timeline = pg_status(lab.cfg.region(a).postgres).timeline
    sw = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=b))).result()
    assert sw.outcome == "succeeded", sw
    try:
        # Above the old one, not necessarily by one: a promotion skips every timeline whose
        # history file is already in the archive (a branch an earlier test abandoned).
        new_timeline = pg_status(lab.cfg.region(b).postgres).timeline
        assert new_timeline > timeline
        # Right after the promotion, no manual step: take.py checkpoints when pg_control lags.
        handle = await client.start_workflow(BackupWorkflow.run, BackupInput(type="incr", trigger="test"),
                                             id=f"test-backup-{uuid.uuid4()}",
                                             task_queue=lab.cfg.temporal.control_task_queue)
        second = await handle.result()
        await record(handle, "backup-after-switchover")
        assert second.outcome == "succeeded" and second.primary_region == b, second
        assert sorted(x.repo_region for x in second.backups) == sorted(lab.cfg.region_names)
        assert all(int(x.wal_start[:8], 16) == new_timeline for x in second.backups), second.backups
        cat = read_catalog(Stanza(lab.cfg, b))
        assert cat.ok, cat
        for x in first.backups + second.backups:
            listed = [y for y in cat.on(x.repo_region) if y.label == x.label]
            assert listed and not listed[0].error, (x.label, [y.label for y in cat.on(x.repo_region)])

        # Rows with known commit times on the new timeline; the target falls between them.
        with psycopg.connect(lab.cfg.region(b).postgres.dsn(), autocommit=True) as conn:
            conn.execute("create table if not exists pitr_probe (note text primary key, at timestamptz)")
            conn.execute("insert into pitr_probe values ('before', clock_timestamp())")
            target = conn.execute("select clock_timestamp()").fetchone()[0]
            conn.execute("insert into pitr_probe values ('after', clock_timestamp())")
        last = _switch_wal(lab, b)
        # Restored from a's own bucket (both got the new timeline's WAL).
        await _until(_async(lambda: (_archived_to(lab, b, a) or "") >= last), 120, "the target's WAL archived",
                     interval=0.5)

        # No host named: the copy goes on a's, the region that is not the primary now (the
        # configured secondary serves after the switch; its host is spared).
        handle = await client.start_workflow(
            RestoreWorkflow.run, RestoreInput(target=RestoreTarget(kind="time", time=target), keep_minutes=30,
                                              trigger="test"),
            id=f"test-restore-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
        released = False
        try:
            async def kept():
                try:
                    return await handle.query(RestoreWorkflow.scratch)
                except Exception:  # noqa: BLE001 - not started yet
                    return None

            copy = await _until(kept, 300, "the scratch copy to be up", 0.3)
            assert copy.region == a and copy.repo_region == a, copy
            sc = scratch_config(Stanza(lab.cfg, a), Path(copy.directory), copy.port)
            with connect_scratch(sc) as conn:
                assert [r[0] for r in conn.execute("select note from pitr_probe order by note")] == ["before"]
            await handle.signal(RestoreWorkflow.release)
            released = True
            res = await handle.result()
            assert res.outcome == "succeeded" and res.dropped, res
            await record(handle, "restore-off-primary-after-switchover")
        finally:
            if not released:
                await handle.cancel()
    finally:
        back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                        target_region=a))).result()
        assert back.outcome == "succeeded", back


# -- the regional worker killed mid-backup -------------------------------------------------------


@pytest.mark.long  # 70-85 s each: `make test-long` (CI's 30 minutes)
@pytest.mark.asyncio(loop_scope="session")
async def test_worker_killed_mid_backup_retries_to_one_valid_backup_per_repo(lab, client):
    import signal

    from activities.backup.take import running_backups

    primary = _primary(lab)
    source = lab.cfg.other(primary).name  # the standby's node takes the backup
    stanza = Stanza(lab.cfg, source)
    # Enough data that copying takes seconds, not milliseconds.
    _exec(lab, primary, "create table if not exists backup_bulk as select g, md5(g::text) || repeat('x', 200) as pad"
                        " from generate_series(1, 100000) g")
    labels_before = {x.label for x in read_catalog(stanza).backups}
    log = stanza.log_dir / f"{stanza.name}-backup.log"
    offset = log.stat().st_size if log.exists() else 0
    handle = await client.start_workflow(BackupWorkflow.run, BackupInput(type="full", trigger="test"),
                                         id=f"test-backup-crash-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)

    def copying() -> int | None:
        mine = [pid for pid, owner in running_backups(stanza).items() if owner.startswith(handle.id)]
        if not mine or not log.exists():
            return None
        with open(log, "rb") as f:
            f.seek(offset)
            return mine[0] if b"backup file " in f.read() else None

    pid = await _until(_async(copying), 120, "pgBackRest copying files", interval=0.01)
    # Freeze it mid-copy so it cannot finish before the worker dies, whatever the machine's speed.
    os.killpg(pid, signal.SIGSTOP)
    killed = kill_tree(read_pid(lab.worker_pidfile(source)))  # kill -9: the worker and pgBackRest
    assert pid in killed
    try:
        os.killpg(pid, signal.SIGCONT)  # what is left of its group (its local processes) ends on its own
    except ProcessLookupError:
        pass
    lab.start_worker(source)
    res = await handle.result()
    assert res.outcome == "succeeded", res
    # The killed attempt was retried (not, say, finished before the kill).
    attempts = [e.activity_task_started_event_attributes.attempt async for e in handle.fetch_history_events()
                if e.HasField("activity_task_started_event_attributes")]
    assert max(attempts) >= 2, attempts
    cat = read_catalog(stanza)
    new = [x for x in cat.backups if x.label not in labels_before]
    # Exactly one new valid backup per repo (the retry resumed or redid the partial; the
    # partial itself is never listed), and they are the ones the workflow reports.
    assert sorted(x.repo_region for x in new) == sorted(lab.cfg.region_names), [x.label for x in new]
    assert all(x.type == "full" and not x.error for x in new)
    assert sorted(x.label for x in new) == sorted(x.label for x in res.backups)
    assert cat.ok and not cat.backup_running
    assert running_backups(stanza) == {}
    _exec(lab, primary, "drop table backup_bulk")


def test_an_open_gap_ends_at_the_first_backup_to_its_bucket_after_it():
    """A gap recorded open on a node that is no longer the primary stays open for good: only
    the guard beside the primary closes a record, and only its own node's. Read as still open,
    it refused every later restore from that bucket, however many backups were taken since. A
    backup that succeeded shows the archive reached the bucket again by its start."""
    from activities.backup.activities import closed_by_later_backups
    from activities.backup.archive import WalGap
    from activities.backup.catalog import BackupRecord

    t = datetime(2026, 12, 1, tzinfo=timezone.utc)

    def backup(label: str, start: int) -> BackupRecord:
        return BackupRecord(label=label, type="incr", repo_key=1, repo_region="us-west-2",
                            started=t + timedelta(minutes=start), stopped=t + timedelta(minutes=start + 1))

    before, after = backup("A", 0), backup("B", 30)
    gap = WalGap(repo_region="us-west-2", since=t + timedelta(minutes=10))
    closed = closed_by_later_backups([gap], "us-west-2", [before, after])
    assert closed[0].until == after.started
    assert pitr_blocked(closed, "us-west-2", after.stopped, t + timedelta(minutes=40)) is None
    # Across the gap, from the backup before it: still refused.
    assert pitr_blocked(closed, "us-west-2", before.stopped, t + timedelta(minutes=20)) is not None
    # No backup since: as open as it was. Another bucket's gap: untouched.
    assert closed_by_later_backups([gap], "us-west-2", [before])[0].until is None
    other = gap.model_copy(update={"repo_region": "us-east-1"})
    assert closed_by_later_backups([other], "us-west-2", [before, after])[0].until is None
