"""Fencing an old primary so it can never take another write.

Two strengths: ``read_only`` (ALTER SYSTEM default_transaction_read_only + terminate client
sessions; reachable over the network, reversible, keeps the instance up for inspection)
and ``stop`` (pg_ctl stop on the region's own worker: nothing can write to a stopped
server). The runbook uses the strongest it can reach and records which one held.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from activities.postgres.ctl import PgCtl
from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig, scrub

import psycopg


class PgFence(BaseModel):
    reachable: bool
    method: str | None = None  # "read_only" | "stop" | None (unfenced)
    last_lsn: str | None = None
    timeline: int | None = None
    error: str | None = None


def _read_only(conn: psycopg.Connection, cfg: PostgresConfig, timeout: float) -> str:
    conn.execute("alter system set default_transaction_read_only = on")
    conn.execute("select pg_reload_conf()")
    # pg_reload_conf() only signals the postmaster: a session forked before it has reloaded
    # still starts read-write. Wait until a new session sees the setting, then end every
    # session opened before that moment.
    deadline = time.monotonic() + max(timeout, 5)
    while True:
        with connect(cfg, timeout) as probe:
            if probe.execute("show default_transaction_read_only").fetchone()[0] == "on":
                break
        if time.monotonic() > deadline:
            raise psycopg.OperationalError("default_transaction_read_only did not take effect after reload")
        time.sleep(0.01)
    conn.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                 "where backend_type = 'client backend' and pid <> pg_backend_pid()")
    return conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]


def fence_read_only(cfg: PostgresConfig, timeout: float = 3) -> PgFence:
    try:
        with connect(cfg, timeout) as conn:
            if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                return PgFence(reachable=True, method="standby")
            lsn = _read_only(conn, cfg, timeout)
            return PgFence(reachable=True, method="read_only", last_lsn=lsn)
    except psycopg.Error as e:
        return PgFence(reachable=False, error=scrub(str(e).strip().splitlines()[0]) if str(e).strip() else "unreachable")


def fence_stop(cfg: PostgresConfig, timeout: float = 3) -> PgFence:
    """Read-only first (so nothing commits while we stop), then stop; idempotent when already down."""
    ctl = PgCtl(cfg)
    if not ctl.running():
        data = ctl.controldata()
        return PgFence(reachable=True, method="stop", last_lsn=data.get("Latest checkpoint location"),
                       timeline=int(data.get("Latest checkpoint's TimeLineID", "0") or 0))
    ro = fence_read_only(cfg, timeout)
    ctl.stop("fast")
    data = ctl.controldata()
    return PgFence(reachable=True, method="stop", last_lsn=data.get("Latest checkpoint location") or ro.last_lsn,
                   timeline=int(data.get("Latest checkpoint's TimeLineID", "0") or 0))


def unfence(cfg: PostgresConfig) -> None:
    """Undo a read-only fence (compensation when promotion did not happen)."""
    with connect(cfg) as conn:
        conn.execute("alter system reset default_transaction_read_only")
        conn.execute("select pg_reload_conf()")
