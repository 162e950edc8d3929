"""The monitor as a service (``eagle-dr monitor``) and the workers' Prometheus endpoints, on the lab.

Each test leaves the configured primary primary, every worker running, and no monitor.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from temporalio.client import WorkflowExecutionStatus

from eagle_dr.monitor import MonitorView, monitor_id
from lab.processes import children, kill_tree, read_pid
from tests.histories import record
from activities.postgres.status import pg_status
from tests.lab_helpers import (_async, _aux_pid, _awaiting, _exec, _left_as_found, _names, _primary, _scrape,
                               _until, _value)
from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow
from workflows.runbook import move_id


def _cli(config, *args, ok=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), *args], capture_output=True,
                       text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


async def _state(handle) -> MonitorState | None:
    try:
        return await handle.query(MonitorWorkflow.monitor_state)
    except Exception:  # noqa: BLE001 - not started yet, or its worker is down
        return None


async def _moves_since(client, lab, since: float) -> bool:
    try:
        desc = await client.get_workflow_handle(move_id(lab.cfg.service)).describe()
    except Exception:  # noqa: BLE001 - never started
        return False
    return desc.start_time.timestamp() >= since


async def test_cli_start_is_idempotent_pause_holds_a_failover_and_survives_a_worker_restart(
        lab, lab_config_path, client, tmp_path):
    """Automatic failover on, paused: the primary stops answering for more rounds than the
    threshold and no runbook starts; the control worker is killed -9 and restarted and the
    same monitor goes on, still paused; resume and stop through the CLI."""
    a, b = _names(lab)
    assert _primary(lab) == a
    doc = yaml.safe_load(lab_config_path.read_text())
    doc["health"].update({"interval": "1s", "failure_threshold": 2, "auto_failover": True})
    config = tmp_path / "eagle-dr.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    wid = monitor_id(lab.cfg.service)
    handle = client.get_workflow_handle_for(MonitorWorkflow.run, wid)

    r = _cli(config, "monitor", "status", ok=False)
    assert r.returncode == 1 and "NOT RUNNING" in r.stdout, r.stdout
    assert f"monitor started: {wid}" in _cli(config, "monitor", "start").stdout
    assert f"monitor already running: {wid}" in _cli(config, "monitor", "start").stdout
    postmaster = lab.postgres(a).pid
    async with _left_as_found(handle, postmaster):
        async def healthy():
            st = await _state(handle)
            return st if st and st.rounds >= 1 and set(st.votes.values()) == {"up"} else None

        first = await _until(healthy, 60, "a round in which every vantage point sees the primary up")
        assert first.auto_failover and first.status == "running" and first.running_since
        assert set(first.probes) == {"control", a, b} and first.probes["control"][b].verdict == "standby"
        assert "monitor: PAUSED" in _cli(config, "monitor", "pause", "--reason", "maintenance").stdout

        t0 = time.time()
        os.kill(postmaster, signal.SIGSTOP)  # no query gets an answer: down from every vantage point
        try:
            async def held():
                st = await _state(handle)
                return st if st and any(f"**{a} is DOWN**" in f and "paused" in f for f in st.findings) else None

            seen = await _until(held, 60, "the paused monitor to see the primary down and hold back")
            more = await _until(lambda: _rounds_after(handle, seen.rounds + 2), 30, "more rounds while down")
            assert more.failures >= more.failure_threshold and more.failovers_started == 0, more
            assert not await _moves_since(client, lab, t0)
        finally:
            os.kill(postmaster, signal.SIGCONT)

        # kill -9 of the control worker (it runs the monitor): the workflow survives on the server.
        assert kill_tree(read_pid(lab.worker_pidfile(None)))
        # Its state unreadable meanwhile: "unknown", never "running" (it is paused, and
        # `monitor resume` took "running" as its confirmation).
        st = json.loads(_cli(config, "monitor", "status", "--json", ok=False).stdout)
        assert st["status"] == "unknown" and st["running"] and "cannot be read now" in st["error"], st
        lab.start_worker(None)
        after = await _until(lambda: _rounds_after(handle, more.rounds), 90, "rounds after the worker restart")
        assert after.status == "paused" and after.pause_reason == "maintenance", after
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

        st = json.loads(_cli(config, "monitor", "status", "--json").stdout)
        assert st["status"] == "paused" and st["state"]["probes"]["control"][a]["verdict"] in ("up", "down")
        line = _cli(config, "status").stdout
        assert "monitor: PAUSED" in line, line
        assert "monitor resumed: monitor: running" in _cli(config, "monitor", "resume").stdout
        assert "monitor stopped" in _cli(config, "monitor", "stop", "--reason", "test over").stdout
        result = await handle.result()
        assert result.stopped == "test over" and result.failover is None
        assert "NOT RUNNING" in _cli(config, "monitor", "status", ok=False).stdout
    assert _primary(lab) == a


async def _lag_measured(handle) -> MonitorState | None:
    """Rounds that saw the primary up and measured the standby's lag: without one, the monitor
    refuses any automatic failover (the loss would be unknown)."""
    st = await _state(handle)
    return st if st and st.rounds >= 2 and st.target_lag_bytes is not None else None


async def _rounds_after(handle, rounds: int) -> MonitorState | None:
    st = await _state(handle)
    return st if st and st.rounds > rounds else None


async def test_pause_and_cooldown_survive_continue_as_new(lab, client):
    """A short run length makes the monitor continue as new every two rounds: the pause, its
    reason and the start time carry over, and stop ends the chain cleanly."""
    last = datetime.now(timezone.utc).replace(microsecond=0)
    inp = MonitorInput(service=lab.cfg.service, interval_seconds=0.5, failure_threshold=2, iterations_per_run=2,
                       auto_failover=True, last_auto_move_at=last, auto_failover_cooldown_seconds=600)
    handle = await client.start_workflow(MonitorWorkflow.run, inp, id=f"monitor-can-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    first_run = handle.result_run_id
    try:
        await handle.signal(MonitorWorkflow.pause, "carried")
        async def serving():
            st = await _state(handle)
            return st if st and st.running_since else None

        since = (await _until(serving, 30, "the monitor's state")).running_since

        async def next_run_paused():
            desc = await client.get_workflow_handle(handle.id).describe()
            if desc.run_id == first_run:
                return None
            st = await _state(client.get_workflow_handle(handle.id))
            return st if st and st.status == "paused" and st.rounds >= 1 else None

        st = await _until(next_run_paused, 60, "a continued run, still paused")
        assert st.pause_reason == "carried" and st.running_since == since and st.paused_since is not None
        assert st.cooldown_until == last + timedelta(seconds=600)
        latest = client.get_workflow_handle_for(MonitorWorkflow.run, handle.id)
        await latest.signal(MonitorWorkflow.stop, "done")
        assert (await latest.result()).stopped == "done"
        await record(latest, "monitor-service-continue-as-new")
    finally:
        try:
            await client.get_workflow_handle(handle.id).terminate("test over")
        except Exception:  # noqa: BLE001 - already ended
            pass


async def test_rounds_counted_while_paused_are_not_spent_at_resume(lab, client):
    """Paused for a planned restart, the primary silent for more rounds than the threshold:
    on resume the monitor failed over at its first round, counting the paused ones. It now
    counts afresh: the first round after resume is the first of a new run of failures."""
    a, _ = _names(lab)
    assert _primary(lab) == a
    inp = MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=4, auto_failover=True)
    handle = await client.start_workflow(MonitorWorkflow.run, inp, id=f"monitor-resume-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    postmaster = lab.postgres(a).pid
    t0 = time.time()
    async with _left_as_found(handle, postmaster):
        await _until(lambda: _lag_measured(handle), 60, "rounds that measure the standby's lag")
        await handle.signal(MonitorWorkflow.pause, "planned restart")
        os.kill(postmaster, signal.SIGSTOP)  # no query gets an answer: down from every vantage point
        try:
            async def counted():
                st = await _state(handle)
                return st if st and st.status == "paused" and st.failures > inp.failure_threshold else None

            paused = await _until(counted, 60, "the paused monitor to count past the threshold")
            await _until(lambda: _outcome_is(handle, "primary-down"), 30, "DrOutcome primary-down")
            await handle.signal(MonitorWorkflow.resume)

            async def resumed_round():
                st = await _state(handle)
                return st if st and st.status == "running" and (st.failures < paused.failures
                                                                 or st.failovers_started) else None

            after = await _until(resumed_round, 30, "a round after resume")
        finally:
            os.kill(postmaster, signal.SIGCONT)
        assert after.failovers_started == 0 and after.failures < inp.failure_threshold, after
        assert not await _moves_since(client, lab, t0)

        async def answers():
            st = await _state(handle)
            return st if st and st.failures == 0 and st.rounds > after.rounds else None

        await _until(answers, 60, "the primary to answer again")
        # Set for alerting, cleared when it is over: it stood for good (continue-as-new carries it).
        await _until(lambda: _outcome_is(handle, None), 30, "DrOutcome cleared once the primary answers")
        await handle.signal(MonitorWorkflow.stop, "test over")
        assert (await handle.result()).failover is None
        await record(handle, "monitor-resume-counts-afresh")
        await record(handle, "monitor-outcome-cleared")
    assert _primary(lab) == a


async def _outcome_is(handle, value: str | None) -> bool:
    from eagle_dr.temporal import DR_OUTCOME

    return (await handle.describe()).typed_search_attributes.get(DR_OUTCOME) == value


@contextlib.asynccontextmanager
async def _automatic_failover_at_its_gate(lab, client, name: str):
    """A monitor with automatic failover and approval required; the primary frozen; yields
    (primary, monitor, its failover waiting at the approval gate, the primary's postmaster).
    Afterwards the primary is continued and the monitor ended (_left_as_found)."""
    from workflows.failover import FailoverWorkflow

    a, _ = _names(lab)
    assert _primary(lab) == a
    inp = MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2, auto_failover=True,
                       require_approval=True)
    handle = await client.start_workflow(MonitorWorkflow.run, inp, id=f"monitor-{name}-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    postmaster = lab.postgres(a).pid
    async with _left_as_found(handle, postmaster):
        await _until(lambda: _lag_measured(handle), 60, "rounds that measure the standby's lag")
        os.kill(postmaster, signal.SIGSTOP)  # continued by _left_as_found
        move = client.get_workflow_handle_for(FailoverWorkflow.run, move_id(lab.cfg.service))
        await _until(lambda: _awaiting(move), 60, "the automatic failover's approval gate")
        yield a, handle, move, postmaster


async def test_a_move_the_monitor_started_outlives_the_monitor(lab, client):
    """An operator terminates (or resets) the monitor while its automatic failover waits for
    approval. With the default parent-close policy the failover was terminated with it: past
    its point of no return, a move stopped half-way (old primary fenced, target promoted,
    nothing routed). It runs on, and ends by its own approval: rejected here, undone."""
    from temporalio.client import WorkflowFailureError

    from workflows.failover import FailoverWorkflow
    from workflows.models import ApprovalDecision

    async with _automatic_failover_at_its_gate(lab, client, "abandon") as (a, handle, move, _):
        await handle.terminate("an operator's reset")
        assert (await move.describe()).status == WorkflowExecutionStatus.RUNNING
        await move.execute_update(FailoverWorkflow.approve, ApprovalDecision(
            approver="bob", decision="reject", comment="the primary is only frozen"))
        with pytest.raises(WorkflowFailureError) as e:
            await move.result()
        assert "approval rejected by bob" in e.value.cause.message
    assert _primary(lab) == a


async def test_an_approved_automatic_failover_is_not_carried_out_once_the_primary_is_back(lab, client):
    """The monitor's automatic failover waits for a human. By the time the approval comes the
    primary answers again (it was only frozen): failing over now would fence a primary that
    takes writes and lose what the standby has not. The failover ends before its fences, saying
    why, and the primary is left writable."""
    from temporalio.client import WorkflowFailureError

    from workflows.failover import FailoverWorkflow
    from workflows.models import ApprovalDecision

    async with _automatic_failover_at_its_gate(lab, client, "back") as (a, _, move, postmaster):
        os.kill(postmaster, signal.SIGCONT)
        await _until(_async(lambda: pg_status(lab.cfg.region(a).postgres).role == "primary"), 30,
                     "the primary to answer again")
        await move.execute_update(FailoverWorkflow.approve, ApprovalDecision(approver="bob", decision="approve"))
        with pytest.raises(WorkflowFailureError) as e:
            await move.result()
        assert e.value.cause.type == "SourceRecovered" and f"{a} answers again" in e.value.cause.message, e.value
        await record(move, "failover-source-back-after-approval")
    assert _primary(lab) == a
    st = pg_status(lab.cfg.region(a).postgres)
    assert st.role == "primary" and not st.read_only, st  # never fenced
    lab.wait_replication()


async def test_workers_serve_sdk_and_dr_metrics_that_follow_the_lab(lab, client):
    a = _primary(lab)  # wherever the primary is now; b: its standby
    b = lab.cfg.other(a).name
    control_port = lab.cfg.temporal.metrics_port
    region_port = lab.cfg.region(a).temporal.metrics_port
    assert control_port and region_port
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=100),
        id=f"monitor-metrics-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    standby = lab.postgres(b).pid
    try:
        async def seen(port, value, region, vantage):
            async def pred():
                try:
                    text = _scrape(port)
                except OSError:
                    return None
                return text if _value(text, "eagle_dr_region_available", region=region, vantage=vantage) == value \
                    else None
            return pred

        text = await _until(await seen(control_port, 1, b, "control"), 60, f"control's metric: {b} available")
        # The SDK's own metrics on the same endpoint, and the DR metrics beside them.
        assert re.search(r"^temporal_\w+", text, re.M), text[:2000]
        assert _value(text, "eagle_dr_probe_latency_seconds", region=a, vantage="control") is not None
        assert _value(text, "eagle_dr_replication_lag_bytes", region=b, vantage="control") is not None
        assert _value(text, "eagle_dr_redis_offset_lag_bytes", region=b, vantage="control") is not None
        # The primary is no standby: its own lag series is unknown, never a figure left from when
        # it was one (the lab moves the primary from test to test; these workers outlive that).
        for name in ("replication_lag_bytes", "replication_lag_seconds", "redis_offset_lag_bytes"):
            assert _nan(_value(text, f"eagle_dr_{name}", region=a, vantage="control")), name

        async def not_paused():
            # One gauge per service: a paused monitor of an earlier test wrote 1 until this one's round.
            return _value(_scrape(control_port), "eagle_dr_monitor_paused", service=lab.cfg.service) == 0

        await _until(not_paused, 30, "the monitor's paused gauge at 0")
        # Every regional worker is a vantage point with its own endpoint.
        await _until(await seen(region_port, 1, b, a), 60, f"{a}'s worker's metric: {b} available")

        os.kill(standby, signal.SIGSTOP)  # the standby stops answering: 0 from every vantage point
        try:
            await _until(await seen(control_port, 0, b, "control"), 60, f"control's metric: {b} unavailable")
            await _until(await seen(region_port, 0, b, a), 60, f"{a}'s worker's metric: {b} unavailable")
        finally:
            os.kill(standby, signal.SIGCONT)
        await _until(await seen(control_port, 1, b, "control"), 60, f"control's metric: {b} available again")
    finally:
        os.kill(standby, signal.SIGCONT)
        await handle.terminate("test over")
    lab.wait_replication()


async def test_a_resume_or_release_signalled_before_a_runs_first_task_stands(lab, client):
    """Signals are handled before a run's first task: a resume or a release that reached a run
    just continued as new (the control worker restarting in between, say) found nothing paused
    or held yet, and the pause or hold the run carried came back after it. The monitor stayed
    paused while saying "resumed", or held automatic moves for up to an hour more. Signal-with-
    start delivers a signal exactly there."""
    from workflows.models import MonitorHold

    until = datetime.now(timezone.utc) + timedelta(hours=1)
    carried = MonitorInput(service=lab.cfg.service, interval_seconds=60, paused=True, pause_reason="maintenance",
                           holds=[MonitorHold(holder="drill-early", until=until, reason="a drill")])
    handles = []
    try:
        for signal_name, args in (("resume", []), ("release", ["drill-early"])):
            handles.append(await client.start_workflow(
                MonitorWorkflow.run, carried, id=f"monitor-early-{signal_name}-{uuid.uuid4()}",
                task_queue=lab.cfg.temporal.control_task_queue, start_signal=signal_name, start_signal_args=args))

        async def loaded(handle):
            st = await handle.query(MonitorWorkflow.monitor_state)
            return st if st.service else None

        resumed = await _until(lambda: loaded(handles[0]), 30, "the resumed monitor to load its input")
        assert resumed.status == "running" and resumed.paused_since is None, resumed
        assert [h.holder for h in resumed.holds] == ["drill-early"]  # a resume releases nothing
        released = await _until(lambda: loaded(handles[1]), 30, "the released monitor to load its input")
        assert released.holds == [] and released.status == "paused", released
        assert any(f.endswith("released by drill-early") for f in released.findings), released.findings
        await record(handles[0], "monitor-early-resume")
        await record(handles[1], "monitor-early-release")
    finally:
        for h in handles:
            await h.terminate("test over")


async def test_a_probe_that_fails_is_no_worker_down_and_no_failed_round(lab, client):
    """A vantage point whose probe runs and fails (here every region's password file gone, as
    a Secret mount mid-rotation) has no vote. It was reported "worker down", which sent the
    reader to a worker that is up. It is said as its probe's failure now, and no round counts
    as failed: no verdict is no outage."""
    from pathlib import Path

    a = _primary(lab)
    path = Path(lab.cfg.region(a).postgres.password.file)
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2),
        id=f"monitor-probe-fails-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    away = path.with_name(path.name + f".away-{uuid.uuid4().hex[:6]}")
    try:
        await _until(lambda: _rounds_after(handle, 0), 60, "a first round")
        os.rename(path, away)  # back within seconds: the workers' self-fence waits 20 s
        try:
            async def said():
                st = await _state(handle)
                return st if st and any("no vote from control: its probe failed" in f
                                        and "password cannot be read here" in f for f in st.findings) else None

            st = await _until(said, 30, "the monitor to say the control vantage point's probe failed")
        finally:
            os.rename(away, path)
        assert not any("worker down: control" in f for f in st.findings), st.findings
        assert st.failures == 0 and not any("is DOWN" in f for f in st.findings), st
    finally:
        await handle.terminate("test over")


def test_a_metric_the_sdk_rejects_never_fails_what_it_measures():
    """Temporal's gauges refuse negative values by raising: inside a runbook that failed its
    workflow task over and over. Such values are dropped and the rest is still exported."""
    from eagle_dr import metrics
    from workflows.models import Rpo, Rto

    port = 29000 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) % 1000
    runtime = metrics.worker_runtime(f"127.0.0.1:{port}")  # kept: its exporter lives as long as it does
    meter = runtime.metric_meter
    metrics.redis_offset_lag(meter, "svc", "control", "r1", -3)
    metrics.move_measured(meter, "svc", "failover", Rto(detected_at=datetime.now(timezone.utc), total_s=3.5,
                                                        target_s=300, met=True), Rpo(redis_offset_gap=-5))
    text = _scrape(port)
    assert _value(text, "eagle_dr_last_rto_seconds", runbook="failover") == 3.5
    assert _value(text, "eagle_dr_last_rto_met", runbook="failover") == 1
    assert _value(text, "eagle_dr_last_rpo_unknown", runbook="failover") == 1  # unknown is said, never "met"
    assert _nan(_value(text, "eagle_dr_last_rpo_met", runbook="failover"))
    assert _value(text, "eagle_dr_redis_offset_lag_bytes", region="r1") is None
    # A move whose routing failed: its steps' time is no RTO (workflows/failover.py finish_measurement).
    metrics.move_measured(meter, "svc", "switchover", Rto(detected_at=datetime.now(timezone.utc), total_s=2.0,
                                                          target_s=300, serving_basis="routing failed"), Rpo())
    text = _scrape(port)
    assert _nan(_value(text, "eagle_dr_last_rto_seconds", runbook="switchover"))
    assert _value(text, "eagle_dr_last_rto_unknown", runbook="switchover") == 1
    # The next failover's RTO unknown: the first one's 3.5 s and "met" are no longer shown as
    # the last move's (a gauge keeps its last value; they were left out, so they stayed).
    metrics.move_measured(meter, "svc", "failover", Rto(detected_at=datetime.now(timezone.utc), total_s=None,
                                                        target_s=300, met=None), Rpo())
    text = _scrape(port)
    assert _nan(_value(text, "eagle_dr_last_rto_seconds", runbook="failover"))
    assert _nan(_value(text, "eagle_dr_last_rto_met", runbook="failover"))
    assert _value(text, "eagle_dr_last_rto_unknown", runbook="failover") == 1
    # A standby's lag measured, then not (it went away): unknown, not the last figure.
    metrics.replication_lag(meter, "svc", "control", "r2", lag_bytes=0, lag_seconds=0.0)
    metrics.redis_offset_lag(meter, "svc", "control", "r2", 0)
    assert _value(_scrape(port), "eagle_dr_replication_lag_bytes", region="r2") == 0
    metrics.replication_lag(meter, "svc", "control", "r2", lag_bytes=None, lag_seconds=None)
    metrics.redis_offset_lag(meter, "svc", "control", "r2", None)
    text = _scrape(port)
    for name in ("replication_lag_bytes", "replication_lag_seconds", "redis_offset_lag_bytes"):
        assert _nan(_value(text, f"eagle_dr_{name}", region="r2")), name


def test_a_full_probe_round_says_unknown_lag_and_a_partial_look_leaves_it(lab):
    """A vantage point's round over every region sets every region's lag: the primary's own
    series is unknown (NaN), never a figure left from when it was a standby. A look at no region
    (what eagle-dr status's liveness check asks every worker for) leaves the figures alone."""
    from temporalio.testing import ActivityEnvironment

    from activities.health import HealthActivities, ProbeRequest
    from eagle_dr import metrics

    a = _primary(lab)
    b = lab.cfg.other(a).name
    port = 29100 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) % 1000
    runtime = metrics.worker_runtime(f"127.0.0.1:{port}")  # kept: its exporter lives as long as it does
    env = ActivityEnvironment()
    env.metric_meter = runtime.metric_meter
    probe = HealthActivities(lab.cfg).probe_regions_from_here
    lab.wait_replication()
    env.run(probe, ProbeRequest(regions=[r.name for r in lab.cfg.regions]))
    text = _scrape(port)
    # The activity's own series (the SDK labels them with its task queue).
    for name in ("replication_lag_bytes", "replication_lag_seconds", "redis_offset_lag_bytes"):
        assert _nan(_value(text, f"eagle_dr_{name}", region=a, vantage="control", task_queue="test")), name
        v = _value(text, f"eagle_dr_{name}", region=b, vantage="control", task_queue="test")
        assert v is not None and not math.isnan(v), (name, v)  # its standby, measured
    env.run(probe, ProbeRequest())  # the liveness check's look: no region
    after = _scrape(port)
    for name in ("replication_lag_bytes", "replication_lag_seconds", "redis_offset_lag_bytes"):
        assert _value(after, f"eagle_dr_{name}", region=b, vantage="control", task_queue="test") == \
            _value(text, f"eagle_dr_{name}", region=b, vantage="control", task_queue="test"), name


def test_a_slow_or_lost_secret_store_is_no_region_down(lab, monkeypatch):
    """Production passwords come from a store over the network (Kubernetes, Vault). Each probe
    read them inside its bounded probe: a store slower than the bound made every region look
    down from every vantage point at once, an outage the monitor counts and fails over on.
    Now a secret once read serves the probes (read again once a minute, the last value kept
    when the store does not answer), and a secret never read fails the vantage point's probe
    as no verdict, never as a region down."""
    import base64
    import socket as socket_module

    from kubernetes import client as k8s_client
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.health import HealthActivities, ProbeRequest
    from eagle_dr import config as config_module
    from eagle_dr.config import SecretRef, forget_network_secrets
    from tests.kmock_cluster import kmock_cluster

    a = _primary(lab)
    password = lab.cfg.region(a).postgres.password.resolve()

    def with_password(ref: SecretRef):
        regions = [r.model_copy(update={"postgres": r.postgres.model_copy(update={"password": ref})})
                   if r.name == a else r for r in lab.cfg.regions]
        return lab.cfg.model_copy(update={"regions": regions})

    def probe(cfg):
        report = ActivityEnvironment().run(HealthActivities(cfg).probe_regions_from_here,
                                           ProbeRequest(regions=[a], timeout_seconds=2))
        return report.of(a)

    forget_network_secrets()
    with kmock_cluster(controller=False) as k8s:
        k8s.core.create_namespaced_secret(k8s.namespace, k8s_client.V1Secret(
            metadata=k8s_client.V1ObjectMeta(name="pg"), data={"password": base64.b64encode(password.encode()).decode()}))
        cfg = with_password(SecretRef(k8s=f"{k8s.namespace}/pg/password", api_url=k8s.api_url))
        assert probe(cfg).postgres_up
    # The store gone, and every use reading it again: the value last read still serves.
    monkeypatch.setattr(config_module, "NETWORK_SECRET_TTL_S", 0.0)
    assert probe(cfg).postgres_up
    # A store that accepts and never answers, for a secret never read: no verdict (an error),
    # not a region down by timeout.
    with socket_module.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        slow = with_password(SecretRef(k8s="eagle-alert/pg/password",
                                       api_url=f"http://127.0.0.1:{silent.getsockname()[1]}"))
        with pytest.raises(ApplicationError) as e:
            probe(slow)
    assert e.value.type == "SecretUnavailable" and f"{a}'s postgres password cannot be read here" in str(e.value), \
        e.value
    assert password not in str(e.value)
    forget_network_secrets()


def test_a_password_rotated_in_the_store_is_read_again_when_the_login_is_refused(lab):
    """A password held from a secret store (read at most once a minute) and rotated meanwhile,
    in the store and on the server: the login with the held value is refused, and the probe
    called the server down for up to a minute, every vantage point at once (an outage the
    monitor counts). A refused login now reads the store again and tries once more."""
    import base64
    import secrets as secrets_module

    import psycopg
    from kubernetes import client as k8s_client

    from eagle_dr.config import SecretRef, forget_network_secrets
    from tests.kmock_cluster import kmock_cluster

    a = _primary(lab)
    role = f"rotation_{uuid.uuid4().hex[:8]}"
    old, new = secrets_module.token_hex(12), secrets_module.token_hex(12)
    admin = lab.cfg.region(a).postgres.dsn()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"create role {role} login password '{old}'")
    forget_network_secrets()
    try:
        with kmock_cluster(controller=False) as k8s:
            def put(value: str) -> None:
                body = k8s_client.V1Secret(metadata=k8s_client.V1ObjectMeta(name="rot"),
                                           data={"password": base64.b64encode(value.encode()).decode()})
                k8s.core.create_namespaced_secret(k8s.namespace, body)

            put(old)
            pg = lab.cfg.region(a).postgres.model_copy(update={
                "user": role, "password": SecretRef(k8s=f"{k8s.namespace}/rot/password", api_url=k8s.api_url)})
            assert pg_status(pg).reachable  # the old password read and held
            with psycopg.connect(admin, autocommit=True) as conn:  # the rotation: server and store
                conn.execute(f"alter role {role} password '{new}'")
            k8s.core.delete_namespaced_secret("rot", k8s.namespace)
            put(new)
            st = pg_status(pg)
            assert st.reachable and st.role == "primary", st
    finally:
        forget_network_secrets()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"drop role if exists {role}")


