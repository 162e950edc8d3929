"""Backups with pgBackRest on the real lab: SeaweedFS over TLS per region, real PostgreSQL.

The lab archives WAL from its first segment (lab up creates the stanza in both buckets);
these tests take backups through BackupWorkflow and read them back with ``pgbackrest info``.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from activities.backup.catalog import read_catalog
from activities.backup.pgbackrest import Stanza
from activities.readiness import check_backup_path
from activities.redis.status import redis_status
from tests.histories import record
from tests.lab_helpers import _primary
from workflows.backup import BackupInput, BackupResult, BackupWorkflow


async def _backup(lab, client, history: str | None = None, **kw) -> BackupResult:
    handle = await client.start_workflow(BackupWorkflow.run, BackupInput(**kw), id=f"test-backup-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    res = await handle.result()
    if history:
        await record(handle, history)
    return res


async def _activities(handle) -> list[str]:
    return [e.activity_task_scheduled_event_attributes.activity_type.name async for e in handle.fetch_history_events()
            if e.HasField("activity_task_scheduled_event_attributes")]


@pytest.mark.asyncio(loop_scope="session")
async def test_full_backup_from_the_standby_to_both_regions_buckets(lab, client):
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    handle = await client.start_workflow(BackupWorkflow.run, BackupInput(type="full", trigger="test"),
                                         id=f"test-backup-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    res = await handle.result()
    await record(handle, "backup-full-from-standby")
    assert res.outcome == "succeeded", res
    # Every bucket has the stanza (lab up made it): no stanza-create, one backup per repo.
    acts = await _activities(handle)
    assert "ensure_stanza" not in acts and acts.count("take_backup") == 2, acts
    assert res.primary_region == primary and res.source_region == standby and res.from_standby
    assert sorted(b.repo_region for b in res.backups) == sorted(lab.cfg.region_names)
    cat = read_catalog(Stanza(lab.cfg, primary))
    assert cat.ok, cat
    for b in res.backups:
        listed = [x for x in cat.on(b.repo_region) if x.label == b.label]
        assert listed and listed[0].type == "full" and not listed[0].error
        assert b.size and b.repo_size and b.wal_start and b.wal_stop
    # Encrypted at rest in both repos.
    assert {r.cipher for r in cat.repos} == {"aes-256-cbc"}
    # Each backup names the step that took it: a retry finds its own by that, not by a start
    # time compared across two clocks (a node clock an hour behind: still found; another
    # step's: not this one's).
    from activities.backup.take import STEP_KEY, _finished_since

    for b in res.backups:
        listed = next(x for x in cat.on(b.repo_region) if x.label == b.label)
        step = listed.annotation.get(STEP_KEY, "")
        # The run id too: activity ids repeat from run to run under a reused workflow id.
        assert step.startswith(f"{handle.id}/{handle.result_run_id}/"), listed.annotation
        source = Stanza(lab.cfg, standby)
        later = datetime.now(timezone.utc).timestamp() + 3600
        assert _finished_since(source, b.repo_region, "full", later, step).label == b.label
        assert _finished_since(source, b.repo_region, "full", later, f"{handle.id}/other") is None


@pytest.mark.asyncio(loop_scope="session")
async def test_incremental_backup_from_the_primary_chains_on_the_full(lab, client):
    """source=primary: what production gets by default (backup.read_from), where the standby's
    host cannot reach the primary's data directory."""
    primary = _primary(lab)
    res = await _backup(lab, client, type="incr", repos=[primary], source="primary")
    assert [b.type for b in res.backups] == ["incr"]
    assert res.source_region == primary and not res.from_standby
    assert res.backups[0].prior


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("raw, field", [({"type": "weekly"}, "type"), ({"repos": ["eu-north-9"]}, "repos.0"),
                                        ({"colour": "red"}, "colour")])
async def test_bad_backup_input_names_the_field(lab, client, raw, field):
    from temporalio.client import WorkflowFailureError

    with pytest.raises(WorkflowFailureError) as e:
        await client.execute_workflow("BackupWorkflow", raw, id=f"test-{uuid.uuid4()}",
                                      task_queue=lab.cfg.temporal.control_task_queue)
    assert e.value.cause.type == "InvalidInput" and field in str(e.value.cause)


