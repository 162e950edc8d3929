"""The local two-region lab: real servers on 127.0.0.1, one state directory.

Region A (the configured primary) runs the PostgreSQL primary and the Redis master;
region B runs a streaming standby and a Redis replica. Three Sentinels (quorum 2) are
placed per ``lab.sentinel_placement``; one S3 server holds a bucket per region. Each region
has its own eagle-dr worker process; a control worker runs the runbooks; the sample app
writes traffic to the active region.

``kill_region`` is a real outage (kill -9); ``heal_region`` restarts what was killed
exactly as it was, without repairing replication: that is the runbooks' job.
"""

from __future__ import annotations

import base64
import os
import secrets
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from activities.routing import LabRouter
from eagle_dr.config import EagleConfig
from lab import binaries
from lab.osuser import LabUser, ensure_lab_user, make_dir
from lab.pgbackrest_server import PgBackRestServer
from lab.postgres import PostgresNode
from lab.processes import is_running, kill_tree, read_pid, spawn, wait_for
from lab.redis import RedisNode, SentinelNode
from lab.s3 import S3Server
from lab.tls import LabTls

SECRETS = ("redis-password", "s3-access-key", "s3-secret-key", "postgres-password", "replication-password",
           "alerts-token")


@dataclass
class ProcessState:
    name: str
    region: str
    pid: int | None
    running: bool


@dataclass
class LabStatus:
    state_dir: str
    processes: list[ProcessState] = field(default_factory=list)

    def running(self, name: str) -> bool:
        return any(p.running for p in self.processes if p.name == name)


