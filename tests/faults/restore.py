"""Back to the reference topology after a fault, whatever the run left: the configured primary
region (us-east-1) primary and writable, the other streaming from it, Redis master there and
replica in the other region, every Sentinel agreeing, routing on the primary, every process up.

The runbooks do the moving (switchover, failback keep what can be kept); only what they
refuse to touch is repaired by hand, the way an operator following their repair lines would.
The session's other tests share this lab and expect exactly that shape.
"""

from __future__ import annotations

import asyncio
import uuid

from activities.postgres.ctl import FENCE_MARKER, PgCtl, PgCtlError
from activities.postgres.fence import lift_stop_fence, unfence
from activities.postgres.status import pg_status
from activities.redis import failover as redis_failover
from activities.redis.status import redis_status
from eagle_dr.devserver import DevServer
from eagle_dr.launch import start_move
from tests.faults.invariants import pg_takes_writes
from tests.lab_helpers import _async, _until
from workflows.failback import FailbackInput, FailbackWorkflow
from workflows.models import SwitchoverInput
from workflows.runbook import move_id
from workflows.split_brain import SplitBrainInput, SplitBrainWorkflow


def _streams_from(lab, standby: str, primary: str) -> bool:
    st = pg_status(lab.cfg.region(standby).postgres)
    up = lab.cfg.region(primary).postgres
    return st.role == "standby" and st.receiver_status == "streaming" and st.upstream == f"{up.host}:{up.port}"


def _writable(lab) -> list[str]:
    return [r.name for r in lab.cfg.regions if pg_takes_writes(lab, r.name)[0]]


async def processes_up(lab) -> list[str]:
    """Every process a fault may have killed: the dev server, workers, the regions' servers.
    Returns what would not start (a diverged old primary held as a standby refuses to: its
    WAL runs past the fork; failback rewinds it)."""
    await asyncio.to_thread(DevServer(lab.cfg).up)
    failed = []
    for r in lab.cfg.regions:
        lab.redis(r.name).start()
        pg = lab.postgres(r.name)
        if not pg.running():
            try:
                pg.start()  # a stop-fenced PostgreSQL comes back a standby of nothing: safe
            except PgCtlError as e:
                failed.append(f"{r.name}: {str(e).splitlines()[0]}")
    for _place, sentinel in lab.sentinels():
        sentinel.start()
    lab.start_workers()
    lab.repoint_sentinels()
    return failed


def _lift_every_fence(lab, region: str) -> None:
    pg = lab.cfg.region(region).postgres
    if (PgCtl(pg).data_dir / FENCE_MARKER).exists():
        lift_stop_fence(pg)
    try:
        unfence(pg)
    except Exception:  # noqa: BLE001 - not fenced read-only, or a standby: nothing to lift
        pass


async def _wait_writable(lab, region: str) -> None:
    await _until(_async(lambda: region in _writable(lab)), 60, f"{region} to take writes")


async def restore_reference(lab, client) -> list[str]:
    """Returns what had to be done (for the report)."""
    home, other = lab.cfg.primary.name, lab.cfg.secondary.name
    done: list[str] = []
    done += [f"would not start: {x}" for x in await processes_up(lab)]
    writable = _writable(lab)
    if len(writable) == 2:
        # Two writable primaries (a forced failover's old primary came back, or a run left a
        # split): resolve it with the runbook, which keeps both sides' writes.
        try:
            res = await client.execute_workflow(
                SplitBrainWorkflow.run, SplitBrainInput(service=lab.cfg.service, reason="fault suite: restore"),
                id=move_id(lab.cfg.service), task_queue=lab.cfg.temporal.control_task_queue)
            done.append(f"split brain resolved: {res.outcome}")
        except Exception as e:  # noqa: BLE001 - the lab must come back all the same
            done.append(f"split-brain resolution failed ({type(e).__name__}); {other} rebuilt from {home}")
            lab.rebuild_standby(other)
        writable = _writable(lab)
    if len(writable) == 1 and writable[0] != home:
        # A degraded run may have left Redis behind PostgreSQL (its repair line says how):
        # the switch back refuses to start unless Redis follows the primary.
        done += _redis_home(lab, writable[0], home)

    if writable == [home] and _streams_from(lab, other, home):
        pass
    elif writable == [other] and _streams_from(lab, home, other):
        await _switch(lab, client, home)
        done.append(f"switchover to {home}")
    elif writable == [other]:
        # The old primary diverged, or is fenced, or stopped: failback keeps what it had.
        try:
            report = await client.execute_workflow(
                FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=home),
                id=f"fault-restore-failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
            done.append(f"failback to {home}: {report.outcome}")
        except Exception as e:  # noqa: BLE001 - the lab must come back all the same
            done.append(f"failback failed ({type(e).__name__}); {home} rebuilt from {other}")
            lab.rebuild_standby(home)
            await _until(_async(lambda: _streams_from(lab, home, other)), 120, f"{home} to stream")
            await _switch(lab, client, home)
        if _writable(lab) != [home]:
            done += _redis_home(lab, other, home)
            await _switch(lab, client, home)
    elif writable == [home]:
        if not _streams_from(lab, other, home):
            done.append(f"{other} rebuilt from {home}")
            lab.rebuild_standby(other)
    else:
        # Both fenced or stopped: the home region's own data is the reference; lift its fences.
        done.append(f"fences on {home} lifted by hand")
        _lift_every_fence(lab, home)
        await _wait_writable(lab, home)
        if not _streams_from(lab, other, home):
            done.append(f"{other} rebuilt from {home}")
            lab.rebuild_standby(other)

    await _until(_async(lambda: _streams_from(lab, other, home)), 120, f"{other} to stream from {home}")
    done += _redis_home(lab, home, other)
    if lab.router.active_region() != home:
        lab.router.set_active_region(home)
        done.append(f"routing set to {home} by hand")
    await asyncio.to_thread(lab.wait_replication, 120)
    return done


async def _switch(lab, client, region: str) -> None:
    await _until(_async(lambda: _streams_from(lab, region, lab.cfg.other(region).name)), 120,
                 f"{region} to stream before the switch")
    res = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service,
                                                                   target_region=region))).result()
    if res.outcome not in ("succeeded", "degraded"):
        raise AssertionError(f"restoring switchover to {region}: {res.outcome}")


def _redis_home(lab, home: str, other: str) -> list[str]:
    done = []
    h, o = lab.cfg.region(home).redis, lab.cfg.region(other).redis
    if redis_status(h).role != "master":
        redis_failover.promote(h)
        done.append(f"{home}'s Redis promoted by hand")
    redis_failover.unfence(h)
    st = redis_status(o)
    if st.role != "slave" or st.master != f"{h.host}:{h.port}":
        redis_failover.demote(o, h)
        done.append(f"{other}'s Redis re-attached by hand")
    lab.repoint_sentinels()
    return done