@pytest.mark.asyncio(loop_scope="session")
async def test_stanza_create_runs_only_when_a_bucket_lacks_the_stanza(lab, client):
    """Not before every backup (a second of S3 round trips to both buckets, bench/backup.py;
    test_full_backup_from_the_standby_to_both_regions_buckets checks a backup runs none), but
    when the backup finds the bucket without it: here one lost and recreated empty. The run
    asks for an incr: with no full backup in the bucket pgBackRest takes a full one instead,
    which the step must take for its own (it used to see no incr, fail, and take another)."""
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    # The standby's region's bucket lost and recreated empty: no backup.info, no archive.info.
    # (Recreated, not just emptied: SeaweedFS keeps the emptied "directories", which
    # stanza-create takes for leftovers, where S3 has none.)
    bucket = lab.cfg.region(standby).s3.bucket
    s3 = lab.s3(standby).client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
    s3.delete_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=bucket)
    assert read_catalog(Stanza(lab.cfg, primary)).repo(standby).ok is False
    handle = await client.start_workflow(BackupWorkflow.run, BackupInput(type="incr", repos=[standby], trigger="test"),
                                         id=f"test-backup-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    res = await handle.result()
    await record(handle, "backup-stanza-missing-incr")
    assert res.outcome == "succeeded", res
    acts = await _activities(handle)
    # Tried, found no stanza, made it once, took the backup.
    assert acts.count("ensure_stanza") == 1 and acts.count("take_backup") == 2, acts
    assert acts.index("ensure_stanza") > acts.index("take_backup")
    cat = read_catalog(Stanza(lab.cfg, primary))
    assert cat.repo(standby).ok, cat.repos
    assert [(b.label, b.type) for b in cat.on(standby)] == [(res.backups[0].label, "full")]
    assert res.backups[0].type == "full", res.backups  # what was taken, not what was asked


@pytest.mark.asyncio(loop_scope="session")
async def test_a_backup_from_the_standby_reaches_the_primary_only_through_its_tls_server(lab, client):
    """Across hosts the standby's pgBackRest reaches the primary only through the primary node's
    pgBackRest TLS server (the lab's nodes share a disk, so this proves the disk is not used):
    with that server down, a backup asked from the standby fails naming it, and leaves no
    backup behind; a scheduled (auto) one reads the primary instead and says why; with the
    server back, backups read the standby again. The server's absence is found by a handshake
    before pgBackRest starts: pgBackRest alone retries the connection for 30 s per bucket."""
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    server = lab.pgbackrest_server(primary)
    assert server is not None and server.running()
    before = {x.label for x in read_catalog(Stanza(lab.cfg, primary)).backups}
    assert check_backup_path(lab.cfg, lab.cfg.region(primary), 3).state == "ok"
    st = Stanza(lab.cfg, standby)
    log = st.log_dir / f"{st.name}-backup.log"
    logged = log.stat().st_size if log.exists() else 0
    server.stop()
    try:
        seen = check_backup_path(lab.cfg, lab.cfg.region(primary), 3)
        assert seen.state == "warn" and "backups read the primary instead" in seen.reason, seen
        with pytest.raises(WorkflowFailureError) as e:
            await _backup(lab, client, type="incr", source="standby", trigger="test")
        why = str(e.value.cause)
        host = lab.cfg.region(primary).postgres
        assert f"{host.pgbackrest_host}:{host.pgbackrest_port}" in why and "pgBackRest server" in why, why
        assert "not started" in why, why
        if log.exists():
            with log.open("rb") as f:
                f.seek(logged)
                assert b"backup command begin" not in f.read(), "pgBackRest was started against a server known down"
        after = read_catalog(Stanza(lab.cfg, primary))
        assert {x.label for x in after.backups} == before, "a failed backup left one behind"

        res = await _backup(lab, client, history="backup-auto-primary-when-remote-down", type="incr", trigger="test")
        assert res.outcome == "degraded" and not res.from_standby and res.source_region == primary, res
        assert len(res.backups) == 2 and any(d.startswith(f"read from the primary ({primary}), not the standby")
                                             and "pgBackRest server" in d for d in res.degraded), res.degraded
    finally:
        server.start()
    res = await _backup(lab, client, type="incr", trigger="test")
    assert res.outcome == "succeeded" and res.from_standby and res.source_region == standby, res


def test_a_client_certificate_the_primarys_server_refuses_is_seen_before_a_backup(lab, tmp_path):
    """A client certificate no CA the server trusts signed (a rotated CA on one side only):
    under TLS 1.3 our side of the handshake ends before the server has looked at it, so the
    handshake alone said the server answers. Its refusal comes on the first read, which the
    readiness check and a backup's look before pgBackRest starts (one function) now make."""
    import subprocess

    primary = _primary(lab)
    crt, key = tmp_path / "rogue.crt", tmp_path / "rogue.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=pgbackrest-client", "-addext", "extendedKeyUsage=clientAuth", "-keyout", str(key),
                    "-out", str(crt)], check=True, capture_output=True)
    client = lab.cfg.backup.tls_client.model_copy(update={"cert_file": str(crt), "key_file": str(key)})
    cfg = lab.cfg.model_copy(update={"backup": lab.cfg.backup.model_copy(update={"tls_client": client})})
    assert check_backup_path(lab.cfg, lab.cfg.region(primary), 3).state == "ok"  # the server is up
    seen = check_backup_path(cfg, cfg.region(primary), 3)
    assert seen.state == "warn" and "backups read the primary instead" in seen.reason, seen
    # Refused for the certificate, not unreachable.
    assert "Connection refused" not in seen.reason and "timed out" not in seen.reason, seen