class Lab:
    def __init__(self, cfg: EagleConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path or os.environ.get("EAGLE_DR_CONFIG")
        self.state = Path(cfg.lab.state_dir)
        self._user: LabUser | None = None

    # -- places --------------------------------------------------------------------------------

    @property
    def user(self) -> LabUser:
        if self._user is None:
            self._user = ensure_lab_user(self.cfg.lab.os_user)
        return self._user

    def region_dir(self, region: str) -> Path:
        return self.state / "regions" / region

    def postgres(self, region: str) -> PostgresNode:
        r = self.cfg.region(region)
        d = self.region_dir(region)
        data = Path(r.postgres.data_dir) if r.postgres.data_dir else d / "pgdata"
        run = Path(r.postgres.socket_dir) if r.postgres.socket_dir else d / "run"
        return PostgresNode(r.postgres, data, run, self.user, region,
                            tls=self.tls if r.postgres.sslmode != "disable" else None,
                            netns=self.cfg.lab.netns.get(region))

    def secret(self, name: str) -> str:
        return (self.state / "secrets" / name).read_text().strip()

    def redis(self, region: str) -> RedisNode:
        r = self.cfg.region(region)
        return RedisNode(r.redis.host, r.redis.port, self.region_dir(region) / "redis", self.user,
                         self.secret("redis-password"), region, tls=self.tls if r.redis.tls else None,
                         netns=self.cfg.lab.netns.get(region))

    def sentinels(self) -> list[tuple[str, SentinelNode]]:
        """(placement, node) for each Sentinel; addresses come from the primary's config."""
        r = self.cfg.primary.redis
        out = []
        for i, (place, ep) in enumerate(zip(self.cfg.lab.sentinel_placement, r.sentinels), start=1):
            node = SentinelNode(ep.host, ep.port, self.state / "sentinels" / str(i), self.user,
                                self.secret("redis-password"), f"sentinel-{i}", tls=self.tls if r.tls else None,
                                netns=self.cfg.lab.netns.get(place))
            out.append((place, node))
        return out

    @property
    def tls(self) -> LabTls:
        return LabTls(self.state / "tls", self.user)

    def s3(self, region: str | None = None) -> S3Server:
        """The S3 server of a region (the primary's by default): region i's ports are the lab's
        S3 ports + 20 i, its HTTPS port the one its ``s3.endpoint_url`` names."""
        r = self.cfg.region(region) if region else self.cfg.primary
        i = self.cfg.region_names.index(r.name)
        hp = r.s3.endpoint_host_port
        https = hp[1] if hp and r.s3.endpoint_url.startswith("https:") else None
        return S3Server(self.cfg.lab.s3_port + 20 * i, self.cfg.lab.s3_base_port + 20 * i, self.state / "s3" / r.name,
                        self.user, self.secret("s3-access-key"), self.secret("s3-secret-key"),
                        https_port=https, tls=self.tls if https else None, name=f"s3-{r.name}")

    def pgbackrest_server(self, region: str) -> PgBackRestServer | None:
        """The region's pgBackRest TLS server, when the config names one (postgres.pgbackrest_host)."""
        r = self.cfg.region(region)
        if not r.postgres.pgbackrest_host:
            return None
        return PgBackRestServer(r.postgres.pgbackrest_port, self.region_dir(region) / "pgbackrest-server", self.user,
                                self.tls, self.cfg.backup.stanza, f"pgbackrest-server-{region}")

    def ensure_pgbackrest_servers(self) -> None:
        client = self.cfg.backup.tls_client
        if client is None:
            return
        self.tls.ensure_pgbackrest(Path(client.cert_file), Path(client.key_file))
        for r in self.cfg.regions:
            if (server := self.pgbackrest_server(r.name)) is not None:
                server.start()

    @property
    def router(self) -> LabRouter:
        return LabRouter(self.state)

    def worker_pidfile(self, region: str | None) -> Path:
        return self.state / "workers" / f"{region or 'control'}.pid"

    # -- bring-up --------------------------------------------------------------------------------

    def ensure_secrets(self) -> None:
        """Every secret the lab's config refers to, written once (random) under secrets/."""
        d = make_dir(self.state / "secrets", self.user, 0o700)
        # The payload codec's key (temporal.codec.keys.lab-1): 32 random bytes, base64, as
        # `openssl rand -base64 32` makes one. Readable by the workers, which run as this user.
        key = d / "codec-key-1"
        if not key.exists():
            key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            os.chmod(key, 0o600)
            self.user.own(key)
        # Each bucket's pgBackRest passphrase and SSE-C key (config: regions[].s3).
        per_region = [f"{kind}-{r}" for r in self.cfg.region_names for kind in ("backup-cipher", "sse-c-key")]
        for name in (*SECRETS, *per_region):
            p = d / name
            if not p.exists():
                p.write_text(secrets.token_urlsafe(24) + "\n")
                os.chmod(p, 0o600)
                self.user.own(p)

    def up_servers(self) -> None:
        """PostgreSQL, Redis, Sentinels, S3: everything but Temporal, workers and traffic."""
        binaries.ensure("postgres", "redis-server", "redis-sentinel")
        make_dir(self.state, self.user, 0o755)
        self.ensure_secrets()
        a, b = self.cfg.primary, self.cfg.secondary
        for r in (a, b):
            make_dir(self.region_dir(r.name), self.user, 0o755)
        # S3 first: PostgreSQL archives WAL into it from its first segment.
        self.tls.ensure()
        for r in self.cfg.regions:
            s3 = self.s3(r.name)
            s3.start()
            s3.ensure_bucket(r.s3.bucket)
        binaries.ensure("pgbackrest")
        from activities.backup.pgbackrest import Stanza

        for r in (a, b):
            Stanza(self.cfg, r.name).write_configs()
        self.ensure_pgbackrest_servers()
        pa, pb = self.postgres(a.name), self.postgres(b.name)
        if (pa.data_dir / "PG_VERSION").exists() and (pb.data_dir / "PG_VERSION").exists():
            # An existing lab: bring back what is down, as it was (never re-clone).
            for node in (pa, pb):
                node.ensure_ssl()  # before ensure_auth's hostssl lines, or nothing could connect
                if node.ensure_archive_include() and node.running():
                    node.stop("fast")
            pa.start()
            pb.start()
            # A lab made before PostgreSQL had passwords gets them now (and loses its trust lines).
            pa.ensure_auth()
            pb.ensure_auth()
            pa.ensure_standby_passfile(pb)
            pb.ensure_standby_passfile(pa)
        else:
            pa.init_primary()
            pb.clone_standby_of(pa)
        ra, rb = self.redis(a.name), self.redis(b.name)
        ra.start()
        rb.start(replica_of=(a.redis.host, a.redis.port))
        for _place, s in self.sentinels():
            if not s.conf.exists():
                s.write_config(a.redis.master_name, (a.redis.host, a.redis.port), quorum=2, down_after_ms=5000)
            s.start()
        self.ensure_stanza()
        if self.router.active_region() is None:
            self.router.set_active_region(a.name, epoch=0)

    def ensure_stanza(self) -> None:
        """stanza-create on whichever node is primary (both repos; a no-op when they exist
        and match), so WAL archiving succeeds from the start."""
        import time

        from activities.backup.pgbackrest import LOCK_ACQUIRE, PgBackRestError, Stanza
        from activities.postgres.status import pg_status

        for r in self.cfg.regions:
            st = pg_status(r.postgres)
            if st.reachable and st.role == "primary":
                deadline = time.monotonic() + 120
                while True:
                    try:
                        Stanza(self.cfg, r.name).run("stanza-create", timeout=180)
                        return
                    except PgBackRestError as e:
                        # The primary archives from its first segment: the async archive-push
                        # holds the stanza's archive lock while it runs, and stanza-create
                        # needs it too. Wait for that push to end.
                        if e.code != LOCK_ACQUIRE or time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)

    def wait_replication(self, timeout: float = 60) -> None:
        """Until the standby streams, the Redis replica is linked and the Sentinels see each
        other, whichever region the runbooks have made primary."""
        from activities.postgres.status import pg_status
        from activities.redis.status import redis_status, sentinel_view

        regions = self.cfg.regions

        def streaming() -> bool:
            for r in regions:
                st = pg_status(r.postgres)
                if st.role == "primary" and any(x.state == "streaming" for x in st.replicas):
                    return True
            return False

        def linked() -> bool:
            return any(redis_status(r.redis).link_status == "up" for r in regions)

        wait_for(streaming, timeout, "a PostgreSQL standby to stream from the primary")
        wait_for(linked, timeout, "the Redis replica link")
        sentinels = regions[0].redis.sentinels
        wait_for(lambda: all((v := sentinel_view(regions[0].redis, ep)).quorum_ok and
                             v.other_sentinels == len(sentinels) - 1 for ep in sentinels),
                 timeout, "Sentinels to discover each other", 0.5)

    def start_worker(self, region: str | None) -> int:
        pidfile = self.worker_pidfile(region)
        pid = read_pid(pidfile)
        if is_running(pid):
            return pid  # type: ignore[return-value]
        argv = [sys.executable, "-m", "eagle_dr.cli"] + (["--config", self.config_path] if self.config_path else [])
        argv += ["worker"] + (["--region", region] if region else ["--control"])
        env = {**os.environ, "EAGLE_DR_STATE_DIR": str(self.state), "EAGLE_DR_LOG_FORMAT": "json"}
        if region and region in self.cfg.lab.netns:
            argv = ["ip", "netns", "exec", self.cfg.lab.netns[region], *argv]
        return spawn(argv, pidfile=pidfile, logfile=self.state / "workers" / f"{region or 'control'}.log", env=env)

    def start_workers(self) -> None:
        for r in self.cfg.regions:
            self.start_worker(r.name)
        self.start_worker(None)

    # -- the codec server the Temporal UI decrypts payloads through ----------------------------

    @property
    def codec_pidfile(self) -> Path:
        return self.state / "codec" / "codec-server.pid"

    def start_codec_server(self) -> int | None:
        """``eagle-dr codec-server`` in the background when temporal.codec is on (the dev
        server's UI points at it: --ui-codec-endpoint). None when encryption is off."""
        codec = self.cfg.temporal.codec
        if codec is None:
            return None
        pid = read_pid(self.codec_pidfile)
        if is_running(pid):
            return pid
        argv = [sys.executable, "-m", "eagle_dr.cli"] + (["--config", self.config_path] if self.config_path else [])
        env = {**os.environ, "EAGLE_DR_STATE_DIR": str(self.state), "EAGLE_DR_LOG_FORMAT": "json"}
        pid = spawn(argv + ["codec-server"], pidfile=self.codec_pidfile,
                    logfile=self.state / "codec" / "codec-server.log", env=env)
        listen = codec.server.listen
        wait_for(lambda: is_running(pid) and urllib.request.urlopen(
            f"http://{listen.host}:{listen.port}/-/ready", timeout=2).status == 200, 30, "codec server", 0.1)
        return pid

    def stop_codec_server(self) -> bool:
        pid = read_pid(self.codec_pidfile)
        if is_running(pid):
            kill_tree(pid, sig=15)
            return True
        return False

    # -- alerts in: the receiver and the lab's Alertmanager ---------------------------------

    @property
    def receiver_pidfile(self) -> Path:
        return self.state / "alerts" / "receiver.pid"

    def alertmanager(self):
        from lab.alertmanager import Alertmanager

        return Alertmanager(self.state / "alerts" / "alertmanager", self.cfg.lab.alertmanager_port)

    def start_receiver(self) -> int:
        """``eagle-dr alerts serve`` in the background, like a worker (pid and log under alerts/)."""
        pid = read_pid(self.receiver_pidfile)
        if is_running(pid):
            return pid  # type: ignore[return-value]
        argv = [sys.executable, "-m", "eagle_dr.cli"] + (["--config", self.config_path] if self.config_path else [])
        env = {**os.environ, "EAGLE_DR_STATE_DIR": str(self.state), "EAGLE_DR_LOG_FORMAT": "json"}
        pid = spawn(argv + ["alerts", "serve"], pidfile=self.receiver_pidfile,
                    logfile=self.state / "alerts" / "receiver.log", env=env)
        listen = self.cfg.alerts.listen
        wait_for(lambda: is_running(pid) and urllib.request.urlopen(
            f"http://{listen.host}:{listen.port}/-/ready", timeout=2).status == 200, 30, "alerts receiver", 0.1)
        return pid

    def start_alertmanager(self) -> int:
        """The lab's Alertmanager, sending every alert to the receiver with the lab's token."""
        from lab.alertmanager import Webhook

        listen = self.cfg.alerts.listen
        return self.alertmanager().start([Webhook("eagle-dr", f"http://{listen.host}:{listen.port}/alert",
                                                  str(self.state / "secrets" / "alerts-token"))])

    def stop_alerts(self) -> list[str]:
        stopped = []
        if self.alertmanager().stop():
            stopped.append("alertmanager")
        pid = read_pid(self.receiver_pidfile)
        if is_running(pid):
            kill_tree(pid, sig=15)
            stopped.append("alerts-receiver")
        return stopped

    def start_app(self) -> int:
        pidfile = self.state / "app" / "app.pid"
        pid = read_pid(pidfile)
        if is_running(pid):
            return pid  # type: ignore[return-value]
        argv = [sys.executable, "-m", "lab.app"] + (["--config", self.config_path] if self.config_path else [])
        env = {**os.environ, "EAGLE_DR_STATE_DIR": str(self.state), "EAGLE_DR_LOG_FORMAT": "json"}
        return spawn(argv, pidfile=pidfile, logfile=self.state / "app" / "app.log", env=env)

    def stop_app(self) -> None:
        pid = read_pid(self.state / "app" / "app.pid")
        if is_running(pid):
            kill_tree(pid, sig=15)
            wait_for(lambda: not is_running(pid), 15, "sample app to stop")

    # -- outages ---------------------------------------------------------------------------------

    def kill_region(self, region: str, with_s3: bool = False) -> list[str]:
        """kill -9 the region's PostgreSQL, Redis, Sentinels placed there and its worker; with
        ``with_s3`` its S3 too (a whole region's outage takes its bucket: the survivor then
        archives to its own alone, which the archive guard handles). Off by default: the
        runbook tests and the drill exercise the database move; the lost bucket has its own
        tests (tests/test_backup_dr.py), and a bucket left dead by a failed test would stall
        every later shutdown of the primary on its archiver."""
        self.cfg.region(region)
        killed = []
        if self.postgres(region).kill():
            killed.append("postgres")
        if self.redis(region).kill():
            killed.append("redis")
        for place, s in self.sentinels():
            if place == region and s.kill():
                killed.append(s.name)
        if kill_tree(read_pid(self.worker_pidfile(region))):
            killed.append("worker")
        if (server := self.pgbackrest_server(region)) is not None and server.kill():
            killed.append("pgbackrest-server")
        if with_s3 and self.s3(region).kill():
            killed.append("s3")
        return killed

    def heal_region(self, region: str) -> list[str]:
        """Restart what kill_region stopped, with its configuration unchanged."""
        self.cfg.region(region)
        started = []
        s3 = self.s3(region)
        if not s3.running():
            s3.start()
            started.append("s3")
        pg = self.postgres(region)
        if not pg.running():
            pg.start()
            started.append("postgres")
        rd = self.redis(region)
        if not rd.running():
            rd.start()
            started.append("redis")
        server = self.pgbackrest_server(region)
        if server is not None and not server.running():
            server.start()
            started.append("pgbackrest-server")
        for place, s in self.sentinels():
            if place == region and not s.running():
                s.start()
                started.append(s.name)
        if not is_running(read_pid(self.worker_pidfile(region))):
            self.start_worker(region)
            started.append("worker")
        self.repoint_sentinels()
        return started

    def repoint_sentinels(self):
        """Point every Sentinel at the master most of them name (a Sentinel that was down while
        the master moved comes back naming the old one). Returns the agreement, or None when
        no master has a majority of the Sentinels: then nothing is changed."""
        from activities.redis.failover import repoint_and_verify, sentinel_quorum

        cfg = self.cfg.primary.redis
        agreed = sentinel_quorum(cfg).agreed_master
        master = next((r.redis for r in self.cfg.regions if f"{r.redis.host}:{r.redis.port}" == agreed), None)
        return repoint_and_verify(cfg, master) if master is not None else None

    def rebuild_standby(self, region: str) -> str:
        """Re-clone the region's PostgreSQL from the current primary and re-attach its Redis.

        A lab shortcut that throws the region's data away (failback, which keeps what it can,
        is the runbook for production)."""
        import shutil

        from activities.postgres.status import pg_status

        other = self.cfg.other(region)
        if pg_status(other.postgres).role != "primary":
            raise RuntimeError(f"{other.name} is not a primary; nothing to rebuild {region} from")
        pg = self.postgres(region)
        if pg.running():
            pg.kill()
        shutil.rmtree(pg.data_dir, ignore_errors=True)
        pg.clone_standby_of(self.postgres(other.name))
        rd = self.redis(region)
        rd.write_config(replica_of=(other.redis.host, other.redis.port))
        if rd.running():
            rd.kill()
        rd.start()
        for place, s in self.sentinels():
            if place == region and not s.running():
                s.start()
        # A Sentinel that was down while the master moved still watches the old one.
        from activities.redis.failover import repoint_sentinels

        repoint_sentinels(other.redis, other.redis)
        self.start_worker(region)
        return other.name

    def reset(self) -> None:
        """Stop the lab and throw away its regions' data and the app's log (secrets,
        Temporal history and search attributes stay): the next ``up`` starts clean."""
        import shutil

        self.down()
        for path in (self.state / "regions", self.state / "sentinels", self.state / "app", self.state / "s3",
                     self.state / "routing.json"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # -- teardown and status ---------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every lab process (workers and app first, so they don't log storms of errors)."""
        stopped = []
        self.stop_app()
        stopped += self.stop_alerts()
        if self.stop_codec_server():
            stopped.append("codec-server")
        for region in [*self.cfg.region_names, None]:
            pid = read_pid(self.worker_pidfile(region))
            if is_running(pid):
                kill_tree(pid, sig=15)
                try:
                    wait_for(lambda: not is_running(pid), 20, "worker to stop")
                except Exception:
                    kill_tree(pid)
                stopped.append(f"worker-{region or 'control'}")
        for _place, s in self.sentinels() if (self.state / "secrets").exists() else []:
            if s.kill():
                stopped.append(s.name)
        for r in self.cfg.regions:
            if (self.state / "secrets").exists() and self.redis(r.name).kill():
                stopped.append(f"redis-{r.name}")
            pg = self.postgres(r.name)
            if pg.running():
                pg.stop("fast")
                if pg.running():
                    pg.kill()
                stopped.append(f"postgres-{r.name}")
        for r in self.cfg.regions:
            server = self.pgbackrest_server(r.name)
            if server is not None and server.running():
                server.stop()
                stopped.append(f"pgbackrest-server-{r.name}")
        if (self.state / "secrets").exists():
            for r in self.cfg.regions:
                s3 = self.s3(r.name)
                if s3.running():
                    s3.stop()
                    stopped.append(f"s3-{r.name}")
        return stopped

    def status(self) -> LabStatus:
        st = LabStatus(state_dir=str(self.state))
        have_secrets = (self.state / "secrets").exists()
        for r in self.cfg.regions:
            pg = self.postgres(r.name)
            st.processes.append(ProcessState("postgres", r.name, pg.pid, pg.running()))
            if have_secrets:
                rd = self.redis(r.name)
                st.processes.append(ProcessState("redis", r.name, rd.pid, rd.running()))
            wp = read_pid(self.worker_pidfile(r.name))
            st.processes.append(ProcessState("worker", r.name, wp, is_running(wp)))
        if have_secrets:
            for place, s in self.sentinels():
                st.processes.append(ProcessState(s.name, place, s.pid, s.running()))
            for r in self.cfg.regions:
                s3 = self.s3(r.name)
                st.processes.append(ProcessState("s3", r.name, s3.pid, s3.running()))
        cp = read_pid(self.worker_pidfile(None))
        st.processes.append(ProcessState("worker", "control", cp, is_running(cp)))
        rp = read_pid(self.receiver_pidfile)
        st.processes.append(ProcessState("alerts-receiver", "control", rp, is_running(rp)))
        if self.cfg.temporal.codec:
            kp = read_pid(self.codec_pidfile)
            st.processes.append(ProcessState("codec-server", "control", kp, is_running(kp)))
        am = self.alertmanager()
        st.processes.append(ProcessState("alertmanager", "shared", am.pid, am.running()))
        ap = read_pid(self.state / "app" / "app.pid")
        st.processes.append(ProcessState("sample-app", "shared", ap, is_running(ap)))
        return st

