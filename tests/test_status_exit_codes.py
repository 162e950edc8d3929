"""``eagle-dr status`` exit codes: 0 healthy, 1 degraded (the verdict names why), 2 cannot assess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from lab.processes import kill_tree, read_pid
from tests.conftest import write_test_config
from tests.lab_helpers import _primary, _until


def _status(config, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(config), "status", *args],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "300"})


async def test_healthy_then_a_dead_worker_is_degraded(lab, lab_config_path):
    a = _primary(lab)  # whichever region the session's earlier tests left primary
    b = lab.cfg.other(a).name
    r = _status(lab_config_path, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["health"] == {"state": "healthy", "exit_code": 0, "reasons": []}, doc["health"]
    assert kill_tree(read_pid(lab.worker_pidfile(b)))
    try:
        r = _status(lab_config_path)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "DEGRADED" in r.stdout and f"worker down: {lab.cfg.region(b).temporal.task_queue}" in r.stdout, r.stdout
        assert "Traceback" not in r.stdout + r.stderr
    finally:
        lab.start_worker(b)

    def healthy():
        return json.loads(_status(lab_config_path, "--json").stdout)["health"]["state"] == "healthy"

    async def check():
        return healthy()

    await _until(check, 90, "status healthy again after the worker restart")


def test_nothing_reachable_cannot_be_assessed(tmp_path):
    """A config whose servers are all elsewhere (ports nobody listens on, secrets not written)
    and Temporal down: exit 2, short reasons in the cells, no raw driver text."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = write_test_config(tmp_path, shift=7777)
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(config), "status"], capture_output=True,
                       text=True, timeout=180, env={**os.environ, "COLUMNS": "300",
                                                    "TEMPORAL_ADDRESS": f"127.0.0.1:{closed}"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "UNKNOWN: no region's PostgreSQL answered" in r.stdout, r.stdout
    assert "tonic" not in r.stdout and "Traceback" not in r.stdout + r.stderr, r.stdout
    doc = json.loads(subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(config), "status",
                                     "--json"], capture_output=True, text=True, timeout=180,
                                    env={**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{closed}"}).stdout)
    assert doc["health"]["state"] == "unknown" and doc["health"]["exit_code"] == 2
