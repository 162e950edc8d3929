"""Fencing an old primary so it can never take another write, not even after a restart.

Two strengths:

``read_only`` (over the network, keeps the instance up for inspection): ALTER SYSTEM sets
``default_transaction_read_only`` *and* names a library that does not exist in
``session_preload_libraries``, reloads, then ends every client session. The first alone
is advisory (a client overrides it with ``BEGIN READ WRITE``). The second makes every new
session fail at start ("could not access file eagle_dr_fenced_old_primary"), superusers
included, unless a superuser overrides it in its startup packet, which eagle-dr does for
its own connections (status.connect) and a non-superuser is not allowed to do. Both live
in ``postgresql.auto.conf``, a file: they survive a restart, write no WAL (the failback's
count of commits after the fork stays the application's own) and do not replicate. A
catalog change (ALTER ROLE ... NOLOGIN, ALTER DATABASE ... CONNECTION LIMIT 0) was
rejected: it is WAL, so it would reach the standby before promotion and lock the
application out of the *new* primary, and it would count as a lost commit at failback.

``stop`` (on the region's own worker, which can reach the data directory): read-only
first (so nothing commits while we stop), ``pg_ctl stop``, then ``standby.signal`` plus
a recovery configuration that points at nothing (empty ``primary_conninfo`` and
``restore_command``, its own timeline, no recovery target). A reboot or a manual
``pg_ctl start`` then brings it up as a read-only hot standby with no upstream, for
everyone, superusers included. What it changed is recorded in ``eagle_dr_fence.json`` in
the data directory so ``unfence`` can undo exactly that; pg_rewind and a re-clone remove
it with everything else.

The runbook uses the strongest it can reach and records which one held.
"""

from __future__ import annotations

import json
import time

import psycopg
import structlog
from psycopg import sql
from pydantic import BaseModel

from activities.postgres.ctl import (FENCE_MARKER, FENCED_BY, HOLD_COMMENT, PROMOTE_TRIGGER, RECOVERY_KEYS,
                                     RECOVERY_TARGETS, PgCtl, libraries, setting_name)
from activities.postgres.status import FENCE_LIBRARY, connect, in_recovery
from activities.postgres.stopwatch import Stopwatch
from eagle_dr.config import PostgresConfig, scrubbed_first_line


log = structlog.get_logger(__name__)


class PgFence(BaseModel):
    reachable: bool
    method: str | None = None  # "read_only" | "stop" | "standby" | None (unfenced)
    last_lsn: str | None = None
    timeline: int | None = None
    error: str | None = None
    # stop: pg_controldata says "shut down", so last_lsn (its shutdown checkpoint) is the last
    # record it wrote. False after a crash: the WAL runs on past the last checkpoint.
    clean_shutdown: bool | None = None
    # Unreachable because its port refused the connection: the host answers and nothing
    # listens, so no client can be writing to it. A timeout proves nothing of the kind (a
    # partition, a frozen host): the failover then waits for it to fence itself. Never set
    # for a server behind a proxy (postgres.behind_proxy), which may refuse for a live server.
    refused: bool = False
    # stop: seconds per phase (drain, read_only, stop, controldata, hold), for the runbook's
    # report and the switchover's write-gap breakdown.
    phases: dict[str, float] = {}
    # stop with at_checkpoint: the postmaster was still exiting (its archiver pushing the segment
    # the shutdown closed) when the fence returned, past its last WAL record.
    exiting: bool = False
    # stop with kill_after: it did not stop in time and was SIGKILLed (hung on its host).
    killed: bool = False



def _file_libraries(conn: psycopg.Connection) -> list[str]:
    """session_preload_libraries as the configuration files set it (this session overrides it)."""
    row = conn.execute("select setting from pg_file_settings where name = 'session_preload_libraries' "
                       "and applied").fetchone()
    return libraries(row[0] if row else None)


