"""Sessions kept from one activity to the next (activities/postgres/sessions.py), on a real
PostgreSQL: reused only while the server behind them is the one that answered, never across a
restart, a frozen server or an open transaction."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import psycopg
import pytest

from activities.postgres import sessions
from activities.postgres.sessions import session
from lab.scratch_postgres import scratch_postgres
from tests.conftest import PORT_SHIFT

PORT = 17990 + PORT_SHIFT - 2000


@pytest.fixture(scope="module")
def node():
    with scratch_postgres(PORT, "sessions") as n:
        yield n


@pytest.fixture(autouse=True)
def nothing_kept():
    sessions._kept.clear()
    yield
    for kept in sessions._kept.values():
        for _, c in kept:
            c.close()
    sessions._kept.clear()


def _pid(conn) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


def test_a_session_handed_back_is_the_next_callers(node):
    with session(node.cfg) as c:
        first = _pid(c)
    with session(node.cfg) as c:
        assert _pid(c) == first
        # Taken, so a caller at the same time gets a session of its own.
        with session(node.cfg) as other:
            assert _pid(other) != first


async def test_a_regional_workers_warm_session_is_the_next_steps(node):
    """keep_warm, as the regional worker runs it: a session kept ready without any step."""
    import asyncio

    from tests.lab_helpers import _async, _until

    key = sessions._key(node.cfg)
    task = asyncio.create_task(sessions.keep_warm(node.cfg, every=3600))
    try:
        await _until(_async(lambda: bool(sessions._kept.get(key))), 10, "a warm session")
    finally:
        task.cancel()
    warm = sessions._kept[key][0][1].info.backend_pid
    with session(node.cfg) as c:
        assert _pid(c) == warm


def test_a_session_left_in_a_transaction_or_that_raised_is_not_kept(node):
    with session(node.cfg) as c:
        c.execute("begin")
        c.execute("select 1")
        in_tx = _pid(c)
    with pytest.raises(psycopg.errors.DivisionByZero):
        with session(node.cfg) as c:
            raised = _pid(c)
            c.execute("select 1 / 0")
    with session(node.cfg) as c:
        assert _pid(c) not in (in_tx, raised)


def test_a_restart_since_is_a_new_session_not_an_error(node):
    with session(node.cfg) as c:
        before = _pid(c)
    node.ctl.stop("fast")
    node.ctl.start()
    with session(node.cfg) as c:
        assert _pid(c) != before
        assert c.execute("select 41 + 1").fetchone()[0] == 42


def test_a_frozen_server_is_not_waited_for_past_the_ping(node):
    """A kept session to a server that stopped answering: the ping gives up (its own deadline;
    a query on the session has none) and a new session meets its connect timeout, as a caller
    without kept sessions would: an error, never a hang."""
    with session(node.cfg) as c:
        c.execute("select 1")
    # The whole server: the session's own backend is a child of the postmaster.
    frozen = [node.ctl.pid, *node.ctl.children()]
    for p in frozen:
        os.kill(p, signal.SIGSTOP)
    outcome: list = []

    def use() -> None:
        try:
            with session(node.cfg, timeout=1) as c:
                outcome.append(c.execute("select 1").fetchone())
        except psycopg.OperationalError as e:
            outcome.append(e)

    t = threading.Thread(target=use, daemon=True)
    try:
        t.start()
        t.join(30)
        assert not t.is_alive(), "a kept session to a frozen server hung its caller"
    finally:
        # Children first: a child that was already exiting when listed is a zombie, which
        # SIGSTOP "stops" without error; a thawed postmaster reaps it at once, and a SIGCONT
        # after that finds no process. That is the ProcessLookupError a clean-clone run saw.
        for p in reversed(frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError), outcome
    # Thawed, the next caller gets a working session.
    with session(node.cfg) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_nothing_is_kept_for_a_server_behind_a_proxy(node):
    proxied = node.cfg.model_copy(update={"behind_proxy": True})
    with session(proxied) as c:
        first = _pid(c)
    with session(proxied) as c:
        assert _pid(c) != first