def _nan(v: float | None) -> bool:
    """Exported, as unknown (NaN); None would mean not exported at all."""
    return v is not None and math.isnan(v)


async def test_a_failed_automatic_attempt_keeps_its_cooldown_across_continue_as_new(lab, client):
    """An automatic failover attempt that does not happen (here another workflow holds the
    move's id) starts the cooldown as a move would: "a human decides". The next run of the
    monitor (continue-as-new every three rounds) used to start without it and try again at once."""
    a = _primary(lab)
    holder = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=60, paused=True),
        id=move_id(lab.cfg.service), task_queue=lab.cfg.temporal.control_task_queue)
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=0.5, failure_threshold=2,
                                          iterations_per_run=3, auto_failover=True,
                                          auto_failover_cooldown_seconds=600, watch_split_brain=False),
        id=f"monitor-cooldown-can-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    first_run = handle.result_run_id
    pid = lab.postgres(a).pid
    try:
        async def healthy():
            st = await _state(handle)
            return st if st and st.rounds >= 1 and st.votes.get("control") == "up" else None

        await _until(healthy, 60, "a healthy round")
        os.kill(pid, signal.SIGSTOP)
        try:
            async def decided(seen=frozenset()):
                # The latest run: the attempt may be made in one run and the next started at once.
                # A run starts with the findings of the one before it; only new ones are its own.
                h = client.get_workflow_handle(handle.id)
                st = await _state(h)
                if st is None:
                    return None
                own = [f for f in st.findings if f not in seen]
                if any("within the cooldown" in f for f in own):
                    return "cooldown", own, (await h.describe()).run_id, st
                if any("a move already holds" in f for f in own):
                    return "attempt", own, (await h.describe()).run_id, st
                return None

            what, own, run, st = await _until(decided, 120, "an automatic attempt that cannot start")
            if what == "attempt":
                assert st.cooldown_until is not None, st

                async def next_run_decided():
                    got = await decided(frozenset(own))
                    return got if got is not None and got[2] != run else None

                what, own, run, st = await _until(next_run_decided, 120, "the monitor's next run to decide")
            # A later run: the input carried no cooldown, so only the failed attempt can have set it.
            assert run != first_run and what == "cooldown", (what, own)
            assert not any("a move already holds" in f for f in own), own
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        for h in (client.get_workflow_handle(handle.id), holder):
            try:
                await h.terminate("test over")
            except Exception:  # noqa: BLE001 - already ended
                pass
    assert _primary(lab) == a
    lab.wait_replication()


