"""Promoting a standby: pg_promote, then wait until it really accepts writes."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone

import psycopg
import structlog
from pydantic import BaseModel

from activities.postgres.ctl import PgCtl, PgCtlError
from activities.postgres.status import CURRENT_TIMELINE, connect, in_recovery
from eagle_dr.config import PostgresConfig, scrubbed_first_line

log = structlog.get_logger(__name__)


class Promotion(BaseModel):
    already_primary: bool
    # The standby's last replayed / received WAL before promotion: what the new timeline forks from.
    replay_lsn: str | None = None
    receive_lsn: str | None = None
    timeline: int | None = None
    writable_at: datetime
    # Seconds per part of the promote step, all inside the write outage (shown in its detail).
    phases: dict[str, float] = {}
    # The DR epoch's record, asked of the step, failed after the promotion (epoch_failure_returned):
    # the node is promoted all the same, and the runbook records it in a step of its own.
    epoch_error: str | None = None


def _writable_in(conn: psycopg.Connection) -> tuple[bool, int | None]:
    if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
        return False, None
    # A real write proves it: default_transaction_read_only may still be set.
    with conn.transaction():
        conn.execute("set local transaction_read_only = off")
        # Dropped at commit: a real catalog write every time, and nothing left on a session
        # kept for the next step (sessions.py), where "if not exists" would write nothing.
        conn.execute("create temp table eagle_dr_probe (x int) on commit drop")
    return True, conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]


def _writable(cfg: PostgresConfig) -> tuple[bool, int | None]:
    with connect(cfg, 2) as conn:
        return _writable_in(conn)


def promote(cfg: PostgresConfig, timeout_s: float, heartbeat=None, conn: psycopg.Connection | None = None,
            deadline: float | None = None) -> Promotion:
    """pg_promote, then wait until the node takes a real write. ``conn``: a session the caller
    already opened to the node (it stays the caller's to close). ``deadline``: a
    ``time.monotonic()`` to wait until instead of ``timeout_s`` from pg_promote (a step whose
    retries must not each wait the whole timeout again: activities/deadline.py); the node is
    looked at once even when it has passed."""
    own = conn is None
    conn = connect(cfg) if own else conn
    try:
        return _promote(cfg, conn, timeout_s, heartbeat, deadline)
    finally:
        if own:
            conn.close()


def _promote(cfg: PostgresConfig, conn: psycopg.Connection, timeout_s: float, heartbeat,
             deadline: float | None = None) -> Promotion:
    recovering = conn.execute("select pg_is_in_recovery()").fetchone()[0]
    replay = receive = None
    if recovering:
        replay, receive = conn.execute(
            "select pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text").fetchone()
        # wait => false: we poll ourselves, with heartbeats, instead of blocking in SQL
        # (pg_promote(wait => true) itself polls only every 100 ms).
        conn.execute("select pg_promote(wait => false)")
    if deadline is None:
        deadline = time.monotonic() + timeout_s
    last_err: Exception | None = None
    # The hot-standby session that asked survives the promotion: polling it every 5 ms costs
    # one tiny query, where a new session per poll cost a SCRAM handshake and the old 50 ms
    # sleep added 25 ms on average to every promotion (all of it write outage). Only after an
    # error is a session of our own opened per poll, as before.
    session: psycopg.Connection | None = conn
    first = True
    while first or time.monotonic() < deadline:
        first = False
        try:
            if session is not None and not session.broken and not session.closed:
                ok, tli = _writable_in(session)
            else:
                session = None
                ok, tli = _writable(cfg)
            if ok:
                at = datetime.now(timezone.utc)
                if recovering:
                    # Promotion replays everything received first: the fork is where the new
                    # timeline begins, not the replay position read before pg_promote. Counted
                    # from there, what was received but not yet replayed read as lost (and
                    # could turn an RPO met into MISSED).
                    replay = _switchpoint(session, cfg, tli) or replay
                # Also on a retry that finds it promoted: the attempt before may have ended first.
                _drop_timeline_pin(session, cfg)
                return Promotion(already_primary=not recovering, replay_lsn=replay, receive_lsn=receive, timeline=tli,
                                 writable_at=at)
        except psycopg.Error as e:
            last_err = e
            session = None  # the caller's to close; never polled again
        if heartbeat:
            heartbeat({"waiting": "promotion"})
        time.sleep(0.005 if session is not None else 0.05)
    raise TimeoutError(f"{cfg.host}:{cfg.port} not writable {timeout_s:.0f}s after pg_promote ({last_err})")


_PIN = re.compile(r"^\s*recovery_target_timeline\s*=", re.M)


def _drop_timeline_pin(conn: psycopg.Connection | None, cfg: PostgresConfig) -> None:
    """Remove a standby's pinned ``recovery_target_timeline`` (a rebuild from backup writes one,
    rebuild.py) once the node is a primary. The pin names the timeline it has just left, and
    every copy of its settings inherits it: a pg_basebackup -R replica of it, or a restore of
    its backups (which carry postgresql.auto.conf) would start in recovery towards that
    timeline and wait for it. Read from the file first (this worker has the data directory),
    so a promotion without a pin pays nothing; best effort: the pin is harmless to the node
    itself while it is a primary, and the stop fence's hold overrides it."""
    try:
        if not _PIN.search((PgCtl(cfg).data_dir / "postgresql.auto.conf").read_text()):
            return
    except (OSError, PgCtlError) as e:  # no data_dir configured, or no access to it: cannot tell
        log.debug("timeline pin not checked", error=scrubbed_first_line(e))
        return
    try:
        if conn is None or conn.broken or conn.closed:
            with connect(cfg, 5) as own:
                own.execute("alter system reset recovery_target_timeline")
        else:
            conn.execute("alter system reset recovery_target_timeline")
    except psycopg.Error as e:  # no ALTER SYSTEM for this role, say
        log.warning("timeline pin left in postgresql.auto.conf", error=scrubbed_first_line(e))


