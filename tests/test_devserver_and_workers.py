"""The dev server is idempotent and carries eagle-dr's search attributes; workers drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

from eagle_dr.status import gather
from eagle_dr.temporal import SEARCH_ATTRIBUTES


def test_second_up_reports_the_running_server(dev_server):
    first = dev_server.status()
    again = dev_server.up()
    assert again.running and again.pid == first.pid
    assert again.db_file.endswith("dev.db") and os.path.exists(again.db_file)


async def test_search_attributes_are_registered(client):
    resp = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace="default"))
    for key in SEARCH_ATTRIBUTES:
        assert key.name in resp.custom_attributes


def test_dev_server_status_cli(dev_server, lab_config_path, lab_cfg):
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "dev-server", "status"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert f"running: 127.0.0.1:{lab_cfg.lab.dev_server.grpc_port}" in r.stdout


async def test_worker_polls_its_region_and_exits_cleanly_on_sigterm(lab, lab_config_path):
    region = lab.cfg.secondary
    proc = subprocess.Popen([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "worker",
                             "--region", region.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "EAGLE_DR_LOG_FORMAT": "json"})
    try:
        ident = f"eagle-dr@{region.name}/{proc.pid}"

        async def polling():
            st = await gather(lab.cfg)
            return any(ident in w.pollers for w in st.workers if w.region == region.name)

        import asyncio
        import time

        deadline = time.monotonic() + 30
        while not await polling():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "worker never polled"
            await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert '"event": "worker.stopping"' in out and '"event": "worker.stopped"' in out
    assert f'"task_queue": "{region.temporal.task_queue}"' in out
    # The lab's own worker of the region holds its metrics port: this second one runs without
    # metrics and says so, instead of failing (a taken port must never cost a worker).
    assert '"event": "worker.metrics_unavailable"' in out, out


def test_unknown_worker_region_is_refused(lab_config_path):
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "worker",
                        "--region", "ap-south-9"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert r.returncode == 2 and "unknown region 'ap-south-9'" in r.stderr
    both = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "worker"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert both.returncode == 2 and "exactly one of --region REGION or --control" in both.stderr
