"""The lab's PostgreSQL: a primary in one region, a streaming standby in the other.

Configured the way the runbooks need it: ``wal_log_hints`` so pg_rewind works after a
failover, a physical slot per standby so the primary keeps the WAL it needs, and a short
``wal_retrieve_retry_interval`` because the default 5 s can stall a promotion that follows
a crash (see shared/notes/lab.md, section 3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psycopg
from psycopg import sql

from activities.postgres.credentials import tool_env
from activities.postgres.ctl import PgCtl
from eagle_dr.config import PostgresConfig
from lab.osuser import LabUser, make_dir
from lab.tls import LabTls
from lab.processes import children, kill_tree

SERVER_SETTINGS = """
# --- eagle-dr lab ---
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_log_hints = on
wal_keep_size = '64MB'
# A slot reserved for a lost region holds WAL until failback; this caps it (failback then
# re-clones with pg_basebackup instead of filling the disk).
max_slot_wal_keep_size = '4GB'
# Reconciliation tells a row committed after the fork from one deleted by the loser.
track_commit_timestamp = on
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = '500ms'
max_wal_size = '1GB'
fsync = on
# WAL archiving to pgBackRest (archive_mode, archive_command): written per node by
# activities/backup/pgbackrest.py, found relative to the data directory so that the copy
# pg_basebackup and pg_rewind make of this file still names the node's own files.
include_if_exists = '../pgbackrest/archive.pg.conf'
"""
ARCHIVE_INCLUDE = "include_if_exists = '../pgbackrest/archive.pg.conf'"

# Password (SCRAM) for every TCP connection, replication included, as in production: what
# connects without the configured password is refused, so a runbook that forgets to pass it
# fails here first. The Unix socket stays trust: it lives in the region's own run directory,
# the lab bootstraps its roles through it, and a fenced old primary is read through it while
# it listens on nothing else (divergence.read_loser).
HBA = """
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
"""
# With the lab's TLS (every lab server; lab.tls): the same, TLS or nothing. ``hostssl`` makes
# the server refuse a plain-text connection outright, so a client that forgets TLS (sslmode
# disable) fails here as it would against a production server configured this way.
HBA_SSL = """
local all all trust
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl replication all 127.0.0.1/32 scram-sha-256
"""
SSL_MARKER = "# --- eagle-dr lab TLS ---"
# A throwaway server (lab.scratch_postgres) has no secrets to check against.
TRUST_HBA = """
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""

SCHEMA = Path(__file__).with_name("schema.sql")


