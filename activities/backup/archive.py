"""The archive guard: the primary never fills its disk because one region's bucket is down.

pgBackRest pushes every WAL segment to both repos and reports success to PostgreSQL only
when both got it (integrations notes 3b). With the other region's bucket unreachable, every
segment "fails" although the live repo has it, the segment stays ``.ready`` in pg_wal and is
never recycled: a region outage elsewhere would grow into a full disk, and so an outage,
here. The guard, run every minute on the primary's worker:

1. reads how much WAL waits (``pg_ls_archive_statusdir()``: ``.ready`` segments) and what
   the archiver says (``pg_stat_archiver``), and probes each bucket with a cheap
   ``repo-ls`` (the async log names the failure, but its repo numbers change once a repo is
   dropped; a probe answers "reachable now?" directly);
2. when WAL waiting exceeds ``backup.archive_backlog_max`` and a bucket is unreachable
   while the other is not, drops the dead one from archiving (``Stanza.set_dropped``
   rewrites archive-push.conf). The archiver then succeeds against the live repo, pg_wal
   shrinks, and that repo's WAL stays continuous (PITR there is unaffected). Below the bound
   nothing is dropped: a short blip of the other region costs no gap;
3. when a dropped bucket answers again, archives to it again, records the WAL gap it now has
   (``archive-gaps.json``) and asks for a full backup to it. Until that full exists, no
   restore from that repo can reach a point after the gap from a backup before it: its
   archive lacks the segments in between (``pitr_blocked``), and PostgreSQL itself refuses to
   promote short of the target ("recovery ended before configured recovery target").

Both buckets down is different: there is no repo to keep continuous, dropping both would
only point archive-push at nothing. WAL then waits, and pgBackRest's
``archive-push-queue-max`` (``backup.archive_queue_max``, by default 4x the guard's bound,
written into archive-push.conf) is the last resort: past it pgBackRest drops WAL (a gap in
both repos, found in its async log and recorded here) and the primary stays up. A database
that stops because its disk filled is a worse outage than a backup gap, which a new full
backup closes.

Why a guard of its own, run by a Schedule, and not a part of MonitorWorkflow: the monitor is
about failing over (optional, often run with ``auto_failover`` off, one long-running
workflow whose history is bounded). Disk protection must run whenever archiving does,
whether or not anyone watches for failover, and a stuck probe of a dead bucket must not
delay the failover monitor's rounds. A one-minute Schedule with overlap SKIP gives one short
workflow per run, each with its outcome (DrOutcome=degraded) searchable: an alert rule can
select on it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import structlog
from pydantic import BaseModel

from activities.backup.catalog import Catalog, read_catalog
from activities.backup.pgbackrest import PgBackRestError, Stanza, _as_owner, _last_error, _write_owned, repos_for
from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig, scrub

log = structlog.get_logger(__name__)

_SEGMENT = re.compile(r"^[0-9A-F]{24}(\.partial)?\.ready$")
QUEUE_DROP = "because archive queue exceeded"


class ArchiverState(BaseModel):
    """What the primary's archiver says (``pg_stat_archiver``) and how much WAL waits."""

    reachable: bool = True
    error: str | None = None
    archive_mode: str | None = None
    segment_bytes: int = 16 << 20
    ready_segments: int = 0  # WAL segments waiting for archive_command
    ready_files: int = 0  # and every other .ready (history, backup labels)
    oldest_ready: str | None = None
    current_wal: str | None = None
    archived_count: int = 0
    last_archived_wal: str | None = None
    last_archived_at: datetime | None = None
    failed_count: int = 0
    last_failed_wal: str | None = None
    last_failed_at: datetime | None = None

    @property
    def ready_bytes(self) -> int:
        return self.ready_segments * self.segment_bytes

    @property
    def failing(self) -> bool:
        """The archiver's last attempt failed (a success since clears it)."""
        return self.last_failed_at is not None and (self.last_archived_at is None
                                                   or self.last_failed_at > self.last_archived_at)