def _set_libraries(conn: psycopg.Connection, libs: list[str]) -> None:
    if libs:
        conn.execute(sql.SQL("alter system set session_preload_libraries = {}").format(
            sql.SQL(", ").join(sql.Literal(x) for x in libs)))
    else:
        conn.execute("alter system reset session_preload_libraries")


def _new_sessions_refused(cfg: PostgresConfig, timeout: float) -> bool:
    try:
        with psycopg.connect(cfg.dsn(), connect_timeout=max(1, int(timeout)), autocommit=True):
            return False
    except psycopg.OperationalError as e:
        if FENCE_LIBRARY in str(e):
            return True
        raise


def _read_only(conn: psycopg.Connection, cfg: PostgresConfig, timeout: float, live: bool = True) -> str:
    conn.execute("alter system set default_transaction_read_only = on")
    libs = _file_libraries(conn)
    if FENCE_LIBRARY not in libs:
        _set_libraries(conn, [FENCE_LIBRARY, *libs])
    if not live:
        # Written for the next start only (the caller is about to stop the server).
        return conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]
    conn.execute("select pg_reload_conf()")
    # pg_reload_conf() only signals the postmaster: a session forked before it has reloaded
    # still starts unfenced. Wait until a new session is refused, then end every session
    # opened before that moment.
    deadline = time.monotonic() + max(timeout, 5)
    while not _new_sessions_refused(cfg, timeout):
        if time.monotonic() > deadline:
            raise psycopg.OperationalError("the read-only fence did not take effect after reload")
        time.sleep(0.01)
    conn.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                 "where backend_type = 'client backend' and pid <> pg_backend_pid()")
    return conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]


# The fences a regional worker puts on its own node (workers/self_fence.py), as marked.
WORKER_FENCES = ("self", "superseded")

# Fencing and a self-fence's lift take this advisory lock on the node, so a runbook's fence
# never lands between the lift's check of who fenced and its removal of the fence.
FENCE_LOCK = 0x45444652  # "EDFR"


def fence_read_only(cfg: PostgresConfig, timeout: float = 3, by: str = "runbook", live: bool = True) -> PgFence:
    """``live`` False: the fence is written (ALTER SYSTEM) but not loaded, so it takes effect at
    the server's next start: for a caller that stops the server next."""
    try:
        with connect(cfg, timeout) as conn:
            if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                return PgFence(reachable=True, method="standby")
            conn.execute("select pg_advisory_lock(%s)", (FENCE_LOCK,))
            if by in WORKER_FENCES and (held := fence_holder(conn)):
                # Already fenced (by a runbook, or the worker's other fence): the worker's own
                # fences never take over a mark. A runbook that fenced this node between the
                # worker's check and this lock keeps its mark (and so its undo), and a self-fence
                # never turns "superseded" into a fence the worker would lift.
                return PgFence(reachable=True, method="read_only", error=f"already fenced by {held}")
            _mark(conn, by)
            lsn = _read_only(conn, cfg, timeout, live)
            return PgFence(reachable=True, method="read_only", last_lsn=lsn)
    except psycopg.Error as e:
        return PgFence(reachable=False, error=scrubbed_first_line(e),
                       refused="connection refused" in str(e).lower() and not cfg.behind_proxy)


def _mark(conn: psycopg.Connection, by: str | None) -> None:
    """Set (or, None, remove) the fence's owner mark. ALTER SYSTEM knows a custom setting only
    once the session has it as a placeholder, hence the SET first."""
    name = sql.Identifier(*FENCED_BY.split("."))
    conn.execute(sql.SQL("set {} = ''").format(name))
    if by is None:
        conn.execute(sql.SQL("alter system reset {}").format(name))
    else:
        conn.execute(sql.SQL("alter system set {} = {}").format(name, sql.Literal(by)))


