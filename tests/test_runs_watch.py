"""``eagle-dr runs`` and ``eagle-dr watch`` see every run however it was started: by the CLI,
through the UI's API (``temporal workflow start``, what the Start Workflow form calls), and
by a Schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from temporalio.client import WorkflowFailureError

from eagle_dr.temporal import find_bin
from schedules.specs import desired, prefix
from schedules.apply import build
from tests.lab_helpers import _primary, _until
from workflows.runbook import move_id


def _cli(config, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "COLUMNS": "250"})


def _popen(config, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(config, *args) -> list[dict]:
    r = _cli(config, "runs", "--json", "--since", "1h", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


async def _awaiting(client, wid: str) -> bool:
    try:
        p = await client.get_workflow_handle(wid).query("progress")
        return bool(p.get("awaiting_approval") if isinstance(p, dict) else p.awaiting_approval)
    except Exception:  # noqa: BLE001 - not started yet
        return False


async def test_runs_and_watch_see_runs_from_the_cli_the_ui_api_and_a_schedule(lab, lab_config_path, client):
    # Whichever region the session's earlier tests left primary: nothing here moves it.
    a = _primary(lab)
    b = lab.cfg.other(a).name
    cfg, wid = lab.cfg, move_id(lab.cfg.service)
    started = time.time()

    # 1. From the CLI: a switchover waiting for approval. `watch latest` attaches to it, shows the
    # approve command, and reports the rejection like the starting command does.
    starter = _popen(lab_config_path, "switchover", "--to", b, "--require-approval", "--reason", "runs test")
    try:
        await _until(lambda: _awaiting(client, wid), 60, "the CLI's switchover to wait for approval")
        watcher = _popen(lab_config_path, "watch", "latest")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watcher.stdout), daemon=True)
        reader.start()
        # It names the approval command before anyone approves.
        await _until(_async(lambda: any("eagle-dr approve" in x for x in lines)), 60,
                     "watch to offer the approval command")
        seen = "".join(lines)
        assert f"watching {wid}" in seen and f"AWAITING APPROVAL: eagle-dr approve {wid}" in seen, seen
        r = _cli(lab_config_path, "approve", wid, "--reject", "--as", "runs-test")
        assert r.returncode == 0, r.stdout + r.stderr
        watcher.wait(timeout=120)
        reader.join(timeout=10)
        seen = "".join(lines)
        assert watcher.returncode == 1 and "rejected" in seen.lower(), seen
    finally:
        starter.kill()
        starter.wait()

    # 2. Through the UI's API: the same runbook started by `temporal workflow start` with a
    # one-object JSON input, rejected again; `watch <id>` of a finished run prints its report.
    ui_id = f"ui-switchover-{int(started)}"
    r = subprocess.run([find_bin("temporal"), "workflow", "start", "--address", f"127.0.0.1:{cfg.lab.dev_server.grpc_port}",
                        "--type", "SwitchoverWorkflow", "--task-queue", cfg.temporal.control_task_queue,
                        "--workflow-id", ui_id, "--input",
                        json.dumps({"service": cfg.service, "target_region": b, "reason": "from the UI",
                                    "approval": {"required": True}})],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    await _until(lambda: _awaiting(client, ui_id), 60, "the UI-started switchover to wait for approval")
    assert _cli(lab_config_path, "approve", ui_id, "--reject").returncode == 0
    with pytest.raises(WorkflowFailureError):
        await client.get_workflow_handle(ui_id).result()
    # A run that ended in a rejection: its steps, then the reason, exit code 1.
    w = _cli(lab_config_path, "watch", ui_id)
    assert w.returncode == 1 and "approval" in w.stdout and "rejected" in w.stderr.lower(), w.stdout + w.stderr

    # 3. By a Schedule: the Redis snapshot schedule, created paused (it must not fire into the
    # session's other tests) and triggered once.
    spec = next(d for d in desired(cfg) if d.id == f"{prefix(cfg.service)}redis-snapshot")
    schedule = await client.create_schedule(spec.id, build(spec, paused=True), memo=spec.memo)
    try:
        await schedule.trigger()

        def scheduled():
            rows = [x for x in _runs(lab_config_path, "--runbook", "redis-snapshot") if x["trigger"] == "schedule"
                    and x["status"] == "Completed" and x["started_at"] >= _iso(started)]
            return rows[0] if rows else None

        snap = await _until(_async(scheduled), 120, "the scheduled snapshot to be listed")
    finally:
        await schedule.delete()
    assert snap["outcome"] and snap["rto_s"] is None and snap["ui"].startswith("http")

    rows = _runs(lab_config_path)
    cli_run = next(x for x in rows if x["workflow_id"] == wid and x["started_at"] >= _iso(started))
    ui_run = next(x for x in rows if x["workflow_id"] == ui_id)
    for run, trigger in ((cli_run, "manual"), (ui_run, "manual")):
        assert run["runbook"] == "switchover" and run["trigger"] == trigger, run
        assert (run["source_region"], run["target_region"]) == (a, b), run
        assert run["status"] == "Failed" and run["outcome"], run
        # A run that moved nothing has no figures: null (unknown), never invented zeros.
        assert run["rto_s"] is None and run["rpo_wal_bytes"] is None, run
    assert any(x["workflow_id"] == snap["workflow_id"] for x in rows)
    only = _runs(lab_config_path, "--runbook", "switchover", "--outcome", ui_run["outcome"])
    assert {x["workflow_id"] for x in only} >= {wid, ui_id} and all(x["runbook"] == "switchover" for x in only)
    table = _cli(lab_config_path, "runs", "--since", "1h")
    assert table.returncode == 0 and ui_id in table.stdout, table.stdout
    assert _primary(lab) == a


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t - 1, timezone.utc).isoformat()


def _async(fn):
    async def call():
        return fn()
    return call
