"""Sessions a worker keeps open from one activity to the next, for the steps inside a write
outage.

A new session is a TCP, TLS and SCRAM handshake: 11-27 ms in the lab's switchovers, paid by the
replay wait and again by the promotion, both while no client can write. Each regional worker
keeps one to its own node (``keep_warm``), and the worker that waits for the standby's replay
is usually the one that promotes it next: the wait and the promotion start on a kept session.

A kept session is reused only when it is safe to, else a new one is opened as if none was kept:
- it was handed back idle (no transaction open) and unbroken, less than ``MAX_IDLE_S`` ago;
- it answers a ping within ``PING_TIMEOUT_S``, waited for with a timeout of our own (a psycopg
  query has none): a server stopped or restarted since has closed it, and a frozen one does not
  answer, where a new session would have met its connect timeout;
- its users set nothing on the session (``SET LOCAL`` at most), so it carries no state over.

Keyed by server, port, database and user, never by the password (it stays out of this map; a
rotated one is used by the next new session). At most ``MAX_KEPT`` a key; a session past its
idle bound is closed when the next one is handed back or asked for.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import structlog
from psycopg import pq

from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig

log = structlog.get_logger(__name__)

MAX_IDLE_S = 30.0
PING_TIMEOUT_S = 1.0
MAX_KEPT = 2

_lock = threading.Lock()
_kept: dict[tuple, list[tuple[float, psycopg.Connection]]] = {}


def _key(cfg: PostgresConfig) -> tuple:
    # Last: behind a TCP proxy nothing is kept. A kept session stays on the backend it was
    # opened to, and the proxy may send the next new one elsewhere.
    return cfg.host, cfg.port, cfg.database, cfg.user, cfg.behind_proxy


def _answers(conn: psycopg.Connection, timeout: float) -> bool:
    """``select 1`` through libpq directly, its answer waited for with a deadline."""
    pg = conn.pgconn
    try:
        pg.send_query(b"select 1")
        deadline = time.monotonic() + timeout
        # psycopg runs libpq non-blocking: the query may still sit in libpq's buffer. poll, not
        # select: a long-running worker's descriptors may pass select's 1024.
        while pg.flush() != 0:
            if not _wait(pg.socket, select.POLLOUT, deadline):
                return False
        while True:
            pg.consume_input()
            if not pg.is_busy():
                break
            if not _wait(pg.socket, select.POLLIN, deadline):
                return False
        ok = True
        while (res := pg.get_result()) is not None:
            ok = ok and res.status == pq.ExecStatus.TUPLES_OK
        return ok and pg.transaction_status == pq.TransactionStatus.IDLE
    except psycopg.Error:
        return False


def _wait(fd: int, event: int, deadline: float) -> bool:
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    p = select.poll()
    p.register(fd, event)
    p.poll(left * 1000)
    return True


def _take(key: tuple) -> psycopg.Connection | None:
    now = time.monotonic()
    with _lock:
        kept = _kept.get(key, [])
        fresh = [(t, c) for t, c in kept if now - t < MAX_IDLE_S]
        stale = [c for t, c in kept if now - t >= MAX_IDLE_S]
        conn = fresh.pop()[1] if fresh else None
        _kept[key] = fresh
    for c in stale:
        c.close()
    if conn is None:
        return None
    if conn.closed or conn.broken or not _answers(conn, PING_TIMEOUT_S):
        conn.close()
        return None
    return conn


def _give(key: tuple, conn: psycopg.Connection) -> None:
    if key[-1] or conn.closed or conn.broken or conn.info.transaction_status != pq.TransactionStatus.IDLE:
        conn.close()
        return
    with _lock:
        kept = _kept.setdefault(key, [])
        kept.append((time.monotonic(), conn))
        extra = kept[:-MAX_KEPT]
        del kept[:-MAX_KEPT]
    for c in extra:
        c.close()


def open_session(cfg: PostgresConfig, timeout: float = 3.0) -> psycopg.Connection:
    """A kept session to ``cfg`` if one is safe to reuse, else a new one (status.connect's)."""
    return _take(_key(cfg)) or connect(cfg, timeout)


def hand_back(cfg: PostgresConfig, conn: psycopg.Connection) -> None:
    """Keep a session for the next caller (closed instead when it is not fit to keep)."""
    _give(_key(cfg), conn)


@contextmanager
def session(cfg: PostgresConfig, timeout: float = 3.0) -> Iterator[psycopg.Connection]:
    """``open_session``, handed back when the block ends without an error; one that raised is
    closed (its state is not known)."""
    conn = open_session(cfg, timeout)
    try:
        yield conn
    except BaseException:
        conn.close()
        raise
    hand_back(cfg, conn)


def _touch(cfg: PostgresConfig) -> None:
    try:
        with session(cfg, 2):
            pass
    except psycopg.Error:
        pass  # down, stopping, starting: the next step connects as it did before any was kept
    except Exception as e:  # noqa: BLE001 - the loop must outlive any one round; nothing awaits it
        log.warning("kept session not renewed", error=str(e))


async def keep_warm(cfg: PostgresConfig, every: float = 10.0) -> None:
    """A regional worker's session to its own node, kept ready (pinged, or opened again) every
    ``every`` seconds: the promotion of a failover, which has no replay wait before it to leave
    one, then starts on it too. One idle session per worker on its node."""
    while True:
        await asyncio.to_thread(_touch, cfg)
        await asyncio.sleep(every)
