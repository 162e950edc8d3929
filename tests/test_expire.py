"""Retention on the real lab: ``pgbackrest expire`` through ExpireWorkflow, asserted on
pgBackRest's own output and on ``pgbackrest info`` afterwards.

The configured policy is time-based (30 days). Backups made seconds ago are first run
through it as they are (it must remove nothing), then through the count override
(``keep_fulls``); then, aged for real: faketime cannot age them (S3's SigV4 refuses the
skewed clock), so the bucket's backup.info is rewritten with older timestamps (decrypted,
re-checksummed and re-encrypted the way pgBackRest writes it), and the time policy must drop
every backup before the newest full older than 30 days, with the WAL only they needed, and
keep that full's WAL onwards (what PITR from it needs).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid

import pytest

from activities.backup.catalog import read_catalog
from activities.backup.pgbackrest import Stanza
from tests.histories import record
from tests.lab_helpers import _primary, _resume
from workflows.backup import BackupInput, BackupWorkflow
from workflows.expire import ExpireInput, ExpireResult, ExpireWorkflow

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _run(lab, client, wf, inp, name: str | None = None):
    handle = await client.start_workflow(wf, inp, id=f"test-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    res = await handle.result()
    if name:
        await record(handle, name)
    return res


async def test_expiry_removes_what_the_policy_says_and_keeps_what_pitr_needs(lab, client):
    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    backups = []
    for i, t in enumerate(("full", "incr", "full")):
        r = await _run(lab, client, BackupWorkflow.run, BackupInput(type=t, repos=[primary], trigger="test"),
                       "backup-full-one-repo" if i == 0 else None)
        assert r.outcome == "succeeded", r
        backups.append(r.backups[0])
    f1, i1, f2 = backups
    assert i1.prior == f1.label
    stanza = Stanza(lab.cfg, primary)
    before = read_catalog(stanza)
    other_before = [b.label for b in before.on(other)]

    # The configured time policy (30 days): nothing is old enough.
    res: ExpireResult = await _run(lab, client, ExpireWorkflow.run, ExpireInput(trigger="test"), "expire")
    assert res.outcome == "succeeded" and sorted(e.repo_region for e in res.repos) == sorted(lab.cfg.region_names)
    for e in res.repos:
        assert e.policy == "time 30 days" and not e.expired_sets and not e.removed_backups and not e.archive_removed
        assert any("retention not met" in n for n in e.notes), e
    assert [b.label for b in read_catalog(stanza).on(primary)] == [b.label for b in before.on(primary)]

    # Keep one full, as a dry run: pgBackRest names what it would remove, and removes nothing.
    dry = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], keep_fulls=1, dry_run=True))
    (d,) = dry.repos
    older = [b.label for b in before.on(primary) if b.stopped < f2.started or b.label in (f1.label, i1.label)]
    older = [x for x in older if x != f2.label]
    assert {f1.label, i1.label} <= set(d.removed_backups) and f2.label not in d.removed_backups
    assert sorted(d.removed_backups) == sorted(older)
    assert [b.label for b in read_catalog(stanza).on(primary)] == [b.label for b in before.on(primary)]

    # For real.
    res = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], keep_fulls=1))
    (e,) = res.repos
    assert sorted(e.removed_backups) == sorted(d.removed_backups)
    assert [s[0] for s in e.expired_sets] and all(s[0].endswith("F") for s in e.expired_sets)
    after = read_catalog(stanza)
    # (The stanza's own status may read "different across repos": the other bucket holds other backups.)
    assert after.repo(primary).ok, after.repos
    left = [b.label for b in after.on(primary)]
    assert f2.label in left and f1.label not in left and i1.label not in left
    assert all(b.started >= f2.started for b in after.on(primary))
    # WAL: what the kept full needs stays (from its start on), what only F1 needed is gone.
    arch = next(a for a in after.archive if a.repo_region == primary)
    assert e.archive_removed and all(a.stop < f2.wal_start for a in e.archive_removed)
    assert arch.min_wal <= f2.wal_start and arch.min_wal > f1.wal_stop, (arch, f1, f2)
    assert arch.max_wal >= f2.wal_stop
    # The other region's bucket was not asked.
    assert [b.label for b in after.on(other)] == other_before


async def test_bad_expire_input_names_the_field(lab, client):
    from temporalio.client import WorkflowFailureError

    for raw, field in (({"keep_fulls": 0}, "keep_fulls"), ({"repos": ["mars-1"]}, "repos.0")):
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow("ExpireWorkflow", raw, id=f"test-{uuid.uuid4()}",
                                          task_queue=lab.cfg.temporal.control_task_queue)
        assert e.value.cause.type == "InvalidInput" and field in str(e.value.cause)


# -- the time policy, on backups made to look old -------------------------------------------------


def _openssl(args: list[str], data: bytes, passphrase: str) -> bytes:
    # pgBackRest's repo cipher is OpenSSL's salted aes-256-cbc with an SHA-1 key derivation.
    r = subprocess.run(["openssl", "enc", *args, "-aes-256-cbc", "-md", "sha1", "-pass", "stdin"],
                       input=passphrase.encode() + b"\n" + data, capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _info_checksum(text: str) -> str:
    """pgBackRest's backup.info checksum: SHA-1 of the sections as one JSON object (values as
    stored), the checksum itself left out."""
    parts, section, keys = [], None, []
    for line in text.splitlines() + ["[end]"]:
        if line.startswith("["):
            if section is not None and keys:
                parts.append(f'"{section}":{{{",".join(keys)}}}')
            section, keys = line[1:-1], []
        elif line and not line.startswith("backrest-checksum="):
            k, _, v = line.partition("=")
            keys.append(f'"{k}":{v}')
    return hashlib.sha1(("{" + ",".join(parts) + "}").encode()).hexdigest()


def _info_key(lab) -> str:
    return f"{lab.cfg.backup.repo_path.strip('/')}/backup/{lab.cfg.backup.stanza}/backup.info"


def _read_info(lab, region: str) -> str:
    """The bucket's backup.info, decrypted: what pgBackRest itself reads."""
    r = lab.cfg.region(region)
    body = lab.s3(region).client().get_object(Bucket=r.s3.bucket, Key=_info_key(lab))["Body"].read()
    return _openssl(["-d"], body, r.s3.cipher_pass.resolve()).decode()


