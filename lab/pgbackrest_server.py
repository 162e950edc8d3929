"""One region's pgBackRest TLS server (``pgbackrest server``), as on a production database host.

A backup from the standby runs on the standby's node and needs the primary's node too (it
starts and stops the backup there and copies pg_control from it). Across hosts pgBackRest
reaches it only as a remote: over SSH or through this server. The lab runs one per node, as
the data directory's owner, with the lab CA's certificate, and the backups reach the primary
through it over TLS with a client certificate, never through the shared disk, so the lab
exercises the production path (`activities/backup/take.py`).
"""

from __future__ import annotations

import socket
from pathlib import Path

from lab import binaries
from lab.osuser import LabUser, make_dir
from lab.processes import is_running, kill_tree, read_pid, spawn, wait_for
from lab.tls import LabTls

CLIENT_CN = "pgbackrest-client"


class PgBackRestServer:
    def __init__(self, port: int, directory: Path, user: LabUser, tls: LabTls, stanza: str, name: str):
        self.port, self.dir, self.user, self.tls, self.stanza, self.name = port, directory, user, tls, stanza, name
        self.pidfile = directory / "server.pid"
        self.conf = directory / "server.conf"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def running(self) -> bool:
        return is_running(self.pid)

    def render(self) -> str:
        return "\n".join([
            "# Written by the lab (lab/pgbackrest_server.py): this node's pgBackRest TLS server.",
            "[global]",
            "tls-server-address=127.0.0.1",
            f"tls-server-port={self.port}",
            f"tls-server-cert-file={self.tls.pgbackrest_cert}",
            f"tls-server-key-file={self.tls.pgbackrest_key}",
            f"tls-server-ca-file={self.tls.ca}",
            # Only the backup client's certificate, and only for this stanza.
            f"tls-server-auth={CLIENT_CN}={self.stanza}",
            f"log-path={self.dir / 'log'}",
            f"lock-path={self.dir / 'lock'}",
            "log-level-file=detail",
            "log-level-console=off",
            "log-level-stderr=error",
        ]) + "\n"

    def start(self) -> None:
        if self.running():
            return
        make_dir(self.dir, self.user, 0o700)
        for sub in ("log", "lock"):
            make_dir(self.dir / sub, self.user, 0o700)
        if not self.conf.exists() or self.conf.read_text() != self.render():
            self.conf.write_text(self.render())
            self.user.own(self.conf)
        pgbackrest = binaries.ensure("pgbackrest")["pgbackrest"]
        spawn([pgbackrest, f"--config={self.conf}", "server"], pidfile=self.pidfile, logfile=self.dir / "server.out",
              user=self.user, cwd=self.dir)
        wait_for(self._listening, 30, f"pgBackRest TLS server ({self.name}) on 127.0.0.1:{self.port}", 0.1)

    def _listening(self) -> bool:
        if not self.running():
            raise RuntimeError(f"pgbackrest server ({self.name}) exited: "
                               f"{(self.dir / 'server.out').read_text()[-2000:] if (self.dir / 'server.out').exists() else ''}")
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        kill_tree(self.pid, sig=15)
        try:
            wait_for(lambda: not self.running(), 15, "pgBackRest server to stop")
        except Exception:  # noqa: BLE001 - then the hard way
            kill_tree(self.pid)

    def kill(self) -> list[int]:
        return kill_tree(self.pid)
