"""Reading a PostgreSQL node's replication state: role, timeline, LSNs, lag.

Plain functions, used by the health activities on a regional worker and by
``eagle-dr status`` on an operator's machine alike.
"""

from __future__ import annotations

from datetime import datetime

import psycopg
from pydantic import BaseModel

from activities.postgres.ctl import FENCE_LIBRARY, FENCE_MARKER
from activities.postgres.unlogged import Unlogged, unlogged_relations
from eagle_dr.config import PostgresConfig, scrubbed_first_line


class ReplicaLink(BaseModel):
    application_name: str
    state: str | None
    sync_state: str | None
    sent_lsn: str | None
    replay_lsn: str | None
    lag_bytes: int | None
    replay_lag_seconds: float | None
    slot_name: str | None = None


class PgStatus(BaseModel):
    reachable: bool
    error: str | None = None
    role: str | None = None  # "primary" | "standby"
    timeline: int | None = None
    # primary: current write LSN; standby: last replayed LSN
    lsn: str | None = None
    receive_lsn: str | None = None
    # standby side: who it streams from and in what state
    upstream: str | None = None
    receiver_status: str | None = None
    replay_delay_seconds: float | None = None
    # standby side: the primary's end of WAL as its walsender last reported it, and when.
    # With the primary gone, (sender_end_lsn - receive_lsn) is the WAL known never received;
    # whatever it wrote after sender_end_at is unknown.
    sender_end_lsn: str | None = None
    sender_end_at: datetime | None = None
    # primary side: its standbys
    replicas: list[ReplicaLink] = []
    read_only: bool | None = None
    # Unlogged tables and sequences (activities/postgres/unlogged.py), read only when asked
    # (pg_status(catalog=True)): no move carries their contents. None: not read.
    unlogged: list[Unlogged] | None = None
    # Read only when asked (pg_status(files=True)): what its data directory makes of its next
    # start. "none"; "eagle-dr": a stop fence's hold (standby.signal and eagle-dr's marker). On
    # a primary, a switchover terminated between its hold and its stop leaves one, so the next
    # restart comes up as a read-only standby of nothing and nothing else says why; on a
    # standby, it is a fenced old primary (restarted), not a replica: never a failover target.
    # "standby.signal": such a file without eagle-dr's marker (every real standby has one).
    # None: not read (no privilege to stat files in the data directory, or not asked).
    hold: str | None = None
    hold_age_seconds: float | None = None  # since its file was written (a switchover's own is seconds old)


_FENCE_OVERRIDE = "-c session_preload_libraries="


def connect(cfg: PostgresConfig, timeout: float = 3.0, dbname: str | None = None,
            _refreshed: bool = False) -> psycopg.Connection:
    try:
        return psycopg.connect(cfg.dsn(dbname), connect_timeout=max(1, int(timeout)), autocommit=True)
    except psycopg.OperationalError as e:
        if not _refreshed and "password authentication failed" in str(e) and cfg.password is not None \
                and cfg.password.refresh():
            # The password held from a secret store (read once a minute) was refused: a
            # rotation. Read it again and try once more, rather than call the server down.
            return connect(cfg, timeout, dbname, _refreshed=True)
        # Only on a fenced node: a non-superuser may not override the setting at all, so
        # the override is not sent to servers that do not need it.
        if FENCE_LIBRARY not in str(e):
            raise
    return psycopg.connect(cfg.dsn(dbname), connect_timeout=max(1, int(timeout)), autocommit=True,
                           options=_FENCE_OVERRIDE)


# The timeline a primary writes on, from the name of its current WAL file: the checkpoint's
# timeline lags a promotion until the first checkpoint after it.
CURRENT_TIMELINE = "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"

_PRIMARY_SQL = f"""
select pg_current_wal_lsn()::text,
       {CURRENT_TIMELINE},
       current_setting('default_transaction_read_only') = 'on'
"""

_REPLICAS_SQL = """
select r.application_name, r.state, r.sync_state, r.sent_lsn::text, r.replay_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint,
       extract(epoch from r.replay_lag)::float8,
       s.slot_name
from pg_stat_replication r
left join pg_replication_slots s on s.active_pid = r.pid
order by r.application_name
"""