def _labels(info: str) -> list[str]:
    """The backups backup.info lists, oldest first."""
    section, out = None, []
    for line in info.splitlines():
        if line.startswith("["):
            section = line[1:-1]
        elif section == "backup:current" and "=" in line:
            out.append(line.partition("=")[0])
    return sorted(out)


def _age_backups(lab, region: str, days_ago: dict[str, float]) -> None:
    """Rewrite the bucket's backup.info (and its .copy) so the named backups look ``days_ago``
    old: the only way to age a real backup (faketime cannot, SigV4 refuses a skewed clock).
    The checksum is recomputed; pgBackRest would refuse the file otherwise."""
    r = lab.cfg.region(region)
    s3 = lab.s3(region).client()
    key = _info_key(lab)
    passphrase = r.s3.cipher_pass.resolve()
    text = _read_info(lab, region)
    stored = re.search(r'^backrest-checksum="(\w+)"$', text, re.M).group(1)
    assert _info_checksum(text) == stored  # the rule reproduces pgBackRest's before anything is changed
    now = int(time.time())
    lines = []
    for line in text.splitlines():
        label, _, value = line.partition("=")
        if label in days_ago:
            b = json.loads(value)
            took = b["backup-timestamp-stop"] - b["backup-timestamp-start"]
            b["backup-timestamp-start"] = now - int(days_ago[label] * 86400)
            b["backup-timestamp-stop"] = b["backup-timestamp-start"] + took
            line = f"{label}={json.dumps(b, separators=(',', ':'))}"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    text = re.sub(r'^backrest-checksum="\w+"$', f'backrest-checksum="{_info_checksum(text)}"', text, flags=re.M)
    body = _openssl(["-e"], text.encode(), passphrase)
    for name in (key, key + ".copy"):
        s3.put_object(Bucket=r.s3.bucket, Key=name, Body=body)