def read_archiver(pg: PostgresConfig, timeout: float = 5) -> ArchiverState:
    """From any host that reaches the database (``eagle-dr status`` uses it too). Needs
    pg_monitor or a superuser for pg_ls_archive_statusdir()."""
    try:
        with connect(pg, timeout) as conn:
            a = conn.execute(
                "select archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal,"
                " last_failed_time, current_setting('archive_mode'),"
                " (select setting::bigint from pg_settings where name = 'wal_segment_size'),"
                " case when pg_is_in_recovery() then null else pg_walfile_name(pg_current_wal_lsn()) end"
                " from pg_stat_archiver").fetchone()
            names = [r[0] for r in conn.execute("select name from pg_ls_archive_statusdir()"
                                                " where name like '%.ready'").fetchall()]
    except Exception as e:  # noqa: BLE001 - a down primary is a state to report, not a crash
        return ArchiverState(reachable=False, error=str(e).strip()[:300])
    segments = sorted(n for n in names if _SEGMENT.match(n))
    return ArchiverState(archived_count=a[0], last_archived_wal=a[1], last_archived_at=a[2], failed_count=a[3],
                         last_failed_wal=a[4], last_failed_at=a[5], archive_mode=a[6], segment_bytes=a[7] or 16 << 20,
                         current_wal=a[8], ready_segments=len(segments), ready_files=len(names),
                         oldest_ready=segments[0].split(".")[0] if segments else None)


# -- the gaps a dropped repo has -------------------------------------------------------------------


class WalGap(BaseModel):
    """WAL a repo lacks: written after ``since`` (the archiver's last success before the
    repo failed) and before ``until`` (when it was archived to again). A backup in that repo
    that ended before ``until`` cannot be replayed past ``since``."""

    repo_region: str
    since: datetime
    last_good_wal: str | None = None
    until: datetime | None = None  # None: still dropped
    resumed_wal: str | None = None
    cause: str = "dropped"  # dropped: the guard; queue-max: pgBackRest dropped WAL (every repo)
    # The first full backup to this repo taken after the gap: from it on, PITR is continuous.
    healed_by: str | None = None


def read_gaps(stanza: Stanza) -> list[WalGap]:
    try:
        return [WalGap(**g) for g in json.loads(stanza.gaps_file.read_text())]
    except (OSError, ValueError):
        return []


def _write_gaps(stanza: Stanza, gaps: list[WalGap]) -> None:
    _write_owned(stanza.gaps_file, json.dumps([g.model_dump(mode="json") for g in gaps], indent=1),
                 stanza.region.postgres)


class GapsBusy(RuntimeError):
    """The gap records stayed locked (a guard round) past the caller's bound."""


@contextmanager
def gaps_locked(stanza: Stanza, wait: float | None = None):
    """One writer of this node's gap records at a time: the guard (every minute) and the prune
    after an expire each read, change and write the whole file, and the later write would
    drop what the other added, a gap record among it. ``wait``: give up (GapsBusy) after that
    many seconds instead of waiting for the guard's round, which may take minutes."""
    with open(stanza.dir / ".archive-gaps.lock", "a") as f:
        if wait is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise GapsBusy(f"the WAL-gap records stayed locked for {wait:.0f} s (an archive guard "
                                       "round)") from None
                    time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def outlived(gap: WalGap, cat: Catalog) -> bool:
    """No restore can meet ``gap`` any more: it is closed, its bucket still lists backups, and
    every one of them ended after it closed (``pitr_blocked`` only stops a restore from a
    backup that ended before ``until``, and no new backup can)."""
    if gap.until is None:
        return False
    backups = cat.on(gap.repo_region)
    return bool(backups) and min(b.stopped for b in backups) >= gap.until