def fence_holder(conn: psycopg.Connection) -> str | None:
    """Who fenced this server, if its files fence it read-only ("a runbook" before the marker)."""
    row = conn.execute("select setting from pg_file_settings where name = 'default_transaction_read_only' "
                       "and applied").fetchone()
    if not row or row[0] not in ("on", "true", "1"):
        return None
    return fenced_by(conn) or "a runbook"


def fenced_by(conn: psycopg.Connection) -> str | None:
    row = conn.execute("select setting from pg_file_settings where name = %s and applied", (FENCED_BY,)).fetchone()
    return row[0] if row else None


def lift_self_fence(cfg: PostgresConfig) -> str | None:
    """Lift a read-only fence only if a self-fence put it on and nothing fenced it since;
    returns None when lifted, else why not."""
    with connect(cfg) as conn:
        conn.execute("select pg_advisory_lock(%s)", (FENCE_LOCK,))
        if conn.execute("select pg_is_in_recovery()").fetchone()[0]:
            return "it is a standby now"
        by = fenced_by(conn)
        if by != "self":
            return f"fenced by {by or 'nothing eagle-dr recorded'}, not by itself"
        _lift_read_only(conn)
    _wait_sessions_allowed(cfg)
    return None


# Appended to postgresql.auto.conf (the last setting of a name wins): a standby that
# follows nothing, whatever postgresql.conf or an earlier rejoin left there.
# recovery_target_timeline 'current': held, the server replays only its own timeline. A pinned
# timeline number left in the file outlives a promotion (a standby rebuilt from a backup pins the
# one it followed, rebuild.py), and a server started in recovery towards a timeline its own last
# checkpoint is not on waits for that checkpoint's WAL forever: the fenced node never came up,
# and a split brain's read of the loser hung (CI, stop 30).
# No recovery target either: one left from a manual PITR (recovery_target_lsn and the like) is met
# while a crashed server replays its own WAL, before the consistent point, and PostgreSQL then
# refuses to start ("requested recovery stop point is before consistent recovery point").
_RECOVERY_NOWHERE = (HOLD_COMMENT + "\n"
                     "primary_conninfo = ''\nprimary_slot_name = ''\nrestore_command = ''\n"
                     "recovery_target_timeline = 'current'\n" + "".join(f"{k} = ''\n" for k in RECOVERY_TARGETS))


# PostgreSQL 12-15 promote a standby when the file named by promote_trigger_file appears: an
# operator's (or an old HA tool's) trigger would make a held node writable beside the new
# primary. PostgreSQL 16 removed the setting, and there an unknown name in postgresql.auto.conf
# stops the server from starting, so it is written only where the data directory's version has it.
def _has_promote_trigger(ctl: PgCtl) -> bool:
    try:
        major = int((ctl.data_dir / "PG_VERSION").read_text().split(".")[0])
    except (OSError, ValueError):
        return False  # unknown: writing a name the server may not know would keep it down
    return 12 <= major <= 15


def _hold_settings(ctl: PgCtl) -> str:
    return _RECOVERY_NOWHERE + (f"{PROMOTE_TRIGGER} = ''\n" if _has_promote_trigger(ctl) else "")