async def test_the_time_policy_expires_backups_older_than_the_retention_and_keeps_what_pitr_needs(lab, client):
    """The configured policy (time, 30 days) on backups aged by rewriting backup.info: every
    backup before the newest full older than 30 days goes, with the WAL only they needed; that
    full stays (a restore to 30 days ago starts from it), and everything after it."""
    primary = _primary(lab)
    made = []
    for t in ("full", "incr", "full", "incr"):
        r = await _run(lab, client, BackupWorkflow.run, BackupInput(type=t, repos=[primary], trigger="test"))
        assert r.outcome == "succeeded", r
        made.append(r.backups[0])
    f1, i1, f2, i2 = made
    stanza = Stanza(lab.cfg, primary)
    # Every backup the bucket holds before f2 (earlier tests' too), as backup.info lists them.
    listed = _labels(_read_info(lab, primary))
    older = [label for label in listed if label < f2.label]
    assert f1.label in older and i1.label in older
    _age_backups(lab, primary, {**{label: 40 for label in older}, f2.label: 35})
    res: ExpireResult = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], trigger="test"),
                                   "expire-time-policy")
    (e,) = res.repos
    assert e.policy == "time 30 days" and res.outcome == "succeeded", res
    # Every backup before f2 goes; f2 and what follows it stay. pgBackRest also deletes backup
    # directories backup.info no longer lists (a retried or killed backup's leftovers, seen in
    # CI after the whole suite): those may be named too, never a listed one it should keep.
    assert set(older) <= set(e.removed_backups) and not {f2.label, i2.label} & set(e.removed_backups), e
    assert not (set(e.removed_backups) - set(older)) & set(listed), (e.removed_backups, listed)
    assert _labels(_read_info(lab, primary)) == [f2.label, i2.label]
    after = read_catalog(stanza)
    assert after.repo(primary).ok, after.repos
    arch = next(a for a in after.archive if a.repo_region == primary)
    assert e.archive_removed and all(a.stop < f2.wal_start for a in e.archive_removed)
    assert f1.wal_stop < arch.min_wal <= f2.wal_start and arch.max_wal >= i2.wal_stop, (arch, f1, f2)


async def test_backup_and_expire_hold_the_service_repo_lock_one_at_a_time(lab, client):
    """pgBackRest locks per node, and a backup (the standby's node) beside an expire (the
    primary's) both rewrite backup.info: one loses the other's entries. The service-wide lock
    (workflows/repo_lock.py) serialises them. Held here by a stand-in holder first: the expire
    must wait, touching nothing, and run once it is released; then a real backup and expire
    started together must hold it in turn, and the backup must stay listed."""
    from temporalio.client import WorkflowExecutionStatus

    from tests.lab_helpers import _progress, _until
    from workflows.repo_lock import RepoLockWorkflow, repo_lock_id

    control = lab.cfg.temporal.control_task_queue
    lock_id = repo_lock_id(lab.cfg.service)
    lock = await client.start_workflow(RepoLockWorkflow.run, "test-holder", id=lock_id, task_queue=control)
    waiting = await client.start_workflow(ExpireWorkflow.run, ExpireInput(dry_run=True, trigger="test"),
                                          id=f"test-{uuid.uuid4()}", task_queue=control)
    try:
        async def lock_step_waits():
            p = await _progress(waiting)
            s = p and next((s for s in p.steps if "backup-repo lock" in s.name), None)
            return s if s and "waiting" in (s.detail or "") else None

        step = await _until(lock_step_waits, 60, "the expire waiting for the lock")
        assert lock_id in step.detail and step.status == "running"
        p = await _progress(waiting)
        assert [s.name for s in p.steps] == ["Read the topology", "Take the service's backup-repo lock"], p.steps
    finally:
        await lock.signal(RepoLockWorkflow.release)
    res = await waiting.result()
    assert res.outcome == "succeeded", res
    await record(lock, "repo_lock-released")
    await record(waiting, "expire-waits-for-repo-lock")
    # Released when the expire ended: the lock's run is the expire's child, completed.
    d = await client.get_workflow_handle(lock_id).describe()
    assert d.status == WorkflowExecutionStatus.COMPLETED and d.parent_id == waiting.id, (d.status, d.parent_id)

    # A real backup and expire at once: each one's pgBackRest steps ran inside its own run of
    # the lock (and Temporal runs one workflow per id at a time).
    primary = _primary(lab)
    backup = await client.start_workflow(BackupWorkflow.run, BackupInput(type="full", trigger="test"),
                                         id=f"test-{uuid.uuid4()}", task_queue=control)
    expire = await client.start_workflow(ExpireWorkflow.run, ExpireInput(trigger="test"),
                                         id=f"test-{uuid.uuid4()}", task_queue=control)
    b, e = await backup.result(), await expire.result()
    assert b.outcome in ("succeeded", "degraded") and b.backups, b
    assert e.outcome == "succeeded", e
    await record(backup, "backup-holds-repo-lock")

    async def lock_runs():
        runs = {r.parent_id: r async for r in client.list_workflows(f'WorkflowId = "{lock_id}"')}
        return runs if all(runs.get(h.id) and runs[h.id].close_time for h in (backup, expire)) else None

    runs = await _until(lock_runs, 30, "both lock runs listed, closed")
    for h in (backup, expire):
        steps = (await _progress(h)).steps
        i = next(i for i, s in enumerate(steps) if "backup-repo lock" in s.name)
        held = runs[h.id]
        inside = steps[i + 1:]
        assert inside and held.start_time <= inside[0].started_at and inside[-1].finished_at <= held.close_time, \
            (h.id, held.start_time, held.close_time, [(s.name, s.started_at, s.finished_at) for s in inside])
    listed = {x.label for x in read_catalog(Stanza(lab.cfg, primary)).backups}
    assert {x.label for x in b.backups} <= listed, (b.backups, listed)


