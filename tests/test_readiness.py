"""Readiness checks (activities/readiness.py) on the real lab: healthy -> ok (the documented
exceptions below), then real faults flip them, in ``eagle-dr status --json``, in the monitor's
state and findings, and in the ``eagle_dr_readiness`` gauge of the primary's worker.

Each test leaves the lab as it found it (Sentinels running, replication streaming).

Documented non-ok states on a healthy test lab: ``dns`` is n/a (the lab routes through its
file, not Route 53), and ``backup_age`` is warn until a test has taken a backup ("configured
but none exists yet") or ok after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import yaml

from activities.dns import Route53Failover
from activities.readiness import assess, check_dns, check_lag, check_next_start, check_standby, check_unlogged, \
    check_wal_headroom, check_workers
from activities.postgres.status import pg_status
from eagle_dr.config import load_config
from eagle_dr.status import WorkerView, _alive
from lab.processes import read_pid
from tests.lab_helpers import _async, _aux_pid, _primary, _scrape, _until, _value
from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow

HEALTHY = {"standby", "replication_lag", "replication_slot", "rewind_safety", "wal_headroom", "sentinel_quorum",
           "workers", "backup_path", "unlogged", "next_start"}


def _states(report) -> dict[str, str]:
    return {c.key: c.state for c in report.checks}


def _assert_healthy(report, a: str, b: str) -> None:
    st = _states(report)
    for c in report.checks:
        if c.name in HEALTHY:
            assert c.state == "ok", (c, report.line())
    assert st["dns@" + a] == "n/a"
    assert st["backup_age@" + a] in ("ok", "warn"), report.line()
    assert {f"rewind_safety@{a}", f"rewind_safety@{b}", f"standby@{b}", f"replication_slot@{b}"} <= set(st)


def _status_json(lab, config) -> dict:
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(config), "status", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 3), r.stderr + r.stdout
    return json.loads(r.stdout)


def _sentinel(lab):
    return lab.sentinels()[-1][1]


async def test_status_shows_readiness_and_a_stopped_sentinel_warns(lab, lab_config_path):
    a = _primary(lab)
    b = lab.cfg.other(a).name
    report = await _async(lambda: assess(lab.cfg, a, {"control": True, a: True, b: True}))()
    _assert_healthy(report, a, b)
    # The numbers behind the verdicts: free bytes for pg_wal, WAL the slot holds, Sentinels passing.
    by = report.by_key()
    assert by[f"wal_headroom@{a}"].value > 0 and by["sentinel_quorum"].value == 3

    sentinel = _sentinel(lab)
    assert sentinel.kill()
    try:
        doc = _status_json(lab, lab_config_path)
        checks = {(c["name"], c["region"]): c for c in doc["readiness"]["checks"]}
        q = checks[("sentinel_quorum", None)]
        assert q["state"] == "warn" and q["value"] == 2 and f"{sentinel.host}:{sentinel.port} unreachable" in \
            q["reason"], q
        assert doc["readiness"]["state"] == "warn" and doc["readiness"]["primary"] == a
        # The workers check comes from status's own liveness probe: every queue answered.
        assert checks[("workers", None)]["state"] == "ok", checks[("workers", None)]
        assert checks[("standby", b)]["state"] == "ok"
    finally:
        sentinel.start()

    async def quorum_back():
        return _states(assess(lab.cfg, a))["sentinel_quorum"] == "ok"

    await _until(quorum_back, 30, "every Sentinel to pass CKQUORUM again", interval=0.5)


async def test_lag_past_the_guard_fails_while_the_standby_does_not_receive(lab, lab_config_path, tmp_path):
    """The standby's walreceiver is stopped (SIGSTOP) while the primary writes: WAL not
    received goes past a 1 MiB guard and the check fails, as the failover's guard would refuse."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    doc = yaml.safe_load(lab_config_path.read_text())
    doc["health"]["max_lag_bytes"] = "1MiB"
    path = tmp_path / "eagle-dr.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_config(path, env={})
    standby = cfg.region(b)

    def lag():
        return check_lag(cfg, standby, pg_status(cfg.region(a).postgres), pg_status(standby.postgres))

    assert lag().state == "ok", lag()
    receiver = _aux_pid(lab, b, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    try:
        with psycopg.connect(cfg.region(a).postgres.dsn(), autocommit=True) as conn:
            # A few MiB of WAL in a table of its own (a temporary table writes none).
            conn.execute("create table readiness_filler as "
                         "select g, repeat('x', 200) as pad from generate_series(1, 20000) g")
            conn.execute("drop table readiness_filler")
        c = lag()
        assert c.state == "fail" and c.value > 1 << 20 and "lag guard" in c.reason, c
    finally:
        os.kill(receiver, signal.SIGCONT)
    await _until(_async(lambda: lag().state == "ok"), 60, "the standby to catch up")


def test_dns_record_ttl_and_target_through_route53(lab_cfg, moto_url):
    """The moto server's Route 53: a missing pair fails, the right pair with a short TTL is
    ok, a 1-hour TTL warns, PRIMARY on the other region fails."""
    zone = f"ready-{uuid.uuid4().hex[:8]}.example.com."
    cfg = lab_cfg.model_copy(update={
        "routing": lab_cfg.routing.model_copy(update={"dns": True, "dns_endpoint_url": moto_url}),
        "regions": [r.model_copy(update={"dns": r.dns.model_copy(update={"zone": zone})}) for r in lab_cfg.regions]})
    a, b = cfg.primary, cfg.secondary
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    r53 = Route53Failover(moto_url, zone, poll_s=0.05)
    r53.ensure_zone()
    record = a.dns.record
    assert check_dns(cfg, a).state == "fail"
    r53.upsert_failover_records(record, a.dns.value, b.dns.value, 60, a.name, b.name)
    c = check_dns(cfg, a)
    assert c.state == "ok" and c.value == 60, c
    r53.upsert_failover_records(record, a.dns.value, b.dns.value, 3600, a.name, b.name)
    c = check_dns(cfg, a)
    assert c.state == "warn" and c.value == 3600 and "max_dns_ttl 60 s" in c.reason, c
    r53.upsert_failover_records(record, b.dns.value, a.dns.value, 60, b.name, a.name)
    c = check_dns(cfg, a)
    assert c.state == "fail" and f"PRIMARY is {b.name}" in c.reason, c


async def test_monitor_runs_readiness_reports_degraded_and_recovered_and_exports_the_gauge(lab, client):
    a = _primary(lab)
    b = lab.cfg.other(a).name
    port = lab.cfg.region(a).temporal.metrics_port
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=100,
                                          readiness_every_seconds=1),
        id=f"monitor-readiness-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)

    async def state() -> MonitorState | None:
        try:
            return await handle.query(MonitorWorkflow.monitor_state)
        except Exception:  # noqa: BLE001 - not started yet
            return None

    async def quorum(want: str, gauge: float):
        async def pred():
            st = await state()
            if not (st and st.readiness and st.readiness.checks):
                return None
            if _states(st.readiness).get("sentinel_quorum") != want:
                return None
            try:
                seen = _value(_scrape(port), "eagle_dr_readiness", check="sentinel_quorum", region="all")
            except OSError:
                return None
            return st if seen == gauge else None
        return pred

    sentinel = _sentinel(lab)
    try:
        st = await _until(await quorum("ok", 1.0), 90, "a readiness report with a passing Sentinel quorum")
        _assert_healthy(st.readiness, a, b)
        assert st.readiness.primary == a
        assert _value(_scrape(port), "eagle_dr_readiness", check="standby", region=b) == 1.0
        assert _value(_scrape(port), "eagle_dr_readiness_unknown", check="standby", region=b) == 0.0
        # The monitor says from the control worker that the checks ran (else the gauges are stale).
        assert _value(_scrape(lab.cfg.temporal.metrics_port), "eagle_dr_readiness_assessed",
                      service=lab.cfg.service) == 1.0

        assert sentinel.kill()
        st = await _until(await quorum("warn", 0.5), 60, "the Sentinel quorum check to warn, gauge 0.5")
        assert any("readiness degraded: sentinel_quorum warn" in f for f in st.findings), st.findings
        sentinel.start()
        st = await _until(await quorum("ok", 1.0), 60, "the Sentinel quorum check back to ok, gauge 1")
        assert any("readiness recovered: sentinel_quorum ok" in f for f in st.findings), st.findings
        # One degradation, one report of it: the rounds in between said nothing new.
        assert sum("readiness degraded: sentinel_quorum" in f for f in st.findings) == 1, st.findings
        await handle.signal(MonitorWorkflow.stop, "test over")
        assert (await handle.result()).stopped == "test over"
        from tests.histories import record

        await record(handle, "monitor-service-readiness")
    finally:
        sentinel.start()
        try:
            await handle.terminate("test over")
        except Exception:  # noqa: BLE001 - already ended
            pass