class PostgresNode:
    """One region's PostgreSQL instance: bootstrap here, process control in PgCtl."""

    def __init__(self, cfg: PostgresConfig, data_dir: Path, run_dir: Path, user: LabUser, name: str,
                 trust: bool = False, tls: LabTls | None = None, netns: str | None = None):
        # The runbooks find the node through its config, so the lab insists on the same paths.
        self.cfg = cfg.model_copy(update={"data_dir": str(data_dir), "socket_dir": str(run_dir),
                                          "os_user": cfg.os_user or user.name})
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.user = user
        self.name = name
        self.trust = trust
        self.tls = tls
        self.ctl = PgCtl(self.cfg, netns)

    @property
    def pid(self) -> int | None:
        return self.ctl.pid

    def running(self) -> bool:
        return self.ctl.running()

    def start(self) -> None:
        self.ctl.start()

    def ensure_archive_include(self) -> bool:
        """A lab made before it archived gets the include line; True when the server needs a
        restart to take archive_mode."""
        conf = self.data_dir / "postgresql.conf"
        if not conf.exists() or ARCHIVE_INCLUDE in conf.read_text():
            return False
        with open(conf, "a") as f:
            f.write("\n" + ARCHIVE_INCLUDE + "\n")
        return True

    def ensure_ssl(self) -> None:
        """ssl = on with the lab CA's server certificate, appended once to postgresql.conf
        (absolute paths: the copy pg_basebackup and pg_rewind make names the same lab files).
        A lab made before TLS gets it here; the settings reload without a restart."""
        if self.tls is None:
            return
        self.tls.ensure_postgres()
        conf = self.data_dir / "postgresql.conf"
        if not conf.exists() or SSL_MARKER in conf.read_text():
            return
        with open(conf, "a") as f:
            f.write(f"\n{SSL_MARKER}\nssl = on\nssl_cert_file = '{self.tls.postgres_cert}'\n"
                    f"ssl_key_file = '{self.tls.postgres_key}'\nssl_min_protocol_version = 'TLSv1.2'\n")
        if self.running():
            self.ctl.run([self.ctl.tool("pg_ctl"), "-D", str(self.data_dir), "reload"], check=True)

    def stop(self, mode: str = "fast") -> None:
        self.ctl.stop(mode)

    def kill(self) -> list[int]:
        return kill_tree(self.pid)

    def aux_pid(self, title: bytes) -> int | None:
        """A child of the postmaster by its process title (b"walreceiver", b"startup")."""
        for pid in children(self.pid) if self.pid else []:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if title in f.read():
                        return pid
            except OSError:
                continue
        return None

    # -- bootstrap ---------------------------------------------------------------------------

    def connect(self, dbname: str | None = None, **kw) -> psycopg.Connection:
        return psycopg.connect(self.cfg.dsn(dbname), connect_timeout=3, autocommit=True, **kw)

    def connect_local(self, dbname: str = "postgres") -> psycopg.Connection:
        """Through the Unix socket (trust): how the lab sets the passwords TCP then asks for."""
        return psycopg.connect(host=str(self.run_dir), port=self.cfg.port, user=self.cfg.user, dbname=dbname,
                               connect_timeout=3, autocommit=True)

    def init_primary(self) -> None:
        """initdb, configure, start, create the replication role, database and schema."""
        make_dir(self.data_dir.parent, self.user, 0o755)
        make_dir(self.run_dir, self.user, 0o755)
        if not (self.data_dir / "PG_VERSION").exists():
            make_dir(self.data_dir, self.user)
            r = self.ctl.run([self.ctl.tool("initdb"), "-D", str(self.data_dir), "-U", self.cfg.user,
                              "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}: initdb failed: {r.stderr}")
            with open(self.data_dir / "postgresql.conf", "a") as f:
                f.write(SERVER_SETTINGS)
            self.ensure_ssl()
        self.start()
        self.ensure_auth()
        with self.connect("postgres") as conn:
            if not conn.execute("select 1 from pg_database where datname = %s", (self.cfg.database,)).fetchone():
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(self.cfg.database)))
        with self.connect() as conn:
            conn.execute(SCHEMA.read_text())

    def ensure_auth(self) -> None:
        """pg_hba.conf as above and, on a primary, the roles' passwords from the lab's secrets.

        Idempotent, and run at every ``up``: a lab made before passwords existed is brought
        to password auth too. Only SCRAM verifiers, computed here (libpq's
        PQencryptPasswordConn, as psql's \\password does), reach the server: the plain
        password never appears in a statement or the server log."""
        hba = self.data_dir / "pg_hba.conf"
        want = TRUST_HBA if self.trust else HBA_SSL if self.tls is not None else HBA
        if not hba.exists() or hba.read_text() != want:
            hba.write_text(want)
            os.chmod(hba, 0o600)
            self.user.own(hba)
            if self.running():
                self.ctl.run([self.ctl.tool("pg_ctl"), "-D", str(self.data_dir), "reload"], check=True)
        if self.trust:
            return
        if self.cfg.password is None:
            raise RuntimeError(f"{self.name}: the lab runs PostgreSQL with password auth: postgres.password "
                               f"must be set in the config")
        with self.connect_local() as conn:
            if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                return  # roles replicate from the primary
            repl = self.cfg.replication_user
            if not conn.execute("select 1 from pg_roles where rolname = %s", (repl,)).fetchone():
                conn.execute(sql.SQL("create role {} replication login").format(sql.Identifier(repl)))
            for role, secret in ((self.cfg.user, self.cfg.password), (repl, self.cfg.replication_secret)):
                verifier = conn.pgconn.encrypt_password(secret.resolve().encode(), role.encode(), b"scram-sha-256")
                conn.execute(sql.SQL("alter role {} password {}").format(sql.Identifier(role),
                                                                         sql.Literal(verifier.decode())))

    def ensure_standby_passfile(self, primary: "PostgresNode") -> None:
        """A standby cloned before the lab had passwords (pg_basebackup -R) names no passfile
        in primary_conninfo and could not stream once TCP asks for a password: rewrite its
        standby config as the runbooks write it, on the same slot, and restart it."""
        auto = self.data_dir / "postgresql.auto.conf"
        if self.trust or not (self.data_dir / "standby.signal").exists() or not auto.exists():
            return
        text = auto.read_text()
        if str(self.ctl.passfile) in text:  # (pg_basebackup -R wrote passfile=~/.pgpass)
            return
        m = re.search(r"^primary_slot_name\s*=\s*'([^']*)'", text, re.M)
        slot = m.group(1) if m else (self.cfg.slot or f"slot_{self.name.replace('-', '_')}")
        self.ctl.write_standby_config(primary.cfg, self.name, slot)
        if self.running():
            self.stop()
            self.start()

    def clone_standby_of(self, primary: "PostgresNode") -> None:
        """pg_basebackup -R from the primary through this node's own replication slot."""
        make_dir(self.data_dir.parent, self.user, 0o755)
        make_dir(self.run_dir, self.user, 0o755)
        if not (self.data_dir / "PG_VERSION").exists():
            slot = self.cfg.slot or f"slot_{self.name.replace('-', '_')}"
            with primary.connect("postgres") as conn:
                row = conn.execute("select active from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
                if row is not None and not row[0]:
                    # A stale slot from an earlier lab pins WAL and makes -C fail.
                    conn.execute("select pg_drop_replication_slot(%s)", (slot,))
            if self.data_dir.exists():
                os.rmdir(self.data_dir)
            # No -R: it would write the password it was given into postgresql.auto.conf, which
            # every later pg_basebackup and pg_rewind copies on. write_standby_config points
            # primary_conninfo at a passfile instead, as the runbooks do.
            r = self.ctl.run([self.ctl.tool("pg_basebackup"), "-h", primary.cfg.host, "-p", str(primary.cfg.port),
                              "-U", primary.cfg.replication_user, "-D", str(self.data_dir), "-X", "stream",
                              "-c", "fast", "-C", "-S", slot],
                             env=tool_env(primary.cfg.replication_secret, primary.cfg))
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}: pg_basebackup failed: {r.stderr}")
            self.ctl.write_standby_config(primary.cfg, self.name, slot)
        self.start()
