"""Health probes.

``probe_region`` runs on a region's own worker (its view of its own databases).
``probe_regions_from_here`` runs on any worker, regional or control: it is one *vantage
point* looking at named regions over the network, so the monitor can tell a dead region
(every vantage point that answers sees it down) from a dead worker (its vantage point
does not answer; the others see the databases fine).
"""

from __future__ import annotations

import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor, wait

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.postgres.status import PgStatus, connect, pg_status
from activities.redis.status import RedisStatus, redis_status
from eagle_dr import metrics
from eagle_dr.config import EagleConfig, SecretUnavailable


WATCH_APPLICATION = "eagle-dr monitor watch"


class RegionHealth(BaseModel):
    region: str
    worker: str
    postgres: PgStatus
    redis: RedisStatus

    @property
    def healthy(self) -> bool:
        return self.postgres.reachable and self.redis.reachable


class ProbeRequest(BaseModel):
    # Empty: only "this worker is alive and picks up work" (eagle-dr status uses that).
    regions: list[str] = []
    timeout_seconds: float = Field(default=3.0, gt=0, le=30)
    # Confirm a refusal here (the monitor's fast confirmation): this region's ports are probed
    # ``confirm_probes`` more times, ``confirm_interval_seconds`` apart, and its sighting keeps
    # ``refused`` only if every probe was refused. In one activity, not in workflow rounds: a
    # workflow timer can fire up to a second late (the server's timer queue), a sleep here does not.
    confirm_region: str | None = None
    confirm_probes: int = Field(default=0, ge=0, le=100)
    confirm_interval_seconds: float = Field(default=0.25, gt=0, le=60)
    # Wait here, before probing, for up to ``watch_seconds`` (the monitor's interval) while
    # holding an idle session open to ``watch_region``'s PostgreSQL: a server that dies closes it
    # and the probe runs at once, instead of at the next round a workflow timer would start (a
    # timer can fire a second late). A stall closes nothing, so the stall tolerance is unchanged.
    watch_region: str | None = None
    watch_seconds: float = Field(default=0, ge=0, le=3600)


class RegionSighting(BaseModel):
    """What one vantage point saw of one region."""

    region: str
    postgres_up: bool
    postgres_role: str | None = None  # "primary" | "standby"
    read_only: bool | None = None
    redis_up: bool
    error: str | None = None
    # How long this vantage point's probe of the region took (PostgreSQL + Redis).
    probe_seconds: float | None = None
    # Both PostgreSQL's and Redis's ports refused a TCP connection: the host answered, nothing
    # listens. The servers are gone, not slow: a stalled (SIGSTOPped, swapping) server still
    # has its listen socket, so the kernel accepts and the probe times out instead. Only this
    # unambiguous evidence lets the monitor confirm an outage fast (MonitorInput.confirm_*).
    refused: bool | None = None
    # A standby that is an old primary held by eagle-dr's stop fence (its marker in the data
    # directory): in recovery like any standby, but stale, never a failover target. None: not
    # a standby, or the marker could not be read (no privilege).
    stale: bool | None = None
    # A standby: the WAL the primary seen by this vantage point in the same round had written
    # and this standby had not received (bytes; the monitor's automatic failover refuses past
    # its lag guard, or when it never saw the standby caught up). None: no primary seen, or
    # neither side could say.
    lag_bytes: int | None = None

    @property
    def verdict(self) -> str:
        """down | standby | read-only (a fenced primary: a move is under way) | up (a writable primary)."""
        if not self.postgres_up:
            return "down"
        if self.postgres_role != "primary":
            return "standby"
        return "read-only" if self.read_only else "up"


class VantageReport(BaseModel):
    worker: str
    sightings: list[RegionSighting] = []
    # How long the watch before the probe lasted (less than asked: the watched server closed
    # the session). The monitor dates the round's probe from it.
    watched_seconds: float | None = None

    def of(self, region: str) -> RegionSighting | None:
        return next((s for s in self.sightings if s.region == region), None)


def _worker() -> str:
    return f"{socket.gethostname()}/{activity.info().task_queue}"


