"""TLS and mTLS to Temporal through temporalio.envconfig (TEMPORAL_TLS_* and a temporal.toml
profile), against the test dev server behind a TLS-terminating proxy (tests/tls_proxy.py)."""

from __future__ import annotations

import os
import pwd
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
import structlog
from temporalio import activity, workflow
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from eagle_dr.cli.errors import explain
from eagle_dr.temporal import connect
from lab.osuser import LabUser
from lab.tls import LabTls
from tests.tls_proxy import tls_proxy

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Above the dev server's own ports (grpc, ui, http, metrics), inside this checkout's shift.
TLS_OFFSET, MTLS_OFFSET = 40, 41


# The connection is under test, not the payload codec: plain payloads, so no codec key is needed
# (the lab's is written only when the lab comes up).
PLAIN = pydantic_data_converter


@pytest.fixture
def tls(tmp_path) -> LabTls:
    pw = pwd.getpwuid(os.geteuid())
    t = LabTls(tmp_path / "tls", LabUser(pw.pw_name, pw.pw_uid, pw.pw_gid))
    t.ensure()
    return t


@pytest.fixture
def no_temporal_env(monkeypatch, tmp_path):
    """Only what a test sets: no TEMPORAL_* from the caller, no ~/.config/temporalio profile."""
    for k in list(os.environ):
        if k.startswith("TEMPORAL_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))
    return monkeypatch


@activity.defn
async def tls_echo(s: str) -> str:
    return f"echo {s}"


@workflow.defn
class TlsEcho:
    @workflow.run
    async def run(self, s: str) -> str:
        return await workflow.execute_activity(tls_echo, s, start_to_close_timeout=timedelta(seconds=10))


async def _run_echo(client) -> str:
    """A worker and a workflow through the same connection: long polls through the proxy too."""
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[TlsEcho], activities=[tls_echo],
                      workflow_runner=UnsandboxedWorkflowRunner()):  # a toy; this module imports the lab
        return await client.execute_workflow(TlsEcho.run, "hi", id=queue, task_queue=queue,
                                             execution_timeout=timedelta(seconds=30))


async def test_tls_via_env(dev_server, tls, no_temporal_env):
    port = dev_server.ports.grpc_port + TLS_OFFSET
    async with tls_proxy(port, dev_server.address, tls.cert, tls.key) as address:
        no_temporal_env.setenv("TEMPORAL_ADDRESS", address)
        no_temporal_env.setenv("TEMPORAL_TLS_SERVER_CA_CERT_PATH", str(tls.ca))
        no_temporal_env.setenv("TEMPORAL_TLS_SERVER_NAME", "localhost")
        # The lab default is only a default: TEMPORAL_ADDRESS wins, as for a real cluster.
        client = await connect("127.0.0.1:1", data_converter=PLAIN)
        assert client.service_client.config.target_host == address
        assert await _run_echo(client) == "echo hi"

        # Without the CA the SDK falls back to the system roots, which do not know the lab CA.
        no_temporal_env.delenv("TEMPORAL_TLS_SERVER_CA_CERT_PATH")
        no_temporal_env.setenv("TEMPORAL_TLS", "true")
        with pytest.raises(Exception) as e:
            await connect("127.0.0.1:1", data_converter=PLAIN)
        line = explain(e.value)
        assert line is not None and "\n" not in line and address in line
        assert "certificate" in line and "TEMPORAL_TLS_SERVER_CA_CERT_PATH" in line
        assert "dev-server up" not in line  # the server is up; its certificate is the problem


async def test_mtls_via_profile(dev_server, tls, no_temporal_env, tmp_path):
    port = dev_server.ports.grpc_port + MTLS_OFFSET
    crt, key = tls.client_cert("eagle-dr-worker")
    async with tls_proxy(port, dev_server.address, tls.cert, tls.key, client_ca=tls.ca) as address:
        profile = tmp_path / "temporal.toml"
        profile.write_text(f'''
[profile.lab-mtls]
address = "{address}"
namespace = "default"
[profile.lab-mtls.tls]
server_name = "localhost"
server_ca_cert_path = "{tls.ca}"
client_cert_path = "{crt}"
client_key_path = "{key}"
''')
        no_temporal_env.setenv("TEMPORAL_CONFIG_FILE", str(profile))
        no_temporal_env.setenv("TEMPORAL_PROFILE", "lab-mtls")
        client = await connect("127.0.0.1:1", data_converter=PLAIN)
        assert await _run_echo(client) == "echo hi"

        # The same profile without the client certificate: refused by the server.
        profile.write_text("\n".join(ln for ln in profile.read_text().splitlines() if not ln.startswith("client_")))
        with pytest.raises(Exception) as e:
            client = await connect("127.0.0.1:1", data_converter=PLAIN)
            await client.count_workflows()
        line = explain(e.value)
        assert line is not None and "\n" not in line and address in line  # the profile's address
        assert "client certificate" in line and "TEMPORAL_TLS_CLIENT_CERT_PATH" in line


API_KEY = "eagle-dr-test-api-key-7f3a9c"  # a marker: it must reach the client and no log line


async def test_api_key_from_env_enables_tls(no_temporal_env):
    """envconfig's rule, relied on in the README: an API key alone means TLS with the system roots
    (Temporal Cloud); TEMPORAL_TLS=false is the only way to send it in plain text."""
    from eagle_dr.temporal import connect_config

    no_temporal_env.setenv("TEMPORAL_API_KEY", API_KEY)
    cfg = connect_config("127.0.0.1:7233")
    assert cfg["api_key"] == API_KEY and cfg["tls"] is True and cfg["target_host"] == "127.0.0.1:7233"
    no_temporal_env.setenv("TEMPORAL_TLS", "false")
    cfg = connect_config("127.0.0.1:7233")
    assert cfg["api_key"] == API_KEY and cfg["tls"] is False


async def test_api_key_reaches_the_client_and_no_log(dev_server, no_temporal_env, capsys):
    from eagle_dr import logs
    from workers.run import log_started

    no_temporal_env.setenv("TEMPORAL_API_KEY", API_KEY)
    no_temporal_env.setenv("TEMPORAL_TLS", "false")  # the dev server is plain text and ignores the key
    client = await connect(dev_server.address, data_converter=PLAIN)
    assert client.service_client.config.api_key == API_KEY
    assert await client.count_workflows() is not None  # the key is sent and the server still answers

    saved = structlog.get_config()
    try:
        logs.configure("test", fmt="json")  # binds capsys's stderr, so restored below
        log_started(logs.get("worker"), client, "dr-control", None)
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert '"event": "worker.started"' in err and '"api_key": "set"' in err and dev_server.address in err
    assert API_KEY not in err
