"""A dependency that is down is one line naming it, its address and the fix; exit code 1.

Temporal is pointed at a port nobody listens on (a real refused connection, no mock)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "COLUMNS": "200"}
    env.pop("EAGLE_DR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_debug_shows_the_trace():
    r = _run("--debug", "failover", "--to", "us-west-2", port=_closed_port())
    assert r.returncode != 0 and "Traceback" in r.stderr, r.stderr


def test_version():
    r = _run("--version", port=_closed_port())
    assert r.returncode == 0 and r.stdout.startswith("eagle-dr "), r.stdout


def test_shell_completion_script(monkeypatch):
    # Typer detects the calling shell from the process tree (sh under make) unless told to take
    # the one named: what `eagle-dr --show-completion bash` gives a bash user.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    r = _run("--show-completion", "bash", port=_closed_port())
    assert r.returncode == 0 and "_eagle_dr_completion" in r.stdout and "complete " in r.stdout, r.stdout + r.stderr


# Every command group with its dependencies down (Temporal refused, the lab's secrets never
# written): whatever each says, it is not a trace and not a driver's raw text.
SWEEP = [("status",), ("runs",), ("watch", "latest"), ("report", "x"), ("monitor", "start"), ("monitor", "pause"),
         ("backup", "now"), ("backup", "list"), ("backup", "list", "--local", "--region", "us-east-1"),
         ("restore", "pitr", "--latest"), ("restore", "rebuild-standby", "--region", "us-west-2"),
         ("schedules", "apply"), ("unfence", "--region", "us-east-1"), ("failback", "--region", "us-east-1"),
         ("split-brain",), ("search-attributes", "ensure"), ("alerts", "serve", "--listen", "127.0.0.1:1"),
         ("notify", "test"), ("switchover", "--to", "us-west-2"), ("drill",), ("approve", "dr-move-eagle-alert")]


def test_no_command_prints_a_trace_with_its_dependencies_down(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import write_test_config

    # Servers nobody runs (an unused port shift), state in an empty directory: no secrets.
    config = write_test_config(tmp_path, shift=7777)
    port = _closed_port()

    def run(args, codec_key: bool = True):
        env = {**os.environ, "TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "COLUMNS": "200"}
        env.pop("EAGLE_DR_DEBUG", None)
        # The payload codec's key is part of reaching Temporal (the client is made with it):
        # given, so that the commands get as far as Temporal; without it, see below.
        env.pop("EAGLE_DR_CODEC_KEY_1", None)
        if codec_key:
            env["EAGLE_DR_CODEC_KEY_1"] = "a test codec key"
        return args, subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), *args],
                                    capture_output=True, text=True, env=env, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, SWEEP))
    for args, r in results:
        text = r.stdout + r.stderr
        assert "Traceback" not in text and "tonic::" not in text and 'File "' not in text, (args, text)
        assert r.returncode in (1, 2, 4), (args, r.returncode, text)
        if args[0] in TEMPORAL_FIRST:
            # One error line naming Temporal's address and the fix.
            error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
            assert len(error) == 1, (args, r.stderr)
            assert f"127.0.0.1:{port}" in error[0] and "eagle-dr dev-server up" in error[0], (args, error)
    # No codec key: one line naming the setting and where the key was looked for.
    _, r = run(("runs",), codec_key=False)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "temporal.codec.keys.lab-1: secret file " in error[0], r.stderr


# Commands whose first act is to reach Temporal: a runbook (_run_runbook), an update, command groups' own.
TEMPORAL_FIRST = {"approve", "runs", "watch", "report", "monitor", "switchover", "failback", "split-brain", "drill",
                  "schedules", "search-attributes"}


# With Temporal up: each command whose dependency is a region's server (PostgreSQL, Redis, S3,
# a Kubernetes API, a secret) that is down, and a runbook whose worker is down.
DIRECT = [("status",), ("backup", "list", "--local", "--region", "us-east-1"), ("unfence", "--region", "us-east-1"),
          ("notify", "test"), ("monitor", "status"), ("runs",), ("watch", "latest"), ("report", "no-such-run")]


def test_commands_with_temporal_up_and_everything_else_down(tmp_path, lab, dev_server):
    """The servers of an unused port shift (nothing listens), a service and task queues no
    worker polls, the test session's real Temporal dev server (and the lab's codec key: what
    this test writes to it must stay readable to the session's history scan)."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from tests.conftest import write_test_config

    svc = f"nobody-{uuid.uuid4().hex[:6]}"
    config = write_test_config(tmp_path, shift=7777)
    doc = yaml.safe_load(config.read_text())
    doc["service"] = svc
    doc["temporal"]["control_task_queue"] = f"{svc}-control"
    for r in doc["regions"]:
        r["temporal"]["task_queue"] = f"{svc}-{r['name']}"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    address = dev_server.address
    # The secrets resolve (from the environment, as in production): what is down is the servers.
    env = {**os.environ, "TEMPORAL_ADDRESS": address, "COLUMNS": "200",
           **{f"EAGLE_DR_{k}": "x" for k in ("POSTGRES_PASSWORD", "REPLICATION_PASSWORD", "REDIS_PASSWORD",
                                              "S3_ACCESS_KEY", "S3_SECRET_KEY")},
           "EAGLE_DR_CODEC_KEY_1": (lab.state / "secrets" / "codec-key-1").read_text().strip()}
    env.pop("EAGLE_DR_DEBUG", None)

    def run(args):
        return args, subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), *args],
                                    capture_output=True, text=True, env=env, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, DIRECT))
    for args, r in results:
        text = r.stdout + r.stderr
        assert "Traceback" not in text and 'File "' not in text and "tonic::" not in text, (args, text)
        # Only what needs no region may succeed (history of a service that has none is empty).
        assert r.returncode in ((0,) if args[0] == "runs" else (1, 2)), (args, r.returncode, text)
    by = {a[0]: r for a, r in results}
    assert "no runs" in by["runs"].stdout, by["runs"].stdout
    # status: both regions' servers refuse connections: the service is down, which is known
    # (degraded, exit 1), not unassessable; every cell a short reason of one line.
    st = by["status"].stdout
    assert by["status"].returncode == 1 and "DEGRADED" in st, st
    assert "connection refused" in st and "Is the server running" not in st, st
    # The database a command needs is named with its address.
    unfence = [line for line in by["unfence"].stderr.splitlines() if line.startswith("error:")]
    assert len(unfence) == 1 and "127.0.0.1" in unfence[0] and "port" in unfence[0], by["unfence"].stderr

    # A runbook whose control worker is down: a warning line at once, naming the queue and the fix
    # (the run is queued: Temporal keeps it until a worker comes).
    proc = subprocess.Popen([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), "switchover", "--to",
                             "us-west-2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.startswith("warning: no worker has polled task queue") and f"{svc}-control" in line, line
        assert "eagle-dr worker --control" in line, line
    finally:
        proc.kill()
        proc.wait()
        asyncio.run(_terminate(address, f"dr-move-{svc}"))


async def _terminate(address: str, workflow_id: str) -> None:
    from temporalio.client import Client

    client = await Client.connect(address)
    try:
        await client.get_workflow_handle(workflow_id).terminate("test over")
    except Exception:  # noqa: BLE001 - never started (the CLI was killed first)
        pass
