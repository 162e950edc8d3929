"""The lab's Alertmanager (Debian ``prometheus-alertmanager``), sending to ``eagle-dr alerts serve``.

Timings are the fast ones the tests need (group_wait 0s, group_interval 1s): a firing alert
reaches the receiver in well under a second, a resolved one within a group interval.
Gossip is off (``--cluster.listen-address=``): one instance, and no port 9094 taken.
"""

from __future__ import annotations

import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab.processes import is_running, kill_tree, read_pid, spawn, wait_for

BINARY = "prometheus-alertmanager"


@dataclass
class Webhook:
    """One receiver: alerts whose labels match ``matchers`` (all, when empty) go to ``url``."""

    name: str
    url: str
    token_file: str
    matchers: tuple[str, ...] = ()


def config(webhooks: list[Webhook], group_by: tuple[str, ...] = ("alertname", "region")) -> dict:
    receivers = [{"name": w.name, "webhook_configs": [{
        "url": w.url, "send_resolved": True, "max_alerts": 0,
        # The token by reference here too: Alertmanager reads the file itself.
        "http_config": {"authorization": {"type": "Bearer", "credentials_file": w.token_file}}}]}
        for w in webhooks]
    default = next(w for w in webhooks if not w.matchers)
    route = {"receiver": default.name, "group_by": list(group_by), "group_wait": "0s", "group_interval": "1s",
             "repeat_interval": "1h",
             "routes": [{"receiver": w.name, "matchers": list(w.matchers)} for w in webhooks if w.matchers]}
    return {"route": route, "receivers": receivers}


class Alertmanager:
    def __init__(self, directory: Path, port: int):
        self.dir = directory
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.dir / "alertmanager.pid"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def running(self) -> bool:
        return is_running(self.pid)

    def start(self, webhooks: list[Webhook], timeout: float = 30) -> int:
        binary = shutil.which(BINARY) or shutil.which("alertmanager")
        if binary is None:
            raise RuntimeError(f"{BINARY} not found (Debian package prometheus-alertmanager: make setup)")
        if self.running():
            return self.pid  # type: ignore[return-value]
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "alertmanager.yml"
        conf.write_text(yaml.safe_dump(config(webhooks), sort_keys=False))
        pid = spawn([binary, f"--config.file={conf}", f"--storage.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", f"--web.external-url={self.url}",
                     "--cluster.listen-address=", "--log.level=debug"],
                    pidfile=self.pidfile, logfile=self.dir / "alertmanager.log")
        wait_for(lambda: self.running() and urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200,
                 timeout, "Alertmanager to be ready", 0.1)
        return pid

    def stop(self) -> bool:
        pid = self.pid
        if not is_running(pid):
            return False
        kill_tree(pid, sig=15)
        return True
