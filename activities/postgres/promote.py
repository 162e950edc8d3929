"""Promoting a standby: pg_promote, then wait until it really accepts writes."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import psycopg
from pydantic import BaseModel

from activities.postgres.status import CURRENT_TIMELINE, connect
from eagle_dr.config import PostgresConfig


class Promotion(BaseModel):
    already_primary: bool
    # The standby's last replayed / received WAL before promotion: what the new timeline forks from.
    replay_lsn: str | None = None
    receive_lsn: str | None = None
    timeline: int | None = None
    writable_at: datetime


def _writable(cfg: PostgresConfig) -> tuple[bool, int | None]:
    with connect(cfg, 2) as conn:
        in_recovery = conn.execute("select pg_is_in_recovery()").fetchone()[0]
        if in_recovery:
            return False, None
        # A real write proves it: default_transaction_read_only may still be set.
        with conn.transaction():
            conn.execute("set local transaction_read_only = off")
            conn.execute("create temp table if not exists eagle_dr_probe (x int)")
        tli = conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]
        return True, tli


def promote(cfg: PostgresConfig, timeout_s: float, heartbeat=None) -> Promotion:
    with connect(cfg) as conn:
        in_recovery = conn.execute("select pg_is_in_recovery()").fetchone()[0]
        replay = receive = None
        if in_recovery:
            replay, receive = conn.execute(
                "select pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text").fetchone()
            # wait => false: we poll ourselves, with heartbeats, instead of blocking 60 s in SQL.
            conn.execute("select pg_promote(wait => false)")
    deadline = time.monotonic() + timeout_s
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ok, tli = _writable(cfg)
            if ok:
                return Promotion(already_primary=not in_recovery, replay_lsn=replay, receive_lsn=receive, timeline=tli,
                                 writable_at=datetime.now(timezone.utc))
        except psycopg.Error as e:
            last_err = e
        if heartbeat:
            heartbeat({"waiting": "promotion"})
        time.sleep(0.05)
    raise TimeoutError(f"{cfg.host}:{cfg.port} not writable {timeout_s:.0f}s after pg_promote ({last_err})")