class PromotionAbort(BaseModel):
    """Where a promotion that the runbook gave up on ended, once it can no longer change.

    ``standby``: stopped while still in recovery and started again as a standby (its promote
    request gone): it cannot become writable. ``stopped``: the same, but it did not start
    again; it is down and would start as a standby. ``promoted``: it got out of recovery
    before it could be stopped; ``promotion`` says what it forked from.
    """

    state: str
    detail: str
    promotion: Promotion | None = None


def _switchpoint(conn: psycopg.Connection | None, cfg: PostgresConfig, tli: int | None) -> str | None:
    """Where timeline ``tli`` forked from its parent (the switchpoint in its history file,
    which is where replay stopped); None when it cannot be read."""
    if not tli or tli < 2:
        return None
    try:
        if conn is None or conn.broken or conn.closed:
            with connect(cfg, 5) as own:
                return _switchpoint(own, cfg, tli)
        history = conn.execute("select pg_read_file(%s)", (f"pg_wal/{tli:08X}.history",)).fetchone()[0]
    except psycopg.Error:
        return None
    lines = [x.split() for x in history.splitlines() if x.strip() and not x.startswith("#")]
    return lines[-1][1] if lines and len(lines[-1]) > 1 else None


def _promotion_of_primary(cfg: PostgresConfig) -> Promotion | None:
    """A node that is out of recovery: when it is writable, what its timeline forked from."""
    ok, tli = _writable(cfg)
    if not ok:
        return None
    return Promotion(already_primary=False, replay_lsn=_switchpoint(None, cfg, tli), timeline=tli,
                     writable_at=datetime.now(timezone.utc))


