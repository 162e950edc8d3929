"""Table locks on a live primary, taken without stalling the application's writes.

A reconcile (failback, split brain, row recovery, data sync) locks the tables it writes in
SHARE ROW EXCLUSIVE mode: a decision is only right against the survivor row it was made
against. On the survivor, the region's live primary, a plain ``LOCK TABLE`` waits behind any
transaction writing those tables (a batch job, a long migration), and while it waits every
later writer queues behind it: the application's writes stop for as long as the batch runs,
an outage the DR runbook caused. So the lock is asked for in short tries, each in a
savepoint and bounded as a whole statement (``statement_timeout``: ``lock_timeout`` bounds
each table's wait, and the tables already granted would hold the writers while the next one
is waited for), with a pause between them in which the queue drains. Past its patience the
caller gets ``TablesBusy``, naming the sessions in the way (pid, application, user, how long
their transaction has run; never their query, which can hold data), and its activity
retries later. Deadlocks are avoided the same way: every table at once, in one statement.

An autovacuum in the way is cancelled, as PostgreSQL itself cancels one that blocks a lock
request (after ``deadlock_timeout``, which a short try never reaches): left alone, a long
autovacuum of a busy table would outlast every try. One that prevents wraparound is left
to finish, as PostgreSQL leaves it.

Once the tables are locked, a write can still wait for a row lock: SELECT ... FOR UPDATE (or
FOR KEY SHARE, which a write to a table referencing the row takes) is compatible with our
table lock, and an application can hold one for as long as its transaction runs. Every
writer of the locked tables queues behind our lock meanwhile. ``in_bounded_waits`` runs the
whole locked transaction with every lock wait bounded (``lock_timeout``): a wait past the
bound rolls it all back, the table locks included, so the queue drains, and it runs again
after a pause, with a longer bound, until its patience.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import psycopg
import structlog
from psycopg import pq, sql
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
# The longest one statement of a locked transaction first waits for a lock (a row lock an
# application holds): the application's writers of the locked tables wait that long more.
# Below PostgreSQL's default deadlock_timeout (1 s): in a deadlock with an application that
# holds a row and queued behind our table lock, our try is the one to end, not its transaction.
ROW_WAIT = 0.5
ROW_WAIT_MAX = 4.0
# The modes that conflict with SHARE ROW EXCLUSIVE (PostgreSQL's lock conflict table).
_CONFLICTING = ("RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
                "ExclusiveLock", "AccessExclusiveLock")
# Sessions named in an error or a log line; a busy primary can have hundreds writing a table.
_NAMED = 10
# What a try that did not get every lock in time ends with: its lock wait, the statement's
# bound, or a deadlock PostgreSQL broke (a DBA's deadlock_timeout below the try): all retried.
_TRY_FAILED = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled, psycopg.errors.DeadlockDetected)
# What a locked transaction that waited too long for a row ends with: its lock_timeout, or a
# deadlock with the application (which waits for our table lock while holding the row).
_WAIT_FAILED = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)
T = TypeVar("T")


# What lock_tables waited in the current try of in_bounded_waits (this thread's): a try that
# ends later loses that wait too. Set to 0 at each try; outside one, what is left is read by no one.
_table_waits = threading.local()


class TablesBusy(RuntimeError):
    """The tables could not be locked within the patience: other sessions hold them."""


def lock_tables(conn: psycopg.Connection, tables: Sequence[sql.Composable], *, lock_try: float = LOCK_TRY,
                patience: float = LOCK_PATIENCE) -> None:
    """SHARE ROW EXCLUSIVE on every table of ``tables`` (identifiers), held by the caller's
    open transaction to its end. The session's own settings are left as they were."""
    if not tables:
        return
    if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
        # A savepoint of nothing would be a transaction of its own, committed (and the locks
        # released) the moment this returned.
        raise RuntimeError("lock_tables needs the caller's open transaction to hold the locks in")
    cur = conn.cursor(row_factory=tuple_row)  # whatever rows the caller's connection makes
    # The pauses leave the caller's transaction idle: a server's idle-in-transaction timeout
    # must not end the session between two tries.
    cur.execute("select set_config('idle_in_transaction_session_timeout', '0', true)")
    statement = sql.SQL("lock table {} in share row exclusive mode").format(sql.SQL(", ").join(tables))
    bound = f"{max(1, int(lock_try * 1000))}ms"
    started = time.monotonic()
    pause = 0.05
    tries = 0
    while True:
        tries += 1
        try:
            # A savepoint: the try that fails aborts it, not the caller's transaction, and the
            # settings go with it. One that succeeds keeps the locks in the enclosing
            # transaction; its settings are put back right after.
            with conn.transaction():
                previous = cur.execute("select current_setting('lock_timeout'),"
                                       " current_setting('statement_timeout')").fetchone()
                cur.execute("select set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                            (bound, bound))
                cur.execute(statement)
                cur.execute("select set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                            previous)
            waited = time.monotonic() - started
            if (spent := getattr(_table_waits, "seconds", None)) is not None:
                _table_waits.seconds = spent + waited
            if tries > 1:
                log.info("tables locked", tries=tries, waited_s=round(waited, 3))
            return
        except _TRY_FAILED:
            in_the_way = _in_the_way(conn, tables)
            held = _describe(in_the_way)
            _cancel_autovacuum(conn, in_the_way)
            waited = time.monotonic() - started
            if waited + pause >= patience:
                raise TablesBusy(
                    f"could not lock {_names(conn, tables)} in {waited:.0f}s ({tries} tries of {lock_try:g}s, so as "
                    f"never to queue the application's writes behind the lock): "
                    f"{'; '.join(held) or 'the sessions holding them finished between tries'}. "
                    "Nothing was written; Temporal retries the step as its retry policy allows.") from None
            log.warning("tables busy, waiting", tables=_names(conn, tables), held_by=held, tries=tries,
                        waited_s=round(waited, 3))
            # Jittered: two reconciles (or a reconcile and a migration) must not retry in step.
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, PAUSE_MAX)


def in_bounded_waits(conn: psycopg.Connection, body: Callable[[float], T], tables: Sequence[sql.Composable], *,
                     force_rollback: bool = False, row_wait: float = ROW_WAIT,
                     patience: float = LOCK_PATIENCE) -> T:
    """``body(lock_patience)`` (which locks ``tables`` with ``lock_tables``, given the
    patience left, and writes them) in a transaction of its own on ``conn``, committed unless
    ``force_rollback``. A lock wait past ``row_wait`` (doubled at each try, up to
    ``ROW_WAIT_MAX``), or a deadlock, rolls the whole transaction back and runs ``body`` again
    after a pause. The patience counts what the tries lost (their bounds, the pauses) and
    what their table locks waited; past it, ``TablesBusy``. ``body`` must be safe to run
    again: nothing of a rolled-back attempt stays but the sequences it advanced."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        # A savepoint's rollback would keep the table locks: the queue would not drain.
        raise RuntimeError("in_bounded_waits needs a connection outside any transaction")
    cur = conn.cursor(row_factory=tuple_row)
    lost = 0.0
    pause = 0.05
    ended: dict[str, int] = {}
    while True:
        _table_waits.seconds = 0.0
        try:
            with conn.transaction(force_rollback=force_rollback):
                # Local: lock_tables' tries set their own bound and put this one back.
                cur.execute("select set_config('lock_timeout', %s, true)", (f"{max(1, int(row_wait * 1000))}ms",))
                result = body(patience - lost)
            if ended:
                log.info("locked transaction done", tries=sum(ended.values()) + 1, lost_s=round(lost, 3))
            return result
        except _WAIT_FAILED as e:
            # Rolled back: our table locks are gone and the application's writers go on. Who
            # held rows is looked up now, best effort: the holder may have finished since.
            held = _describe([r for r in cur.execute(_IN_THE_WAY, (_oids(cur, conn, tables), ["RowShareLock"]))
                              if r[2]])
            why = "a deadlock" if isinstance(e, psycopg.errors.DeadlockDetected) else f"a lock wait past {row_wait:g}s"
            ended[why] = ended.get(why, 0) + 1
            # The try's bound, the pause to come, and what its table locks waited (each try
            # waits for them again: without it, tries that each waited most of the patience
            # for the tables, then ended on a row, ran for the patience many times over).
            lost += row_wait + pause + _table_waits.seconds
            tries = ", ".join(f"{n} by {w}" for w, n in ended.items())
            if lost >= patience:
                raise TablesBusy(
                    f"could not write {_names(conn, tables)}: {sum(ended.values())} tries ended ({tries}) and were "
                    "rolled back, so as never to queue the application's writes behind the table locks while a "
                    "write waited; sessions holding row locks on them just after the last: "
                    f"{'; '.join(held) or 'none (or the wait was on a table a foreign key refers to)'}. "
                    "Nothing was written (sequences may have advanced); Temporal retries the step as its retry "
                    "policy allows.") from None
            log.warning("rows busy, rolled back to wait", tables=_names(conn, tables), tries=tries,
                        row_locks_by=held, lost_s=round(lost, 3))
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, PAUSE_MAX)
            # A holder that keeps its rows a little longer than the bound, every time, would
            # otherwise end every try: give it longer, up to a few seconds.
            row_wait = min(row_wait * 2, ROW_WAIT_MAX)


def _names(conn: psycopg.Connection, tables: Sequence[sql.Composable]) -> str:
    return ", ".join(t.as_string(conn) for t in tables)


def _oids(cur: psycopg.Cursor, conn: psycopg.Connection, tables: Sequence[sql.Composable]) -> list[int]:
    got = [cur.execute(sql.SQL("select to_regclass({})::oid").format(sql.Literal(t.as_string(conn)))).fetchone()[0]
           for t in tables]
    return [o for o in got if o is not None]


# Locks on the tables, or on their partitions and inheritance children (LOCK takes those
# too), in this database, held or queued ahead, in a mode that conflicts with ours.
_IN_THE_WAY = """
with recursive t(oid) as (select unnest(%s::oid[]) union select i.inhrelid from pg_inherits i join t on i.inhparent = t.oid)
select l.relation::regclass::text, l.pid, l.granted, coalesce(nullif(a.application_name, ''), '?'),
       coalesce(a.usename::text, '?'), coalesce(a.backend_type, '?'),
       coalesce(extract(epoch from clock_timestamp() - a.xact_start)::int::text, '?'),
       a.query like 'autovacuum:%%' and a.query not like '%%(to prevent wraparound)%%'
from pg_locks l left join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'relation' and l.database = (select oid from pg_database where datname = current_database())
  and l.relation in (select oid from t) and l.mode = any(%s) and l.pid is distinct from pg_backend_pid()
order by l.granted desc, 1, 2"""


def _in_the_way(conn: psycopg.Connection, tables: Sequence[sql.Composable]) -> list[tuple]:
    cur = conn.cursor(row_factory=tuple_row)
    return cur.execute(_IN_THE_WAY, (_oids(cur, conn, tables), list(_CONFLICTING))).fetchall()


def _describe(rows: list[tuple]) -> list[str]:
    """Who holds (or waits ahead for) a lock on the tables that ours conflicts with."""
    out = []
    for table, pid, granted, app, user, kind, age, _ in rows[:_NAMED]:
        who = ("a prepared transaction (pg_prepared_xacts)" if pid is None else
               f"pid {pid} ({app}, user {user}, {kind}, transaction open {age}s)")
        out.append(f"{table} {'held' if granted else 'queued ahead'} by {who}")
    if len(rows) > _NAMED:
        out.append(f"and {len(rows) - _NAMED} more")
    return out


def _cancel_autovacuum(conn: psycopg.Connection, rows: list[tuple]) -> None:
    cur = conn.cursor(row_factory=tuple_row)
    for table, pid, granted, *_, cancellable in rows:
        if not (granted and cancellable and pid is not None):
            continue
        try:
            with conn.transaction():  # a refusal must not abort the caller's transaction
                cancelled = cur.execute("select pg_cancel_backend(%s)", (pid,)).fetchone()[0]
        except psycopg.errors.InsufficientPrivilege:
            cancelled = False  # not a superuser: it stays named among the holders
        log.warning("autovacuum in the way of the reconcile's lock", table=table, pid=pid, cancelled=cancelled)