async def test_an_expiry_deletes_nothing_while_a_restore_reads_the_buckets(lab, client):
    """An expire deletes backup sets and the WAL between them; pgBackRest has no read lock, so
    a restore beside it lost the set or the WAL it was reading. Expirers (ExpireWorkflow, a
    backup's own expire steps) now ask the running restores under the expiry lock and defer.
    Here a restore's pgbackrest restore is frozen mid-read while an expire is asked to keep one
    full only and a backup runs: neither may remove anything. Once the copy is restored, the
    restore only keeps it (for 30 minutes): the same expire must then go ahead, not wait on it."""
    import os
    import signal

    from tests.lab_helpers import _progress, _until
    from tests.test_restore import _async_true, _kept
    from tests.test_restore_modes import _signalling_every_restore
    from workflows.restore import RestoreInput, RestoreResult, RestoreWorkflow

    primary = _primary(lab)
    stanza = Stanza(lab.cfg, primary)
    fulls = []
    for _ in range(2):
        r = await _run(lab, client, BackupWorkflow.run, BackupInput(type="full", trigger="test"))
        assert r.outcome == "succeeded" and not r.expiry_deferred_for, r
        # pgBackRest's own expire is off: the backup's expire ran as a step of the run, per bucket.
        assert all(b.expire_auto is False for b in r.backups), r.backups
        assert sorted(e.repo_region for e in r.expired) == sorted(lab.cfg.region_names), r.expired
        # (What it removes depends on the tests before: one of them ages the backups.)
        assert all(e.policy == "time 30 days" for e in r.expired), r.expired
        fulls.append(r.backups[0].label)
    listed = {b.label for b in read_catalog(stanza).backups}
    assert set(fulls) <= listed

    scratch_host = lab.cfg.other(primary).name
    frozen: set[int] = set()
    try:
        async with _signalling_every_restore(Stanza(lab.cfg, scratch_host), signal.SIGSTOP) as hit:
            restore = await client.start_workflow(RestoreWorkflow.run,
                                                  RestoreInput(region=scratch_host, keep_minutes=30, trigger="test"),
                                                  id=f"test-restore-{uuid.uuid4()}",
                                                  task_queue=lab.cfg.temporal.control_task_queue)
            await _until(lambda: _async_true(bool(hit)), 120, "pgbackrest restore to start (and be frozen)")
            frozen = hit
        e: ExpireResult = await _run(lab, client, ExpireWorkflow.run, ExpireInput(keep_fulls=1, trigger="test"),
                                     "expire-deferred-for-restore")
        assert e.outcome == "degraded" and e.deferred_for == [restore.id] and not e.repos, e
        b = await _run(lab, client, BackupWorkflow.run, BackupInput(type="incr", trigger="test"),
                       "backup-expiry-deferred")
        assert b.outcome == "succeeded" and b.expiry_deferred_for == [restore.id] and not b.expired, b
        assert listed <= {x.label for x in read_catalog(stanza).backups}
    finally:
        _resume(frozen)
    await _kept(restore)
    # The copy is up and only kept: the restore no longer reads, and the expire goes ahead.
    e = await _run(lab, client, ExpireWorkflow.run, ExpireInput(keep_fulls=1, trigger="test"))
    assert e.outcome == "succeeded" and not e.deferred_for, e
    removed = {x for r in e.repos for x in r.removed_backups}
    assert fulls[0] in removed and fulls[0] not in {x.label for x in read_catalog(stanza).backups}, e
    await restore.signal(RestoreWorkflow.release)
    res: RestoreResult = await restore.result()
    await record(restore, "restore-visible-to-expiries")
    assert res.outcome == "succeeded", res
    step = next(s for s in (await _progress(restore)).steps if s.name == "Wait until no expiry deletes backups")
    assert step.detail.startswith("listed after") and "no expire running" in step.detail, step