def prune_gaps(stanza: Stanza, cat: Catalog, repo_region: str, wait: float = 30) -> list[WalGap]:
    """Drop this node's gap records of ``repo_region``'s bucket that no restore can meet (after
    an expire removed the backups they concerned); returns those dropped. The records
    otherwise grew for good, and every restore carries all of them in its request. GapsBusy
    after ``wait`` seconds of a guard round holding them: the next expire prunes."""
    with gaps_locked(stanza, wait):
        gaps = read_gaps(stanza)
        gone = [g for g in gaps if g.repo_region == repo_region and outlived(g, cat)]
        if gone:
            _write_gaps(stanza, [g for g in gaps if g not in gone])
    return gone


def pitr_blocked(gaps: list[WalGap], repo_region: str, backup_stopped: datetime, target: datetime) -> WalGap | None:
    """The gap that keeps a restore from ``repo_region``'s bucket, starting from a backup
    that ended at ``backup_stopped``, from replaying to ``target``; None when there is none.
    RestoreWorkflow and the drill must refuse such a target (or use the other repo)."""
    for g in gaps:
        if g.repo_region != repo_region:
            continue
        until = g.until or datetime.now(timezone.utc)
        if backup_stopped < until and target > g.since:
            return g
    return None


# -- the guard -------------------------------------------------------------------------------------


class RepoProbe(BaseModel):
    region: str
    reachable: bool
    stanza: bool = True  # the stanza's archive.info is there

    @property
    def usable(self) -> bool:
        return self.reachable and self.stanza
    error: str | None = None
    seconds: float = 0


class GuardReport(BaseModel):
    region: str  # the primary's
    backlog_max_bytes: int
    queue_max_bytes: int
    archiver: ArchiverState
    repos: list[RepoProbe] = []
    dropped: list[str] = []  # after this run
    newly_dropped: list[str] = []
    readmitted: list[str] = []
    # Readmitted repos with a gap and no full backup since: the workflow starts one.
    needs_full: list[str] = []
    gaps: list[WalGap] = []
    last_push_error: str | None = None
    alerts: list[str] = []

    @property
    def degraded(self) -> bool:
        return bool(self.alerts)


def probe_repo(stanza: Stanza, region: str, timeout: float = 10) -> RepoProbe:
    """Can this node reach that bucket now? ``repo-ls`` of the stanza's archive directory:
    one signed request, no lock, nothing written; with a short io-timeout so a blackholed
    endpoint answers within seconds."""
    key = next(r.key for r in repos_for(stanza.cfg, stanza.region.name) if r.region == region)
    t0 = time.monotonic()
    try:
        argv = stanza.argv("repo-ls", f"--repo={key}", f"--io-timeout={max(1, int(timeout // 2))}")
        r = subprocess.run([*argv, f"archive/{stanza.name}"], capture_output=True, text=True, timeout=timeout * 6,
                           **_as_owner(stanza.region.postgres))
    except Exception as e:  # noqa: BLE001 - subprocess timeout: unreachable
        return RepoProbe(region=region, reachable=False, error=scrub(str(e))[:300],
                         seconds=round(time.monotonic() - t0, 2))
    ok = r.returncode == 0
    # A bucket that answers but lost the stanza (deleted, recreated empty) fails archive-push
    # just the same: archive.info is what archive-push needs first.
    stanza_there = ok and "archive.info" in r.stdout.split()
    return RepoProbe(region=region, reachable=ok, stanza=stanza_there,
                     error=None if ok else scrub(_last_error(r.stderr or r.stdout))[:300],
                     seconds=round(time.monotonic() - t0, 2))


def _last_push_error(stanza: Stanza) -> str | None:
    path = stanza.log_dir / f"{stanza.name}-archive-push-async.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    errors = [ln for ln in tail.splitlines() if "ERROR:" in ln or "WARN:" in ln]
    return scrub(errors[-1].strip())[:400] if errors else None