def hold_as_standby(ctl: PgCtl, before_stop: bool = False) -> bool:
    """Make a stopped server start as a read-only standby of nothing. Returns False when it
    already starts as a standby that eagle-dr did not fence (a real standby: left alone).
    ``before_stop``: the server is running and about to be stopped by the caller. A running
    server reads standby.signal only at its next start, and the recovery settings only take
    effect in recovery, so they change nothing until then; a crash in between restarts it
    held, which is what the stop is for."""
    if not before_stop and ctl.running() and ctl.exiting() is None:
        # A postmaster past its shutdown checkpoint (stop_to_checkpoint) reads none of these
        # files again; anything earlier could still be running as the primary it is.
        raise RuntimeError("hold_as_standby needs the server stopped")
    signal, auto, marker = (ctl.data_dir / n for n in ("standby.signal", "postgresql.auto.conf", FENCE_MARKER))
    if marker.exists():
        if not signal.exists():
            # A hold interrupted before its signal (the marker is written first), or a marker
            # left behind: finish the hold; the marker keeps the original it saved.
            current = auto.read_text() if auto.exists() else ""
            if HOLD_COMMENT not in current:
                ctl.write_file(auto, current + ("" if current.endswith("\n") or not current else "\n")
                               + _hold_settings(ctl))
            ctl.write_file(signal, "")
        return True  # fenced already (a retry)
    if signal.exists():
        return False
    original = auto.read_text() if auto.exists() else ""
    # The marker first: whatever happens after it, unfence knows what to restore.
    ctl.write_file(marker, json.dumps({"auto_conf": original, "created_standby_signal": True}))
    ctl.write_file(auto, original + ("" if original.endswith("\n") or not original else "\n") + _hold_settings(ctl))
    ctl.write_file(signal, "")
    return True


def drain_archive(cfg: PostgresConfig, max_wait: float) -> int | None:
    """Wait, while clients still write, until the archiver has no segment waiting (.ready).

    A fast shutdown does not end until the archiver has pushed every waiting segment (each
    failing one gets three tries a second apart): a backlog found at stop time is paid for in
    the write outage, seconds per segment with an S3 repository. Waiting for it beforehand
    costs clients nothing. Bounded: under heavy writes new segments keep coming, and an
    archiver that is failing will not catch up by waiting (it retries once a minute), so it is
    not waited for; the shutdown then pays as before. Returns the segments still waiting
    (None: not measurable, e.g. archiving off or no permission)."""
    deadline = time.monotonic() + max_wait
    try:
        with connect(cfg, 3) as conn:
            while True:
                ready, failing = conn.execute(
                    "select (select count(*) from pg_ls_archive_statusdir() where name like '%.ready'), "
                    "coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) "
                    "from pg_stat_archiver").fetchone()
                if ready == 0 or failing or time.monotonic() > deadline:
                    return ready
                time.sleep(0.05)
    except psycopg.Error:
        return None


def _checkpoint(cfg: PostgresConfig) -> None:
    try:
        with connect(cfg, 5) as conn:
            # Bounded: a huge dirty set must not eat the fence's own timeout (the checkpoint
            # goes on in the background; the shutdown then does the rest).
            conn.execute("set statement_timeout = '30s'")
            conn.execute("checkpoint")
    except psycopg.Error as e:
        # Not allowed to (no superuser, no pg_checkpoint role): the shutdown does all of it.
        log.warning("pre-stop checkpoint skipped", error=scrubbed_first_line(e))


