"""Point-in-time restore into a scratch instance: pgBackRest restores, PostgreSQL replays.

A scratch instance is a whole PostgreSQL cluster in a directory of its own, on a port of
its own, reachable only from this host (127.0.0.1 and its own socket directory), that never
archives: it starts with ``archive_mode=off`` on the command line (pgBackRest's
``--archive-mode=off`` too), because the copy carries the production archive settings and,
promoted onto a new timeline, would push WAL into the live stanza (notes 3b).

The repo is always named (``--repo``): a restore that lets pgBackRest pick falls back from a
lost bucket to the other with a race in 2.45's async archive-get (2 of 12 starts failed with
"could not locate required checkpoint record"); naming it leaves ``restore_command`` asking
that repo alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import re
import shutil
import tempfile
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import psycopg
import structlog
from pydantic import BaseModel, Field

from activities.backup.catalog import BackupRecord, Catalog
from activities.backup.orphans import OrphanRestore, owner_tag, stop_orphan_restores
from activities.backup.pgbackrest import PgBackRestError, Stanza, _last_error, repo_key, submit_in_activity
from activities.postgres.ctl import PgCtl, PgCtlError, _guc_string
from activities.postgres.lsn import int_to_lsn, lsn_to_int
from activities.postgres.wal import segment_name, segment_start
from eagle_dr.config import PostgresConfig, scrub
from eagle_dr.locks import LockBusy, exclusive


class RestoreTarget(BaseModel):
    """Where recovery stops. ``latest``: the end of the archived WAL."""

    kind: Literal["latest", "time", "lsn", "name"] = "latest"
    time: datetime | None = None
    # An lsn target's position; with a name target, where that restore point is (what
    # pg_create_restore_point returned), so that the restore starts from a backup that ended
    # before it. Without it a name target starts from the newest backup, as pgBackRest does, and
    # fails when that backup ended after the restore point.
    lsn: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
    name: str | None = Field(default=None, min_length=1, max_length=63)
    # Stop just before the target (a corrupting transaction's own commit time) or just after.
    inclusive: bool = True

    def describe(self) -> str:
        if self.kind == "latest":
            return "the end of the archive"
        value = {"time": self.time.isoformat() if self.time else None, "lsn": self.lsn, "name": self.name}[self.kind]
        return f"{self.kind} {value}" + ("" if self.inclusive else " (exclusive)")


log = structlog.get_logger(__name__)


class RestoreError(RuntimeError):
    """A restore refused or failed; ``field`` names the input at fault when it is the input."""

    def __init__(self, message: str, field: str | None = None, kind: str = "RestoreFailed"):
        self.field, self.kind = field, kind
        super().__init__(message)


class Scratch(BaseModel):
    region: str  # whose worker (and host) runs it
    directory: str
    port: int
    socket_dir: str
    repo_region: str
    backup_label: str | None = None
    target: RestoreTarget
    restore_seconds: float  # pgbackrest restore
    recovery_seconds: float  # start, WAL replay, promotion
    # The newest commit the scratch holds (pg_last_committed_xact, track_commit_timestamp):
    # the point the restore actually reached. None when the server does not track it.
    recovered_to: datetime | None = None
    timeline: int | None = None
    # The recovery_target_timeline it followed: the live primary's (a number), the backup's
    # own ("current"), or, when no single reachable primary named the live branch, "latest"
    # (or "current" again when the latest is a branch the backup is not on).
    followed: str | None = None
    # Said when no single reachable primary named the live branch: which one was followed and
    # why that may not be the one wanted (the runbook reports it as degraded).
    timeline_note: str | None = None


def _plain(text: str | None) -> str:
    """pgBackRest quotes a wrongly decrypted file's bytes in its messages: keep printable text."""
    return "".join(c if c.isprintable() else "?" for c in (text or ""))[:300]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def check_target(target: RestoreTarget, catalog: Catalog, repo_region: str, now: datetime) -> None:
    """Refuse a target no backup in the repo can reach, before anything is written."""
    repo = catalog.repo(repo_region)
    if repo is not None and not repo.ok and repo.code != 2:
        raise RestoreError(f"the repo in {repo_region}'s bucket is unreadable ({_plain(repo.message)}): the bucket is "
                           f"gone or unreachable, or the cipher passphrase is wrong", "repo", "RepoUnavailable")
    backups = catalog.on(repo_region)
    if not backups:
        raise RestoreError(f"no backup in {repo_region}'s bucket to restore from", "repo", "NoBackup")
    if target.kind == "time":
        t = target.time
        if t is None:
            raise RestoreError("a time target needs 'time'", "target.time", "InvalidInput")
        if t.tzinfo is None:
            raise RestoreError("the time must carry its time zone (e.g. 2026-12-01T21:02:29+00:00)", "target.time",
                               "InvalidInput")
        if t > now:
            raise RestoreError(f"{t.isoformat()} is in the future (now {now.isoformat(timespec='seconds')})",
                               "target.time", "InvalidInput")
        oldest = backups[0]
        if t < oldest.stopped:
            raise RestoreError(f"{t.isoformat()} is before the end of the oldest backup in {repo_region}'s bucket "
                               f"({oldest.label}, consistent from {oldest.stopped.isoformat()}): nothing can "
                               f"restore to it", "target.time", "InvalidInput")
    if target.kind == "lsn" and not target.lsn:
        raise RestoreError("an lsn target needs 'lsn'", "target.lsn", "InvalidInput")
    if target.kind == "name" and not target.name:
        raise RestoreError("a name target needs 'name' (a restore point from pg_create_restore_point)",
                           "target.name", "InvalidInput")
    if start_backup(backups, target, now) is None:
        ended = [b for b in backups if b.lsn_stop]
        first = min(ended, key=lambda b: lsn_to_int(b.lsn_stop))
        raise RestoreError(f"{target.lsn} is before the end of the oldest backup in {repo_region}'s bucket "
                           f"({first.label}, consistent from {first.lsn_stop}): nothing can restore to it",
                           "target.lsn", "InvalidInput")