async def test_a_restore_waits_for_an_expirer_and_for_an_expire_left_running(lab, client):
    """The other half of the lock: an expirer that took the expiry lock before a restore was
    listed did not see it, so the restore must not read the buckets until that expirer is done,
    nor while a `pgbackrest expire` its crashed worker left still runs. A stand-in expirer holds
    the lock and a real expire (a dry run) is frozen on the primary's node: a restore drill must
    stay at its wait step, before any check or restore, until both are gone."""
    import os
    import signal

    from tests.lab_helpers import _progress, _until
    from tests.test_restore import _backup
    from workflows.repo_lock import RepoLockWorkflow, expiry_lock_id
    from workflows.restore_drill import RestoreDrillResult

    await _backup(lab, client, type="full")
    primary = _primary(lab)
    control = lab.cfg.temporal.control_task_queue
    lock_id = expiry_lock_id(lab.cfg.service)
    stanza = Stanza(lab.cfg, primary)
    left = stanza.popen("expire", "--repo=1", "--dry-run")
    os.kill(left.pid, signal.SIGSTOP)
    try:
        lock = await client.start_workflow(RepoLockWorkflow.run, "test-expirer", id=lock_id, task_queue=control)
        drill = await client.start_workflow("RestoreDrillWorkflow", {"trigger": "test"},
                                            id=f"test-restore-drill-{uuid.uuid4()}", task_queue=control,
                                            result_type=RestoreDrillResult)
        try:
            async def waiting():
                p = await _progress(drill)
                s = p and p.steps and p.steps[-1]
                return p if s and s.name == "Wait until no expiry deletes backups" and "waiting" in (s.detail or "") \
                    else None

            p = await _until(waiting, 120, "the drill waiting on the expiry lock", 0.2)
            # The last step: no check of the bucket and no restore has begun.
            assert lock_id in p.steps[-1].detail and p.steps[-1].status == "running", p.steps[-1]
        finally:
            await lock.signal(RepoLockWorkflow.release)

        async def waiting_for_the_expire():
            d = await drill.describe()
            pending = [a.activity_type.name for a in d.raw_description.pending_activities]
            return pending if "wait_repo_writers_gone" in pending else None

        await _until(waiting_for_the_expire, 120, "the drill waiting for the expire left running", 0.2)
        p = await _progress(drill)
        assert p.steps[-1].name == "Wait until no expiry deletes backups" and p.steps[-1].status == "running", p.steps
    finally:
        os.kill(left.pid, signal.SIGCONT)
    assert left.wait(120) == 0, left.stderr.read() if left.stderr else None
    res = await drill.result()
    await record(drill, "restore_drill-waits-for-expiry-lock")
    assert res.outcome == "succeeded", res
    step = next(s for s in (await _progress(drill)).steps if s.name == "Wait until no expiry deletes backups")
    assert "waited" in step.detail and "left running" in step.detail, step