def fence_stop(cfg: PostgresConfig, timeout: float = 3, drain_archive_s: float = 0,
               at_checkpoint: bool = False, kill_after: float | None = None,
               unresponsive: str | None = None) -> PgFence:
    """Read-only first (so nothing commits while a stop that may hang is waited for), stop, then
    hold it as a standby of nothing so a restart cannot make it writable; idempotent, also when
    already down.
    ``drain_archive_s``: first let the archiver catch up for up to that long, and checkpoint, so
    neither is paid inside the write outage (a planned switchover; never a failover, where the
    fence must not wait).
    ``at_checkpoint``: return once the shutdown checkpoint is written, while the postmaster may
    still be exiting (``PgCtl.stop_to_checkpoint``; ``exiting`` in the result); its read-only
    fence is written for the next start only (the node answers: a planned move). For a caller
    whose next steps touch only the standby; a later step that needs the old primary gone
    (restart, rewind, start as a standby) waits for the exit through ``PgCtl.stop``.
    ``kill_after``: a server still up that long after the stop request is SIGKILLed (a
    failover: the old primary is being replaced, and one hung on its host, e.g. frozen or
    stuck in I/O, never acts on the request, which held the failover for the whole stop
    timeout). When even its own host's connection timed out, it is hung: 2 s at most. The
    WAL it had flushed survives the kill; clean_shutdown is then False (RPO not proven)."""
    ctl = PgCtl(cfg)
    ro = None
    watch = Stopwatch()
    lap, phases = watch.lap, watch.laps
    exiting, data, killed, was = False, None, False, None
    if ctl.running() and (data := ctl.exiting()) is not None:
        # A retry after an at_checkpoint return: already past its last record, still exiting.
        exiting = True
    elif ctl.running():
        if drain_archive_s > 0:
            drain_archive(cfg, drain_archive_s)
            lap("drain")
            # The shutdown checkpoint writes every dirty buffer before the server exits, all of
            # it write outage (seconds with a large shared_buffers). A checkpoint now, while
            # clients still write, leaves it only what they dirty in the next moments.
            _checkpoint(cfg)
            lap("checkpoint")
        if at_checkpoint or kill_after is not None:
            # Held before the stop: a restart by a supervisor after the kill (or after a stop
            # that ends in uninterruptible I/O, where the kill waits) comes up held, and for a
            # switchover its durable file writes (six fsyncs) stay out of the write outage.
            was = ctl.controldata(check=False)
            hold_as_standby(ctl, before_stop=True)
            lap("hold")
        if at_checkpoint:
            # The read-only fence written for the next start, not loaded: a fast shutdown
            # refuses new sessions and ends the open ones from its first moment, so loading it
            # (reload, the wait until new sessions are refused, ending the old ones: ~40 ms)
            # closed no window and only lengthened a switchover's write outage. Written, it
            # still keeps the node read-only when lifting the stop fence restarts it a primary,
            # until `eagle-dr unfence` has checked the epoch. Written while clients still write.
            ro = fence_read_only(cfg, timeout, live=False)
            lap("read_only at next start")
        elif unresponsive is None:
            ro = fence_read_only(cfg, timeout)
            lap("read_only")
        else:
            # The caller's own connection just timed out (not refused): another would only wait
            # out the same timeout before the stop, all of it before the promotion.
            ro = PgFence(reachable=False, error=unresponsive)
            lap("read_only skipped (unresponsive)")
        if at_checkpoint:
            data = ctl.stop_to_checkpoint("fast", was=was)
            exiting = data is not None
        else:
            if kill_after is not None and not ro.reachable and not ro.refused:
                kill_after = min(kill_after, 2.0)
            killed = ctl.stop("fast", kill_after=kill_after)
        lap("killed" if killed else "stop")
    if data is None:
        # Read before anything else starts it: "shut down" proves the checkpoint is its last record.
        data = ctl.controldata()
        lap("controldata")
    if "hold" not in phases:
        hold_as_standby(ctl)
        lap("hold")
    return PgFence(reachable=True, method="stop",
                   last_lsn=data.get("Latest checkpoint location") or (ro.last_lsn if ro else None),
                   timeline=int(data.get("Latest checkpoint's TimeLineID", "0") or 0),
                   clean_shutdown=data.get("Database cluster state") == "shut down", phases=phases,
                   exiting=exiting, killed=killed)


# What the lift puts back as it was. Not the timeline and the targets: the lift makes the node a
# primary (which reads none of them), and a rebuild's pin or a PITR's target put back would only
# wait for the next start in recovery (a pinned timeline the node has since left never comes).
_RESTORED_KEYS = ("primary_conninfo", "primary_slot_name", "restore_command", PROMOTE_TRIGGER)


