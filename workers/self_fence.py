"""Self-fencing: a regional worker that is cut off from everyone fences its own primary.

A partitioned region's PostgreSQL stays a writable primary for every client inside the
partition, and the runbooks cannot reach it to fence it: the quorum fails over to the other
region, and two primaries take writes until the partition heals. Patroni's answer is its
leader lease: a primary that cannot renew its key in the DCS demotes itself. Ours is the
same idea with the contacts a regional worker has. It checks, every ``check_every``:

- Temporal (a GetSystemInfo call): the orchestrator that would run a failover;
- every other region's PostgreSQL (a ``select 1``): the other side of a partition.

Any answer from a server is contact, an error included (a refused login still proves the
network carries it); only silence, a reset or a timeout is not. Either contact is enough
(Patroni's failsafe mode: a control-plane outage alone must not take the whole service
read-only). With no contact for ``health.self_fence_after``:

- the local PostgreSQL, a primary not already fenced, gets the read-only fence
  (activities/postgres/fence.py), marked as its own (``eagle_dr.fenced_by = 'self'`` beside it
  in postgresql.auto.conf);
- the region's Redis master, whatever PostgreSQL's state (down, say: the failover promotes the
  other region's Redis replica all the same), gets the write fence, marked as its own by its
  size (activities/redis/failover.py, SELF_FENCE_MIN_REPLICAS; a runbook's fence over it
  makes it the runbook's). A worker restarted inside the partition finds its PostgreSQL mark
  and fences Redis at once instead of waiting out another bound.

A failover that could not fence an old primary it found unreachable by timeout, with that
primary's worker silent, waits the same bound (workflows/failover.py).

With contact everywhere, an unfenced primary here beside another region's unfenced primary
that the split-brain survivor rule keeps, on evidence (routing names that region active, or
it holds the higher DR epoch: a failover promoted it while this region was gone, powered off,
say, and the supervisor started PostgreSQL again writable), is fenced read-only, and its Redis
master with it when another Redis master takes writes: two primaries are never left taking
writes for a human to notice. That fence is never lifted here.

When Temporal and every other region answer again, it lifts each fence only if it is still
its own, no move (``dr-move-<service>``) is running, and no region records a DR epoch newer
than this node's (a failover that promoted the other region recorded one there). For
PostgreSQL the mark is checked and the fence lifted under the node's fence lock, so no fence
lands in between; for Redis the check and the lift are two commands, and a runbook's fence in
the round trip between them would be undone. Otherwise the fences stay for the runbooks
(failback rewinds this node; split brain resolves it), and the worker says why at every
round. The marks are on the nodes, so a restarted worker lifts fences its predecessor put on.

What this does not cover: a worker that is down during the partition fences nothing (the
failover still waits the bound and says it could not verify the fence); with three regions,
hearing from a region that is not the failover's target keeps the node unfenced.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

import psycopg

from activities.postgres import epoch as epochs
from activities.postgres.fence import fence_holder, fence_read_only, lift_self_fence
from activities.postgres.status import connect as pg_connect
from activities.redis.failover import fence as redis_fence
from activities.redis.failover import fence_holder as redis_holder
from activities.redis.failover import unfence as redis_unfence
from eagle_dr import logs
from eagle_dr.config import EagleConfig


@dataclass
class Contact:
    temporal: bool
    peers: dict[str, bool]

    @property
    def any(self) -> bool:
        return self.temporal or any(self.peers.values())

    @property
    def all(self) -> bool:
        return self.temporal and all(self.peers.values())


def _peer_answers(cfg, timeout: float) -> bool:
    try:
        with pg_connect(cfg, timeout) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error as e:
        # An error the server sent (a refused login, too many clients, starting up) carries an
        # SQLSTATE: the network works. A timeout, reset or refused connect carries none.
        return getattr(e, "sqlstate", None) is not None


def _local_state(cfg) -> tuple[bool | None, str | None]:
    """(primary?, who fenced it); (None, None) when it does not answer."""
    try:
        with pg_connect(cfg, 3) as conn:
            primary = not conn.execute("select pg_is_in_recovery()").fetchone()[0]
            return primary, fence_holder(conn)
    except psycopg.Error:
        return None, None


class SelfFence:
    def __init__(self, cfg: EagleConfig, region: str, client) -> None:
        self.cfg, self.region, self.client = cfg, region, client
        self.after = cfg.health.self_fence_after.total_seconds()
        self.every = cfg.health.self_fence_check_seconds()
        self.timeout = min(2.0, self.every)
        self.log = logs.get("self_fence").bind(region=region)
        self.last_contact = time.monotonic()
        self.kept_why: str | None = None
        self.redis_silent = False
        self.contact_seen = False
        self._superseded_task: asyncio.Task | None = None

    async def _temporal_answers(self) -> bool:
        from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
        from temporalio.service import RPCError, RPCStatusCode

        try:
            await self.client.workflow_service.get_system_info(GetSystemInfoRequest(),
                                                               timeout=timedelta(seconds=self.timeout))
            return True
        except RPCError as e:
            # The server answered, if only to refuse (an expired key): the network works.
            return e.status not in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED,
                                    RPCStatusCode.CANCELLED, RPCStatusCode.UNKNOWN)
        except Exception:  # noqa: BLE001 - no answer at all
            return False

    async def _bounded(self, coro) -> bool:
        # A check that hangs past its own timeout (a stalled TCP stream) is no contact, and
        # must not hold up the round: the fence's timing depends on the rounds going on.
        try:
            return await asyncio.wait_for(coro, self.timeout + 1)
        except asyncio.TimeoutError:
            return False

    async def contact(self) -> Contact:
        peers = [r for r in self.cfg.regions if r.name != self.region]
        got = await asyncio.gather(self._bounded(self._temporal_answers()),
                                   *[self._bounded(asyncio.to_thread(_peer_answers, r.postgres, self.timeout))
                                     for r in peers])
        return Contact(temporal=got[0], peers={r.name: ok for r, ok in zip(peers, got[1:])})

    async def round(self) -> None:
        c = await self.contact()
        now = time.monotonic()
        pg = self.cfg.region(self.region).postgres
        if c.any:
            self.last_contact = now
            self.contact_seen = True
            if c.all:
                # Read once for both: the lift of a fence of its own, the check of an unfenced primary.
                primary, held = await asyncio.to_thread(_local_state, pg)
                await self._maybe_lift(pg, primary, held)
                if primary and not held:
                    self._check_superseded(pg)
            return
        alone = now - self.last_contact
        primary, held = await asyncio.to_thread(_local_state, pg)
        if alone < self.after and (held != "self" or self.contact_seen):
            return
        # Past the bound; or a worker that has had no contact at all since it started, beside a
        # node its predecessor fenced (restarted in the partition): its Redis must not wait
        # out another bound. A blip after contact is no reason to fence anything.
        if primary and not held and alone >= self.after:
            fence = await asyncio.to_thread(fence_read_only, pg, 3, "self")
            if fence.method == "read_only" and not fence.error:
                self.kept_why = None
                self.log.error("self_fence.fenced", alone_seconds=round(alone, 1), last_lsn=fence.last_lsn,
                               why="no answer from Temporal nor any other region's PostgreSQL")
            elif not fence.method:
                self.log.error("self_fence.failed", alone_seconds=round(alone, 1), error=fence.error)
        # Redis whatever PostgreSQL's state (down, a standby): the failover promotes the other
        # region's Redis replica, and clients in here would write to two Redis masters otherwise.
        await asyncio.to_thread(self._fence_redis, alone)

    def _fence_redis(self, alone: float) -> None:
        rcfg = self.cfg.region(self.region).redis
        state = redis_holder(rcfg)
        if state is None:
            if not self.redis_silent:
                self.log.error("self_fence.redis_unreachable", alone_seconds=round(alone, 1),
                               why="the region's Redis does not answer: nothing to fence now, tried every round")
            self.redis_silent = True
            return
        self.redis_silent = False
        if state != ("master", None):
            return  # a replica takes no writes; a fenced master is fenced (its own or a runbook's)
        f = redis_fence(rcfg, by="self")
        if f.paused:
            self.log.error("self_fence.redis_fenced", alone_seconds=round(alone, 1), offset=f.offset,
                           durable=f.durable)
        else:
            self.log.error("self_fence.redis_failed", alone_seconds=round(alone, 1), error=f.error)

    def _redis_self_fenced(self) -> bool:
        return redis_holder(self.cfg.region(self.region).redis) == ("master", "self")

    async def _maybe_lift(self, pg, primary: bool | None, held: str | None) -> None:
        pg_own = bool(primary) and held == "self"
        redis_own = await asyncio.to_thread(self._redis_self_fenced)
        if not pg_own and not redis_own:
            return
        why = await self._keep_why()
        if why is None and pg_own:
            why = await asyncio.to_thread(lift_self_fence, pg)
            if why is None:
                self.log.warning("self_fence.lifted", why="contact back; no move, no newer epoch")
        if why is None and redis_own:
            # Only its own: a runbook's fence since then made the Redis fence the runbook's.
            f = await asyncio.to_thread(redis_unfence, self.cfg.region(self.region).redis, 2.0, "self")
            if f.reachable and not f.error:
                self.log.warning("self_fence.redis_lifted", why="contact back; no move, no newer epoch")
            else:
                why = f"Redis fence not lifted: {f.error or 'no answer'}"
        if why is None:
            self.kept_why = None
        elif why != self.kept_why:
            self.log.warning("self_fence.kept", why=f"{why}: the runbooks decide this node's fate")
            self.kept_why = why

    def _check_superseded(self, pg) -> None:
        """Started in a round with contact everywhere, on an unfenced primary, one at a time,
        never awaited by the round: a peer that stops answering in the middle of its reads (a
        partition starting) holds this check for as long as TCP takes to give up, never the
        partition's fence."""
        if self._superseded_task is None or self._superseded_task.done():
            self._superseded_task = asyncio.create_task(self._fence_if_superseded(pg))

    async def _fence_if_superseded(self, pg) -> None:
        """Two writable primaries, this one unfenced, the other holding a higher DR epoch (a move
        recorded there since this node's last), and the split-brain survivor rule, decided on
        evidence (routing names the other region the active one, or the higher epoch; not
        region priority alone), keeps the other: this is an old primary back from an outage a
        failover could not fence it in (a region that lost power, its
        PostgreSQL started again by its supervisor, writable, its services never scaled down).
        Its worker fences it read-only (marked "superseded": never lifted here; failback
        rewinds it, split brain resolves it), and its Redis master too when another region's
        Redis is an unfenced master, so the two stop taking writes apart. Nothing while a move
        runs: that runbook decides."""
        try:
            choice = await self._superseded_by(pg)
        except Exception as e:  # noqa: BLE001 - a check that fails fences nothing, and says so
            self.log.warning("self_fence.superseded_check_failed", error=str(e))
            return
        if choice is None:
            return
        why = f"{choice.survivor} keeps the writes ({choice.why})"
        fence = await asyncio.to_thread(fence_read_only, pg, 3, "superseded")
        if fence.method == "read_only" and not fence.error:
            self.log.error("self_fence.superseded_fenced", why=why, last_lsn=fence.last_lsn)
        else:
            self.log.error("self_fence.superseded_fence_failed", why=why, error=fence.error or fence.method)
            return
        await asyncio.to_thread(self._fence_redis_superseded, why)

    def _fence_redis_superseded(self, why: str) -> None:
        here = self.cfg.region(self.region).redis
        if redis_holder(here) != ("master", None):
            return  # a replica takes no writes; a fenced master is fenced
        if not any(redis_holder(r.redis) == ("master", None) for r in self.cfg.regions if r.name != self.region):
            return  # no other writable master: fencing this one would leave none
        f = redis_fence(here)  # a runbook's fence: the worker never lifts it
        self.log.error("self_fence.superseded_redis_fenced" if f.paused else "self_fence.superseded_redis_failed",
                       why=why, error=f.error)

    async def _superseded_by(self, pg):
        from temporalio.client import WorkflowExecutionStatus
        from temporalio.service import RPCError, RPCStatusCode

        from activities.split_brain import choose_survivor, detect
        from workflows.runbook import move_id

        def decide():
            # The common case, each round on a healthy primary: the other side is a standby.
            if not any(_local_state(r.postgres) == (True, None) for r in self.cfg.regions if r.name != self.region):
                return None
            report = detect(self.cfg)
            if self.region not in report.postgres_primaries or len(report.postgres_primaries) < 2:
                return None
            choice = choose_survivor(self.cfg.split_brain.survivor_rule, report,
                                     {r.name: r.priority for r in self.cfg.regions})
            if choice.loser != self.region or choice.rule not in ("active-region", "highest-epoch"):
                return None
            # And a move recorded on the survivor since this node's last one (a failover made while
            # this region was gone), whichever rule decided. Without it this is a split nothing
            # has settled yet (a standby promoted by hand, outside any runbook): the split-brain
            # runbook keeps both sides' writes, and a fence here would hide the split from its
            # detection (a fenced primary is no second writer), leaving this node's writes
            # unreconciled and unreported (and a monitor waiting for that split waits forever:
            # the likely cause of a CI run that hung). Equal epochs, routing alone: left to the runbook.
            if report.epochs.get(choice.survivor, -1) <= report.epochs.get(self.region, -1):
                return None
            return choice

        choice = await asyncio.to_thread(decide)
        if choice is None:
            return None
        try:
            d = await self.client.get_workflow_handle(move_id(self.cfg.service)).describe()
            if d.status == WorkflowExecutionStatus.RUNNING:
                return None
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                return None  # unknown: a fence needs evidence
        return choice

    async def _keep_why(self) -> str | None:
        from temporalio.client import WorkflowExecutionStatus
        from temporalio.service import RPCError, RPCStatusCode

        from workflows.runbook import move_id

        try:
            d = await self.client.get_workflow_handle(move_id(self.cfg.service)).describe()
            if d.status == WorkflowExecutionStatus.RUNNING:
                return f"move {d.id} is running"
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                return f"could not read the move's state: {e}"
        own = self.cfg.region(self.region).postgres

        def newer() -> str | None:
            mine = epochs.read_epoch(own, self.cfg.service).epoch
            for r in self.cfg.regions:
                if r.name == self.region:
                    continue
                try:
                    theirs = epochs.read_epoch(r.postgres, self.cfg.service)
                except psycopg.Error as e:
                    return f"{r.name}'s epoch unreadable ({type(e).__name__})"
                if theirs.epoch > mine:
                    return f"{r.name} records epoch {theirs.epoch} ({theirs.workflow_id}), newer than this node's {mine}"
            return None

        try:
            return await asyncio.to_thread(newer)
        except psycopg.Error as e:
            return f"could not read this node's epoch ({type(e).__name__})"

    async def run(self) -> None:
        self.log.info("self_fence.watching", after_seconds=self.after, every_seconds=self.every)
        while True:
            try:
                await self.round()
            except Exception as e:  # noqa: BLE001 - the watch must outlive any one round
                self.log.error("self_fence.round_failed", error=str(e))
            await asyncio.sleep(self.every)