def _pg_with_files(cfg, timeout: float) -> PgStatus:
    # The data directory's fence marker too: a fenced old primary restarted is no failover target.
    return pg_status(cfg, timeout, files=True)


class HealthActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def probe_region(self, region: str) -> RegionHealth:
        """Probe this region's PostgreSQL and Redis; unreachable is a result, not an error."""
        r = self.cfg.region(region)
        timeout = min(self.cfg.health.timeout.total_seconds(), 10.0)
        return RegionHealth(region=region, worker=_worker(),
                            postgres=pg_status(r.postgres, timeout, catalog=True, files=True),
                            redis=redis_status(r.redis, timeout))

    @activity.defn
    def probe_regions_from_here(self, req: ProbeRequest) -> VantageReport:
        """From this worker, over the network: each named region's PostgreSQL with a real
        query (role, read-only) and its Redis with PING. Unreachable is a sighting, not an error."""
        self._credentials(req.regions)
        watched = self._watch(req) if req.watch_region and req.watch_seconds > 0 else None
        woke = watched is not None and watched < req.watch_seconds - 0.05  # the session closed
        out, pgs, rss = [], {}, {}
        answers = self._probe_all(req)
        pgs_all = {name: pg for name, (pg, _, _) in answers.items()}
        activity.heartbeat()  # a watched round's heartbeat timeout covers one bounded step at a time
        for name in req.regions:
            r = self.cfg.region(name)
            pg, rs, seconds = answers[name]
            if woke and name == req.watch_region and not pg.reachable and rs.reachable:
                # The watch woke on PostgreSQL's death, within milliseconds: the rest of a dying
                # host may be a moment behind it. Look again within the confirmation's schedule
                # before calling this a PostgreSQL-only failure (which is never confirmed fast).
                for _ in range(req.confirm_probes):
                    time.sleep(req.confirm_interval_seconds)
                    activity.heartbeat()
                    if not (rs := redis_status(r.redis, req.timeout_seconds)).reachable:
                        break
            pgs[name], rss[name] = pg, rs
            errors = [e for e in (pg.error and f"postgres: {pg.error}", rs.error and f"redis: {rs.error}") if e]
            refused = None
            # Behind a proxy a refusal may come from the proxy for a live server: no fast path.
            if not pg.reachable and not rs.reachable and not r.postgres.behind_proxy:
                refused = _refuses(r.postgres.host, r.postgres.port, req.timeout_seconds) and \
                    _refuses(r.redis.host, r.redis.port, req.timeout_seconds)
            if refused and name == req.confirm_region:
                refused = self._still_refused(r, req)
            activity.heartbeat()
            out.append(RegionSighting(region=name, postgres_up=pg.reachable, postgres_role=pg.role,
                                      read_only=pg.read_only, redis_up=rs.reachable,
                                      error="; ".join(errors) or None, probe_seconds=round(seconds, 4),
                                      refused=refused,
                                      stale=pg.hold == "eagle-dr" if pg.role == "standby" and pg.hold else None,
                                      lag_bytes=self._not_received(name, pgs_all)))
        self._record(out, pgs, rss)
        return VantageReport(worker=_worker(), sightings=out,
                             watched_seconds=None if watched is None else round(watched, 4))

    def _probe_all(self, req: ProbeRequest) -> dict[str, tuple[PgStatus, RedisStatus, float]]:
        """Every region's PostgreSQL and Redis at once, each bounded by the request's timeout:
        {region: (postgres, redis, seconds)}.

        In parallel and bounded here, not by the clients: a frozen host accepts connections and
        never answers, and libpq will not give up on a connect in under 2 s, so one after the
        other a round took the sum of every timeout (3.3 s for a 1 s budget) and detecting a
        frozen host took ``failure_threshold`` such rounds. A probe still out at the deadline is
        a timeout sighting; its thread is left to end on the client's own timeout."""
        pool = ThreadPoolExecutor(max_workers=2 * max(1, len(req.regions)), thread_name_prefix="probe")
        started = time.monotonic()
        ends: dict[tuple[str, str], float] = {}

        def timed(kind: str, name: str, fn, cfg):
            try:
                return fn(cfg, req.timeout_seconds)
            finally:
                ends[(kind, name)] = time.monotonic()

        # INFO replication is the Redis probe: an answer proves the server serves commands
        # as PING would, and it carries the offset the lag metric needs.
        futures = {(kind, name): pool.submit(timed, kind, name, fn, getattr(self.cfg.region(name), kind))
                   for name in req.regions for kind, fn in (("postgres", _pg_with_files), ("redis", redis_status))}
        pool.shutdown(wait=False)
        wait(futures.values(), timeout=req.timeout_seconds + 0.05)
        missed = f"no answer within {req.timeout_seconds:g}s"
        out = {}
        for name in req.regions:
            pg, rs = futures[("postgres", name)], futures[("redis", name)]
            out[name] = (pg.result() if pg.done() else PgStatus(reachable=False, error=missed),
                         rs.result() if rs.done() else RedisStatus(reachable=False, error=missed),
                         max(ends.get((k, name), time.monotonic()) for k in ("postgres", "redis")) - started)
        return out

    def _credentials(self, regions: list[str]) -> None:
        """Each probed region's passwords, read before any probe's clock starts (a store is
        asked at most once a minute per secret, config.NETWORK_SECRET_TTL_S). Read inside a
        probe, a secret store slower than the probe's bound made every server look down from
        every vantage point at once: an outage the monitor would count, and fail over on. One
        that cannot be read at all is no verdict on any server: this vantage point answers
        nothing (an error, not a sighting of a server down)."""
        for name in regions:
            r = self.cfg.region(name)
            for what, ref in (("postgres", r.postgres.password), ("redis", r.redis.password)):
                if ref is None:
                    continue
                try:
                    ref.resolve()
                    activity.heartbeat()  # a store that hangs costs its client's timeout per secret
                except SecretUnavailable as e:
                    raise ApplicationError(f"{name}'s {what} password cannot be read here ({e}): this vantage point "
                                           "has no verdict on any region", type="SecretUnavailable",
                                           non_retryable=True) from None

    def _watch(self, req: ProbeRequest) -> float:
        """Wait up to ``watch_seconds`` on an idle session to the watched region's PostgreSQL;
        return early when the server closes it (a crash, a kill, a shutdown). Event-driven: no
        connection per tick, so nothing floods the server's log.

        A session that cannot be opened waits the whole time: a server already down or
        restarting must not turn the interval into back-to-back rounds, which would count
        failure_threshold failed rounds within a restart the interval exists to ride out."""
        started = time.monotonic()
        deadline = started + req.watch_seconds
        try:
            conn = connect(self.cfg.region(req.watch_region).postgres, req.timeout_seconds)
            # Named, so an operator reading pg_stat_activity knows whose idle session it is.
            conn.execute(f"set application_name = '{WATCH_APPLICATION}'")
        except Exception:  # noqa: BLE001 - down or refusing: the probe after the wait says which
            conn = None
        try:
            while (left := deadline - time.monotonic()) > 0:
                if conn is None:
                    time.sleep(min(left, 1.0))
                else:
                    # Readable on an idle session: EOF (the server is gone) or, rarely, a
                    # message the server pushed; either way the probe that follows tells.
                    ready, _, _ = select.select([conn.fileno()], [], [], min(left, 1.0))
                    if ready:
                        break
                activity.heartbeat()
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a session to a dead server
                    pass
        return time.monotonic() - started

    @staticmethod
    def _still_refused(r, req: ProbeRequest) -> bool:
        """Both ports refuse at every one of ``confirm_probes`` more probes: a server restarting
        within the window (a supervisor bringing it back) answers one of them and is kept."""
        for _ in range(req.confirm_probes):
            time.sleep(req.confirm_interval_seconds)  # the confirmation's spacing, inside the activity
            activity.heartbeat()
            if not (_refuses(r.postgres.host, r.postgres.port, req.timeout_seconds)
                    and _refuses(r.redis.host, r.redis.port, req.timeout_seconds)):
                return False
        return True

    def _not_received(self, name: str, pgs: dict[str, PgStatus]) -> int | None:
        """What standby ``name`` had not received of the primary's WAL this round, in bytes."""
        sb = pgs.get(name)
        primaries = [(n, pg) for n, pg in pgs.items() if n != name and pg.reachable and pg.role == "primary"]
        if len(primaries) != 1 or sb is None or (sb.reachable and sb.role != "standby"):
            return None  # no primary, or two (a split brain): no "behind" to speak of
        _, primary = primaries[0]
        # The furthest it has: a restarted WAL receiver reports the start of its segment, and a
        # standby replaying from the archive may have replayed past what it streamed.
        got = max((_lsn(x) for x in (sb.receive_lsn, sb.lsn) if x), default=None) if sb.reachable else None
        if got is not None and primary.lsn:
            return max(0, _lsn(primary.lsn) - got)
        # The standby did not answer this vantage point: the primary's own view of it, what it
        # had sent it (not its replay position: replay held back by queries is not lost, and
        # promotion replays what was received first). In flight at most is counted as received.
        standby = self.cfg.region(name)
        link = next((x for x in primary.replicas if x.application_name == standby.name or
                     x.slot_name == standby.postgres.slot_name), None)
        if link is None or not link.sent_lsn or not primary.lsn:
            return None
        return max(0, _lsn(primary.lsn) - _lsn(link.sent_lsn))

    def _record(self, sightings: list[RegionSighting], pgs: dict[str, PgStatus], rss: dict[str, RedisStatus]) -> None:
        """This vantage point's view as metrics: availability and probe latency per region, and
        the lag of each standby behind the primary it saw (PostgreSQL and Redis). Every region's
        lag is set in each round that looked at every region, unknown (NaN) where it cannot be
        measured (no one primary seen, the standby not seen, the region the primary itself): a
        gauge keeps its last value, and a standby that went away showed the lag it had while it
        still streamed. A partial look (a liveness check asks for no region) sets only what it
        measured."""
        full = set(pgs) == {r.name for r in self.cfg.regions}
        meter, svc = activity.metric_meter(), self.cfg.service
        queue = activity.info().task_queue
        vantage = next((r.name for r in self.cfg.regions if r.temporal.task_queue == queue), "control")
        for s in sightings:
            metrics.probe(meter, svc, vantage, s.region, postgres_up=s.postgres_up, redis_up=s.redis_up,
                          seconds=s.probe_seconds or 0.0)
        primaries = [(n, pg) for n, pg in pgs.items() if pg.role == "primary"]
        for standby in self.cfg.regions:
            lag_bytes, lag_seconds = None, None
            if len(primaries) == 1 and primaries[0][0] != standby.name:
                pg = primaries[0][1]
                link = next((x for x in pg.replicas if x.application_name == standby.name or
                             x.slot_name == standby.postgres.slot_name), None)
                if link is not None:
                    lag_bytes, lag_seconds = link.lag_bytes, link.replay_lag_seconds or 0.0
                elif (sb := pgs.get(standby.name)) is not None and sb.role == "standby" and sb.lsn and pg.lsn:
                    # Not streaming (no pg_stat_replication row): what it has replayed against
                    # the primary's end of WAL is the lag that matters for a failover now.
                    lag_bytes = max(0, _lsn(pg.lsn) - _lsn(sb.lsn))
            if full or lag_bytes is not None or lag_seconds is not None:
                metrics.replication_lag(meter, svc, vantage, standby.name, lag_bytes=lag_bytes,
                                        lag_seconds=lag_seconds)
        masters = [rs for rs in rss.values() if rs.role == "master" and rs.offset is not None]
        for region in self.cfg.regions:
            rs = rss.get(region.name)
            lag = None
            if rs is not None and rs.role == "slave" and rs.offset is not None and len(masters) == 1:
                lag = max(0, masters[0].offset - rs.offset)
            if full or lag is not None:
                metrics.redis_offset_lag(meter, svc, vantage, region.name, lag)


def _refuses(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connect to host:port is actively refused (ECONNREFUSED), read from the
    socket's errno rather than a client library's (translatable) message. A timeout, an
    unreachable network or a name that does not resolve is not a refusal: those are what a
    partition or a frozen host look like, and they take the slow, stall-tolerant path."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 2.0)):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)
