"""The lab's Redis: a master in one region, a replica in the other, three Sentinels.

AUTH is on everywhere (``requirepass``/``masterauth``, Sentinel ``auth-pass``), with the
password read from the lab's secret file, so the runbooks' secret handling is exercised.
Persistence is off, as for a cache, which is exactly why a restarted old master must not
simply rejoin (it comes back empty): that is the runbooks' business, not the lab's.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import redis

from activities.postgres.ctl import in_netns
from lab import binaries
from lab.osuser import LabUser, make_dir
from lab.processes import is_running, kill_tree, read_pid, wait_for
from eagle_dr.redis_connect import connect
from lab.tls import LabTls


def _write_private(path: Path, text: str, user: LabUser) -> None:
    path.write_text(text)
    os.chmod(path, 0o600)
    user.own(path)


class _RedisProcess:
    """What a Redis data node and a Sentinel share: a daemonized redis binary, a pid file, AUTH."""

    conf_name = pid_name = ""

    def __init__(self, host: str, port: int, directory: Path, user: LabUser, password: str, name: str,
                 tls: LabTls | None = None, netns: str | None = None):
        self.host, self.port, self.dir, self.user, self.password, self.name = host, port, directory, user, password, name
        self.tls = tls
        self.netns = netns  # the partition tests' labs (lab/netns.py): run in this network namespace
        self.conf = directory / self.conf_name
        self.pidfile = directory / self.pid_name

    def _listen(self) -> list[str]:
        """The port, TLS only when the lab has TLS: ``port 0`` closes the plain-text one, so a
        client that forgets TLS is refused. ``tls-replication`` makes the node's own outgoing
        links (a replica to its master, a Sentinel to the nodes and to the other Sentinels)
        TLS too; clients need no certificate (AUTH is the client's credential)."""
        if self.tls is None:
            return [f"port {self.port}"]
        self.tls.ensure_redis()
        return ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.tls.redis_cert}",
                f"tls-key-file {self.tls.redis_key}", f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients no", "tls-replication yes"]

    @property
    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def running(self) -> bool:
        return is_running(self.pid)

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls is not None else {}
        return connect(self.host, self.port, password=self.password, tls=tls, socket_timeout=3,
                       socket_connect_timeout=3, decode_responses=True)

    def _sync_listen(self) -> None:
        """An existing config (Redis and Sentinel rewrite their own) gets this lab's listening
        lines: a lab made before TLS, or with it turned off since, starts as configured now."""
        lines = self.conf.read_text().splitlines()
        new: list[str] = []
        for x in lines:
            if re.match(r"(port|tls-[a-z-]+) ", x):
                if not any(y.startswith("port ") for y in new):
                    new += self._listen()  # where the old listening lines were
                continue
            new.append(x)
        if not any(y.startswith("port ") for y in new):
            new += self._listen()
        if new != lines:
            _write_private(self.conf, "\n".join(new) + "\n", self.user)

    def _launch(self, binary: str) -> None:
        if self.conf.exists():
            self._sync_listen()
        argv = [binaries.ensure(binary)[binary], str(self.conf)]
        kw = self.user.popen_kwargs()
        if self.netns:
            argv = in_netns(self.netns, argv, *((self.user.uid, self.user.gid) if kw else ()))
            kw = {"cwd": "/"} if kw else {}
        subprocess.run(argv, check=True, capture_output=True, **kw)
        wait_for(lambda: self.client().ping(), 20, f"{self.name} on port {self.port}")

    def kill(self) -> list[int]:
        return kill_tree(self.pid)


class RedisNode(_RedisProcess):
    conf_name, pid_name = "redis.conf", "redis.pid"

    def write_config(self, replica_of: tuple[str, int] | None) -> None:
        make_dir(self.dir, self.user, 0o700)
        lines = [
            f"bind {self.host}", *self._listen(), "daemonize yes", f"pidfile {self.pidfile}",
            f"logfile {self.dir / 'redis.log'}", f"dir {self.dir}", 'save ""', "appendonly no",
            f"requirepass {self.password}", f"masterauth {self.password}",
            # Full resyncs otherwise wait 5 s for more replicas to join.
            "repl-diskless-sync-delay 0", "protected-mode no",
        ]
        if replica_of:
            # Promotion across regions is the DR runbook's decision (fenced, epoch-stamped,
            # in step with PostgreSQL), not Sentinel's: priority 0 keeps Sentinel from
            # promoting this replica on its own. The runbook raises it when it promotes.
            lines += [f"replicaof {replica_of[0]} {replica_of[1]}", "replica-priority 0"]
        _write_private(self.conf, "\n".join(lines) + "\n", self.user)

    def start(self, replica_of: tuple[str, int] | None = None) -> None:
        """Start with the config already written; ``replica_of`` only applies to a new config."""
        if self.running():
            return
        if not self.conf.exists():
            self.write_config(replica_of)
        self._launch("redis-server")


class SentinelNode(_RedisProcess):
    conf_name, pid_name = "sentinel.conf", "sentinel.pid"

    def write_config(self, master_name: str, master: tuple[str, int], quorum: int, down_after_ms: int) -> None:
        make_dir(self.dir, self.user, 0o700)
        lines = [
            f"bind {self.host}", *self._listen(), "daemonize yes", f"pidfile {self.pidfile}",
            f"logfile {self.dir / 'sentinel.log'}", f"dir {self.dir}", f"requirepass {self.password}",
            f"sentinel monitor {master_name} {master[0]} {master[1]} {quorum}",
            f"sentinel auth-pass {master_name} {self.password}",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} 10000",
            f"sentinel parallel-syncs {master_name} 1",
            # Sentinels authenticate to each other with the same password.
            f"sentinel sentinel-pass {self.password}",
        ]
        # Sentinel rewrites its own config file, so it must be writable by the lab user.
        _write_private(self.conf, "\n".join(lines) + "\n", self.user)

    def start(self) -> None:
        if self.running():
            return
        self._launch("redis-sentinel")