def _start(ctl: PgCtl, timeout: int, heartbeat) -> None:
    """``pg_ctl start -w``, heartbeating meanwhile: a start after an immediate stop or a kill
    replays WAL from the last checkpoint (each segment asked of restore_command first), which
    can outlast the step's heartbeat timeout. Timed out, the server retried the step while
    this start still ran, and the retry stopped the starting server again: every attempt
    ended the same way, and the runbook was left with no writer at all."""
    if heartbeat is None:
        ctl.start(timeout=timeout)
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            ctl.start(timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - raised in the activity's thread below
            failed.append(e)

    starting = threading.Thread(target=run, name="abort-promotion-start", daemon=True)
    starting.start()
    while starting.is_alive():
        heartbeat({"starting": str(ctl.data_dir)})
        starting.join(1.0)
    if failed:
        raise failed[0]


def abort_promotion(cfg: PostgresConfig, stop_timeout_s: int = 10, start_timeout_s: int = 120,
                    heartbeat=None) -> PromotionAbort:
    """Make sure a standby whose promotion timed out can no longer become writable.

    A promotion requested with ``pg_promote(wait => false)`` keeps going after the runbook
    stops waiting: a startup process that is slow (a long replay, a stalled disk) finishes
    it minutes later. Lifting the old primary's fence before that is ruled out would end
    with two writable primaries. A running standby cannot prove it never will promote: the
    ``promote`` file may already have been read, and deleting it races with the startup
    process. So it is stopped, escalating to SIGKILL of the whole instance because a stuck
    startup process ignores pg_ctl stop, and only the stopped data directory decides:
    ``standby.signal`` is removed by the startup process when it leaves recovery (before
    the first write on the new timeline), so if it is still there the node never finished
    promoting and starts again as a standby (the postmaster drops a leftover ``promote``
    file at start; we remove it first anyway). If it is gone, the promotion went through:
    the node is started and reported as promoted, and the runbook rolls forward instead of
    unfencing the old primary. Idempotent: a retry finds it stopped or in recovery.
    """
    ctl = PgCtl(cfg)
    if ctl.running() and in_recovery(cfg) is False:
        promotion = _promotion_of_primary(cfg)
        if promotion:
            return PromotionAbort(state="promoted", detail="it had finished promoting", promotion=promotion)
    (ctl.data_dir / "promote").unlink(missing_ok=True)
    how = "pg_ctl stop -m fast"
    for mode in ("fast", "immediate"):
        try:
            ctl.stop(mode, timeout=stop_timeout_s)
        except PgCtlError:
            pass
        if not ctl.running():
            break
        how = f"pg_ctl stop -m {mode} did not stop it; SIGKILL"
        if heartbeat:
            heartbeat({"stopping": mode})
    if ctl.running():
        ctl.kill()
    (ctl.data_dir / "promote").unlink(missing_ok=True)
    if not (ctl.data_dir / "standby.signal").exists():
        # Out of recovery already: the promotion won. Start it and let the runbook roll forward.
        _start(ctl, start_timeout_s, heartbeat)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            try:
                if promotion := _promotion_of_primary(cfg):
                    return PromotionAbort(state="promoted", detail=f"stopped ({how}) after it left recovery",
                                          promotion=promotion)
            except psycopg.Error:
                pass
            if heartbeat:
                heartbeat({"waiting": "promoted node writable"})
            time.sleep(0.1)
        raise TimeoutError(f"{cfg.host}:{cfg.port} left recovery but is not writable {start_timeout_s}s after start")
    try:
        _start(ctl, start_timeout_s, heartbeat)
    except PgCtlError as e:
        return PromotionAbort(state="stopped", detail=f"stopped in recovery ({how}); it did not start again: "
                                                      f"{scrubbed_first_line(e)}")
    # The stopped data directory is the proof; SQL only double-checks it. A standby that takes
    # no connections (hot_standby off, a full max_connections) answers nothing: that is no
    # reason to call the proof unproven and leave both nodes without a writer.
    if in_recovery(cfg) is False:
        # Cannot happen with standby.signal in place; never report "cannot promote" unproven.
        raise RuntimeError(f"{cfg.host}:{cfg.port} restarted with standby.signal but is not in recovery")
    return PromotionAbort(state="standby", detail=f"stopped in recovery ({how}) and restarted as a standby")
