"""Restore drills and ``eagle-dr backup list`` on the real lab: pgBackRest, SeaweedFS over TLS,
PostgreSQL. Each test makes the backups it needs, so it runs alone or in any order.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import uuid

import psycopg
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.testing import ActivityEnvironment

from activities.backup.catalog import read_catalog
from activities.backup.drill import ArchiverState, FreshnessRequest, RestoreDrillActivities, archiving_problems
from activities.backup.pgbackrest import Stanza, endpoint_unreachable
from tests.histories import record
from tests.lab_helpers import _primary, _until
from tests.test_restore import _archived_now, _backup, _no_scratch_left
from workflows.restore_drill import RestoreDrillResult

# Its tests name lab.cfg.primary as the primary (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("configured_topology")

ASYNC = pytest.mark.asyncio(loop_scope="session")


def _probe_rows(lab, tag: str, n: int) -> None:
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create table if not exists drill_probe (n int primary key, tag text, at timestamptz)")
        conn.execute("insert into drill_probe select g, %s, now() from generate_series(%s::int, %s::int) g "
                     "on conflict (n) do update set tag = excluded.tag", (tag, 1, n))


async def _drill(lab, client, raw: dict, name: str):
    # A raw dict, as a Schedule starts it ({} must be a valid input).
    handle = await client.start_workflow("RestoreDrillWorkflow", raw, id=f"test-restore-drill-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue,
                                         result_type=RestoreDrillResult)
    try:
        return await handle.result()
    finally:
        await record(handle, name)


@ASYNC
async def test_restore_drill_passes_on_a_healthy_lab_and_reports_rto_rpo(lab, client):
    _probe_rows(lab, uuid.uuid4().hex, 500)
    await _backup(lab, client, type="full")
    res = await _drill(lab, client, {}, "restore_drill-healthy-drops-ended-copies")
    assert res.outcome == "succeeded", res
    assert not res.problems
    tables = {t.table: t for t in res.tables}
    # The configured tables and every other user table, identical at the restore point.
    for t in lab.cfg.conflicts:
        assert f"public.{t}" in tables, sorted(tables)
    assert tables["public.drill_probe"].primary_rows == 500
    assert all(t.match and t.restored_rows == t.primary_rows for t in res.tables), res.tables
    assert res.restore_point and res.restore_point_lsn and res.backup_label
    assert res.rto_seconds and res.rto_seconds == pytest.approx(res.restore_seconds + res.replay_seconds)
    assert res.newest_recoverable is not None and res.rpo_seconds is not None and res.rpo_seconds >= 0
    assert res.newest_archived_wal
    assert res.freshness and set(res.freshness.newest) == set(lab.cfg.region_names)
    # The replay reached the restore point: the copy's newest commit is no later than the mark.
    assert res.recovered_to is None or res.recovered_to <= res.restore_point_at
    _no_scratch_left(lab)


@ASYNC
async def test_restore_drill_names_unlogged_tables_as_not_restorable(lab, client):
    """An unlogged table with rows is in no backup (never in WAL): the every-table drill must
    not call the restore complete while leaving it out unsaid. It names it, is degraded, and
    still checks every other table."""
    with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create unlogged table if not exists drill_cache (k int primary key)")
        conn.execute("insert into drill_cache select generate_series(1, 100) on conflict do nothing")
    try:
        _probe_rows(lab, uuid.uuid4().hex, 50)
        await _backup(lab, client, type="full")
        res = await _drill(lab, client, {}, "restore_drill-unlogged")
    finally:
        with psycopg.connect(lab.cfg.region(_primary(lab)).postgres.dsn(), autocommit=True) as conn:
            conn.execute("drop table if exists drill_cache")
    assert res.not_restorable == ["public.drill_cache"], res
    assert res.outcome == "degraded" and not res.problems, res
    assert any("NOT RESTORABLE" in d and "public.drill_cache" in d for d in res.degraded), res.degraded
    tables = {t.table: t for t in res.tables}
    assert "public.drill_cache" not in tables and tables["public.drill_probe"].match, res.tables
    _no_scratch_left(lab)


@ASYNC
async def test_restore_drill_fails_and_says_why_when_archiving_is_broken(lab, client):
    await _backup(lab, client, type="incr")
    dsn = lab.cfg.region(_primary(lab)).postgres.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("alter system set archive_command = 'false'")
        conn.execute("select pg_reload_conf()")
        try:
            await _until(lambda: _async(conn.execute("show archive_command").fetchone()[0] == "false"), 10,
                         "the reload")
            conn.execute("create table if not exists drill_probe (n int primary key, tag text, at timestamptz)")
            conn.execute("insert into drill_probe values (-1, 'archive-broken', now()) on conflict (n) do nothing")
            conn.execute("select pg_switch_wal()")

            async def failing():
                a, f = conn.execute("select last_archived_time, last_failed_time from pg_stat_archiver").fetchone()
                return f is not None and (a is None or f > a)

            await _until(failing, 60, "pg_stat_archiver to record a failure", 0.3)
            with pytest.raises(WorkflowFailureError) as e:
                await _drill(lab, client, {}, "restore_drill-archiving-broken")
            cause = e.value.cause
            assert cause.type == "ArchivingFailing" and cause.non_retryable, cause
            assert "WAL archiving is failing" in cause.message and "failed at" in cause.message, cause.message
        finally:
            conn.execute("alter system reset archive_command")
            conn.execute("select pg_reload_conf()")
    # Archiving back: the backlog drains (later tests restore through it).
    await _archived_now(lab)
    _no_scratch_left(lab)


async def _async(v):
    return v


@ASYNC
async def test_restore_drill_fails_when_the_newest_backup_is_too_old(lab, client):
    await _backup(lab, client, type="incr")
    # An interval of 1 s instead of waiting 30 minutes: every backup is then "too old".
    with pytest.raises(WorkflowFailureError) as e:
        await _drill(lab, client, {"backup_every_seconds": 1}, "restore_drill-stale-backup")
    cause = e.value.cause
    assert cause.type == "RestoreDrillFailed" and "more than 2 x backup.every" in cause.message, cause.message
    # The restore was still tried and measured: the figures come with the failure.
    figures = RestoreDrillResult.model_validate(cause.details[0])
    assert figures.outcome == "failed" and figures.rto_seconds and all(t.match for t in figures.tables)
    _no_scratch_left(lab)


@ASYNC
async def test_restore_drill_bad_input_names_the_field(lab, client):
    for raw, field in (({"region": "eu-north-9"}, "region"), ({"backup_every_seconds": -1}, "backup_every_seconds"),
                       ({"colour": "red"}, "colour")):
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow("RestoreDrillWorkflow", raw, id=f"test-{uuid.uuid4()}",
                                          task_queue=lab.cfg.temporal.control_task_queue)
        assert e.value.cause.type == "InvalidInput" and field in str(e.value.cause), e.value.cause


def test_archiving_problems_rules():
    from datetime import datetime, timedelta, timezone

    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    ok = ArchiverState(region="r", at=now, archive_mode="on", archive_timeout_seconds=60, archived_count=9,
                       last_archived_wal="000000010000000000000009", last_archived_time=now - timedelta(seconds=30),
                       failed_count=2, last_failed_wal="000000010000000000000008",
                       last_failed_time=now - timedelta(seconds=90), current_wal="00000001000000000000000A",
                       ready_count=0, oldest_ready_seconds=0)
    assert archiving_problems(ok) == []  # an old failure, retried with success since
    failing = ok.model_copy(update={"last_failed_time": now - timedelta(seconds=5)})
    assert "failing" in archiving_problems(failing)[0]
    backlog = ok.model_copy(update={"ready_count": 4, "oldest_ready_seconds": 400})
    assert "4 WAL segments wait" in archiving_problems(backlog)[0]
    # Without the status directory: a finished segment unarchived long after the last success.
    stalled = ok.model_copy(update={"ready_count": None, "oldest_ready_seconds": None, "last_failed_time": None,
                                    "last_archived_time": now - timedelta(seconds=600),
                                    "current_wal": "00000001000000000000000C"})
    assert "stalled" in archiving_problems(stalled)[0]
    idle = stalled.model_copy(update={"current_wal": "00000001000000000000000A"})
    assert archiving_problems(idle) == []  # nothing written since: no news is not a failure
    assert "archive_mode is off" in archiving_problems(ok.model_copy(update={"archive_mode": "off"}))[0]


@ASYNC
async def test_backup_list_shows_each_repo_and_exits_1_on_a_broken_one(lab, client, lab_config_path):
    b = await _backup(lab, client, type="incr")
    argv = [sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "backup", "list"]
    r = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert {x["region"] for x in view["repos"]} == set(lab.cfg.region_names) and not view["broken"]
    for repo in view["repos"]:
        assert repo["ok"] and repo["encrypted"] and repo["cipher"] == "aes-256-cbc"
        labels = [x["label"] for x in repo["backups"]]
        assert any(x.label in labels for x in b.backups if x.repo_region == repo["region"])
        assert repo["backups"][0]["type"] == "full" and repo["pitr_from"] and repo["pitr_to"]
        assert all(x["size"] and x["wal_start"] and x["age_seconds"] >= 0 for x in repo["backups"])
    text = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "PITR window" in text.stdout and b.backups[0].label in text.stdout
    # One region's S3 down: its repo is shown BROKEN and the command exits 1.
    lost = lab.cfg.secondary.name
    lab.s3(lost).kill()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "BROKEN" in r.stdout and lost in r.stderr
        # Said from a refused connection to its endpoint, not after pgBackRest's minute of
        # retries (activities/backup/catalog.py): and the live bucket is still read in full.
        shown = " ".join(r.stdout.split())
        assert f"{lost}'s bucket (repo" in shown and "BROKEN (its endpoint " in shown, r.stdout
        assert "NOT encrypted" not in shown and "PITR window: unknown (bucket not read)" in shown, r.stdout
        j = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=300)
        view = json.loads(j.stdout)
        # Never the live repo's "ok" as the stanza's status: pgBackRest was not asked about one.
        assert not view["ok"] and view["status_code"] is None and view["broken"] == [lost], view
        assert re.match(rf"repo\d \({lost}'s bucket\) not read", view["status"]), view["status"]
        live = lab.cfg.other(lost).name
        fresh = ActivityEnvironment().run(RestoreDrillActivities(lab.cfg).check_backup_freshness,
                                          FreshnessRequest(region=_primary(lab)))
        assert any(p.startswith(f"{lost}'s bucket is unreadable: its endpoint ") for p in fresh.problems), fresh
        assert live in fresh.newest and not any(p.startswith(f"{live}'s bucket is unreadable") for p in fresh.problems)
    finally:
        lab.s3(lost).start()
        await _archived_now(lab)  # archive-push to that bucket failed meanwhile: caught up again


def _with_endpoint(cfg, region: str, url: str):
    """``cfg`` with ``region``'s S3 endpoint replaced (the node's pgBackRest files unchanged)."""
    regions = [r.model_copy(update={"s3": r.s3.model_copy(update={"endpoint_url": url})}) if r.name == region else r
               for r in cfg.regions]
    return cfg.model_copy(update={"regions": regions})


@pytest.mark.parametrize("fault", ["silent", "blackholed"])
def test_a_silent_s3_endpoint_is_listed_unreadable_and_not_handed_to_pgbackrest(lab, fault):
    """Production, not the lab's dead process: a region's S3 endpoint that accepts connections
    and never answers (a hung server, a load balancer holding connections with nothing behind
    it). The catalog lists that bucket unreadable, saying so, and reads the other; a look that
    only connected called it reachable and handed it to pgBackRest, which waits out its own
    timeout. Or one that answers no connection at all (a region's network dropping packets: a
    listener whose accept queue is full drops SYNs here). The files pgBackRest reads still
    name the real, answering server: had it been asked, that bucket would read fine."""
    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    with contextlib.ExitStack() as stack:
        silent = stack.enter_context(socket.socket())  # listens, never accepts
        silent.bind(("127.0.0.1", 0))
        silent.listen(0 if fault == "blackholed" else 8)
        port = silent.getsockname()[1]
        for _ in range(2 if fault == "blackholed" else 0):  # fill the accept queue
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        cfg = _with_endpoint(lab.cfg, other, f"https://127.0.0.1:{port}")
        cat = read_catalog(Stanza(cfg, primary))
    state = cat.repo(other)
    assert state is not None and not state.ok and state.code is None, cat.repos
    said = {"silent": "accepted a connection but answered nothing within 3 s",
            "blackholed": "answered no connection within 3 s per address (packets dropped: a firewall, a partition; "
                          "or the host down)"}
    assert state.message == f"its endpoint 127.0.0.1:{port} {said[fault]}", state.message
    assert cat.repo(primary).code in (0, 2) and not cat.ok
    # A server that answers passes the look, over TLS as pgBackRest speaks (the lab's endpoint).
    assert endpoint_unreachable(lab.cfg, other) is None
    # One that answers plain HTTP where TLS is expected (a TLS-terminating proxy left out) is
    # said at once: pgBackRest would retry its handshake for minutes.
    plain = lab.s3(other).port
    why = endpoint_unreachable(_with_endpoint(lab.cfg, other, f"https://127.0.0.1:{plain}"), other)
    assert why is not None and why.startswith(f"its endpoint 127.0.0.1:{plain}: ") and "WRONG_VERSION_NUMBER" in why, why


def test_without_an_endpoint_url_the_look_goes_where_pgbackrest_goes(lab):
    """Real AWS S3 (no ``endpoint_url``): pgBackRest's config names the regional endpoint and
    no URI style, so it connects host-style, to ``<bucket>.s3.<region>.amazonaws.com:443``
    (``.com.cn`` in China). The look before a catalog read goes there too (it looked at
    nothing, so an AWS deployment kept pgBackRest's minute per dead bucket). A region AWS does
    not have stands in for an unreachable one: no network call answers for it, online or not."""
    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    cfg = _with_endpoint(lab.cfg, other, None)
    s3 = cfg.region(other).s3
    assert s3.request_host_port == (f"{s3.bucket}.s3.{s3.region_name}.amazonaws.com", 443)
    assert s3.model_copy(update={"region_name": "cn-north-1"}).service_host_port == \
        ("s3.cn-north-1.amazonaws.com.cn", 443)
    written = [x for x in Stanza(cfg, primary)._repo_lines(2, cfg.region(other))
               if x.startswith(("repo2-s3-endpoint=", "repo2-storage-port=", "repo2-s3-uri-style="))]
    assert written == [f"repo2-s3-endpoint=s3.{s3.region_name}.amazonaws.com"]  # host style, port 443
    regions = [r.model_copy(update={"s3": r.s3.model_copy(update={"region_name": "eagle-dr-nowhere-1"})})
               if r.name == other else r for r in cfg.regions]
    nowhere = cfg.model_copy(update={"regions": regions})
    why = endpoint_unreachable(nowhere, other)
    assert why is not None and why.startswith(
        f"its endpoint {s3.bucket}.s3.eagle-dr-nowhere-1.amazonaws.com:443: "), why
