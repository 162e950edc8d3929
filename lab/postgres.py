"""The lab's PostgreSQL: a primary in one region, a streaming standby in the other.

Configured the way the runbooks need it: ``wal_log_hints`` so pg_rewind works after a
failover, a physical slot per standby so the primary keeps the WAL it needs, and a short
``wal_retrieve_retry_interval`` because the default 5 s can stall a promotion that follows
a crash (see shared/notes/lab.md, section 3).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg

from eagle_dr.config import PostgresConfig
from lab import binaries
from lab.osuser import LabUser, make_dir
from lab.processes import is_running, kill_tree, read_pid

SERVER_SETTINGS = """
# --- eagle-dr lab ---
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_log_hints = on
wal_keep_size = '64MB'
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = '500ms'
max_wal_size = '1GB'
fsync = on
"""

HBA = """
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""

SCHEMA = Path(__file__).with_name("schema.sql")


class PostgresNode:
    """One region's PostgreSQL instance, managed through pg_ctl as the lab user."""

    def __init__(self, cfg: PostgresConfig, data_dir: Path, run_dir: Path, user: LabUser, name: str):
        self.cfg = cfg
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.user = user
        self.name = name
        self.log = data_dir.parent / "postgresql.log"

    # -- process control ------------------------------------------------------------------

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, **self.user.popen_kwargs(), **kw)

    @property
    def pid(self) -> int | None:
        return read_pid(self.data_dir / "postmaster.pid")

    def running(self) -> bool:
        return is_running(self.pid)

    def start(self) -> None:
        if self.running():
            return
        # A kill -9 leaves postmaster.pid behind; PostgreSQL refuses to start while that pid
        # is still in the process table (an unreaped zombie counts), and we know it is dead.
        stale = self.data_dir / "postmaster.pid"
        if stale.exists():
            stale.unlink()
        r = self._run([binaries.pg("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t", "60",
                       "-o", f"-p {self.cfg.port} -k {self.run_dir}", "start"])
        if r.returncode != 0:
            tail = self.log.read_text()[-1500:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name}: pg_ctl start failed: {r.stdout}{r.stderr}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        if not self.running():
            return
        self._run([binaries.pg("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop"])

    def kill(self) -> list[int]:
        return kill_tree(self.pid)

    # -- bootstrap ---------------------------------------------------------------------------

    def connect(self, dbname: str | None = None, **kw) -> psycopg.Connection:
        return psycopg.connect(self.cfg.dsn(dbname), connect_timeout=3, autocommit=True, **kw)

    def init_primary(self) -> None:
        """initdb, configure, start, create the replication role, database and schema."""
        make_dir(self.data_dir.parent, self.user, 0o755)
        make_dir(self.run_dir, self.user, 0o755)
        if not (self.data_dir / "PG_VERSION").exists():
            make_dir(self.data_dir, self.user)
            r = self._run([binaries.pg("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                           "-E", "UTF8", "--locale=C.UTF-8"])
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}: initdb failed: {r.stderr}")
            with open(self.data_dir / "postgresql.conf", "a") as f:
                f.write(SERVER_SETTINGS)
            (self.data_dir / "pg_hba.conf").write_text(HBA)
        self.start()
        with self.connect("postgres") as conn:
            if not conn.execute("select 1 from pg_roles where rolname = %s", (self.cfg.replication_user,)).fetchone():
                conn.execute(f'create role "{self.cfg.replication_user}" replication login')
            if not conn.execute("select 1 from pg_database where datname = %s", (self.cfg.database,)).fetchone():
                conn.execute(f'create database "{self.cfg.database}"')
        with self.connect() as conn:
            conn.execute(SCHEMA.read_text())

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
            r = self._run([binaries.pg("pg_basebackup"), "-h", primary.cfg.host, "-p", str(primary.cfg.port),
                           "-U", primary.cfg.replication_user, "-D", str(self.data_dir), "-X", "stream", "-c", "fast",
                           "-R", "-C", "-S", slot, "-d", f"application_name={self.name}"])
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}: pg_basebackup failed: {r.stderr}")
        self.start()
