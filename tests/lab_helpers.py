"""Small helpers the lab-driven runbook tests share: who is primary, polling with a deadline,
a workflow's progress, a postmaster's auxiliary processes."""

from __future__ import annotations

import time

from activities.postgres.status import pg_status
from workflows.models import Progress


def _names(lab):
    return lab.cfg.primary.name, lab.cfg.secondary.name


def _primary(lab) -> str:
    return next(r.name for r in lab.cfg.regions if pg_status(r.postgres).role == "primary")


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


def _lag_bytes(lab, primary: str) -> int:
    st = pg_status(lab.cfg.region(primary).postgres)
    return max((x.lag_bytes or 0) for x in st.replicas) if st.replicas else 0


def _async(fn):
    async def run():
        return fn()
    return run