_STANDBY_SQL = """
select pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text,
       extract(epoch from clock_timestamp() - pg_last_xact_replay_timestamp())::float8,
       (select status from pg_stat_wal_receiver),
       (select received_tli from pg_stat_wal_receiver),
       (select sender_host || ':' || sender_port from pg_stat_wal_receiver),
       (select timeline_id from pg_control_checkpoint()),
       (select latest_end_lsn::text from pg_stat_wal_receiver),
       (select latest_end_time from pg_stat_wal_receiver)
"""


def _unlogged(conn: psycopg.Connection, primary: bool) -> list[Unlogged] | None:
    # Informational: a catalog read that fails must not turn a reachable node into an
    # unreachable one.
    try:
        return unlogged_relations(conn, sizes=primary)
    except psycopg.Error:
        return None


def _hold(conn: psycopg.Connection, standby: bool) -> tuple[str | None, float | None]:
    """(``hold``, its file's age in seconds): see PgStatus.hold. "eagle-dr" needs the marker and
    standby.signal both (a marker alone starts nothing as a standby), and on a standby also an
    empty primary_conninfo: a real replica copied from a held primary by someone else's
    pg_basebackup or restore carries the marker too, but follows its primary."""
    try:
        # (...).size, not the row: a row IS NOT NULL only when every field is, and Linux has
        # no creation time.
        signal, marker, signal_age, marker_age, follows = conn.execute(
            "select (s).size is not null, (m).size is not null, extract(epoch from now() - (s).modification), "
            "extract(epoch from now() - (m).modification), current_setting('primary_conninfo') <> '' "
            "from (select pg_stat_file('standby.signal', true) as s, pg_stat_file(%s, true) as m) f",
            (FENCE_MARKER,)).fetchone()
    except psycopg.Error:  # pg_stat_file needs superuser or an explicit grant: unknown, not "none"
        return None, None
    if marker and signal and not (standby and follows):
        return "eagle-dr", float(marker_age)
    return ("standby.signal", float(signal_age)) if signal else ("none", None)


def in_recovery(cfg: PostgresConfig, timeout: float = 2.0) -> bool | None:
    """Whether the server is in recovery (a standby); None when it does not answer."""
    try:
        with connect(cfg, timeout) as conn:
            return conn.execute("select pg_is_in_recovery()").fetchone()[0]
    except psycopg.Error:
        return None


def pg_status(cfg: PostgresConfig, timeout: float = 3.0, catalog: bool = False, files: bool = False) -> PgStatus:
    try:
        with connect(cfg, timeout) as conn:
            conn.execute(f"set statement_timeout = {int(timeout * 1000)}")
            in_recovery = conn.execute("select pg_is_in_recovery()").fetchone()[0]
            if not in_recovery:
                lsn, tli, ro = conn.execute(_PRIMARY_SQL).fetchone()
                replicas = [
                    ReplicaLink(application_name=r[0], state=r[1], sync_state=r[2], sent_lsn=r[3], replay_lsn=r[4],
                                lag_bytes=r[5], replay_lag_seconds=r[6], slot_name=r[7])
                    for r in conn.execute(_REPLICAS_SQL).fetchall()
                ]
                hold, age = _hold(conn, False) if files else (None, None)
                return PgStatus(reachable=True, role="primary", timeline=tli, lsn=lsn, replicas=replicas, read_only=ro,
                                unlogged=_unlogged(conn, True) if catalog else None, hold=hold,
                                hold_age_seconds=age)
            replay, receive, delay, status, rtli, upstream, ctli, end, end_at = conn.execute(_STANDBY_SQL).fetchone()
            hold, age = _hold(conn, True) if files else (None, None)
            return PgStatus(reachable=True, role="standby", timeline=rtli or ctli, lsn=replay, receive_lsn=receive,
                            upstream=upstream, receiver_status=status, replay_delay_seconds=delay, read_only=True,
                            sender_end_lsn=end, sender_end_at=end_at,
                            unlogged=_unlogged(conn, False) if catalog else None, hold=hold, hold_age_seconds=age)
    except psycopg.Error as e:
        return PgStatus(reachable=False, error=scrubbed_first_line(e))
