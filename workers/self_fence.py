"""Self-fencing: a regional worker that is cut off from everyone fences its own primary.

A partitioned region's PostgreSQL stays a writable primary for every client inside the
partition, and the runbooks cannot reach it to fence it: the quorum fails over to the other
region, and two primaries take writes until the partition heals. Patroni's answer is its
leader lease: a primary that cannot renew its key in the DCS demotes itself. Ours is the
same idea with the contacts a regional worker has. It checks, every ``check_every``:

- Temporal (a GetSystemInfo call): the orchestrator that would run a failover;
- every other region's PostgreSQL (a ``select 1``): the other side of a partition.

Either answering is contact (Patroni's failsafe mode: a control-plane outage alone must not
take the whole service read-only). With no contact for ``health.self_fence_after``, and the
local PostgreSQL a primary, it puts the read-only fence on it (activities/postgres/fence.py:
new sessions refused, every session ended). A failover that could not fence an old primary
it found unreachable by timeout waits the same bound (workflows/failover.py), so by the time
the standby is promoted the old primary has fenced itself.

When contact comes back, its own fence is lifted only when nothing else may have happened
meanwhile: Temporal answers, no move (``dr-move-<service>``) is running or has started since
the fence went on, and the local PostgreSQL is still a primary. Otherwise the fence stays for
the runbooks (failback rewinds this node; split brain resolves it), and the worker logs why.
A worker that restarts forgets its own fence and leaves it in place: that is the safe side.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg

from activities.postgres.fence import fence_read_only, unfence
from activities.postgres.status import connect as pg_connect
from eagle_dr import logs
from eagle_dr.config import EagleConfig


@dataclass
class Contact:
    temporal: bool
    peers: dict[str, bool]

    @property
    def any(self) -> bool:
        return self.temporal or any(self.peers.values())


def _peer_answers(cfg, timeout: float) -> bool:
    try:
        with pg_connect(cfg, timeout) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:
        return False


def _is_primary(cfg) -> bool | None:
    try:
        with pg_connect(cfg, 3) as conn:
            return not conn.execute("select pg_is_in_recovery()").fetchone()[0]
    except psycopg.Error:
        return None


class SelfFence:
    def __init__(self, cfg: EagleConfig, region: str, client) -> None:
        self.cfg, self.region, self.client = cfg, region, client
        self.after = cfg.health.self_fence_after.total_seconds()
        self.every = cfg.health.self_fence_check_seconds()
        self.timeout = min(2.0, self.every)
        self.log = logs.get("self_fence").bind(region=region)
        self.last_contact = time.monotonic()
        self.last_contact_wall = datetime.now(timezone.utc)
        # When this worker put its own fence on, and since when it had heard from no one (wall
        # clock: compared with Temporal's times).
        self.fenced_at: datetime | None = None
        self.isolated_since = self.last_contact_wall

    async def _temporal_answers(self) -> bool:
        from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

        try:
            await self.client.workflow_service.get_system_info(GetSystemInfoRequest(),
                                                               timeout=timedelta(seconds=self.timeout))
            return True
        except Exception:  # noqa: BLE001 - any failure to get an answer is no contact
            return False

    async def contact(self) -> Contact:
        peers = [r for r in self.cfg.regions if r.name != self.region]
        got = await asyncio.gather(self._temporal_answers(),
                                   *[asyncio.to_thread(_peer_answers, r.postgres, self.timeout) for r in peers])
        return Contact(temporal=got[0], peers={r.name: ok for r, ok in zip(peers, got[1:])})

    async def round(self) -> None:
        c = await self.contact()
        now = time.monotonic()
        if c.any:
            self.last_contact, self.last_contact_wall = now, datetime.now(timezone.utc)
            if self.fenced_at is not None and c.temporal:
                await self._maybe_lift()
            return
        alone = now - self.last_contact
        if alone < self.after or self.fenced_at is not None:
            return
        self.isolated_since = self.last_contact_wall
        pg = self.cfg.region(self.region).postgres
        primary = await asyncio.to_thread(_is_primary, pg)
        if not primary:
            return  # a standby takes no writes; a stopped server is fenced by its stop (or fences when back)
        fence = await asyncio.to_thread(fence_read_only, pg)
        if fence.method == "read_only":
            self.fenced_at = datetime.now(timezone.utc)
            self.log.error("self_fence.fenced", alone_seconds=round(alone, 1), last_lsn=fence.last_lsn,
                           why="no answer from Temporal nor any other region's PostgreSQL")
        else:
            self.log.error("self_fence.failed", alone_seconds=round(alone, 1), error=fence.error)

    async def _maybe_lift(self) -> None:
        from temporalio.client import WorkflowExecutionStatus
        from temporalio.service import RPCError, RPCStatusCode

        from workflows.runbook import move_id

        # Anything a move did while this node was cut off (started, or ended: a switchover to
        # here finishing) may have made another primary or expect this one fenced. A minute of
        # margin for the clocks of this host and Temporal's.
        since = self.isolated_since - timedelta(seconds=60)
        try:
            d = await self.client.get_workflow_handle(move_id(self.cfg.service)).describe()
            moved = d.status == WorkflowExecutionStatus.RUNNING or d.start_time >= since or \
                (d.close_time is not None and d.close_time >= since)
            why = f"move {d.id} {d.status.name.lower()}, started {d.start_time.isoformat()}"
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                self.log.warning("self_fence.kept", why=f"could not read the move's state: {e}")
                return
            moved, why = False, "no move ever ran"
        if moved:
            self.log.warning("self_fence.kept", why=f"{why}: the runbooks decide this node's fate")
            self.fenced_at = None  # not ours to lift any more
            return
        pg = self.cfg.region(self.region).postgres
        if not await asyncio.to_thread(_is_primary, pg):
            self.fenced_at = None
            return
        await asyncio.to_thread(unfence, pg)
        self.log.warning("self_fence.lifted", fenced_since=self.fenced_at.isoformat(), why=f"contact back; {why}")
        self.fenced_at = None

    async def run(self) -> None:
        self.log.info("self_fence.watching", after_seconds=self.after, every_seconds=self.every)
        while True:
            try:
                await self.round()
            except Exception as e:  # noqa: BLE001 - the watch must outlive any one round
                self.log.error("self_fence.round_failed", error=str(e))
            await asyncio.sleep(self.every)