def start_backup(backups: list[BackupRecord], target: RestoreTarget, now: datetime) -> BackupRecord | None:
    """The backup a restore to ``target`` starts from (``backups`` of one repo, oldest first).

    A time: the newest that ended by then, else the oldest (pgBackRest's own choice, made
    again by it). A position (an lsn target, or a name target with its restore point's LSN):
    the newest that ended at or before it, passed to pgBackRest as ``--set``: 2.45 takes the
    newest backup for both, and PostgreSQL then refuses a stop point before the end of the
    backup ("before consistent recovery point"), so a drill whose restore point had a backup
    finish after it failed; None when every backup ended after it. Otherwise the newest."""
    if not backups:
        return None
    if target.kind in ("lsn", "name") and target.lsn:
        ended = [b for b in backups if b.lsn_stop]
        if ended:  # records without positions (none from a current pgBackRest): as before
            at = lsn_to_int(target.lsn)
            fit = [b for b in ended if lsn_to_int(b.lsn_stop) <= at]
            return max(fit, key=lambda b: lsn_to_int(b.lsn_stop)) if fit else None
    when = target.time if target.kind == "time" and target.time else now
    return ([b for b in backups if b.stopped <= when] or backups[:1])[-1]


def backup_set(backups: list[BackupRecord], target: RestoreTarget, now: datetime) -> str | None:
    """The ``--set`` a restore to ``target`` must name; None where pgBackRest's own choice is
    right (a time, latest, a name without its position)."""
    if target.kind in ("lsn", "name") and target.lsn and (b := start_backup(backups, target, now)) is not None:
        return b.label
    return None