@pytest.mark.parametrize("fault", ["silent", "blackholed"])
def test_a_primary_server_that_never_answers_is_said_within_the_look_s_bound(lab, fault):
    """Production, not a stopped process: the primary's pgBackRest server host either accepts
    TCP and never speaks TLS (a hung server), or drops the connection attempt (a partition
    dropping packets: a listener whose accept queue is full drops SYNs here, as a blackholed
    host would). Neither refuses, so neither is retried as a restarting server; each is said
    as timed out within the bound, not waited on as pgBackRest would."""
    import socket

    from activities.backup.take import primary_server_unreachable

    primary = _primary(lab)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0 if fault == "blackholed" else 8)
        port = listener.getsockname()[1]
        if fault == "blackholed":  # fill the accept queue: the next SYN goes unanswered
            for _ in range(2):
                filler = stack.enter_context(socket.socket())
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            probe = stack.enter_context(socket.socket())
            probe.settimeout(1)
            with pytest.raises(TimeoutError):
                probe.connect(("127.0.0.1", port))
        pg = lab.cfg.region(primary).postgres.model_copy(update={"pgbackrest_host": "127.0.0.1",
                                                                 "pgbackrest_port": port})
        regions = [r.model_copy(update={"postgres": pg}) if r.name == primary else r for r in lab.cfg.regions]
        cfg = lab.cfg.model_copy(update={"regions": regions})
        why = primary_server_unreachable(cfg, primary, 2.0, settle=5.0)
        seen = check_backup_path(cfg, cfg.region(primary), 2)
    # Which of the two, in our bound's words: not the kernel's after its two minutes of SYN
    # retries ("[Errno 110] Connection timed out"), nor a verdict on the certificate.
    said = {"silent": "it accepted a connection but did not complete a TLS handshake within 2 s",
            "blackholed": "no answer to a connection within 2 s per address (packets dropped: a firewall, a "
                          "partition; or the host down)"}
    assert why == said[fault], why
    assert seen.state == "warn" and f": {said[fault]}; backups read the primary instead" in seen.reason, seen
    assert "certificate" not in seen.reason, seen  # a network's silence, not a certificate's refusal
    assert "backups read the primary instead" in seen.reason, seen


def test_what_pgbackrest_says_is_scrubbed_in_a_worker_that_never_wrote_its_config(lab, monkeypatch):
    """A worker that only reads (``pgbackrest info``, a restore's checks) never resolved the
    repos' secrets in its life, so scrub() had nothing to take out of pgBackRest's text, and
    that text goes into results and errors, in workflow history. Here pgBackRest quotes a path
    that carries the bucket's secret key."""
    import eagle_dr.config as config

    region = _primary(lab)
    st = Stanza(lab.cfg, region)
    st.write_configs()
    secret = lab.cfg.region(region).s3.secret_key.resolve()
    monkeypatch.setattr(config, "_RESOLVED", set())  # a fresh worker process: nothing resolved yet
    r = st.run("repo-get", "--repo=1", args=(f"backup/missing-{secret}",), check=False)
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "missing-***" in said, said
    assert secret not in said


