"""Table locks on a live primary, taken without stalling the application's writes.

A reconcile (failback, split brain, row recovery, data sync) locks the tables it writes in
SHARE ROW EXCLUSIVE mode: a decision is only right against the survivor row it was made
against. On the survivor, the region's live primary, a plain ``LOCK TABLE`` waits behind any
transaction writing those tables (a batch job, a long migration), and while it waits every
later writer queues behind it: the application's writes stop for as long as the batch runs,
an outage the DR runbook caused. So the lock is asked for in short tries (``lock_timeout``),
each in a savepoint, with a pause between them in which the queue drains. Past its patience
the caller gets ``TablesBusy``, naming the sessions in the way (pid, application, user, how
long their transaction has run; never their query, which can hold data), and its activity
retries later. Deadlocks are avoided the same way: every table at once, in one statement.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import tuple_row

log = structlog.get_logger(__name__)

# Long enough to take a lock behind ordinary short transactions (the request waits only for
# the transactions holding the table when it is made), short enough that the application's
# writes queued behind it wait no longer than this.
LOCK_TRY = 0.5
# The longest pause between tries: behind a long batch, the application's writes can stall
# for LOCK_TRY in every LOCK_TRY + PAUSE_MAX, a tenth of the time, never for the batch's length.
PAUSE_MAX = 4.5
# Then the activity fails and Temporal retries it (its retry policy spaces the attempts).
LOCK_PATIENCE = 300.0
# The modes that conflict with SHARE ROW EXCLUSIVE (PostgreSQL's lock conflict table).
_CONFLICTING = ("RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
                "ExclusiveLock", "AccessExclusiveLock")


class TablesBusy(RuntimeError):
    """The tables could not be locked within the patience: other sessions hold them."""


def lock_tables(conn: psycopg.Connection, tables: Sequence[sql.Composable], *, lock_try: float = LOCK_TRY,
                patience: float = LOCK_PATIENCE) -> None:
    """SHARE ROW EXCLUSIVE on every table of ``tables`` (identifiers), held by the caller's
    open transaction to its end. The session's own ``lock_timeout`` is left as it was."""
    if not tables:
        return
    statement = sql.SQL("lock table {} in share row exclusive mode").format(sql.SQL(", ").join(tables))
    started = time.monotonic()
    pause = 0.05
    tries = 0
    while True:
        tries += 1
        try:
            # A savepoint: the try that times out aborts it, not the caller's transaction, and the
            # setting goes with it. One that succeeds keeps the locks in the enclosing transaction;
            # its setting is put back right after.
            with conn.transaction():
                cur = conn.cursor(row_factory=tuple_row)  # whatever rows the caller's connection makes
                previous = cur.execute("select current_setting('lock_timeout')").fetchone()[0]
                conn.execute("select set_config('lock_timeout', %s, true)", (f"{max(1, int(lock_try * 1000))}ms",))
                conn.execute(statement)
                conn.execute("select set_config('lock_timeout', %s, true)", (previous,))
            if tries > 1:
                log.info("tables locked", tries=tries, waited_s=round(time.monotonic() - started, 3))
            return
        except psycopg.errors.LockNotAvailable:
            held = _holders(conn, tables)
            waited = time.monotonic() - started
            if waited + pause >= patience:
                raise TablesBusy(
                    f"could not lock {_names(conn, tables)} in {waited:.0f}s ({tries} tries of {lock_try:g}s, so as "
                    f"never to queue the application's writes behind the lock): "
                    f"{'; '.join(held) or 'the sessions holding them finished between tries'}. "
                    "Nothing was written; the step is retried.") from None
            log.warning("tables busy, waiting", tables=_names(conn, tables), held_by=held, tries=tries,
                        waited_s=round(waited, 3))
            # Jittered: two reconciles (or a reconcile and a migration) must not retry in step.
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, PAUSE_MAX)


def _names(conn: psycopg.Connection, tables: Sequence[sql.Composable]) -> str:
    return ", ".join(t.as_string(conn) for t in tables)


def _holders(conn: psycopg.Connection, tables: Sequence[sql.Composable]) -> list[str]:
    """Who holds a lock on ``tables`` that the reconcile's conflicts with, one line each."""
    cur = conn.cursor(row_factory=tuple_row)
    oids = [cur.execute(sql.SQL("select to_regclass({})::oid").format(sql.Literal(t.as_string(conn)))).fetchone()[0]
            for t in tables]
    rows = cur.execute(
        "select l.relation::regclass::text, a.pid, coalesce(nullif(a.application_name, ''), '?'), a.usename,"
        " a.state, extract(epoch from clock_timestamp() - a.xact_start)::int"
        " from pg_locks l join pg_stat_activity a on a.pid = l.pid"
        " where l.locktype = 'relation' and l.granted and l.relation = any(%s::oid[]) and l.mode = any(%s)"
        " and l.pid <> pg_backend_pid() order by 1, 2", ([o for o in oids if o is not None], list(_CONFLICTING))
    ).fetchall()
    return [f"{table} held by pid {pid} ({app}, user {user}, {state}, transaction open {age}s)"
            for table, pid, app, user, state, age in rows]