async def test_a_check_degraded_then_not_looked_at_recovers_when_it_is_ok_again(lab, client):
    """warn -> unknown -> ok is a recovery. The standby stopped makes its slot inactive (warn);
    the primary stopped too makes the slot unreadable (unknown); both back, it is ok. Compared
    against "unknown", the recovery was never said, and a pager incident opened by the warning
    stayed open for good. The primary's worker is frozen while both servers come back, so no
    readiness round sees the slot inactive again in between (which would hide the fault)."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    slot = f"replication_slot@{b}"
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=100,
                                          auto_failover=False, watch_split_brain=False, readiness_every_seconds=1),
        id=f"monitor-readiness-unknown-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)

    def slot_is(want: str):
        async def pred():
            try:
                st = await handle.query(MonitorWorkflow.monitor_state)
            except Exception:  # noqa: BLE001 - not started yet
                return None
            ok = st.readiness and st.readiness.checks and _states(st.readiness).get(slot) == want
            return st if ok else None
        return pred

    def streaming() -> bool:
        try:
            with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True, connect_timeout=3) as c:
                return c.execute("select 1 from pg_replication_slots where slot_name = %s and active",
                                 (lab.cfg.region(b).postgres.slot_name,)).fetchone() is not None
        except psycopg.Error:
            return False

    worker = read_pid(lab.worker_pidfile(a))
    assert worker, f"{a}'s worker is not running"
    try:
        await _until(slot_is("ok"), 90, f"{slot} ok")
        lab.postgres(b).stop()
        st = await _until(slot_is("warn"), 60, f"{slot} to warn with its standby stopped")
        assert any(f"readiness degraded: {slot} warn" in f for f in st.findings), st.findings
        lab.postgres(a).stop()
        await _until(slot_is("unknown"), 60, f"{slot} unknown with the primary stopped too")
        os.kill(worker, signal.SIGSTOP)
        lab.postgres(a).start()
        lab.postgres(b).start()
        await _until(_async(streaming), 90, f"{b} streaming from {a} again")
        os.kill(worker, signal.SIGCONT)
        st = await _until(slot_is("ok"), 120, f"{slot} ok again")
        assert any(f"readiness recovered: {slot} ok" in f for f in st.findings), st.findings
        # Not degraded again (the findings keep the last 20: the first may have scrolled out).
        assert sum(f"readiness degraded: {slot}" in f for f in st.findings) <= 1, st.findings
        await handle.signal(MonitorWorkflow.stop, "test over")
        assert (await handle.result()).stopped == "test over"
        from tests.histories import record

        await record(handle, "monitor-readiness-through-unknown")
    finally:
        os.kill(worker, signal.SIGCONT)
        for r in (a, b):
            if not lab.postgres(r).running():
                lab.postgres(r).start()
        try:
            await handle.terminate("test over")
        except Exception:  # noqa: BLE001 - already ended
            pass


def test_pg_wal_headroom_against_its_thresholds(lab, lab_config_path, tmp_path):
    """The real free space of the primary's pg_wal filesystem against configured bounds: a
    bound above it fails, one between warns (filling the disk for real would hurt the host)."""
    a = _primary(lab)
    free = check_wal_headroom(lab.cfg, lab.cfg.region(a), 3).value
    assert free and free > 0

    def with_bounds(fail: int, warn: int):
        doc = yaml.safe_load(lab_config_path.read_text())
        doc["readiness"] = {"wal_free_fail": fail, "wal_free_warn": warn}
        path = tmp_path / "eagle-dr.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return check_wal_headroom(load_config(path, env={}), lab.cfg.region(a), 3)

    big = int(free) * 4
    assert with_bounds(big, big).state == "fail"
    assert with_bounds(1 << 20, big).state == "warn"
    assert with_bounds(1 << 20, 2 << 20).state == "ok"


def test_workers_check_tells_a_dead_worker_from_an_unknown_one(lab_cfg):
    a, b = lab_cfg.region_names
    ok = check_workers(lab_cfg, {"control": True, a: True, b: True})
    assert ok.state == "ok" and ok.value == 0
    dead = check_workers(lab_cfg, {"control": True, a: True, b: False})
    assert dead.state == "fail" and b in dead.reason and dead.value == 1
    # Temporal down: status's probe could not ask, which says nothing about the workers.
    views = [WorkerView(task_queue=f"q-{r}", region=r, polling=False, error="temporal: connection refused")
             for r in ("control", a, b)]
    assert check_workers(lab_cfg, _alive(views)).state == "unknown"
    views[2] = WorkerView(task_queue="q", region=b, polling=False, error="no worker picked up a probe within 3s")
    assert _alive(views)[b] is False


def test_encryption_warns_for_each_link_not_encrypted_and_verified(lab_cfg):
    from activities.readiness import check_encryption

    c = check_encryption(lab_cfg)  # the lab: verify-full and Redis TLS everywhere
    assert c.state == "ok" and c.value == 0, c
    a, b = lab_cfg.regions
    weaker = lab_cfg.model_copy(update={"regions": [
        a.model_copy(update={"postgres": a.postgres.model_copy(update={"sslmode": "require"})}),
        b.model_copy(update={"redis": b.redis.model_copy(update={"tls": False, "ca_file": None})})]})
    c = check_encryption(weaker)
    assert c.state == "warn" and c.value == 2, c
    assert f"{a.name} PostgreSQL sslmode=require" in c.reason and f"{b.name} Redis without TLS" in c.reason, c


async def test_unlogged_relations_warn_largest_first_until_set_logged(lab):
    """An unlogged table is never in WAL: the standby has none of its rows, so the next move
    empties it. The check warns naming the largest first, and is ok again once the table is
    SET LOGGED and the sequence dropped."""
    a = _primary(lab)
    primary = lab.cfg.region(a)
    with psycopg.connect(primary.postgres.dsn(), autocommit=True) as conn:
        conn.execute("create unlogged table readiness_cache_small (k int primary key)")
        conn.execute("create unlogged table readiness_cache_big as "
                     "select g as k, repeat('x', 200) as pad from generate_series(1, 5000) g")
        conn.execute("create unlogged sequence readiness_ids")
        try:
            c = await _async(lambda: check_unlogged(primary, 3))()
            assert c.state == "warn" and c.region == a, c
            assert "3 unlogged relation(s)" in c.reason and "SET LOGGED" in c.reason, c
            big, small = c.reason.index("public.readiness_cache_big"), c.reason.index("public.readiness_cache_small")
            assert big < small and "public.readiness_ids (sequence)" in c.reason, c
            assert c.value > 1 << 20, c  # 5000 rows of 200 bytes: the main fork's size
            conn.execute("alter table readiness_cache_big set logged")
            conn.execute("drop table readiness_cache_small")
            conn.execute("drop sequence readiness_ids")
            c = await _async(lambda: check_unlogged(primary, 3))()
            assert c.state == "ok" and c.value == 0, c
        finally:
            conn.execute("drop table if exists readiness_cache_big, readiness_cache_small")
            conn.execute("drop sequence if exists readiness_ids")
    # A node that does not answer is unknown, never ok.
    down = primary.model_copy(update={"postgres": primary.postgres.model_copy(update={"port": 1})})
    c = await _async(lambda: check_unlogged(down, 1))()
    assert c.state == "unknown" and "cannot read its catalog" in c.reason, c


async def test_a_hold_on_the_running_primary_warns_until_lifted(lab):
    """A switchover ended between its hold and its stop leaves standby.signal on a primary that
    keeps serving: its next crash restart would come up read-only. The check warns with the
    repair, and is ok once the hold is lifted (in place: the same postmaster)."""
    from activities.postgres.ctl import FENCE_MARKER, PgCtl
    from activities.postgres.fence import hold_as_standby, lift_stop_fence
    from activities.readiness import HOLD_GRACE_SECONDS

    a = _primary(lab)
    primary = lab.cfg.region(a)
    ctl = PgCtl(primary.postgres)
    pid = ctl.pid
    assert hold_as_standby(ctl, before_stop=True)
    try:
        st = await _async(lambda: pg_status(primary.postgres, 3, files=True))()
        assert st.hold == "eagle-dr" and 0 <= st.hold_age_seconds < 60, st
        # A fresh hold is a running switchover's own: no page for its few seconds.
        c = check_next_start(primary, st)
        assert c.state == "ok" and "a switchover's own" in c.reason, c
        # Dated back past the grace, as one left by a run terminated minutes ago.
        old = time.time() - HOLD_GRACE_SECONDS - 60
        os.utime(ctl.data_dir / FENCE_MARKER, (old, old))
        c = check_next_start(primary, await _async(lambda: pg_status(primary.postgres, 3, files=True))())
        assert c.state == "warn" and c.region == a, c
        assert "stop fence's hold" in c.reason and f"eagle-dr unfence --region {a} --local" in c.reason, c
    finally:
        assert await _async(lambda: lift_stop_fence(primary.postgres))()
    assert ctl.pid == pid
    c = check_next_start(primary, await _async(lambda: pg_status(primary.postgres, 3, files=True))())
    assert c.state == "ok", c
    # Without the file read (no privilege, or not asked) it is unknown, never ok.
    c = check_next_start(primary, await _async(lambda: pg_status(primary.postgres, 3))())
    assert c.state == "unknown" and "pg_stat_file" in c.reason, c


async def test_a_replica_copied_with_a_fence_marker_is_still_a_failover_target(lab):
    """A pg_basebackup or restore of a primary that carried a hold copies eagle-dr's marker
    into a real replica. It follows its primary (primary_conninfo set), so it is no fenced old
    primary: refusing to fail over to it would turn the next outage into a long one."""
    import json

    from activities.postgres.ctl import FENCE_MARKER, PgCtl

    a = _primary(lab)
    standby = lab.cfg.other(a)
    ctl = PgCtl(standby.postgres)
    marker = ctl.data_dir / FENCE_MARKER
    ctl.write_file(marker, json.dumps({"auto_conf": "", "created_standby_signal": True}))
    try:
        st = await _async(lambda: pg_status(standby.postgres, 3, files=True))()
        assert st.role == "standby" and st.receiver_status == "streaming" and st.hold == "standby.signal", st
        c = check_standby(standby, st)
        assert c.state == "ok", c
    finally:
        marker.unlink(missing_ok=True)
