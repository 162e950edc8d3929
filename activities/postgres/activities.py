"""PostgreSQL activities: each one short, idempotent and named for the one action it takes.

Region-bound ones (fence by stopping, rejoin) run on that region's task queue because they
act on its data directory; the others only need a network path to the node.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.deadline import deadline_across_attempts
from activities.heartbeat import heartbeating
from activities.postgres import epoch as epochs
from activities.postgres.ctl import PgCtl
from activities.postgres.divergence import ForkPoint, LostWal, lost_wal
from activities.postgres.fence import PgFence, fence_read_only, fence_stop, lift_stop_fence, unfence
from activities.postgres.promote import Promotion, PromotionAbort, abort_promotion, promote
from activities.postgres.standby import Rejoined, Replayed, rejoin_as_standby, reserve_slot_in, wait_replayed_past
from activities.postgres.status import CURRENT_TIMELINE, PgStatus, connect, pg_status
from activities.postgres.lsn import lsn_to_int
from activities.postgres.sessions import hand_back, open_session, session
from activities.postgres.stopwatch import Stopwatch
from activities.postgres.unlogged import flush_init_forks
from activities.postgres.wal import WalUnreadable, current_timeline
from eagle_dr.config import EagleConfig, scrubbed_first_line


def _redis_epoch(node, service: str, timeout: float) -> epochs.EpochRecord:
    """Redis's record in PostgreSQL's shape, to be compared with it."""
    from activities.redis.epoch import read_epoch

    return epochs.EpochRecord(**read_epoch(node, service, timeout).model_dump(exclude={"node"}))


class EpochReadRequest(BaseModel):
    """Read the epoch ``region`` records; raise the figure to what any of ``others`` records,
    from those that answer within ``others_timeout`` seconds (best effort: never a failure)."""

    region: str
    others: list[str] = []
    others_timeout: float = 1.0
    # The Redis records too (``region``'s and the others'): a move whose PostgreSQL record failed
    # after its promotion (it degrades and goes on) recorded its epoch in Redis only, and the
    # next move, reading PostgreSQL alone, took that epoch again and was refused by Redis.
    redis: bool = False


class EpochRequest(BaseModel):
    region: str
    epoch: int


class UnfenceRequest(BaseModel):
    region: str
    # The runbook's DR epoch. None: a bare region name, what workflows recorded before lifting
    # a fence carried the epoch; still accepted so they replay, and acts unchecked.
    epoch: int | None = None


class PromoteRequest(EpochRequest):
    # How long to wait for the standby to accept writes after pg_promote.
    timeout_seconds: float = 120
    # Also record the epoch in the new primary once it is writable (what record_epoch does),
    # saving the runbook a round trip while writes are stopped. False in older histories.
    record_epoch: bool = False
    # That record failing (a full disk, a trigger) is returned in Promotion.epoch_error, not
    # raised: raised, the step was retried and then aborted, about a node that had promoted.
    epoch_failure_returned: bool = False


class PromoteWhenReplayedRequest(PromoteRequest):
    # The old primary's shutdown checkpoint: promote only once the standby has replayed past it.
    lsn: str
    catch_up_timeout_seconds: float = 120


class FenceRequest(BaseModel):
    region: str
    epoch: int
    # "stop" needs the region's own worker; "read_only" works over the network.
    method: str = "stop"
    # "stop" only: let the archiver push its backlog for up to this long first, while clients
    # still write (a planned switchover). 0 (failover, older histories): fence at once.
    drain_archive_seconds: float = 0
    # "stop" only: return at the shutdown checkpoint, while the postmaster may still be exiting
    # (fence.fence_stop). For a switchover, whose next steps need only the standby.
    at_checkpoint: bool = False
    # "stop" only: SIGKILL a server still up this long after the stop request (fence.fence_stop).
    # A failover's: None waits for a graceful exit up to the stop timeout.
    kill_after_seconds: float | None = None


class ReplayRequest(BaseModel):
    region: str
    lsn: str
    timeout_seconds: float = 300


class FlushInitForksRequest(BaseModel):
    primary: str
    standby: str
    timeout_seconds: float = 120


class LostWalRequest(BaseModel):
    region: str
    # Where the promoted standby left the old primary's WAL (its replay LSN at promotion).
    from_lsn: str


class RejoinRequest(BaseModel):
    region: str
    primary_region: str
    timeout_seconds: float = 300
    # The epoch the run recorded in the primary it rejoins to (None in older histories).
    epoch: int | None = None


def _heartbeat(details) -> None:
    activity.heartbeat(details)


def _still_ours(beat: list[float]):
    """A check made right before pg_promote. An attempt that stalled (a paused VM, a starved
    worker) for longer than half its heartbeat timeout since ``beat[0]`` may be one the server
    has already given up on and retried; the retry may have proven NotPromoted and the runbook
    undone the stop (switchover), or aborted the promotion and lifted the fence (failover). It
    must not wake up and promote."""
    timeout = activity.info().heartbeat_timeout
    bound = timeout.total_seconds() / 2 if timeout else None

    def check() -> None:
        if bound is not None and time.monotonic() - beat[0] > bound:
            raise ApplicationError(f"this attempt stalled {time.monotonic() - beat[0]:.3f} s (over {bound:.3f} s "
                                   "without a heartbeat): not promoting, the server may have moved on",
                                   type="AttemptStalled")
    return check


def _cancel_requested() -> bool:
    """A cancel asked for by the workflow, not a worker shutdown, a pause or a timeout."""
    details = activity.cancellation_details()
    # None only when the SDK cancelled the attempt itself (a heartbeat it could not record):
    # not the runbook asking, so another attempt goes on.
    return details is not None and details.cancel_requested


def keep_skipped_histories(cfg: EagleConfig, region: str, timeline: int) -> list[str]:
    """After a promotion that skipped timeline numbers, put the skipped ones' history files in
    pg_wal, from the archive.

    A standby whose settings name the archive (one rebuilt from backup) picks its new timeline
    past every history file there, a split brain's dead branch included: it skips that branch's
    number instead of reusing it (reuse mixes two histories under one timeline in the archive).
    But a standby that follows this primary asks it, over replication, for the history file of
    every timeline between its own and the primary's, and the primary has none for the skipped
    ones: the standby then retries forever ("could not receive timeline history file"). Their
    content is never followed (the new timeline's own file names its real parents); only their
    presence matters. Best effort: the promotion stands either way; what is missing is logged."""
    pg = cfg.region(region).postgres
    if not pg.data_dir:
        return []
    wal = Path(pg.data_dir) / "pg_wal"
    history = wal / f"{timeline:08X}.history"
    try:
        parents = [int(line.split()[0]) for line in history.read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    except (OSError, ValueError):
        return []
    skipped = [t for t in range(max(parents, default=0) + 1, timeline) if not (wal / f"{t:08X}.history").exists()]
    if not skipped:
        return []
    from activities.backup.pgbackrest import PgBackRestError, Stanza

    kept = []
    for t in skipped:
        name = f"{t:08X}.history"
        try:
            Stanza(cfg, region).run("archive-get", args=(name, str(wal / name)), timeout=60)
            kept.append(name)
        except (PgBackRestError, OSError, ValueError) as e:
            activity.logger.warning("skipped timeline's history not kept", extra={"file": name, "error": str(e)})
    activity.logger.info("kept skipped timelines' history files", extra={"files": kept})
    return kept


class PostgresActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _pg(self, region: str):
        return self.cfg.region(region).postgres

    @activity.defn
    def postgres_status(self, region: str) -> PgStatus:
        return pg_status(self._pg(region), min(self.cfg.health.timeout.total_seconds(), 10))

    @activity.defn
    def read_epoch(self, region: str) -> epochs.EpochRecord:
        return epochs.read_epoch(self._pg(region), self.cfg.service)

    @activity.defn
    def read_highest_epoch(self, req: EpochReadRequest) -> epochs.EpochRecord:
        """The highest epoch ``req.region`` or another region records. Each region records a
        move's epoch on its primary, and the standby gets it by replication: a move cancelled
        after recording on one side, before the other received it, left the next run reading
        the lower one, taking the same epoch again, and refused (StaleEpoch, with the wrong
        story) when it lifted a fence. The others are read beside it and waited for only
        ``others_timeout``: a hung server must not add a connect timeout to an outage."""
        pool = ThreadPoolExecutor(max(1, 2 * len(req.others) + 1))
        try:
            others = [pool.submit(epochs.read_epoch, self._pg(r), self.cfg.service) for r in req.others]
            if req.redis:
                others += [pool.submit(_redis_epoch, self.cfg.region(r).redis, self.cfg.service, req.others_timeout)
                           for r in [req.region, *req.others]]
            best = epochs.read_epoch(self._pg(req.region), self.cfg.service)
            deadline = time.monotonic() + req.others_timeout
            for f in others:
                try:
                    got = f.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - timeout, psycopg.Error, a secret unavailable there
                    continue  # no answer in time: no evidence either way
                if got.epoch > best.epoch:
                    best = got
            return best
        finally:
            pool.shutdown(wait=False)  # a read still out ends by its own connect timeout

    @activity.defn
    def fence_postgres(self, req: FenceRequest) -> PgFence:
        pg = self._pg(req.region)
        # A late step of a superseded run must not fence what a newer move made the primary.
        # Unreachable: no check is possible, and fencing a node nobody can reach harms nothing.
        unresponsive = None
        try:
            held = epochs.read_epoch(pg, self.cfg.service).epoch
        except psycopg.Error as e:
            held = None
            if isinstance(e, psycopg.errors.ConnectionTimeout):
                # It took the connection and never answered (frozen, hung on I/O). The stop
                # fence then goes straight to the stop and its short kill bound, instead of
                # first waiting out the same timeout on a read-only fence's connection: the
                # node ends stopped either way. (The read-only fence alone keeps its own
                # attempt: one timeout is not proof enough to leave a node unfenced.)
                unresponsive = f"unresponsive: {scrubbed_first_line(e)}"
        if held is not None and held > req.epoch:
            raise ApplicationError(f"stale epoch {req.epoch}: {req.region} already records epoch {held}; "
                                   "not fencing the primary of a newer move", type="StaleEpoch", non_retryable=True)
        # Beating while it works: a fast shutdown can wait on the archiver and the shutdown
        # checkpoint, and without beats a worker that dies here (or a server restart that
        # loses the completion) costs the whole start-to-close timeout before the retry.
        with heartbeating(2.0):
            if req.method == "stop":
                return fence_stop(pg, drain_archive_s=req.drain_archive_seconds, at_checkpoint=req.at_checkpoint,
                                  kill_after=req.kill_after_seconds, unresponsive=unresponsive)
            return fence_read_only(pg)

    def _refuse_stale_unfence(self, req: UnfenceRequest) -> None:
        """Lifting a fence is as dangerous as promoting: a late compensation of a superseded run
        would make a writable primary next to the newer move's. Checked against every reachable
        node (see epochs.highest_epoch), before anything is lifted."""
        if req.epoch is None:
            return
        held = epochs.highest_epoch([r.postgres for r in self.cfg.regions], self.cfg.service)
        try:
            epochs.refuse_stale(held, req.epoch, activity.info().workflow_run_id,
                                what=f"lift the fence on {req.region}'s PostgreSQL")
        except epochs.StaleEpoch as e:
            raise ApplicationError(str(e), type="StaleEpoch", non_retryable=True) from e

    @activity.defn
    def unfence_postgres(self, req: str | UnfenceRequest) -> None:
        req = UnfenceRequest(region=req) if isinstance(req, str) else req
        self._refuse_stale_unfence(req)
        unfence(self._pg(req.region))

    @activity.defn
    def lift_postgres_fence(self, req: str | UnfenceRequest) -> None:
        """Undo either fence before the point of no return, on the region's own worker: start the
        old primary again as the primary if it was stopped, then lift the read-only lockout. Idempotent."""
        req = UnfenceRequest(region=req) if isinstance(req, str) else req
        region = req.region
        self._refuse_stale_unfence(req)
        pg = self._pg(region)
        lift_stop_fence(pg)
        unfence(pg)
        # Done means a new session can write: the reload reaches new backends asynchronously.
        deadline = time.monotonic() + 30
        while True:
            try:
                with connect(pg) as conn:
                    if conn.execute("select not pg_is_in_recovery() and "
                                    "current_setting('default_transaction_read_only') = 'off'").fetchone()[0]:
                        return
            except psycopg.Error:
                pass
            if time.monotonic() > deadline:
                raise ApplicationError(f"{region}'s PostgreSQL was started and unfenced but does not take writes")
            time.sleep(0.1)

    @activity.defn
    def lift_postgres_stop_fence(self, req: str | UnfenceRequest) -> bool:
        """Undo a stop fence and start the old primary again (region-bound: its data directory)."""
        req = UnfenceRequest(region=req) if isinstance(req, str) else req
        self._refuse_stale_unfence(req)
        return lift_stop_fence(self._pg(req.region))

    def _check_epoch(self, req: EpochRequest, conn: psycopg.Connection | None = None) -> None:
        current = epochs.read_epoch(self._pg(req.region), self.cfg.service) if conn is None else \
            epochs.read_epoch_on(conn, self.cfg.service)
        info = activity.info()
        # The same epoch is this run's own (a retry) only if the run matches: workflow ids are reused.
        other_run = current.run_id != info.workflow_run_id if current.run_id else current.workflow_id != info.workflow_id
        if current.epoch > req.epoch or (current.epoch == req.epoch and other_run):
            raise ApplicationError(f"stale epoch {req.epoch}: {req.region} already records epoch {current.epoch} "
                                   f"from {current.workflow_id} (run {current.run_id})", type="StaleEpoch",
                                   non_retryable=True)

    @activity.defn
    def abort_promotion(self, req: EpochRequest) -> PromotionAbort:
        """After a failed promote step: stop the region's standby until it provably cannot
        promote any more, or report that it did (region-bound: pg_ctl on its data directory).
        A late attempt of a superseded run is refused on any node's record, not only the
        target's: the target is often what does not answer here (down, starting after a slow
        promotion, a standby taking no connections), and the proof this step exists for is its
        data directory, which needs no SQL. No node answering at all is no evidence of a newer move.
        Read at once and bounded: one hung node (the old primary mid-partition) must not spend
        the step's heartbeat timeout before its first beat, on every attempt."""
        nodes = [self._pg(req.region), *(r.postgres for r in self.cfg.regions if r.name != req.region)]
        pool = ThreadPoolExecutor(len(nodes))
        try:
            reads = [pool.submit(epochs.read_epoch, n, self.cfg.service) for n in nodes]
            deadline, held = time.monotonic() + 10, epochs.EpochRecord(service=self.cfg.service, epoch=0)
            for f in reads:
                try:
                    got = f.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - no answer in time, psycopg.Error, a secret unresolvable here
                    continue  # no evidence either way: the data directory decides
                if got.epoch > held.epoch:
                    held = got
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        try:
            epochs.refuse_stale(held, req.epoch, activity.info().workflow_run_id,
                                what=f"stop {req.region}'s promotion")
        except epochs.StaleEpoch as e:
            raise ApplicationError(str(e), type="StaleEpoch", non_retryable=True) from e
        return abort_promotion(self._pg(req.region), heartbeat=_heartbeat)

    @activity.defn
    def promote_postgres(self, req: PromoteRequest) -> Promotion:
        """Promote the region's standby for epoch ``req.epoch``, refusing if a newer runbook won."""
        pg = self._pg(req.region)
        # This step is the promotion alone: its retries share the first attempt's deadline.
        deadline = deadline_across_attempts(req.timeout_seconds)
        watch = Stopwatch()
        beat = [time.monotonic()]  # no heartbeat before pg_promote: the attempt's start
        # One session for the epoch check, the slots, pg_promote, the wait and the epoch's
        # record: each new one is a SCRAM handshake (and a TLS one), all inside the write outage.
        # The replay wait's, when this worker ran it (sessions.py).
        with session(pg) as conn:
            watch.lap("connect")
            return self._promote_in(req, pg, conn, watch, before_promote=_still_ours(beat), deadline=deadline)

    # no_thread_cancel_exception: the SDK would otherwise raise a cancel inside this thread
    # wherever it happens to be, a promotion half asked for included (and on leaving a
    # shield_thread_cancel_exception block, over the promotion's result). The cancel is read
    # only where it is safe (_wait_replayed_or_refuse).
    @activity.defn(no_thread_cancel_exception=True)
    def promote_when_replayed(self, req: PromoteWhenReplayedRequest) -> Promotion:
        """A planned switchover's replay wait and promotion in one step: the workflow round trip
        and dispatch between them (~30 ms) were write outage.

        The point of no return is inside, and this decides it: the standby is promoted only once
        it has replayed past ``req.lsn`` (the old primary's shutdown checkpoint). Until then a
        cancel, or the catch-up deadline, ends the step with ``NotPromoted``, which proves that
        no attempt of it ever asked for a promotion: each asks only after that replay, and a
        node's replay position never goes back while it runs (a restart drops a pending
        promotion; a node already out of recovery is never reported NotPromoted). The runbook
        then undoes the stop. Past that point a cancel is ignored: the step promotes, and the
        runbook rolls forward. Any other failure proves nothing, and the runbook asks
        ``abort_promotion`` where the node stands."""
        pg = self._pg(req.region)
        watch = Stopwatch()
        beat = [time.monotonic()]  # when this attempt last heartbeated
        conn = self._wait_replayed_or_refuse(req, pg, beat)
        watch.lap("replay wait")
        try:
            promotion = self._promote_in(req, pg, conn, watch, before_promote=_still_ours(beat))
        except BaseException:
            conn.close()
            raise
        hand_back(pg, conn)
        return promotion

    def _wait_replayed_or_refuse(self, req: PromoteWhenReplayedRequest, pg, beat: list[float]) -> psycopg.Connection:
        """A session to the node once it has replayed past ``req.lsn`` (or is out of recovery);
        NotPromoted, proven, on a cancel or at the deadline before that."""
        target = lsn_to_int(req.lsn)
        deadline = deadline_across_attempts(req.catch_up_timeout_seconds)
        conn: psycopg.Connection | None = None
        short = False  # the last read answered: in recovery, not yet past the checkpoint
        seen = "no answer"
        while True:
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = open_session(pg, 2)
                recovering, replay = conn.execute(
                    "select pg_is_in_recovery(), pg_last_wal_replay_lsn()::text").fetchone()
                if not recovering or (replay and lsn_to_int(replay) > target):
                    return conn
                short, seen = True, f"replayed {replay}"
            except psycopg.Error as e:
                short = False
                seen = f"no answer ({scrubbed_first_line(e)})"
                if conn is not None:
                    conn.close()
                conn = None
            cancelled = activity.is_cancelled()
            if cancelled and not _cancel_requested():
                # Worker shutdown, a pause, an attempt the server gave up on: nobody asked to
                # stop the switchover, so another attempt goes on waiting.
                if conn is not None:
                    conn.close()
                raise ApplicationError(f"replay wait on {req.region} interrupted ({activity.cancellation_details()})",
                                       type="AttemptInterrupted")
            if cancelled or time.monotonic() > deadline:
                if conn is not None:
                    conn.close()
                why = "cancelled" if cancelled else \
                    f"not replayed past {req.lsn} within {req.catch_up_timeout_seconds:.0f} s"
                promote_file = Path(pg.data_dir) / "promote" if pg.data_dir else None
                # Only a first attempt proves it: a later one may have an earlier one still
                # alive behind it (stalled, given up on by the server), which abort_promotion
                # and its stall check (still_ours) deal with.
                first = activity.info().attempt == 1
                if not short or not first or promote_file is None or promote_file.exists():
                    # A node that does not answer may be one an earlier attempt asked to promote
                    # (and that then went away); a promote file left from an earlier attempt is
                    # read again by a startup process restarted after a backend crash (the
                    # postmaster removes it only when it starts): nothing is proven, the
                    # runbook finds out.
                    raise ApplicationError(f"{req.region}'s promotion state unknown ({why}; {seen}"
                                           + ("; a promote file is pending" if promote_file and promote_file.exists()
                                              else "") + ("" if first else f"; attempt {activity.info().attempt}")
                                           + ")", type="PromotionUnknown", non_retryable=True)
                # Proven "not promoted, by no attempt": the node answered, in recovery and short
                # of the checkpoint, with no promote file pending, and a promotion is only ever
                # asked past the checkpoint.
                raise ApplicationError(f"{req.region} not promoted ({why}; {seen})", {"seen": seen},
                                       type="NotPromoted", non_retryable=True)
            activity.heartbeat({"target_lsn": req.lsn, "seen": seen})
            beat[0] = time.monotonic()
            time.sleep(0.005 if conn is not None else 0.02)

    def _promote_in(self, req: PromoteRequest, pg, conn: psycopg.Connection, watch: Stopwatch,
                    before_promote=None, deadline: float | None = None) -> Promotion:
        phase = watch.lap
        self._check_epoch(req, conn)
        phase("epoch check")
        # Keep the WAL each other region needs to come back as a standby: failback rewinds
        # it and replays from before the fork, often hours later.
        for other in self.cfg.regions:
            if other.name != req.region:
                reserve_slot_in(conn, pg, other.postgres.slot_name)
        phase("slots")
        if before_promote is not None:
            before_promote()
        # (In promote_when_replayed the time before pg_promote is the replay wait's, bounded by
        # its own deadline: the wait here is per attempt.)
        promotion = promote(pg, timeout_s=req.timeout_seconds, heartbeat=_heartbeat, conn=conn, deadline=deadline)
        phase("pg_promote to writable")
        if promotion.timeline:
            # Also on a retry that finds it promoted already: a first attempt may have died
            # between the promotion and this (idempotent, a file check when nothing was skipped).
            keep_skipped_histories(self.cfg, req.region, promotion.timeline)
        if req.record_epoch:
            # After writable_at: the record is the first write of the new timeline, as when the
            # runbook called record_epoch next; a retry of this activity records it again
            # (idempotent). On a session of its own if the wait had to leave this one.
            try:
                try:
                    self._advance_epoch(req, conn, after_promotion=True)
                except psycopg.Error:  # a closed or broken session raises too
                    with connect(pg) as fresh:
                        self._advance_epoch(req, fresh, after_promotion=True)
            except (psycopg.Error, ApplicationError) as e:
                # A newer epoch found there (StaleEpochAfterPromotion) too: the runbook's own
                # record step meets it again and rolls forward degraded, as before.
                if not req.epoch_failure_returned:
                    raise
                promotion.epoch_error = scrubbed_first_line(e)
            phase("epoch recorded")
        promotion.phases = watch.laps
        return promotion

    @activity.defn
    def reserve_rejoin_slots(self, region: str) -> list[str]:
        """Before a planned switchover's stop, while clients still write: the slots the promote
        step would otherwise make inside the write outage (~15-20 ms). Made on the standby they
        start at its last restartpoint, before the fork, as they would at promotion; the
        promote step then finds them (reserve_slot_in is idempotent). Returns the names of those
        reserved (none when max_slot_wal_keep_size is unset)."""
        pg = self._pg(region)
        names = [o.postgres.slot_name for o in self.cfg.regions if o.name != region]
        with session(pg) as conn:
            if not conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                raise ApplicationError(f"{region} is not a standby: no slot reserved for a promotion",
                                       type="NotStandby", non_retryable=True)
            return [name for name in names if reserve_slot_in(conn, pg, name)]

    @activity.defn
    def drop_rejoin_slots(self, region: str) -> list[str]:
        """Undo of ``reserve_rejoin_slots`` when the switchover is undone: on a node still a
        standby, an inactive slot pins its WAL forever (nothing advances it). A node that is a
        primary by now keeps them: a newer runbook promoted it and they are its standbys'.
        Returns the names dropped."""
        names = [o.postgres.slot_name for o in self.cfg.regions if o.name != region]
        with connect(self._pg(region)) as conn:
            if not conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                return []
            rows = conn.execute("select slot_name, pg_drop_replication_slot(slot_name) from pg_replication_slots "
                                "where slot_name = any(%s) and not active", (names,)).fetchall()
        return [r[0] for r in rows]

    @activity.defn
    def record_epoch(self, req: EpochRequest) -> epochs.EpochRecord:
        with connect(self._pg(req.region)) as conn:
            return self._advance_epoch(req, conn)

    def _advance_epoch(self, req: EpochRequest, conn: psycopg.Connection,
                       after_promotion: bool = False) -> epochs.EpochRecord:
        info = activity.info()
        try:
            return epochs.advance_epoch_in(conn, self.cfg.service, req.epoch, req.region, info.workflow_id,
                                           info.workflow_run_id)
        except epochs.StaleEpoch as e:
            # Inside the promote step, the node is promoted by now: a type of its own, so that no
            # runbook reads it as the StaleEpoch its epoch check raises before promoting (which
            # means "not promoted", and lets a failover lift the old primary's fence).
            raise ApplicationError(str(e), type="StaleEpochAfterPromotion" if after_promotion else "StaleEpoch",
                                   non_retryable=True) from e

    @activity.defn
    def measure_lost_wal(self, req: LostWalRequest) -> LostWal:
        """What the old primary committed that the promoted standby never replayed, read from the
        old primary's own WAL on its own worker: the failover's RPO in bytes, commits and time.
        After a crash nobody planned, pg_controldata's checkpoint is not the end of the WAL:
        pg_waldump reads to the last valid record."""
        pg = self._pg(req.region)
        ctl = PgCtl(pg)
        tli = current_timeline(ctl)
        if ctl.running():
            with connect(pg) as conn:
                tli = conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]
        try:
            return lost_wal(pg, ForkPoint(new_timeline=tli + 1, old_timeline=tli, fork_lsn=req.from_lsn,
                                          loser_timeline=tli))
        except WalUnreadable as e:
            raise ApplicationError(f"{req.region}'s WAL after {req.from_lsn} cannot be read: {e}",
                                   type="WalUnreadable", non_retryable=True) from e

    @activity.defn
    def wait_replayed(self, req: ReplayRequest) -> Replayed:
        return wait_replayed_past(self._pg(req.region), req.lsn, req.timeout_seconds, heartbeat=_heartbeat)

    @activity.defn
    def flush_init_forks(self, req: FlushInitForksRequest) -> str:
        """A restartpoint on the standby before a planned promotion, so that its unlogged
        sequences come up readable (activities/postgres/unlogged.py)."""
        with heartbeating():
            return flush_init_forks(self._pg(req.primary), self._pg(req.standby), req.timeout_seconds,
                                    heartbeat=_heartbeat)

    @activity.defn
    def rejoin_as_standby(self, req: RejoinRequest) -> Rejoined:
        old = self.cfg.region(req.region)
        if req.epoch is not None:
            held = epochs.read_epoch(self._pg(req.primary_region), self.cfg.service).epoch
            if held > req.epoch:
                raise ApplicationError(f"stale epoch {req.epoch}: {req.primary_region} records epoch {held}; not "
                                       f"rejoining {req.region} to it", type="StaleEpoch", non_retryable=True)
        return rejoin_as_standby(old.postgres, self._pg(req.primary_region), application_name=old.name,
                                 slot=old.postgres.slot_name, timeout_s=req.timeout_seconds, heartbeat=_heartbeat)
