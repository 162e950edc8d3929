"""Small helpers the lab-driven runbook tests share: who is primary, polling with a deadline,
a workflow's progress, a postmaster's auxiliary processes."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager, contextmanager

import psycopg

from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from workflows.failback import FailbackInput, FailbackWorkflow
from workflows.models import FailoverInput, Progress


def _names(lab):
    """(the region whose PostgreSQL is primary now, the other): what a test means by "the
    primary", whichever region the tests before it left primary."""
    a = _primary(lab)
    return a, lab.cfg.other(a).name


def _primary(lab) -> str:
    return next(r.name for r in lab.cfg.regions if pg_status(r.postgres).role == "primary")



def _resume(pids) -> None:
    """SIGCONT every process a test froze, whichever of them has ended meanwhile: nothing stays
    stopped for the tests after."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


async def _until(pred, timeout: float, what: str, interval: float = 0.05):
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await pred()
        if v:
            return v
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


async def _progress(handle):
    try:
        return await handle.query("progress", result_type=Progress)
    except Exception:  # noqa: BLE001 - not started yet
        return None


async def _awaiting(handle):
    p = await _progress(handle)
    return p is not None and p.awaiting_approval


def _aux_pid(lab, region: str, name: bytes) -> int:
    pid = lab.postgres(region).aux_pid(name)
    if pid is None:
        raise AssertionError(f"no {name.decode()} process under {region}'s postmaster")
    return pid


def _startup_pid(lab, region: str) -> int:
    """The standby's startup (WAL replay) process: SIGSTOP it to make replay lag."""
    return _aux_pid(lab, region, b"startup")


def _hold_pg_rewind(data_dir: str, timeout: float = 120) -> int | None:
    """SIGSTOP the first pg_rewind that copies into ``data_dir`` (polled until ``timeout``), so a
    test can act while a rewind is in flight; returns its pid (SIGCONT it), None if none ran."""
    from activities.postgres.rewind import copiers

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in copiers(data_dir):
            os.kill(pid, signal.SIGSTOP)
            return pid
    return None


@contextmanager
def _live_writes_on_a_trailing_standby(lab, primary: str, *statements: tuple[str, tuple]):
    """While inside: a thread runs ``statements`` (query, parameters: fixed, or a function of
    the round number) on the primary round after round, and the standby's startup process runs
    10 ms in every 50 (SIGSTOP/SIGCONT), so the primary is always ahead by some writes when the
    standby is read. Yields a one-item list: the rounds written so far (a test asserts writes
    happened while it compared)."""
    import threading

    stop = threading.Event()
    writes = [0]

    def writer():
        with _pg(lab, primary) as c:
            i = 0
            while not stop.is_set():
                i += 1
                for q, params in statements:
                    c.execute(q, params(i) if callable(params) else params)
                writes[0] += 1

    def slow_replay():
        pid = _startup_pid(lab, lab.cfg.other(primary).name)
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            stop.wait(0.04)
            os.kill(pid, signal.SIGCONT)
            stop.wait(0.01)
        os.kill(pid, signal.SIGCONT)

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, slow_replay)]
    for t in threads:
        t.start()
    try:
        yield writes
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def _lag_bytes(lab, primary: str) -> int:
    st = pg_status(lab.cfg.region(primary).postgres)
    return max((x.lag_bytes or 0) for x in st.replicas) if st.replicas else 0


def _async(fn):
    async def run():
        return fn()
    return run


# -- a fork between the regions, as an outage makes one ------------------------------------


def _pg(lab, region: str, db: str | None = None) -> psycopg.Connection:
    return psycopg.connect(lab.cfg.region(region).postgres.dsn(db), autocommit=True)


def _exec(lab, region: str, *statements) -> None:
    with _pg(lab, region) as conn:
        for s in statements:
            conn.execute(*s) if isinstance(s, tuple) else conn.execute(s)


async def _fork(lab, client, old_writes) -> tuple[str, str]:
    """The standby stops receiving, the primary commits ``old_writes``, the primary's region
    dies, failover; then the old primary comes back writable and diverged."""
    old = _primary(lab)
    new = lab.cfg.other(old).name
    # A snapshot of the running transactions (logged at every checkpoint, and every 15 s of
    # activity) before the fork, which failback's WAL reading needs to read only the divergence:
    # a primary promoted by the test before may have none on its timeline yet, and failback then
    # rightly reads every table in full (CI saw that once as a flaky read_mode "full").
    _exec(lab, old, "checkpoint")
    await _until(_async(lambda: _lag_bytes(lab, old) == 0), 30, "the standby to catch up")
    receiver = _aux_pid(lab, new, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    _exec(lab, old, *old_writes)
    lab.kill_region(old)
    startup_before = _startup_pid(lab, new)
    os.kill(receiver, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return _startup_pid(lab, new) != startup_before and \
                pg_status(lab.cfg.region(new).postgres).role == "standby"
        except AssertionError:
            return False

    await _until(_async(restarted), 60, "the standby to restart and accept connections")
    failover = await (await start_move(client, lab.cfg, FailoverInput(
        service=lab.cfg.service, target_region=new, reason="fork test", force=True))).result()
    assert failover.outcome == "succeeded", failover
    lab.heal_region(old)
    return old, new


async def _failback(lab, client, region: str, **kw):
    return await client.execute_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=region,
                                                                             **kw),
                                         id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)


# -- a worker's Prometheus endpoint ---------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@asynccontextmanager
async def _left_as_found(handle, postmaster: int):
    """However the test ends: the primary's postmaster continued (a test SIGSTOPs it) and the
    workflow watching it (a monitor) terminated. Either, left behind, would move the lab under
    the tests after it."""
    try:
        yield
    finally:
        os.kill(postmaster, signal.SIGCONT)
        try:
            await handle.terminate("test over")
        except Exception:  # noqa: BLE001 - already ended
            pass
