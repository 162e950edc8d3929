"""The lab's PostgreSQL: a primary in one region, a streaming standby in the other.

Configured the way the runbooks need it: ``wal_log_hints`` so pg_rewind works after a
failover, a physical slot per standby so the primary keeps the WAL it needs, and a short
``wal_retrieve_retry_interval`` because the default 5 s can stall a promotion that follows
a crash (see shared/notes/lab.md, section 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from activities.postgres.ctl import PgCtl
from eagle_dr.config import PostgresConfig
from lab.osuser import LabUser, make_dir
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
"""

HBA = """
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""

SCHEMA = Path(__file__).with_name("schema.sql")


class PostgresNode:
    """One region's PostgreSQL instance: bootstrap here, process control in PgCtl."""

    def __init__(self, cfg: PostgresConfig, data_dir: Path, run_dir: Path, user: LabUser, name: str):
        # The runbooks find the node through its config, so the lab insists on the same paths.
        self.cfg = cfg.model_copy(update={"data_dir": str(data_dir), "socket_dir": str(run_dir),
                                          "os_user": cfg.os_user or user.name})
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.user = user
        self.name = name
        self.ctl = PgCtl(self.cfg)

    @property
    def pid(self) -> int | None:
        return self.ctl.pid

    def running(self) -> bool:
        return self.ctl.running()

    def start(self) -> None:
        self.ctl.start()

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

    def init_primary(self) -> None:
        """initdb, configure, start, create the replication role, database and schema."""
        make_dir(self.data_dir.parent, self.user, 0o755)
        make_dir(self.run_dir, self.user, 0o755)
        if not (self.data_dir / "PG_VERSION").exists():
            make_dir(self.data_dir, self.user)
            r = self.ctl.run([self.ctl.tool("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
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
            r = self.ctl.run([self.ctl.tool("pg_basebackup"), "-h", primary.cfg.host, "-p", str(primary.cfg.port),
                           "-U", primary.cfg.replication_user, "-D", str(self.data_dir), "-X", "stream", "-c", "fast",
                           "-R", "-C", "-S", slot, "-d", f"application_name={self.name}"])
            if r.returncode != 0:
                raise RuntimeError(f"{self.name}: pg_basebackup failed: {r.stderr}")
        self.start()
