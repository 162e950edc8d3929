"""A regional worker cut off from everyone fences its own primary (workers/self_fence.py).

The worker's two contacts, Temporal and the other region's PostgreSQL, go through TCP proxies
that the test cuts the way a partition does: connections are accepted and nothing comes back
(a black hole, so every check must bound itself with a timeout; a refused port would be the
easy case). The primary it guards is a throwaway real PostgreSQL, so the lab's is never
fenced; the other region's PostgreSQL (the lab's primary, where the test records epochs under a
service name of its own) and Temporal are the lab's real ones.

- Temporal alone cut (a control-plane outage): no fence, however long.
- Both cut: the primary refuses new sessions, marked as fenced by itself, not before the bound,
  and the region's Redis master (a throwaway one too) refuses writes.
- Both back, no move, no newer epoch: a new watch (a restarted worker) lifts that fence, and
  the Redis one.
- Cut again, and the other region records a newer DR epoch (a failover promoted it): back,
  the fence stays; it is lifted only once that evidence is gone.
- Cut again, and a runbook fences the node over the self-fence: back, the fence stays.
- Cut again, and a move is running when contact returns: the fence stays until it ends.
- A runbook's Redis fence over the self-fence is the runbook's: the lift leaves it.
- PostgreSQL down inside the partition: its Redis master is fenced all the same.
- Never cut off, and the other region's writable primary records a newer epoch (a failover
  while this region was powered off), which the split-brain survivor rule keeps: this primary
  is fenced as superseded, its Redis master too, and never lifted by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import timedelta

import psycopg
import pytest

from eagle_dr.temporal import connect
from lab.scratch_postgres import scratch_postgres
from tests.conftest import PORT_SHIFT
from tests.lab_helpers import _until
from workers.self_fence import SelfFence

pytestmark = pytest.mark.asyncio(loop_scope="session")

PORT = 17870 + PORT_SHIFT - 2000
AFTER = 3.0


class Partitionable:
    """A TCP proxy to ``target``: ``cut()`` turns it into a black hole (accepts, forwards
    nothing, answers nothing), ``heal()`` drops the held connections and forwards again."""

    def __init__(self, target_port: int):
        self.target_port, self.cut_off, self.conns = target_port, False, set()
        self.server = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                if self.cut_off:
                    continue  # swallowed: the far side never hears of it
                w.write(data)
                await w.drain()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns.add(w)
        try:
            if self.cut_off:
                await r.read()  # held open, unanswered, until the client or heal() gives up
                return
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            self.conns.add(uw)
            await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))
        except Exception:  # noqa: BLE001 - a dropped connection ends its pipes
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    def cut(self) -> None:
        self.cut_off = True

    def heal(self) -> None:
        self.cut_off = False
        for w in list(self.conns):
            with contextlib.suppress(Exception):
                w.close()
        self.conns.clear()

    def close(self) -> None:
        self.heal()
        if self.server:
            self.server.close()


def _redis_write(node) -> str | None:
    """A Redis client's write; None when acknowledged, else the error."""
    import redis

    try:
        node.client().set("selffence:probe", "1")
        return None
    except redis.RedisError as e:
        return str(e)


def _write(node, key: int) -> str | None:
    """An application's write in a new session; None when it committed, else why not."""
    dsn = node.cfg.dsn().replace("user=postgres", "user=app")
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("insert into alerts (id, region, payload) values (%s, 'x', '{}')", (key,))
        return None
    except psycopg.Error as e:
        return str(e).strip().splitlines()[0]


