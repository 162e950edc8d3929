"""``--plan``: every runbook's preflight runs for real, read-only, prints what it would do, and
changes nothing (PostgreSQL roles and fences, Redis roles and fences, routing, epochs, no move
started, no move lock taken). Real lab; the failback and split-brain plans after a real fork."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from activities.postgres.ctl import FENCE_MARKER
from activities.postgres.epoch import read_epoch
from activities.postgres.status import connect, pg_status
from activities.redis.status import fenced, redis_status
from activities.routing import LabRouter
from eagle_dr.launch import start_move
from tests.histories import record
from tests.test_traffic_activities import aws_env, clusters  # noqa: F401 - fixtures
from tests.lab_helpers import _async, _awaiting, _failback, _fork, _names, _primary, _until
from workflows.dry_run import PlanInput, PlanWorkflow
from workflows.models import ApprovalDecision, ApprovalPolicy, SwitchoverInput
from workflows.plan import Plan
from workflows.runbook import move_id
from workflows.split_brain import SplitBrainInput, SplitBrainWorkflow


def _pg_state(lab, region: str) -> dict:
    r = lab.cfg.region(region).postgres
    data = Path(r.data_dir)
    state = {"fence_marker": (data / FENCE_MARKER).exists(), "standby_signal": (data / "standby.signal").exists(),
             "auto_conf": (data / "postgresql.auto.conf").read_text()}
    try:
        with connect(r, 3) as conn:  # as eagle-dr connects: through a read-only fence
            state["in_recovery"], state["read_only"] = conn.execute(
                "select pg_is_in_recovery(), current_setting('default_transaction_read_only')").fetchone()
        state["epoch"] = read_epoch(r, lab.cfg.service).epoch
    except psycopg.OperationalError as e:
        state["down"] = str(e).splitlines()[0]
    return state


def _snapshot(lab) -> dict:
    """Everything a runbook would change, as it is now (LSNs left out: the app may write)."""
    out: dict = {"routing": LabRouter(lab.cfg.lab.state_dir).read()}
    for r in lab.cfg.regions:
        rd = redis_status(r.redis)
        out[r.name] = {"pg": _pg_state(lab, r.name), "redis": (rd.role, rd.master, fenced(r.redis))}
    return out


async def _no_move(client, service: str) -> None:
    """No runbook holds the move id: the plan neither started a move nor took its lock."""
    try:
        desc = await client.get_workflow_handle(move_id(service)).describe()
    except RPCError:
        return
    assert desc.status != WorkflowExecutionStatus.RUNNING, f"a move is running: {desc.workflow_type}"


async def _plan(lab, client, runbook: str, name: str | None = None, **inp) -> Plan:
    handle = await client.start_workflow(PlanWorkflow.run, PlanInput(runbook=runbook, input=inp),
                                         id=f"dr-plan-test-{uuid.uuid4().hex[:8]}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    plan = await handle.result()
    assert handle.id != move_id(lab.cfg.service)
    if name:
        await record(handle, name)
    return plan


def _cli(lab, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", lab.config_path, *args, "--plan"],
                          capture_output=True, text=True, env=env, timeout=120)


async def test_failover_switchover_restore_and_split_brain_plans_change_nothing(lab, client):
    a, b = _names(lab)
    assert _primary(lab) == a
    before = _snapshot(lab)

    p = await _plan(lab, client, "failover", "plan-failover", service=lab.cfg.service, target_region=b)
    assert p.blocked is None, p.blocked
    assert a in p.fence and "stop" in p.fence and b in p.promote
    assert p.lag_bytes is not None and p.max_lag_bytes == 16 * 1024 * 1024
    assert p.routing == [f"lab: {a} -> {b}"]
    r = _cli(lab, "failover", "--to", b)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"fence {a}" in r.stdout and f"promote {b}" in r.stdout and "accepts up to 16777216 bytes" in r.stdout

    # The runbook's own guard, refused in the plan as the runbook would refuse it.
    r = _cli(lab, "failover", "--to", a)
    assert r.returncode == 1 and "WOULD REFUSE" in r.stdout and "already the primary" in r.stdout, r.stdout

    p = await _plan(lab, client, "switchover", "plan-switchover", service=lab.cfg.service, target_region=b)
    assert p.blocked is None, p.blocked
    assert a in p.fence and "stopped cleanly" in p.fence and b in p.promote and p.max_lag_bytes == 64 * 1024 * 1024
    r = _cli(lab, "switchover", "--to", b)
    assert r.returncode == 0 and f"{a} becomes a standby of {b}" in r.stdout, r.stdout + r.stderr

    p = await _plan(lab, client, "split-brain", service=lab.cfg.service)
    assert p.blocked is None and p.fence is None and p.steps[0].action.startswith("nothing: no split brain")

    p = await _plan(lab, client, "restore", "plan-restore", mode="pitr")
    # The copy goes on the host of the region that is not the primary now (a file before may
    # have left the configured secondary primary), from its own bucket (or refused: no backup yet).
    assert p.target_region == f"scratch on {b}" and p.source_region in (a, b)
    assert p.blocked is None or "backup" in p.blocked.lower(), p.blocked
    r = _cli(lab, "restore", "pitr", "--latest")
    assert f"restore into a scratch instance on {b}" in r.stdout, r.stdout + r.stderr

    p = await _plan(lab, client, "restore", mode="verify")
    assert p.target_region == f"a copy on {b}, following {a}", p.target_region
    assert p.blocked is None or "backup" in p.blocked.lower(), p.blocked
    assert any("compare every table" in s.action for s in p.steps), p.steps
    p = await _plan(lab, client, "restore", mode="verify", target={"kind": "lsn", "lsn": "0/1"})
    assert p.blocked and "latest" in p.blocked, p.blocked
    r = _cli(lab, "restore", "verify")
    assert "replay the archive alone" in r.stdout, r.stdout + r.stderr

    assert _snapshot(lab) == before
    await _no_move(client, lab.cfg.service)


async def test_approval_gate_shows_the_plan_first(lab, client):
    a, b = _names(lab)
    before = _snapshot(lab)
    handle = await start_move(client, lab.cfg, SwitchoverInput(
        service=lab.cfg.service, target_region=b, approval=ApprovalPolicy(required=True, timeout_seconds=600)))
    try:
        await _until(lambda: _awaiting(handle), 60, "the approval gate")
        md = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        details = md.current_details
        assert details.startswith("**Plan**"), details
        assert f"PLAN switchover {lab.cfg.service}: {a} -> {b}" in details and f"stop writes on {a}" in details
        assert details.index("PLAN switchover") < details.index("WAITING FOR APPROVAL")
    finally:
        await handle.execute_update("approve", ApprovalDecision(approver="test", decision="reject"))
        with pytest.raises(Exception):
            await handle.result()
    assert _snapshot(lab)[a]["pg"]["in_recovery"] is False
    assert {k: v for k, v in _snapshot(lab).items() if k != "routing"} == \
        {k: v for k, v in before.items() if k != "routing"}


@pytest.mark.long  # a real fork and failback (35 s); the healthy-lab plans stay in `make test`
async def test_failback_and_split_brain_plans_after_a_fork_change_nothing(lab, client):
    key = 9_400_000_001
    old, new = await _fork(lab, client, [
        ("insert into alerts (id, region, payload) values (%s, 'old', '{}')", (key,)),
        ("insert into alerts (id, region, payload) select g, 'old', '{}' from generate_series(%s, %s) g",
         (key + 1, key + 3)),
        ("update alerts set payload = '{\"u\": 1}' where id = %s", (key,)),
        ("delete from alerts where id = %s", (key + 3,))])
    try:
        # Back, writable and diverged, after a failover recorded a newer DR epoch on the new
        # primary: its own worker fences it read-only as superseded (workers/self_fence.py).
        # Wait for that, or the snapshot below races it.
        await _until(_async(lambda: pg_status(lab.cfg.region(old).postgres).read_only and
                            fenced(lab.cfg.region(old).redis)), 60,
                     f"{old}'s worker to fence it (PostgreSQL, then Redis) as superseded")
        before = _snapshot(lab)
        assert before[old]["pg"].get("in_recovery") is False  # a primary still: diverged

        p = await _plan(lab, client, "failback", "plan-failback", service=lab.cfg.service, region=old)
        assert p.blocked is None, p.blocked
        assert p.fence.startswith(f"stop {old}'s PostgreSQL (it is primary)")
        assert p.rewind.startswith(f"pg_rewind {old} onto {new}") and "wal_log_hints on" in p.rewind
        assert "fork at " in p.rewind
        commits = int(p.reconcile.split(" commits")[0])
        assert commits >= 1 and new in p.reconcile
        # Per table, from the post-fork WAL: the rows written, by kind (the sample app may add to them).
        m = re.search(r"public\.alerts \(delete (\d+), insert (\d+), update (\d+)\)", p.reconcile)
        assert m and int(m[1]) >= 1 and int(m[2]) >= 4 and int(m[3]) >= 1, p.reconcile
        assert p.routing == [f"lab: {new} -> {old}"]
        r = _cli(lab, "failback", "--region", old)
        assert r.returncode == 0 and f"rewind {old} into a standby of {new}" in r.stdout, r.stdout + r.stderr

        # A fenced old primary is no second writer: nothing for the split-brain runbook, but the
        # plan must not hide it (its writes after the fork are in neither region's live data).
        p = await _plan(lab, client, "split-brain", "plan-split_brain-fenced-old-primary", service=lab.cfg.service)
        assert p.fence is None and p.steps[0].action.startswith("nothing: no split brain"), p
        assert any(n.startswith(f"{old}'s PostgreSQL is an old primary, fenced read-only beside {new}")
                   and f"failback --region {old}" in n for n in p.notes), p.notes
        r = _cli(lab, "split-brain")
        assert r.returncode == 0 and f"failback --region {old}" in " ".join(r.stdout.split()), r.stdout + r.stderr
        # The runbook itself: the same finding, in its result's notes, and nothing changed.
        handle = await client.start_workflow(SplitBrainWorkflow.run, SplitBrainInput(service=lab.cfg.service),
                                             id=move_id(lab.cfg.service),
                                             task_queue=lab.cfg.temporal.control_task_queue)
        sb = await handle.result()
        await record(handle, "split_brain-fenced-old-primary")
        assert sb.outcome == "no-split-brain" and sb.detection.fenced_primaries == [old], sb
        assert any(n.startswith(f"{old}'s PostgreSQL is an old primary") for n in sb.notes), sb.notes

        assert _snapshot(lab) == before
        await _no_move(client, lab.cfg.service)
        with connect(lab.cfg.region(old).postgres) as conn:
            assert conn.execute("select count(*) from alerts where id = %s", (key,)).fetchone()[0] == 1
    finally:
        # Leave the lab as the other tests expect it: the old region primary again, its row kept.
        report = await _failback(lab, client, old)
        assert report.outcome == "succeeded", report.notes


def test_routing_plan_reads_configmaps_and_dns_and_writes_nothing(aws_env, clusters, moto_url, tmp_path):
    """Production routing (a kmock API server per region, Route 53 on moto): the plan names
    what route_traffic would move, and neither API receives a single write."""
    from temporalio.testing import ActivityEnvironment

    from activities.plan import PlanActivities
    from tests.test_traffic_activities import CM, EAST, WEST, _config, _dns
    from workflows.plan import routing_changes

    cfg = _config({name: k.api_url for name, k in clusters.items()}, moto_url, str(tmp_path))
    dns = _dns(cfg, moto_url)
    record = cfg.region(EAST).dns.record
    dns_before = dns.current(record)
    writes = {n: len([r for r in k.requests() if r[0] != "GET"]) for n, k in clusters.items()}

    view = ActivityEnvironment().run(PlanActivities(cfg).read_routing)
    assert view.mechanisms == {f"configmap@{EAST}": EAST, f"configmap@{WEST}": EAST, f"dns {record}": EAST}
    assert routing_changes(WEST, view) == [f"configmap@{EAST}: {EAST} -> {WEST}", f"configmap@{WEST}: {EAST} -> {WEST}",
                                           f"dns {record}: {EAST} -> {WEST}"]
    assert {n: len([r for r in k.requests() if r[0] != "GET"]) for n, k in clusters.items()} == writes
    for k in clusters.values():
        assert k.core.read_namespaced_config_map(CM, k.namespace).data["active.region"] == EAST
    assert dns.current(record) == dns_before


@pytest.mark.parametrize("verify,streaming,expected", [
    ("divergence", None, "verify the reconciled keys on a against b"),
    ("full", None, "verify a's data against b"),
    # Already streaming: nothing reconciled, nothing says which of its rows to trust.
    ("divergence", "b", "verify a's data against b"),
])
def test_the_failback_plan_names_the_verify_it_will_run(verify, streaming, expected):
    from workflows.plan import failback_plan

    plan = failback_plan("svc", "a", "b", role="primary" if streaming is None else "standby",
                         streaming_from=streaming, switch_back=False, verify=verify)
    assert [s.action for s in plan.steps if s.action.startswith("verify")] == [expected], plan.steps