def _queue_drops(stanza: Stanza, seen_file) -> list[str]:
    """Lines of the async log where pgBackRest dropped WAL (archive-push-queue-max) since the
    last look: a gap in every repo."""
    path = stanza.log_dir / f"{stanza.name}-archive-push-async.log"
    try:
        offset = int(seen_file.read_text())
    except (OSError, ValueError):
        offset = 0
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            if offset > size:  # rotated
                offset = 0
            f.seek(offset)
            chunk = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    _write_owned(seen_file, str(size), stanza.region.postgres)
    return [ln.strip() for ln in chunk.splitlines() if QUEUE_DROP in ln]


def _restart_pushers(stanza: Stanza) -> None:
    """Make the new archive-push.conf count now, not minutes later. The async pusher still
    running read the old file and keeps retrying the dead bucket until its io-timeout (two
    minutes on the notes' lab), and the foreground archive-push waits on it up to
    archive-timeout (60 s). SIGTERM ends both cleanly: pgBackRest exits with an error code (not
    by the signal, so PostgreSQL's archiver only logs a failed archive_command and retries a
    second later), the segment stays .ready and is pushed again with the new file, to a repo
    that may already have it (pgBackRest compares the checksum and skips it). Then a config
    reload wakes the archiver out of its 60 s back-off after failures."""
    for pid in stanza.processes("archive-push", "archive-push:async", archive=True):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    try:
        with connect(stanza.region.postgres, 5) as conn:
            conn.execute("select pg_reload_conf()")
    except Exception as e:  # noqa: BLE001 - the archiver wakes by itself within 60 s
        log.info("could not wake the archiver", error=str(e)[:200])


def guard(stanza: Stanza, backlog_max: int, probe_timeout: float = 10) -> GuardReport:
    """One round of the guard on the primary's node (see the module's docstring)."""
    stanza.write_configs()
    with gaps_locked(stanza):
        return _guard(stanza, backlog_max, probe_timeout)