def socket_dir(directory: Path) -> Path:
    """A short socket directory of the scratch's own: a Unix socket path must stay under 108
    bytes, and a scratch directory deep in a relocated state dir (/var/lib/eagle-dr-lab/...)
    is already longer than that with the socket's name."""
    digest = hashlib.sha1(str(directory.absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"eagle-dr-scratch-{digest}"


def scratch_config(stanza: Stanza, directory: Path, port: int) -> PostgresConfig:
    pg = stanza.region.postgres
    return PostgresConfig(host="127.0.0.1", port=port, database=pg.database, user=pg.user, password=pg.password,
                          data_dir=str(directory / "pgdata"), socket_dir=str(socket_dir(directory)),
                          bin_dir=pg.bin_dir, os_user=pg.os_user)


def timeline_to_follow(stanza: Stanza, repo_region: str, primary_timeline: int | None,
                       timeout: float = 60) -> str | None:
    """Which timeline recovery follows: the live primary's, never PostgreSQL's default "latest".

    A fenced old primary or a split brain's loser that was promoted archives a history file of
    its own into the shared stanza; "latest" then follows that dead branch ("requested timeline
    N is not a child of this server's history"). The primary's own history file names the real
    branch. When the repo lacks that file (the bucket was wiped or lost after the promotion that
    made the timeline) recovery stays on the backup's own timeline ("current"): right when the
    backup was taken on the primary's timeline, and otherwise the copy stops at the fork, which
    a time or LSN target past it reports as "the archived WAL ends before"."""
    if primary_timeline is None:
        return None
    if primary_timeline == 1:
        return "current"
    key = repo_key(stanza.cfg, stanza.region.name, repo_region)
    known = stanza.has_history(key, primary_timeline, timeout)
    if known is None:
        # The listing failed (throttled, timed out): the primary's timeline all the same. If its
        # history file is really missing PostgreSQL refuses to start, loudly; "current" would
        # replay silently to the fork and promote a copy missing everything written since.
        return str(primary_timeline)
    return str(primary_timeline) if known else "current"


def restore_to_scratch(stanza: Stanza, directory: Path, port: int, target: RestoreTarget, repo_region: str,
                       beat=lambda d: None, timeout: float = 3600, timeline: int | None = None,
                       backup: str | None = None) -> Scratch:
    """Restore, start, replay to the target, promote; returns where it is and what it reached.
    ``timeout`` bounds all of it: each part gets what the parts before it left, so the whole
    ends within the activity's start-to-close (timeout + a margin), which used to allow a
    restore, a start and a replay of ``timeout`` each."""
    left = _budget(timeout)
    sc = _prepare(stanza, directory, port)
    _refuse_if_dropped(stanza, directory, port)
    opts = [f"--repo={repo_key(stanza.cfg, stanza.region.name, repo_region)}", f"--pg1-path={sc.data_dir}",
            "--archive-mode=off", *([f"--set={backup}"] if backup else [])]
    if target.kind != "latest":
        value = {"time": target.time.isoformat(sep=" ") if target.time else "", "lsn": target.lsn,
                 "name": target.name}[target.kind]
        opts += [f"--type={target.kind}", f"--target={value}", "--target-action=promote"]
        if not target.inclusive:
            opts.append("--target-exclusive")
    beat({"phase": "pgbackrest restore", "target": target.describe()})
    t0 = time.monotonic()
    # Which timeline to follow asks the repo (a listing: half a second over TLS), so it runs
    # beside the restore instead of before it; its answer goes into the copy's settings after.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        follow_f = submit_in_activity(pool, timeline_to_follow, stanza, repo_region, timeline)
        r = stanza.run("restore", *opts, "--log-level-console=info", timeout=left(), check=False,
                       owner=owner_tag("scratch", directory))
        follow = follow_f.result()
    if r.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        out = r.stderr + r.stdout
        hint = ""
        if "FormatError" in out or "unable to load info file" in out:
            # What a wrong passphrase looks like: the decrypted info file is garbage.
            hint = " (the repo's info files do not decrypt: is the cipher passphrase right?)"
        raise RestoreError(f"pgbackrest restore failed ({r.returncode}): {_plain(scrub(_last_error(out)))}{hint}")
    restore_s = time.monotonic() - t0
    m = re.search(r"restore backup set (\d{8}-\d{6}F(?:_\d{8}-\d{6}[DI])?)", r.stdout + r.stderr)
    label = m.group(1) if m else None
    beat({"phase": "replaying WAL", "backup": label})
    start_tli = _backup_timeline(Path(sc.data_dir))
    ctl = PgCtl(sc)
    if follow:
        # What --target-timeline would have written; the last setting in the file wins.
        auto = Path(sc.data_dir) / "postgresql.auto.conf"
        ctl.write_file(auto, auto.read_text() + f"recovery_target_timeline = '{follow}'\n")
    t1 = time.monotonic()
    note = None
    _refuse_if_dropped(stanza, directory, port)
    try:
        _start(ctl, left())
    except RestoreError as e:
        if follow or "is not a child of this server's history" not in str(e):
            raise
        # No primary named the live branch, and the repo's latest timeline is one this backup
        # is not on (a fenced old primary's or a split brain's loser's, promoted after the
        # backup's timeline forked): recovery refuses it before it changes anything. The
        # backup's own timeline is then the one history it is certainly on.
        follow = "current"
        auto = Path(sc.data_dir) / "postgresql.auto.conf"
        ctl.write_file(auto, auto.read_text() + "recovery_target_timeline = 'current'\n")
        note = ("the repo's latest timeline is a branch this backup is not on, so recovery followed the backup's own "
                "timeline; WAL of any later timeline (a failover since the backup) is not in the copy")
        _start(ctl, left())
    deadline = time.monotonic() + left()
    while True:
        try:
            with connect_scratch(sc) as conn:
                if not conn.execute("select pg_is_in_recovery()").fetchone()[0]:
                    break
        except psycopg.OperationalError:
            pass
        if not ctl.running():
            log = ctl.log.read_text()[-1500:] if ctl.log.exists() else ""
            if "recovery ended before configured recovery target was reached" in log:
                if target.kind == "name" and not target.lsn:
                    # Replay starts at the end of the backup: a restore point written before it
                    # is never met (pgBackRest takes the newest backup for a name).
                    raise RestoreError(
                        f"recovery never met restore point {target.name!r}: it is after the newest archived WAL, "
                        f"or before the end of backup {label}, where replay started; give target.lsn (the "
                        f"restore point's position, pg_create_restore_point's answer) to start from a backup "
                        f"that ended before it", "target.lsn", "InvalidInput")
                # The archive ends before the target (its newest WAL is older): say so plainly.
                raise RestoreError(f"the archived WAL ends before {target.describe()}: nothing newer than the "
                                   f"newest archived segment can be restored; choose an earlier target, or "
                                   f"'latest' for the newest recoverable point", "target", "InvalidInput")
            raise RestoreError(f"the restored copy stopped during recovery: {scrub(log)[-900:]}")
        if time.monotonic() > deadline:
            raise RestoreError(f"recovery did not reach {target.describe()} in {timeout:.0f}s")
        _refuse_if_dropped(stanza, directory, port)
        beat({"phase": "replaying WAL", "backup": label})
        time.sleep(0.1)  # what an operator waits for: promptly seen (heartbeats are throttled by the SDK)
    recovery_s = time.monotonic() - t1
    with connect_scratch(sc) as conn:
        row = conn.execute("select (pg_last_committed_xact()).timestamp").fetchone() if _tracks_commit_ts(conn) else None
        tli = conn.execute("select timeline_id from pg_control_checkpoint()").fetchone()[0]
    how = note or "recovery followed the repo's latest timeline"
    if timeline is None:
        timeline_note = (f"no single reachable primary named the live timeline: {how} (ended on timeline {tli}); if a "
                         f"fenced old primary or a split brain's loser was ever promoted, check the copy holds the "
                         f"branch you want")
    elif follow == "current" and start_tli is not None and start_tli < timeline:
        # The repo lacks the live timeline's history file (a bucket wiped or lost after that
        # promotion): the backup's own timeline ends where the live one forked from it.
        timeline_note = (f"the repo holds no history of the live primary's timeline {timeline}: recovery stayed on "
                         f"backup {label}'s timeline {start_tli}, which the live timeline left at its promotion; "
                         f"nothing written since that promotion is in the copy")
    else:
        timeline_note = None
    _refuse_if_dropped(stanza, directory, port)
    return Scratch(region=stanza.region.name, directory=str(directory), port=port, socket_dir=sc.socket_dir,
                   repo_region=repo_region, backup_label=label, target=target, restore_seconds=restore_s,
                   recovery_seconds=recovery_s, recovered_to=row[0] if row else None, timeline=tli,
                   followed=follow or "latest", timeline_note=timeline_note)


def _backup_timeline(data_dir: Path) -> int | None:
    """The timeline the restored backup was taken on (its backup_label, before recovery
    removes it); None when it cannot be read."""
    try:
        m = re.search(r"^START TIMELINE: (\d+)$", (data_dir / "backup_label").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _prepare(stanza: Stanza, directory: Path, port: int) -> PostgresConfig:
    if not port_free(port):
        raise RestoreError(f"port {port} is already taken on this host", "port", "PortInUse")
    if directory.exists() and any(directory.iterdir()):
        raise RestoreError(f"{directory} exists and is not empty: another scratch instance?", "directory",
                           "ScratchExists")
    sc = scratch_config(stanza, directory, port)
    from activities.backup.pgbackrest import _make_dir

    _make_dir(directory, stanza.region.postgres)
    _make_dir(Path(sc.data_dir), stanza.region.postgres)
    _make_dir(Path(sc.socket_dir), stanza.region.postgres)
    return sc


# Command-line settings beat every file the copy carries: never archive, never listen beyond
# loopback, never wait for a synchronous standby it does not have. (max_wal_senders and friends
# stay as the copy says: recovery refuses values lower than the primary's.)
_SCRATCH_SETTINGS = ("-c archive_mode=off -c archive_command='' -c listen_addresses=127.0.0.1 "
                     "-c synchronous_standby_names='' -c hot_standby=on")


def _budget(timeout: float):
    """What is left of ``timeout`` from now, as a function (at least a second: a part that
    finds it spent still gets to fail with its own message)."""
    end = time.monotonic() + timeout
    return lambda: max(1.0, end - time.monotonic())


def _start(ctl: PgCtl, timeout: float, extra: str = "") -> None:
    try:
        ctl.start(timeout=int(min(timeout, 3600)), extra=f"{_SCRATCH_SETTINGS} {extra}".strip())
    except PgCtlError as e:
        log = ctl.log.read_text()[-1500:] if ctl.log.exists() else ""
        raise RestoreError(f"the restored copy did not start: {scrub(str(e))[:600]} {scrub(log)[-600:]}") from None


# -- a restored copy that follows the primary (restore mode "verify") ----------------------------


class FollowingScratch(BaseModel):
    scratch: Scratch
    # The primary's newest archived segment when the restore began, and where replay of the
    # archive alone reached: past its start, the archive has no gap up to it.
    archived_segment: str | None = None
    archive_replayed_to: str | None = None
    # False: nothing to check against (the primary had archived no segment yet, or only a
    # history file since a promotion); said, never passed as checked.
    archive_checked: bool = True
    upstream: str


VERIFY_APPLICATION = "eagle-dr-restore-verify"


def restore_following(stanza: Stanza, directory: Path, port: int, repo_region: str, primary: PostgresConfig,
                      beat=lambda d: None, timeout: float = 3600, timeline: int | None = None,
                      stall_seconds: float = 30) -> FollowingScratch:
    """The newest backup restored as a hot standby that replays the archive, then streams from
    the primary: the copy the verify mode compares, key by key, with the primary while it
    follows it (consistency check's follower mode).

    Two proofs in one. First the archive alone: replay must get past the start of the
    primary's newest archived segment (read before the restore) with no primary_conninfo. Where
    it stops short and stays put, the repo is asked for the segment it waits for: missing, it is
    a gap, reported (ArchiveGap), instead of being filled from the primary's pg_wal by streaming;
    present, replay is only slow, and is waited for. Then streaming, without a slot (the archive
    backs it), so the copy keeps up with the primary and each range can be compared at one LSN
    on both sides. Refused on a primary whose synchronous_standby_names could take the copy as a
    synchronous standby: commits would then wait on a copy that is about to be dropped."""
    from activities.postgres.status import connect as pg_connect

    left = _budget(timeout)  # one bound for the whole, as restore_to_scratch
    with pg_connect(primary, 10) as conn:
        archived, seg_bytes, sync_names = conn.execute(
            "select last_archived_wal, (select setting::bigint * case unit when '8kB' then 8192 when 'MB' "
            "then 1048576 else 1 end from pg_settings where name = 'wal_segment_size'), "
            "current_setting('synchronous_standby_names') from pg_stat_archiver").fetchone()
    seg_bytes = int(seg_bytes)
    if sync_names and ("*" in sync_names or VERIFY_APPLICATION in sync_names):
        raise RestoreError(f"the primary's synchronous_standby_names ({sync_names!r}) would take the restored copy "
                           "as a synchronous standby: its commits would wait on a copy that is dropped at the end. "
                           "Name the real standbys there instead of '*'", "mode", "InvalidInput")
    floor = _floor(archived, seg_bytes)
    sc = _prepare(stanza, directory, port)
    _refuse_if_dropped(stanza, directory, port)
    key = repo_key(stanza.cfg, stanza.region.name, repo_region)
    beat({"phase": "pgbackrest restore", "as": "standby"})
    t0 = time.monotonic()
    follow = timeline_to_follow(stanza, repo_region, timeline)
    r = stanza.run("restore", f"--repo={key}", f"--pg1-path={sc.data_dir}", "--archive-mode=off", "--type=standby",
                   "--log-level-console=info", *([f"--target-timeline={follow}"] if follow else []),
                   timeout=left(), check=False, owner=owner_tag("scratch", directory))
    if r.returncode != 0:
        raise RestoreError(f"pgbackrest restore failed ({r.returncode}): {_plain(scrub(_last_error(r.stderr + r.stdout)))}")
    restore_s = time.monotonic() - t0
    m = re.search(r"restore backup set (\d{8}-\d{6}F(?:_\d{8}-\d{6}[DI])?)", r.stdout + r.stderr)
    label = m.group(1) if m else None
    ctl = PgCtl(sc)
    t1 = time.monotonic()
    # The archive alone first: a primary_conninfo the copy's settings carry (a once-standby
    # primary keeps one in its file) is overridden on the command line.
    _refuse_if_dropped(stanza, directory, port)
    _start(ctl, left(), "-c primary_conninfo=''")
    deadline = time.monotonic() + left()
    while True:
        reached, passed = _replay_archive(sc, ctl, floor, stall_seconds, deadline, beat, label)
        if floor is None or passed:
            break
        if reached is None:
            continue  # not answering yet: nothing to ask the repo about
        missing = _missing_from_repo(stanza, key, _awaited(sc, reached, floor, archived, timeline, seg_bytes),
                                     Path(sc.data_dir), directory)
        if missing:
            ctl.stop("immediate", timeout=60)
            raise RestoreError(f"the archive in {repo_region}'s bucket has a gap: replay of backup {label} stopped at "
                               f"{reached}, and segment {missing} is not in the bucket, though {primary.host}:"
                               f"{primary.port} had archived up to segment {archived}; a restore from this bucket "
                               f"cannot reach anything after {reached}", "repo", "ArchiveGap")
        beat({"phase": "replaying the archive (slow, no gap)", "at": reached, "until": floor})
    beat({"phase": "streaming from the primary", "backup": label})
    ctl.stop("fast", timeout=120)
    # Appended, not rewritten: the copy's own settings stay (a hot standby refuses to start with
    # max_connections and friends below the primary's, and ALTER SYSTEM may have set them), and
    # so do the restore_command and recovery_target_timeline pgBackRest wrote; the last setting
    # of a name wins. No slot: the archive covers what the primary recycles.
    auto = Path(sc.data_dir) / "postgresql.auto.conf"
    conninfo = ctl.standby_conninfo(primary, VERIFY_APPLICATION)
    text = auto.read_text()
    ctl.write_file(auto, text + ("" if text.endswith("\n") or not text else "\n")
                   + f"primary_conninfo = {_guc_string(conninfo)}\nprimary_slot_name = ''\n")
    _refuse_if_dropped(stanza, directory, port)
    _start(ctl, left())
    wait_streaming(ctl, sc.model_copy(update={"host": sc.socket_dir}), primary, time.monotonic() + left(), timeout,
                   "restored copy", lambda: beat({"phase": "waiting to stream", "backup": label}))
    with connect_scratch(sc) as conn:
        tli = conn.execute("select timeline_id from pg_control_checkpoint()").fetchone()[0]
    scratch = Scratch(region=stanza.region.name, directory=str(directory), port=port, socket_dir=sc.socket_dir,
                      repo_region=repo_region, backup_label=label, target=RestoreTarget(), restore_seconds=restore_s,
                      recovery_seconds=time.monotonic() - t1, timeline=tli)
    _refuse_if_dropped(stanza, directory, port)
    return FollowingScratch(scratch=scratch, archived_segment=archived, archive_replayed_to=reached,
                            archive_checked=floor is not None, upstream=f"{primary.host}:{primary.port}")


def wait_streaming(ctl: PgCtl, node: PostgresConfig, primary: PostgresConfig, deadline: float, timeout: float,
                   what: str, beat) -> None:
    """Until ``node`` (a restore just started as a standby) streams from ``primary``; a copy that
    stops, or the deadline, is a RestoreError naming ``what`` it is."""
    from activities.postgres.standby import _streaming_from

    while not _streaming_from(node, primary):
        if not ctl.running():
            log = ctl.log.read_text()[-1200:] if ctl.log.exists() else ""
            raise RestoreError(f"the {what} stopped: {scrub(log)[-800:]}")
        if time.monotonic() > deadline:
            raise RestoreError(f"the {what} did not stream from {primary.host}:{primary.port} in {timeout:.0f}s")
        beat()
        time.sleep(0.2)


def _floor(archived: str | None, seg_bytes: int) -> str | None:
    """The LSN replay of the archive must get past: the start of the primary's newest archived
    segment. A ``.partial`` (the old timeline's last segment, archived at a promotion) is
    followed by the new timeline's copy of it only at its next archive: the segment before is
    the floor then. A history or backup-label file, or nothing archived: no floor."""
    if not archived or not re.match(r"^[0-9A-F]{24}(\.partial)?$", archived):
        return None
    start = segment_start(archived, seg_bytes)
    if archived.endswith(".partial"):
        start -= seg_bytes
        if start < 0:
            return None
    return int_to_lsn(start)


def _awaited(sc: PostgresConfig, reached: str, floor: str, archived: str, timeline: int | None,
             seg_bytes: int) -> list[list[str]]:
    """The segment replay waits for, as its name on each timeline it may be on (the backup's up
    to the primary's): the one holding ``reached``, and the next one when ``reached`` is inside
    a segment (a record may continue there). Never one past the newest archived segment."""
    try:
        with connect_scratch(sc) as conn:
            own = conn.execute("select timeline_id from pg_control_checkpoint()").fetchone()[0]
    except psycopg.OperationalError:
        own = None
    known = [t for t in (own, int(archived[:8], 16), timeline) if t]
    timelines = range(min(known), max(known) + 1)
    pos = lsn_to_int(reached)
    starts = [pos - pos % seg_bytes]
    if pos % seg_bytes and starts[0] + seg_bytes <= lsn_to_int(floor):
        starts.append(starts[0] + seg_bytes)
    return [[segment_name(t, start, seg_bytes) for t in timelines] for start in starts]


def _missing_from_repo(stanza: Stanza, key: int, awaited: list[list[str]], pg_path: Path,
                       directory: Path) -> str | None:
    """The first awaited segment the repo holds on none of its timelines (archive-get's exit
    code 1: not found), named as on the newest; None when each is there on one of them."""
    dest = directory / "verify-probe.wal"
    for names in awaited:
        found = False
        for name in reversed(names):
            # pg1-path is the copy's: archive-get checks the repo against that pg_control.
            r = stanza.run("archive-get", f"--repo={key}", f"--pg1-path={pg_path}", "--no-archive-async",
                           args=(name, str(dest)), timeout=300, check=False)
            dest.unlink(missing_ok=True)
            if r.returncode == 0:
                found = True
                break
            if r.returncode != 1:
                raise RestoreError(f"could not ask the repo for WAL segment {name} (pgbackrest archive-get "
                                   f"{r.returncode}): {_plain(scrub(_last_error(r.stderr + r.stdout)))}")
        if not found:
            return names[-1]
    return None


def _replay_position(sc: PostgresConfig, floor: str | None) -> tuple[str | None, bool]:
    """(where replay is, whether it went beyond ``floor``: a segment's start, so it read at
    least one record of that segment); (None, False) while the copy does not answer."""
    try:
        with connect_scratch(sc) as conn:
            at, past = conn.execute("select pg_last_wal_replay_lsn()::text, pg_last_wal_replay_lsn() > %s::pg_lsn",
                                    (floor or "0/0",)).fetchone()
            return at, bool(past) and floor is not None
    except psycopg.OperationalError:
        return None, False


def _replay_archive(sc: PostgresConfig, ctl: PgCtl, floor: str | None, stall_seconds: float, deadline: float,
                    beat, label: str | None) -> tuple[str | None, bool]:
    """Until replay passes ``floor``, or stops advancing for ``stall_seconds`` (without a floor:
    settles for 5 s), or the copy stops; returns where replay is and whether it passed."""
    last, since = None, time.monotonic()
    while True:
        if not ctl.running():
            log = ctl.log.read_text()[-1500:] if ctl.log.exists() else ""
            raise RestoreError(f"the restored copy stopped during recovery: {scrub(log)[-900:]}")
        now_at, passed = _replay_position(sc, floor)
        if passed:
            return now_at, True
        if now_at != last:
            last, since = now_at, time.monotonic()
        elif time.monotonic() - since > (stall_seconds if floor is not None else 5):
            return last, False
        if time.monotonic() > deadline:
            raise RestoreError(f"archive replay did not get past {floor} in time (at {now_at})")
        beat({"phase": "replaying the archive", "backup": label, "at": now_at, "until": floor})
        time.sleep(0.2)


def _tracks_commit_ts(conn) -> bool:
    return conn.execute("select current_setting('track_commit_timestamp')").fetchone()[0] == "on"


def connect_scratch(sc: PostgresConfig, dbname: str | None = None, timeout: int = 5) -> psycopg.Connection:
    """Through the scratch's own socket directory: it listens on nothing else we trust."""
    kw = {"password": sc.password.resolve()} if sc.password else {}
    return psycopg.connect(host=sc.socket_dir, port=sc.port, user=sc.user, dbname=dbname or sc.database,
                           connect_timeout=timeout, autocommit=True, **kw)


def _scratch_lock(stanza: Stanza, directory: Path) -> Path:
    # Beside the node's pgBackRest files, not on the scratch volume: nothing of an attempt
    # refused for want of room is left there.
    return stanza.dir / "scratch-locks" / f"{directory.name}.lock"


def scratch_owner_file(stanza: Stanza, directory: Path) -> Path:
    """Whose copy this is (left_copies.py): the run that made it, until its final drop."""
    return stanza.dir / "scratch-locks" / f"{directory.name}.owner.json"


def _dropped_mark(stanza: Stanza, directory: Path) -> Path:
    return stanza.dir / "scratch-locks" / f"{directory.name}.dropped"


def _refuse_if_dropped(stanza: Stanza, directory: Path, port: int) -> None:
    """Looked at again at each step of an attempt, not only when it takes the lock: one frozen
    while it held the lock (a paused VM) outlasts the final drop's wait, and would go on after
    it. What it made so far goes; nothing more is made."""
    if _dropped_mark(stanza, directory).exists():
        _drop(stanza, directory, port)
        raise _dropped(directory)


def _dropped(directory: Path) -> RestoreError:
    return RestoreError(f"the run's scratch copy {directory.name} was already dropped: this attempt outlived its "
                        "run and restores nothing", None, "ScratchDropped")


# The run's final drop waits this long for a live attempt to let go of the directory (it stops
# what the attempt runs meanwhile, its restores given a short grace), within the drop activity's
# 180 s, which also holds the drop itself (a server stop of up to 60 s); then its retry goes on.
LAST_DROP_WAIT_S = 90
# A copy's records (its "dropped" mark, its owner record, its lock file) are kept far longer than
# any attempt can outlive its run (an activity's start-to-close is hours), while its folder
# exists: scratch names are one per run, so none is ever needed again.
RECORD_DAYS = 30


@contextlib.contextmanager
def scratch_attempt(stanza: Stanza, directory: Path):
    """Hold ``directory`` for one attempt at restoring into it (orphans.py): a retry waits for
    a slow attempt still alive; a dead one's restore is stopped by the drop that follows. An
    attempt that outlived its run (its worker cut off from Temporal, it never heard of the
    timeout) finds the run's final drop's mark, and restores nothing: a copy of production
    data made after that drop would be left, writable, for nobody to drop."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(_scratch_lock(stanza, directory)))
        except OSError as e:
            raise RestoreError(f"cannot take the scratch copy's lock on this host ({e}): the worker's user "
                               f"must be able to write {stanza.dir}", None, "LockUnavailable") from None
        if _dropped_mark(stanza, directory).exists():
            raise _dropped(directory)
        yield


def drop_scratch(stanza: Stanza, directory: Path, port: int, last: bool = False) -> bool:
    """Stop and delete a scratch instance; idempotent (True when something was there). A
    restore into it that a dead worker left running is stopped first: deleted under it, the
    directory filled again with production data nobody would drop, and a retry restoring
    into it had a second writer beside it. ``last``: the run's own drop, after which no
    attempt may restore (scratch_attempt): it marks the copy dropped, then takes the
    directory's lock, stopping what a live attempt runs until it lets go (else that attempt
    could restore after the drop), and removes the lock file."""
    if not last:
        return _drop(stanza, directory, port)
    lock, mark = _scratch_lock(stanza, directory), _dropped_mark(stanza, directory)
    marked = False
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        marked = True
        _prune_records(mark.parent, directory.parent)
    except OSError as e:
        # Without the mark a later attempt is not refused; the lock still holds off a live one.
        log.warning("scratch drop without its dropped mark", directory=str(directory), error=str(e))
    dropped = False

    def drop(grace: float = 30) -> None:
        nonlocal dropped
        dropped = _drop(stanza, directory, port, grace) or dropped

    try:
        with exclusive(lock, meanwhile=lambda: drop(grace=5), timeout=LAST_DROP_WAIT_S):
            drop()
            scratch_owner_file(stanza, directory).unlink(missing_ok=True)
            if marked:
                # Removed while held: a waiter on this file and a newcomer on a new one both
                # find the mark and refuse.
                lock.unlink(missing_ok=True)
    except LockBusy as e:
        raise RestoreError(f"an attempt at the copy is still alive: {e}; the drop is retried", None,
                           "AttemptAlive") from None
    except OSError as e:
        # The lock cannot be opened here: the copy goes all the same, production data must not
        # stay for want of a lock file.
        log.warning("scratch drop without its lock", directory=str(directory), error=str(e))
        drop()
    return dropped


def _prune_records(folder: Path, base: Path) -> None:
    """The records in ``folder`` older than RECORD_DAYS of copies with no folder in ``base``:
    those of copies dropped, and of copies never made (a run terminated before its restore)."""
    cutoff = time.time() - RECORD_DAYS * 86400
    for f in [*folder.glob("*.dropped"), *folder.glob("*.owner.json"), *folder.glob("*.lock")]:
        with contextlib.suppress(OSError):
            if not (base / f.name.split(".", 1)[0]).exists() and f.stat().st_mtime < cutoff:
                f.unlink()


def _drop(stanza: Stanza, directory: Path, port: int, grace: float = 30) -> bool:
    try:
        stopped = stop_orphan_restores(stanza, directory, owner_tag("scratch", directory), grace)
    except OrphanRestore as e:
        raise RestoreError(str(e), kind="OrphanRestore") from None
    if stopped:
        log.warning("stopped a restore a dead attempt left running", directory=str(directory), pgids=stopped)
    if not directory.exists():
        return bool(stopped)
    sc = scratch_config(stanza, directory, port)
    ctl = PgCtl(sc)
    if ctl.running():
        try:
            ctl.stop("immediate", timeout=60)
        except PgCtlError:
            ctl.kill()
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(socket_dir(directory), ignore_errors=True)
    return True


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


__all__ = ["RestoreTarget", "RestoreError", "Scratch", "restore_to_scratch", "drop_scratch", "check_target",
           "FollowingScratch", "restore_following",
           "connect_scratch", "port_free", "scratch_config", "PgBackRestError", "utcnow"]
