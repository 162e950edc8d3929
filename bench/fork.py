"""Filling the bench lab with data and forking it the way a real outage does, for the failback
benchmark (the same recipe as tests/test_runbooks.py's failback test, at a bench's size):

the standby's walreceiver is stopped, so what the old primary commits next never reaches it;
the old primary writes; its region is killed (kill -9); the walreceiver is killed with what it
buffered; eagle-dr fails over to the standby; the new primary writes; the old region comes
back, writable and diverged. Writes on both sides include updates of the same rows (conflicts).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psycopg

from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from eagle_dr.temporal import poller_ages
from lab.lab import Lab
from workflows.models import FailoverInput

# Bytes per alerts row with a 400-byte pad (jsonb payload, tuple header, index entry), measured
# on PostgreSQL 15: sizes the post-fork writes.
ROW_BYTES = 560
# ~55 MB a batch: the fill overshoots its target by less than that.
BATCH_ROWS = 100_000
# Post-fork rows carry ids far above the fill's.
FORK_IDS = 10**12


def _dsn(lab: Lab, region: str) -> str:
    return lab.cfg.region(region).postgres.dsn()


def db_bytes(lab: Lab, region: str) -> int:
    with psycopg.connect(_dsn(lab, region), autocommit=True) as conn:
        return conn.execute("select pg_database_size(current_database())").fetchone()[0]


def fill(lab: Lab, region: str, gb: float) -> int:
    """Seed alerts until the database holds ``gb`` GiB. The rows are a day old, as most of a
    real database is: failback only extracts rows changed around the fork, so seeding them
    "now" would make it reconcile the whole table. Returns the rows written."""
    target = int(gb * 1024**3)
    written = 0
    with psycopg.connect(_dsn(lab, region), autocommit=True) as conn:
        while conn.execute("select pg_database_size(current_database())").fetchone()[0] < target:
            # Batches of their own transactions: WAL is recycled and streamed as it goes.
            conn.execute(
                "insert into alerts (id, region, payload, created_at, updated_at) "
                "select g, 'seed', jsonb_build_object('severity', 'info', 'pad', repeat('x', 400)), "
                "now() - interval '1 day', now() - interval '1 day' "
                "from generate_series(%s::bigint, %s::bigint) g", (written + 1, written + BATCH_ROWS))
            written += BATCH_ROWS
        settle(conn)
    return written


def settle(conn: psycopg.Connection, timeout: float = 60) -> None:
    """Make the freshly loaded rows look like a steady-state database's, on both sides.

    Rows just inserted carry no hint bits, and the standby never gets the ones the primary
    sets on pages already dirty. After a failover, the first full read of such a table (the
    failback's reconcile reads every key) sets them all, and ``wal_log_hints`` turns that into
    a full-page image per page: ~175 MB of WAL seen on a 1 GiB table, enough to push the fork's
    WAL out of ``wal_keep_size``, and blocks pg_rewind must copy. Frozen rows need no hint
    bits, and freezing is WAL-logged, so it reaches the standby."""
    xid = conn.execute("select txid_current()").fetchone()[0]
    deadline = time.monotonic() + timeout
    # With hot_standby_feedback, VACUUM cannot freeze rows the standby's reported xmin may
    # still need: wait until that xmin has passed the load.
    while conn.execute("select coalesce(bool_and(xmin is null or xmin::text::bigint > %s), true) "
                       "from pg_replication_slots", (xid % 2**32,)).fetchone()[0] is not True:
        if time.monotonic() > deadline:
            raise TimeoutError("the standby's xmin did not pass the load")
        time.sleep(0.2)
    conn.execute("vacuum (freeze, analyze) alerts")
    conn.execute("checkpoint")


def lag_bytes(lab: Lab, primary: str) -> int | None:
    st = pg_status(lab.cfg.region(primary).postgres)
    return max((x.lag_bytes or 0) for x in st.replicas) if st.replicas else None


async def until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def write_side(lab: Lab, region: str, mb: float, seed_rows: int, tag: str) -> None:
    """About ``mb`` MB of new alerts, plus updates of the first 1000 seed rows (both sides
    update the same ones: those are the conflicts) and, on the old primary, deletes of 100."""
    rows = max(1, int(mb * 1024**2 / ROW_BYTES))
    base = FORK_IDS * (2 if tag == "old" else 3) + int(time.time()) * 10**5
    with psycopg.connect(_dsn(lab, region), autocommit=True) as conn:
        conn.execute("insert into alerts (id, region, payload) select g, %s, "
                     "jsonb_build_object('side', %s::text, 'pad', repeat('y', 400)) "
                     "from generate_series(%s::bigint, %s::bigint) g", (region, tag, base, base + rows - 1))
        conn.execute("update alerts set payload = payload || jsonb_build_object('side', %s::text) "
                     "where id between 1 and %s", (tag, min(1000, seed_rows)))
        if tag == "old" and seed_rows > 2000:
            conn.execute("delete from alerts where id between 1001 and 1100")


async def fork(lab: Lab, client, old: str, mb: float, seed_rows: int) -> str:
    """Fork the lab (see the module's doc); returns the new primary. The old region is running
    again when this returns, writable and diverged."""
    new = lab.cfg.other(old).name
    await until(lambda: lag_bytes(lab, old) == 0, 300, "the standby to catch up")
    with psycopg.connect(_dsn(lab, old), autocommit=True) as conn:
        # Every run forks right after a checkpoint, so rewinds copy what the fork changed only.
        conn.execute("checkpoint")
    await until(lambda: lag_bytes(lab, old) == 0, 60, "the standby to replay the checkpoint")
    with psycopg.connect(_dsn(lab, new), autocommit=True) as conn:
        # And a restartpoint on the standby: after the bulk fill its restartpoints lag far behind,
        # so the crash-restart below would redo ~1 GB and leave a spread restartpoint running
        # into the failback, whose CHECKPOINT before pg_rewind then waits for it (seen: ~2.7 s).
        # A database in steady state has neither; without this the first fork is not like the second.
        conn.execute("checkpoint")
    receiver = lab.postgres(new).aux_pid(b"walreceiver")
    if receiver is None:
        raise RuntimeError(f"{new} has no walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    write_side(lab, old, mb, seed_rows, "old")
    before = await _pollers(client, lab.cfg.region(old).temporal.task_queue)
    lab.kill_region(old)
    startup_before = lab.postgres(new).aux_pid(b"startup")
    os.kill(receiver, signal.SIGKILL)  # with what it buffered: those bytes stay unreceived

    def restarted() -> bool:
        # A killed walreceiver restarts the standby's processes: wait for a new startup process.
        try:
            return lab.postgres(new).aux_pid(b"startup") not in (None, startup_before) and \
                pg_status(lab.cfg.region(new).postgres).role == "standby"
        except Exception:  # noqa: BLE001 - not accepting connections yet
            return False

    await until(restarted, 120, f"{new} to restart as a standby")
    failover = await (await start_move(client, lab.cfg, FailoverInput(
        service=lab.cfg.service, target_region=new, reason="bench: fork for failback"))).result()
    if failover.outcome != "succeeded":
        raise RuntimeError(f"failover to {new}: {failover.outcome}")
    write_side(lab, new, mb, seed_rows, "new")
    lab.heal_region(old)
    # Back means its worker polls again: a failback started before that waits for its first
    # poll (~1 s seen in the preflight), which only a bench that kills the worker pays.
    queue = lab.cfg.region(old).temporal.task_queue

    async def polling() -> bool:
        return bool(await _pollers(client, queue) - before)

    deadline = time.monotonic() + 60
    while not await polling():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{old}'s worker did not poll {queue} within 60 s of the heal")
        await asyncio.sleep(0.05)
    return new


async def _pollers(client, queue: str) -> set[str]:
    """Identities of the workers that polled ``queue``'s activity tasks (the killed one's stays
    listed a while: a new identity is the restarted worker)."""
    return set(await poller_ages(client, queue, workflow=False))
