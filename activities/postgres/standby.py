"""Standby-side operations: waiting for replay, and turning an old primary into a standby."""

from __future__ import annotations

import logging
import time

import psycopg
from pydantic import BaseModel

from activities.deadline import deadline_across_attempts
from activities.postgres.ctl import PgCtl
from activities.postgres.lsn import lsn_to_int
from activities.postgres.status import connect, pg_status
from activities.postgres.sessions import hand_back, open_session
from eagle_dr.config import PostgresConfig

log = logging.getLogger(__name__)


class Replayed(BaseModel):
    target_lsn: str
    replay_lsn: str


def wait_replayed_past(cfg: PostgresConfig, lsn: str, timeout_s: float, heartbeat=None) -> Replayed:
    """Until the standby has replayed the record that starts at ``lsn`` (strictly past it).

    Used with the old primary's shutdown checkpoint: once that record is replayed, every
    transaction the old primary ever committed is on the standby."""
    target = lsn_to_int(lsn)
    deadline = deadline_across_attempts(timeout_s)
    replay = None
    conn: psycopg.Connection | None = None
    try:
        while time.monotonic() < deadline:
            # One session for the whole wait (a new one costs a SCRAM handshake each time);
            # opened again only after an error. Writes are stopped while this runs, so every
            # millisecond between the replay and our noticing it is part of the outage.
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = open_session(cfg, 2)
                replay = conn.execute("select pg_last_wal_replay_lsn()::text").fetchone()[0]
            except psycopg.Error:
                replay = None
                if conn is not None:
                    conn.close()
                conn = None
            if replay and lsn_to_int(replay) > target:
                # Kept for the promotion, the next step on this node (sessions.py).
                hand_back(cfg, conn)
                conn = None
                return Replayed(target_lsn=lsn, replay_lsn=replay)
            if heartbeat:
                heartbeat({"target_lsn": lsn, "replay_lsn": replay})
            time.sleep(0.005 if conn is not None else 0.02)
    finally:
        if conn is not None:
            conn.close()
    raise TimeoutError(f"standby {cfg.host}:{cfg.port} replayed {replay}, not past {lsn}, within {timeout_s:.0f}s")


class Rejoined(BaseModel):
    already_standby: bool
    upstream: str | None
    slot: str


def ensure_slot(primary: PostgresConfig, slot: str) -> bool:
    with connect(primary) as conn:
        if conn.execute("select 1 from pg_replication_slots where slot_name = %s", (slot,)).fetchone():
            return False
        # Reserve WAL at once: the slot must hold everything since now, before the standby
        # (a rewound old primary, hours later) first connects.
        conn.execute("select pg_create_physical_replication_slot(%s, true)", (slot,))
        return True


def reserve_slot(node: PostgresConfig, slot: str) -> None:
    """A slot that keeps the WAL another region needs to come back as a standby of ``node``.

    Made on the standby just before it is promoted: a physical slot starts at the node's
    last restartpoint, before the fork, which is where a rewound old primary starts
    replaying (pg_rewind copies the source's pg_wal as it is then). One surviving from the
    node's earlier life keeps its older position, which covers as much; only one whose WAL
    is already lost (max_slot_wal_keep_size) is replaced."""
    with connect(node) as conn:
        reserve_slot_in(conn, node, slot)


def reserve_slot_in(conn: psycopg.Connection, node: PostgresConfig, slot: str) -> bool:
    """``reserve_slot`` on a session already open to ``node`` (the promote step's own). False
    when no WAL is reserved (max_slot_wal_keep_size unset)."""
    if conn.execute("select current_setting('max_slot_wal_keep_size') = '-1'").fetchone()[0]:
        # An unbounded slot for a region that may never return fills this node's disk:
        # without the cap, failback re-clones with pg_basebackup instead.
        log.warning("max_slot_wal_keep_size is unset on %s:%s: no WAL reserved for %s", node.host, node.port, slot)
        return False
    row = conn.execute("select restart_lsn is null or wal_status = 'lost' from pg_replication_slots "
                       "where slot_name = %s and not active", (slot,)).fetchone()
    if row is not None and row[0]:
        conn.execute("select pg_drop_replication_slot(%s)", (slot,))
    elif conn.execute("select 1 from pg_replication_slots where slot_name = %s", (slot,)).fetchone():
        return True
    conn.execute("select pg_create_physical_replication_slot(%s, true)", (slot,))
    return True


def _streaming_from(cfg: PostgresConfig, primary: PostgresConfig) -> bool:
    st = pg_status(cfg, 2)
    return st.role == "standby" and st.receiver_status == "streaming" and \
        st.upstream == f"{primary.host}:{primary.port}"


def rejoin_as_standby(old: PostgresConfig, primary: PostgresConfig, application_name: str, slot: str,
                      timeout_s: float = 120, heartbeat=None) -> Rejoined:
    """Make a cleanly stopped old primary stream from the new one (no rewind needed after a
    switchover: its shutdown checkpoint precedes the fork). Idempotent."""
    ctl = PgCtl(old)
    ensure_slot(primary, slot)
    if ctl.running() and _streaming_from(old, primary):
        return Rejoined(already_standby=True, upstream=f"{primary.host}:{primary.port}", slot=slot)
    ctl.stop("fast")
    ctl.write_standby_config(primary, application_name, slot)
    ctl.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _streaming_from(old, primary):
            _drop_inactive_slots(old)
            return Rejoined(already_standby=False, upstream=f"{primary.host}:{primary.port}", slot=slot)
        if heartbeat:
            heartbeat({"waiting": "streaming"})
        time.sleep(0.1)
    raise TimeoutError(f"{old.host}:{old.port} did not start streaming from {primary.host}:{primary.port}")


def _drop_inactive_slots(cfg: PostgresConfig) -> None:
    """Slots the node served as a primary would pin WAL on it forever as a standby."""
    try:
        with connect(cfg) as conn:
            conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where not active")
    except psycopg.Error:
        pass  # best effort: a leftover slot costs disk, not correctness