async def test_a_cut_off_worker_fences_its_primary_and_lifts_only_its_own_fence_when_nothing_moved(
        lab, client, dev_server):
    from activities.postgres import epoch as epochs
    from activities.postgres.fence import fence_holder, fence_read_only, unfence
    from activities.redis.failover import fence as redis_fence
    from activities.redis.failover import fence_holder as redis_holder
    from activities.redis.failover import unfence as redis_unfence
    from activities.postgres.status import connect as pg_connect
    from tests.lab_helpers import _primary
    from workflows.runbook import move_id

    primary = _primary(lab)
    a = next(r.name for r in lab.cfg.regions if r.name != primary)  # the guarded node's region name
    temporal = Partitionable(int(dev_server.address.rsplit(":", 1)[1]))
    peer = Partitionable(lab.cfg.region(primary).postgres.port)
    t_port, p_port = await temporal.start(), await peer.start()
    service = f"selffence-{uuid.uuid4().hex[:8]}"  # its own move id and epoch row
    peer_cfg = lab.cfg.region(primary).postgres
    # The guarded region's Redis: a throwaway master with the lab's password and TLS.
    from lab.redis import RedisNode

    a_redis = lab.cfg.region(a).redis
    rnode = RedisNode(a_redis.host, PORT + 1, lab.state / "selffence-redis", lab.user,
                      lab.secret("redis-password"), "selffence-redis", tls=lab.tls if a_redis.tls else None)
    rnode.kill()
    if rnode.conf.exists():
        rnode.conf.unlink()  # a config a killed run rewrote (fenced): start as a plain master
    rnode.start()
    with contextlib.ExitStack() as cleanup, scratch_postgres(PORT, "selffence") as node:
        cleanup.callback(rnode.kill)
        with node.connect() as conn:
            conn.execute("create role app login password 'app'")
            conn.execute("grant all on alerts to app")
        guarded_redis = a_redis.model_copy(update={"port": PORT + 1})
        regions = [r.model_copy(update={"postgres": node.cfg, "redis": guarded_redis})
                   if r.name == a else
                   r.model_copy(update={"postgres": peer_cfg.model_copy(update={"port": p_port})})
                   for r in lab.cfg.regions]
        cfg = lab.cfg.model_copy(update={
            "service": service, "regions": regions,
            # The guarded node and the lab's primary are two writable primaries from the start, and
            # the lab's routing names the lab's primary active: the superseded-primary check must
            # still leave the guarded node alone until a newer epoch there (the last case).
            "health": lab.cfg.health.model_copy(update={"self_fence_after": timedelta(seconds=AFTER),
                                                        "interval": timedelta(seconds=1)})})
        proxied = await connect(target_host=f"127.0.0.1:{t_port}", config=lab.cfg)
        rounds = 0
        watch: asyncio.Task | None = None

        def start_watch() -> None:
            nonlocal watch
            if watch is not None:
                watch.cancel()
            sf = SelfFence(cfg, a, proxied)
            real_round = sf.round

            async def counted():
                nonlocal rounds
                await real_round()
                rounds += 1

            sf.round = counted
            watch = asyncio.create_task(sf.run())

        async def after_rounds(n: int):
            start = rounds
            await _until(lambda: asyncio.sleep(0, rounds >= start + n), 60, f"{n} more rounds")

        def holder() -> str | None:
            # A session opened while the fence is going on is ended by it (it ends every client
            # session once new ones are refused): read again in a new one.
            for _ in range(3):
                try:
                    with pg_connect(node.cfg) as conn:
                        return fence_holder(conn)
                except psycopg.errors.AdminShutdown:
                    continue
            with pg_connect(node.cfg) as conn:
                return fence_holder(conn)

        seen: list[str | None] = []

        async def refused():
            seen.append(await asyncio.to_thread(_write, node, 3 + len(seen) * 1000))
            # Either face of the fence: a session that starts after the reload is refused (the
            # library), one that started just before it and takes the reload between its
            # start-up and its INSERT gets the read-only setting (seen in CI).
            fenced = ("eagle_dr_fenced_old_primary", "read-only transaction")
            return seen[-1] if any(f in (seen[-1] or "") for f in fenced) else None

        async def cut_until_fenced():
            temporal.cut()
            peer.cut()
            await _until(refused, 60, f"the primary to refuse writes (last: {seen[-1:]})")
            assert holder() == "self"

        async def heal_until_lifted(what: str):
            temporal.heal()
            peer.heal()
            await _until(lambda: asyncio.to_thread(lambda: _write(node, 9_000_000 + rounds) is None), 60, what)
            assert holder() is None
            # Redis in the same round, right after PostgreSQL: a few ms later, so polled (CI once
            # read it in between).
            await _until(lambda: asyncio.to_thread(lambda: _redis_write(rnode) is None), 10,
                         f"{what}: Redis lifted in the same round")

        move = None
        start_watch()
        try:
            await after_rounds(2)
            assert _write(node, 1) is None

            # Temporal alone cut off: the other region still answers, so no fence (Patroni's failsafe).
            temporal.cut()
            await after_rounds(int(AFTER) + 3)
            assert holder() is None and _write(node, 2) is None

            # Both: fenced by itself, not before the bound.
            peer.cut()
            cut_at = time.monotonic()
            await _until(refused, 60, f"the primary to refuse writes (last: {seen[-1:]})")
            assert time.monotonic() - cut_at >= AFTER - 1.0, f"fenced before the bound: {seen}"
            assert seen[:-1] and not any(seen[:-1]), f"writes failed before the fence: {seen}"
            assert holder() == "self"
            # Redis next, in the same round: the failover promotes the other region's replica too.
            await _until(lambda: asyncio.to_thread(lambda: "NOREPLICAS" in (_redis_write(rnode) or "")), 30,
                         "the region's Redis master to refuse writes")
            assert redis_holder(guarded_redis) == ("master", "self")

            # Back, with nothing moved: a new watch (a restarted worker) lifts it: the mark is on the node.
            start_watch()
            await heal_until_lifted("a restarted watch to lift the fence")
            assert _redis_write(rnode) is None, "the Redis fence outlived the PostgreSQL one"

            # The other region recorded a newer epoch meanwhile (a failover promoted it): kept.
            await cut_until_fenced()
            epochs.advance_epoch(peer_cfg, service, 7, primary, "test-failover", "run-1")
            temporal.heal()
            peer.heal()
            await after_rounds(4)
            assert holder() == "self" and _write(node, 4) is not None, "lifted despite a newer epoch elsewhere"
            assert "NOREPLICAS" in (_redis_write(rnode) or ""), "Redis lifted despite a newer epoch elsewhere"
            with pg_connect(peer_cfg) as conn:
                conn.execute("delete from eagle_dr.dr_epoch where service = %s", (service,))
            await heal_until_lifted("the fence lifted once no newer epoch is recorded")

            # A runbook fenced it over the self-fence, Redis too: not the worker's to lift any more.
            await cut_until_fenced()
            await _until(lambda: asyncio.to_thread(lambda: redis_holder(guarded_redis) == ("master", "self")), 30,
                         "the Redis self-fence")
            assert fence_read_only(node.cfg).method == "read_only"
            assert holder() == "runbook"
            assert redis_fence(guarded_redis).paused and redis_holder(guarded_redis) == ("master", "runbook")
            temporal.heal()
            peer.heal()
            await after_rounds(4)
            assert holder() == "runbook" and _write(node, 5) is not None, "a runbook's fence was lifted"
            assert "NOREPLICAS" in (_redis_write(rnode) or ""), "a runbook's Redis fence was lifted"
            unfence(node.cfg)
            redis_unfence(guarded_redis)
            assert _redis_write(rnode) is None  # the runbook's unfence lifts it whole

            # A move running when contact returns: kept until it ends.
            await cut_until_fenced()
            move = await client.start_workflow("SwitchoverWorkflow", {"service": service}, id=move_id(service),
                                               task_queue=f"nobody-{service}")
            temporal.heal()
            peer.heal()
            await after_rounds(4)
            assert holder() == "self" and _write(node, 6) is not None, "lifted while a move runs"
            await move.terminate("test: the move ends")
            await heal_until_lifted("the fence lifted once the move ended")

            # PostgreSQL down inside the partition, Redis up: Redis is fenced all the same (the
            # failover promotes the other region's Redis whatever this PostgreSQL does), and
            # lifted once everything answers again.
            assert _redis_write(rnode) is None
            node.ctl.stop("fast")
            temporal.cut()
            peer.cut()
            await _until(lambda: asyncio.to_thread(lambda: redis_holder(guarded_redis) == ("master", "self")), 60,
                         "Redis fenced with PostgreSQL down")
            temporal.heal()
            peer.heal()
            node.ctl.start()
            await _until(lambda: asyncio.to_thread(lambda: _redis_write(rnode) is None), 60,
                         "the Redis self-fence lifted once all answers again")

            # Never cut off, never fenced, and the other region's writable primary records a
            # newer epoch: a failover promoted it while this region was gone (powered off: its
            # worker fenced nothing, and the supervisor started PostgreSQL again, writable).
            # Two primaries took writes until a human noticed; the split-brain rule keeps the
            # other (routing names it active, and it holds the higher epoch), and the worker
            # fences this one, and its Redis master (the other region's is a master too).
            await _until(lambda: asyncio.to_thread(lambda: _write(node, 7_000_000 + rounds) is None), 30,
                         "the guarded primary writable before the epoch moves")
            # Routing names the other region active, the epochs are equal: a split nothing has
            # settled (a standby promoted by hand). Left to the split-brain runbook, whose
            # detection a fence here would hide.
            await after_rounds(3)
            assert holder() is None and _write(node, 7_500_000 + rounds) is None, \
                "fenced as superseded on routing alone"
            epochs.advance_epoch(peer_cfg, service, 9, primary, "test-failover-while-gone", "run-2")
            await _until(refused, 60, f"the superseded primary to refuse writes (last: {seen[-1:]})")
            assert holder() == "superseded"
            await _until(lambda: asyncio.to_thread(lambda: "NOREPLICAS" in (_redis_write(rnode) or "")), 30,
                         "the superseded Redis master to refuse writes")
            assert redis_holder(guarded_redis) == ("master", "runbook")
            await after_rounds(3)
            assert holder() == "superseded", "the worker lifted a superseded primary's fence"
        finally:
            watch.cancel()
            temporal.close()
            peer.close()
            if move is not None:
                with contextlib.suppress(Exception):
                    await move.terminate("test over")
            with contextlib.suppress(Exception), pg_connect(peer_cfg) as conn:
                conn.execute("delete from eagle_dr.dr_epoch where service = %s", (service,))
                conn.execute("delete from eagle_dr.dr_epoch_history where service = %s", (service,))