def _without_hold(current: str, original: str) -> str:
    """postgresql.auto.conf as it is now, minus what ``hold_as_standby`` added: its recovery
    settings go back to the original's (``_RESTORED_KEYS``) or away, its comment goes. Whatever
    else changed since the hold stays, above all a read-only fence taken after it (the
    switchover holds first): restoring the snapshot would drop that fence, and ``eagle-dr
    unfence`` relies on the server starting read-only so it can check the epoch before
    anything writes."""
    kept = [line for line in current.splitlines()
            if line.strip() != HOLD_COMMENT and setting_name(line) not in (*RECOVERY_KEYS, PROMOTE_TRIGGER)]
    kept += [line for line in original.splitlines() if setting_name(line) in _RESTORED_KEYS]
    return "\n".join(kept) + "\n" if kept else ""


def lift_stop_fence(cfg: PostgresConfig) -> bool:
    """Undo ``hold_as_standby`` (the server must be stopped) and start the server again.
    Returns whether a stop fence was found."""
    ctl = PgCtl(cfg)
    marker = ctl.data_dir / FENCE_MARKER
    if not marker.exists():
        ctl.start()
        return False
    # A running primary reads standby.signal and the recovery settings only at its next start:
    # its hold (a switchover that ended between its hold and its stop) is lifted in place,
    # without the write outage of a restart. Anything else (stopped, or running as the standby
    # the hold made it) is stopped first: the files are its startup's.
    if ctl.running() and in_recovery(cfg, 3) is False:
        _lift_hold_live(cfg, ctl)
        if in_recovery(cfg, 3) is False:
            return True
        # It restarted between the check and the unlink (a crash, a supervisor) and came up
        # as the standby the hold made it: the files are gone now, so a restart brings it up
        # as the primary it was.
        ctl.stop("fast")
        ctl.start()
        return True
    ctl.stop("fast")
    saved = json.loads(marker.read_text())
    auto = ctl.data_dir / "postgresql.auto.conf"
    ctl.write_file(auto, _without_hold(auto.read_text() if auto.exists() else "", saved["auto_conf"]))
    if saved.get("created_standby_signal"):
        (ctl.data_dir / "standby.signal").unlink(missing_ok=True)
    marker.unlink()
    ctl.start()
    return True


def _lift_hold_live(cfg: PostgresConfig, ctl: PgCtl) -> None:
    """A running primary's hold, lifted in place. Its recovery settings are reset through
    ALTER SYSTEM, which the server serialises with any other ALTER SYSTEM (an operator's, a
    self-fence's): writing postgresql.auto.conf beside a running server could lose either
    change. On a primary they were never read (only recovery reads them), and a later rejoin
    writes its own, so the original values are not put back. The marker goes last: until
    then a retry finds the hold and lifts it again."""
    with connect(cfg, 3) as conn:
        for key in (*RECOVERY_KEYS, PROMOTE_TRIGGER) if _has_promote_trigger(ctl) else RECOVERY_KEYS:
            conn.execute(sql.SQL("alter system reset {}").format(sql.Identifier(key)))
    (ctl.data_dir / "standby.signal").unlink(missing_ok=True)
    (ctl.data_dir / FENCE_MARKER).unlink(missing_ok=True)


def _lift_read_only(conn: psycopg.Connection) -> None:
    conn.execute("alter system reset default_transaction_read_only")
    _mark(conn, None)
    libs = _file_libraries(conn)
    if FENCE_LIBRARY in libs:
        _set_libraries(conn, [x for x in libs if x != FENCE_LIBRARY])
    conn.execute("select pg_reload_conf()")


def unfence(cfg: PostgresConfig) -> None:
    """Undo a read-only fence over the network (compensation when promotion did not happen)."""
    with connect(cfg) as conn:
        conn.execute("select pg_advisory_lock(%s)", (FENCE_LOCK,))
        _lift_read_only(conn)
    _wait_sessions_allowed(cfg)


def _wait_sessions_allowed(cfg: PostgresConfig) -> None:
    deadline = time.monotonic() + 10
    while _new_sessions_refused(cfg, 3):
        if time.monotonic() > deadline:
            raise psycopg.OperationalError("the read-only fence was still in effect 10 s after reload")
        time.sleep(0.01)