async def test_no_automatic_failover_within_the_cooldown_or_to_a_dead_target(lab, client):
    """Automatic failover on, the primary down for more rounds than the threshold: within the
    cooldown of the last automatic attempt, and (without a cooldown) with the standby down
    too, the monitor refuses, says why once, and keeps watching."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    primary, standby = lab.postgres(a).pid, lab.postgres(b).pid

    async def refused(stop: list[int], recent: bool, why: str):
        t0 = time.time()
        inp = MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2, auto_failover=True,
                           last_auto_move_at=datetime.now(timezone.utc) if recent else None,
                           auto_failover_cooldown_seconds=600)
        handle = await client.start_workflow(MonitorWorkflow.run, inp, id=f"monitor-refuse-{uuid.uuid4()}",
                                             task_queue=lab.cfg.temporal.control_task_queue)
        try:
            async def healthy():
                st = await _state(handle)
                return st if st and st.rounds >= 1 and st.votes.get("control") == "up" else None

            await _until(healthy, 60, "a healthy round")
            for pid in stop:
                os.kill(pid, signal.SIGSTOP)
            try:
                async def said():
                    st = await _state(handle)
                    return st if st and any(f"**{a} is DOWN**" in f and why in f for f in st.findings) else None

                seen = await _until(said, 60, f"the monitor to refuse: {why}")
                later = await _until(lambda: _rounds_after(handle, seen.rounds + 2), 30, "more rounds")
                assert later.failovers_started == 0 and not await _moves_since(client, lab, t0), later
                assert sum(why in f for f in later.findings) == 1, later.findings  # once per outage
            finally:
                for pid in stop:
                    os.kill(pid, signal.SIGCONT)
            assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        finally:
            await handle.terminate("test over")

    await refused([primary], recent=True, why="within the cooldown")
    await refused([primary, standby], recent=False, why=f"the target {b} is not a live standby")
    assert _primary(lab) == a
    lab.wait_replication()


async def test_no_automatic_failover_to_a_standby_seen_behind_or_never_measured(lab, client):
    """The primary down past the threshold, automatic failover on, the standby live: with the
    primary gone the failover's own lag guard cannot read the lag (unknown is let through), so
    the monitor judges on what it measured while the primary answered. A standby it saw past
    the guard, or never measured at all, is refused: promoting it could drop writes unasked."""
    a = _primary(lab)
    b = lab.cfg.other(a).name
    primary = lab.postgres(a).pid
    guard = 64 * 1024

    async def refused(handle, why: str, t0: float) -> MonitorState:
        async def said():
            st = await _state(handle)
            return st if st and any(f"**{a} is DOWN**" in f and why in f for f in st.findings) else None

        seen = await _until(said, 60, f"the monitor to refuse: {why}")
        later = await _until(lambda: _rounds_after(handle, seen.rounds + 2), 30, "more rounds")
        assert later.failovers_started == 0 and not await _moves_since(client, lab, t0), later.findings
        return later

    # 1. Seen behind: the standby's WAL receiver frozen while the primary writes 300 kB.
    t0 = time.time()
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2,
                                          auto_failover=True, max_lag_bytes=guard, watch_split_brain=False),
        id=f"monitor-behind-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    receiver = _aux_pid(lab, b, b"walreceiver")
    try:
        async def measured():
            st = await _state(handle)
            return st if st and st.votes.get("control") == "up" and st.target_lag_bytes is not None else None

        caught_up = await _until(measured, 60, "a round that measures the standby's lag")
        assert caught_up.target_lag_bytes <= guard, caught_up
        view = MonitorView(workflow_id=handle.id, running=True, status="running", state=caught_up)
        assert f"standby {caught_up.target_lag_bytes} bytes behind at" in view.line(), view.line()
        os.kill(receiver, signal.SIGSTOP)
        try:
            _exec(lab, a, "create table eagle_dr_test_lag (x text)",
                  "insert into eagle_dr_test_lag select repeat('x', 1000) from generate_series(1, 300)")

            async def behind():
                st = await _state(handle)
                return st if st and (st.target_lag_bytes or 0) > guard else None

            seen = await _until(behind, 30, "the monitor to measure the standby behind the guard")
            os.kill(primary, signal.SIGSTOP)
            try:
                later = await refused(handle, "bytes behind", t0)
                # The measurement before the outage stands: rounds with the primary down keep it.
                assert later.target_lag_bytes >= seen.target_lag_bytes and later.target_lag_at is not None
            finally:
                os.kill(primary, signal.SIGCONT)
        finally:
            os.kill(receiver, signal.SIGCONT)
    finally:
        await handle.terminate("test over")
        _exec(lab, a, "drop table if exists eagle_dr_test_lag")
    await record(handle, "monitor-refuses-a-standby-behind")

    # 2. Never measured: a monitor started while the primary is already down.
    t0 = time.time()
    os.kill(primary, signal.SIGSTOP)
    try:
        handle = await client.start_workflow(
            MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2,
                                              auto_failover=True, primary_region=a, watch_split_brain=False),
            id=f"monitor-unmeasured-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
        try:
            later = await refused(handle, "never measured", t0)
            assert later.target_lag_bytes is None
            view = MonitorView(workflow_id=handle.id, running=True, status="running", state=later)
            assert "standby lag NOT MEASURED" in view.line(), view.line()
        finally:
            await handle.terminate("test over")
    finally:
        os.kill(primary, signal.SIGCONT)
    assert _primary(lab) == a
    lab.wait_replication()


async def test_a_stall_is_ridden_out_while_refused_connections_would_be_confirmed_fast(lab, client):
    """The primary's PostgreSQL and Redis frozen (SIGSTOP): their listen sockets still accept, so
    the probes time out. That is no evidence of death: the fast confirmation (0.2 s x 3 rounds)
    must not fire, only the threshold could, and the stall ends first. No failover."""
    a = _primary(lab)  # whichever region the session's earlier tests left primary
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=100,
                                          confirm_interval_seconds=0.2, confirm_rounds=3, auto_failover=True,
                                          stop_after_failover=True, watch_split_brain=False),
        id=f"monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
    frozen = [lab.postgres(a).pid, lab.redis(a).pid]
    frozen += [c for pid in frozen[:1] for c in children(pid)]
    t0 = time.time()
    try:
        async def healthy():
            st = await _state(handle)
            return st if st and st.rounds >= 1 and st.votes.get("control") == "up" else None

        await _until(healthy, 60, "a round that sees the primary up")
        for pid in frozen:
            _signal(pid, signal.SIGSTOP)

        async def timing_out():
            st = await _state(handle)
            # A round the control worker's probe took part in (under load a round can close on
            # the other vantage points' votes while its probe still waits out its timeout).
            return st if st and st.failures >= 1 and a in st.probes.get("control", {}) else None

        stalled = await _until(timing_out, 30, "a round whose probes of the frozen primary time out")
    finally:
        for pid in frozen:
            _signal(pid, signal.SIGCONT)
    seen = stalled.probes["control"][a]
    assert seen.verdict == "down" and seen.refused is False, seen

    async def answering():
        st = await _state(handle)
        return st if st and st.rounds > stalled.rounds and st.failures == 0 else None

    after = await _until(answering, 60, "the monitor to see the primary answer again")
    assert after.failovers_started == 0 and not any("is DOWN" in f for f in after.findings), after.findings
    assert not await _moves_since(client, lab, t0)
    await handle.terminate("test over")
    assert _primary(lab) == a


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # a backend that ended between the listing and the signal: nothing to freeze


def test_a_lag_measured_long_before_the_outage_is_no_ground_for_an_automatic_failover():
    """The age limit of the measurement the monitor judges on: a few rounds (at least 60 s).
    Older, the standby had stopped being measured (unreachable, or not streaming) before the
    primary went down, and what was written since is unknown."""
    wf = MonitorWorkflow()
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    wf.state.target_lag_bytes, wf.state.target_lag_at = 10, at
    inp = MonitorInput(interval_seconds=10, max_lag_bytes=1000)
    assert wf._lag_refusal(inp, "r1", "r2", at + timedelta(seconds=59)) is None
    why = wf._lag_refusal(inp, "r1", "r2", at + timedelta(seconds=61))
    assert "last measured 10 bytes behind r1" in why and "more than 60 s" in why, why
    # A slow monitor measures less often: three of its intervals.
    slow = MonitorInput(interval_seconds=100, max_lag_bytes=1000)
    assert wf._lag_refusal(slow, "r1", "r2", at + timedelta(seconds=290)) is None
    assert "more than 300 s" in wf._lag_refusal(slow, "r1", "r2", at + timedelta(seconds=301))
    # Past the guard it is refused however recent.
    assert "past max_lag_bytes 5" in wf._lag_refusal(MonitorInput(max_lag_bytes=5), "r1", "r2", at)


def test_the_lag_a_vantage_point_reports_is_what_the_standby_had_not_received(lab_cfg):
    """WAL received but not replayed is not lost (promotion replays it); without the standby's
    own answer the primary's view stands in: what it had sent (its replay position would count
    replay held back by queries as lost)."""
    from activities.health import HealthActivities
    from activities.postgres.status import PgStatus, ReplicaLink

    a, b = lab_cfg.regions[0].name, lab_cfg.regions[1].name
    slot = lab_cfg.region(b).postgres.slot_name
    link = ReplicaLink(application_name=b, state="streaming", sync_state="async", sent_lsn="0/2E00000",
                       replay_lsn="0/1000000", lag_bytes=0x2000000, replay_lag_seconds=1.0, slot_name=slot)
    primary = PgStatus(reachable=True, role="primary", lsn="0/3000000", replicas=[link])
    standby = PgStatus(reachable=True, role="standby", lsn="0/1000000", receive_lsn="0/2F00000")
    h = HealthActivities(lab_cfg)
    assert h._not_received(b, {a: primary, b: standby}) == 0x100000
    assert h._not_received(b, {a: primary, b: PgStatus(reachable=False)}) == 0x200000
    # A restarted receiver reports the start of its segment: what it replayed is further.
    restarted = PgStatus(reachable=True, role="standby", lsn="0/1000000", receive_lsn="0/800000")
    assert h._not_received(b, {a: primary, b: restarted}) == 0x2000000
    assert h._not_received(b, {a: PgStatus(reachable=False), b: standby}) is None  # no primary: unknown
    # Two writable primaries: no "behind" to speak of.
    assert h._not_received(b, {a: primary, b: primary}) is None