async def test_an_expire_drops_the_gap_records_no_backup_can_meet_any_more(lab, client):
    """The archive guard's WAL-gap records grew for good, and every restore carries all of them
    in its request. Once an expire leaves a bucket no backup that ended before a gap closed,
    no restore from that bucket can cross it, and its record goes. Every other record stays:
    one a listed backup still ends before, one still open, and another bucket's."""
    from datetime import timedelta

    from activities.backup.archive import WalGap, _write_gaps, gaps_locked, read_gaps

    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    r = await _run(lab, client, BackupWorkflow.run, BackupInput(type="full", trigger="test"))
    assert r.outcome == "succeeded", r
    stanza = Stanza(lab.cfg, primary)
    first_end = min(b.stopped for b in read_catalog(stanza).on(primary))
    hour = timedelta(hours=1)
    outlived = WalGap(repo_region=primary, since=first_end - 2 * hour, until=first_end - hour, healed_by="x")
    crossed = WalGap(repo_region=primary, since=first_end - hour, until=first_end + timedelta(seconds=1))
    still_open = WalGap(repo_region=primary, since=first_end + hour)
    elsewhere = WalGap(repo_region=other, since=first_end - 2 * hour, until=first_end - hour)
    saved = stanza.gaps_file.read_text() if stanza.gaps_file.exists() else None
    try:
        with gaps_locked(stanza):
            _write_gaps(stanza, [outlived, crossed, still_open, elsewhere])
        e = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], trigger="test"))
        assert e.outcome == "succeeded", e
        assert any("1 WAL-gap record(s) dropped" in n for n in e.repos[0].notes), e.repos[0].notes
        assert read_gaps(stanza) == [crossed, still_open, elsewhere]
        # Once more: nothing left to drop, and nothing said.
        e = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], trigger="test"))
        assert not any("WAL-gap" in n for n in e.repos[0].notes), e.repos[0].notes
        assert read_gaps(stanza) == [crossed, still_open, elsewhere]
    finally:
        with gaps_locked(stanza):
            if saved is None:
                stanza.gaps_file.unlink(missing_ok=True)
            else:
                stanza.gaps_file.write_text(saved)


async def test_a_restore_goes_on_beside_an_expire_that_outlasts_its_wait_and_says_so(lab, client):
    """An expire hung on a bucket that is down (when restores are most needed) must not hold a
    restore at 3 a.m.: past ``expiry_wait_seconds`` the restore goes on, and its degraded notes
    say that a backup or WAL it reads may be removed under it. Twice: a stand-in expirer holding
    the expiry lock, then a real ``pgbackrest expire`` (a dry run) frozen on the primary's node."""
    import asyncio
    import os
    import signal

    from tests.test_restore import _backup
    from workflows.repo_lock import RepoLockWorkflow, expiry_lock_id
    from workflows.restore import RestoreInput, RestoreResult, RestoreWorkflow

    await _backup(lab, client, type="incr")
    control = lab.cfg.temporal.control_task_queue
    lock_id = expiry_lock_id(lab.cfg.service)

    async def restore() -> RestoreResult:
        handle = await client.start_workflow(RestoreWorkflow.run, RestoreInput(keep_minutes=0, expiry_wait_seconds=10,
                                                                               trigger="test"),
                                             id=f"test-restore-{uuid.uuid4()}", task_queue=control)
        # Bounded: without the give-up it would wait as long as the expire runs.
        return await asyncio.wait_for(handle.result(), 300)

    lock = await client.start_workflow(RepoLockWorkflow.run, "test-expirer", id=lock_id, task_queue=control)
    try:
        res = await restore()
    finally:
        await lock.signal(RepoLockWorkflow.release)
    assert res.outcome == "degraded" and res.scratch is not None and res.dropped, res
    assert any(f"an expire still held {lock_id} after" in d and "went on beside it" in d for d in res.degraded), \
        res.degraded

    stanza = Stanza(lab.cfg, _primary(lab))
    left = stanza.popen("expire", "--repo=1", "--dry-run")
    os.kill(left.pid, signal.SIGSTOP)
    try:
        res = await restore()
    finally:
        _resume([left.pid])
    assert left.wait(120) == 0, left.stderr.read() if left.stderr else None
    assert res.outcome == "degraded" and res.scratch is not None, res
    assert any("an expire still runs" in d and "went on beside it" in d for d in res.degraded), res.degraded