@pytest.mark.asyncio(loop_scope="session")
async def test_a_pgbackrest_left_writing_by_an_ended_holder_is_waited_for(lab, client):
    """The backup-repo lock ends with its holder at once (terminated, timed out); the pgBackRest
    that holder started does not. The next holder waits until no pgBackRest writes on any node
    before it touches the buckets: two writers each rewrite backup.info from what they read."""
    import os
    import signal

    from temporalio.api.enums.v1 import PendingActivityState
    from temporalio.client import WorkflowExecutionStatus

    from tests.lab_helpers import _progress, _until

    primary = _primary(lab)
    st = Stanza(lab.cfg, primary)
    st.write_configs()
    leftover = st.popen("expire", "--repo=1", owner="an ended holder")
    os.kill(leftover.pid, signal.SIGSTOP)  # still running, mid-write as far as anyone can tell
    try:
        handle = await client.start_workflow(BackupWorkflow.run, BackupInput(type="incr", trigger="test"),
                                             id=f"test-backup-{uuid.uuid4()}",
                                             task_queue=lab.cfg.temporal.control_task_queue)

        async def waiting():
            d = await handle.describe()
            return any(p.activity_type.name == "wait_repo_writers_gone" and
                       p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED and p.attempt == 1
                       for p in d.raw_description.pending_activities)

        await _until(waiting, 60, "the new holder to wait for the pgBackRest left running")
        await _until(waiting, 60, "it to still wait a moment later")
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        assert "take_backup" not in await _activities(handle)
    finally:
        os.kill(leftover.pid, signal.SIGCONT)
    leftover.wait(60)
    res = await handle.result()
    await record(handle, "backup-waits-for-a-leftover-writer")
    assert res.outcome == "succeeded", res
    lock = next(s for s in (await _progress(handle)).steps if s.name == "Take the service's backup-repo lock")
    assert f"{primary}: waited" in lock.detail, lock.detail