def _guard(stanza: Stanza, backlog_max: int, probe_timeout: float) -> GuardReport:
    b = stanza.cfg.backup
    arch = read_archiver(stanza.region.postgres)
    rep = GuardReport(region=stanza.region.name, backlog_max_bytes=backlog_max, queue_max_bytes=b.archive_queue_limit,
                      archiver=arch)
    if not arch.reachable:
        rep.alerts.append(f"{stanza.region.name}: PostgreSQL unreachable ({arch.error}); archiving not checked")
        return rep
    regions = [r.region for r in repos_for(stanza.cfg, stanza.region.name)]
    rep.repos = [probe_repo(stanza, r, probe_timeout) for r in regions]
    up = {p.region: p.usable for p in rep.repos}
    recreated: list[str] = []
    if any(p.reachable and not p.stanza for p in rep.repos):
        # The bucket answers without the stanza (lost and recreated): stanza-create makes it
        # again where it is missing (a no-op where it matches), then archiving can resume.
        r = stanza.run("stanza-create", timeout=300, check=False)
        if r.returncode == 0:
            for p in rep.repos:
                if p.reachable and not p.stanza:
                    p.stanza, up[p.region] = True, True
                    # Nothing from before is in that bucket: it needs a full backup before a
                    # restore can start from it (recorded as a gap so the workflow starts one).
                    recreated.append(p.region)
            _restart_pushers(stanza)
        else:
            rep.alerts.append(f"stanza-create for a bucket without the stanza failed: "
                              f"{scrub(_last_error(r.stderr or r.stdout))[:300]}")
    dropped = stanza.dropped()
    gaps = read_gaps(stanza)
    now = datetime.now(timezone.utc)

    readmit = [r for r in dropped if up.get(r)]
    dead = [r for r in regions if not up[r] and r not in dropped]
    live = [r for r in regions if up[r] and r not in dropped]
    drop: list[str] = []
    if dead and arch.ready_bytes > backlog_max:
        if live:
            drop = dead
        else:
            rep.alerts.append(
                f"no bucket reachable ({', '.join(dead)}): {_mb(arch.ready_bytes)} of WAL waits on the primary; past "
                f"{_mb(b.archive_queue_limit)} (archive-push-queue-max) pgBackRest drops WAL, a PITR gap in every repo")
    elif dead:
        rep.alerts.append(f"archiving to {', '.join(dead)}'s bucket fails: {_mb(arch.ready_bytes)} of WAL waits, "
                          f"the repo is dropped from archiving past {_mb(backlog_max)}")
    new_dropped = sorted((set(dropped) - set(readmit)) | set(drop))
    if new_dropped != sorted(dropped):
        stanza.set_dropped(new_dropped)
        _restart_pushers(stanza)
    for r in drop:
        gaps.append(WalGap(repo_region=r, since=arch.last_archived_at or now, last_good_wal=arch.last_archived_wal))
        log.warning("archive guard dropped a bucket from WAL archiving", region=stanza.region.name, repo=r,
                    waiting_bytes=arch.ready_bytes, backlog_max=backlog_max)
    for r in readmit:
        for g in gaps:
            if g.repo_region == r and g.until is None:
                g.until, g.resumed_wal = now, arch.oldest_ready or arch.current_wal
        log.warning("archive guard readmitted a bucket to WAL archiving; its WAL has a gap until a full backup",
                    region=stanza.region.name, repo=r)
    for r in recreated:
        gaps.append(WalGap(repo_region=r, since=now, until=now, cause="stanza-recreated"))
        log.warning("archive guard recreated the stanza in a bucket that had lost it", region=stanza.region.name, repo=r)
    for line in _queue_drops(stanza, stanza.dir / "archive-queue-drops.seen"):
        for r in regions:
            gaps.append(WalGap(repo_region=r, since=now, until=now, cause="queue-max"))
        rep.alerts.append(f"pgBackRest dropped WAL (archive-push-queue-max): {scrub(line)[:200]}")

    # A gap is healed by the first full backup to that repo after it closed.
    open_ = [g for g in gaps if g.until is not None and g.healed_by is None]
    if open_:
        try:
            cat = read_catalog(stanza)
        except PgBackRestError:
            cat = None
        for g in open_:
            full = next((x for x in (cat.on(g.repo_region) if cat else []) if x.type == "full"
                         and x.started >= g.until.replace(microsecond=0)), None)
            if full:
                g.healed_by = full.label
    if gaps != read_gaps(stanza):
        _write_gaps(stanza, gaps)

    rep.dropped, rep.newly_dropped, rep.readmitted, rep.gaps = new_dropped, drop, readmit, gaps
    rep.needs_full = sorted({g.repo_region for g in gaps if g.until is not None and g.healed_by is None
                             and g.repo_region not in new_dropped})
    for r in new_dropped:
        rep.alerts.append(f"{r}'s bucket is dropped from WAL archiving (unreachable; {_mb(arch.ready_bytes)} waited "
                          f"past {_mb(backlog_max)}): PITR from it stops at the gap; the other bucket's is continuous")
    for r in rep.needs_full:
        rep.alerts.append(f"{r}'s bucket has a WAL gap: no PITR across it from that bucket until a full backup "
                          f"to it completes")
    if arch.failing and not dead and not drop:
        rep.last_push_error = _last_push_error(stanza)
        rep.alerts.append(f"archive_command failing since {arch.last_failed_at:%H:%M:%S} UTC "
                          f"({arch.last_failed_wal}) although every archived-to bucket answers")
    elif dead or drop:
        rep.last_push_error = _last_push_error(stanza)
    if rep.alerts:
        log.warning("archiving degraded", region=stanza.region.name, alerts=rep.alerts,
                    waiting_bytes=arch.ready_bytes, dropped=new_dropped)
    return rep


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


__all__ = ["ArchiverState", "GapsBusy", "GuardReport", "WalGap", "gaps_locked", "guard", "outlived", "pitr_blocked", "prune_gaps",
           "read_archiver", "read_gaps"]