@pytest.mark.asyncio(loop_scope="session")
async def test_a_backup_after_a_failover_that_left_the_old_primary_fenced_and_running_takes_the_new_one(lab, client):
    """What a failover leaves when the old primary's worker could not stop it: the old primary
    fenced read-only, still running until failback, beside the promoted standby. It counted as
    a second primary: every backup failed "no single primary" for as long as failback waited."""
    from activities.postgres.fence import fence_read_only
    from activities.postgres.status import pg_status
    from activities.redis import failover as redis_failover
    from tests.lab_helpers import _async, _exec, _failback, _until

    a = _primary(lab)
    b = lab.cfg.other(a).name
    # Every part of that failover, Redis's too (failback re-attaches a's Redis to b's master:
    # with b's still a replica of a's, the two would follow each other, no master at all), and
    # routing (the failback below does not switch back: routing left on a, with b the primary,
    # failed the next file's routing checks on the same xdist worker).
    assert fence_read_only(lab.cfg.region(a).postgres).method == "read_only"
    assert redis_failover.fence(lab.cfg.region(a).redis).paused
    redis_failover.promote(lab.cfg.region(b).redis)
    redis_failover.repoint_sentinels(lab.cfg.region(b).redis, lab.cfg.region(b).redis)
    _exec(lab, b, "select pg_promote()")
    lab.router.set_active_region(b)
    try:
        await _until(_async(lambda: (s := pg_status(lab.cfg.region(b).postgres)).role == "primary" and
                            not s.read_only), 60, f"{b} promoted")
        res = await _backup(lab, client, "backup-beside-a-fenced-old-primary", trigger="test", repos=[b])
        assert res.outcome == "succeeded", res
        assert res.primary_region == b and res.source_region == b and not res.from_standby, res
    finally:
        # The failback that failover would have named puts the lab back in shape.
        back = await _failback(lab, client, a, switch_back=False)
        assert back.outcome in ("succeeded", "degraded"), back
        lab.wait_replication()
    roles = {r.name: redis_status(r.redis).role for r in lab.cfg.regions}
    assert roles == {b: "master", a: "slave"}, roles
    assert lab.router.active_region() == b


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("frozen", ["pgbackrest", "worker"])
async def test_a_cancelled_backup_stops_its_pgbackrest_starts_nothing_more_and_names_what_it_kept(lab, client, frozen):
    """A cancel (the UI's button: a backup hogging I/O at peak) during the second bucket's
    backup stops that pgBackRest and starts no expire. The first bucket's backup is complete
    and stays; a cancelled run has no result, so its details and search attributes name it.
    The lock is released: the next backup runs.

    ``worker``: the cancel cannot reach the standby's worker (frozen) before its pgBackRest
    ends: that backup is complete too, and is named as kept, not as cancelled."""
    import os
    import signal

    from temporalio.exceptions import CancelledError

    from activities.backup.take import running_backups
    from eagle_dr.temporal import DR_BACKUP_LABEL
    from lab.processes import read_pid
    from tests.lab_helpers import _async, _exec, _resume, _until

    primary = _primary(lab)
    source = lab.cfg.other(primary).name  # the standby's node takes the backup
    other = primary
    stanza = Stanza(lab.cfg, source)
    # Enough data that a full copy takes more than the blink a poll needs to see it.
    _exec(lab, primary, "create table if not exists backup_bulk as select g, md5(g::text) || repeat('x', 200) as pad"
                        " from generate_series(1, 100000) g")
    before = {x.label for x in read_catalog(stanza).backups}
    handle = await client.start_workflow(BackupWorkflow.run, BackupInput(type="full", trigger="test"),
                                         id=f"test-backup-cancel-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)

    def ours() -> list[int]:
        return [pid for pid, owner in running_backups(stanza).items() if owner.startswith(handle.id)]

    async def second_running() -> int | None:
        # Its takes run one after the other: a second scheduled means the first completed.
        if (await _activities(handle)).count("take_backup") < 2:
            return None
        return (ours() or [None])[0]

    pid = await _until(second_running, 120, f"the backup to {other}'s bucket running", interval=0.01)
    # Frozen, so that it still runs when the cancel arrives, whatever the machine's speed.
    if frozen == "pgbackrest":
        os.killpg(pid, signal.SIGSTOP)  # the group: its local processes too
        try:
            await handle.cancel()
            # Until its worker, told of the cancel, has sent it SIGTERM (pending while stopped).
            await _until(_async(lambda: _pending(pid, signal.SIGTERM)), 60, "the worker's SIGTERM to pgBackRest")
        finally:
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    else:
        worker = read_pid(lab.worker_pidfile(source))
        os.kill(worker, signal.SIGSTOP)  # pgBackRest runs in a process group of its own, and goes on
        try:
            await handle.cancel()
            await _until(_async(lambda: not ours()), 120, "pgBackRest to finish while its worker is frozen")
        finally:
            _resume([worker])
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    assert isinstance(e.value.cause, CancelledError), e.value.cause
    meta = await handle.query("__temporal_workflow_metadata")
    details = (meta.get("currentDetails") if isinstance(meta, dict) else getattr(meta, "current_details", "")) or ""
    await _until(_async(lambda: not ours()), 90, "the cancelled pgBackRest to end")
    taken = [x for x in read_catalog(stanza).backups if x.label not in before]
    mine = [x for x in taken if x.repo_region == source]
    assert len(mine) == 1 and mine[0].type == "full", [x.label for x in taken]
    assert f"kept: backup {mine[0].label} in {source}'s bucket (complete)" in details, details
    names = await _activities(handle)
    assert "expire_backups" not in names, names  # nothing scheduled after the cancel
    labels = (await handle.describe()).typed_search_attributes.get(DR_BACKUP_LABEL)
    if frozen == "pgbackrest":
        assert f"stopped: the backup to {other}'s bucket, unfinished" in details, details
        assert f"⏹️ full backup to {other}'s bucket" in details, details  # cancelled, not failed
        assert labels == [mine[0].label], labels
        assert not [x for x in taken if x.repo_region == other], "a cancelled backup was listed"
        await record(handle, "backup-cancel-stops-pgbackrest")
    else:
        done = [x for x in taken if x.repo_region == other]
        assert len(done) == 1, [x.label for x in taken]
        assert f"backup {done[0].label} in {other}'s bucket (complete)" in details, details
        assert "stopped:" not in details and f"✅ full backup to {other}'s bucket" in details, details
        assert sorted(labels) == sorted([mine[0].label, done[0].label]), labels
        await record(handle, "backup-cancel-finds-a-backup-finished-anyway")
    res = await _backup(lab, client, type="incr", trigger="test")
    assert res.outcome == "succeeded" and {b.repo_region for b in res.backups} == {source, other}, res


def _pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits to be delivered to the (stopped) process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False

