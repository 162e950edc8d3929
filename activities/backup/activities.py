"""Backup activities (pgBackRest). Each runs on the worker of the region whose node it acts
on: pgBackRest reads that node's data directory and config files.
"""

from __future__ import annotations

import errno
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.backup.archive import GuardReport, WalGap, guard, pitr_blocked, probe_repo, prune_gaps, read_gaps
from activities.backup.catalog import BackupRecord, Catalog, read_catalog
from activities.backup.expire import RepoExpiry, expire
from activities.backup.left_copies import (CopyOwner, DropLeftRequest, DropLeftResult, FindLeftRequest, LeftCopy,
                                           drop_copies, find_copies, record_owner)
from activities.backup.pgbackrest import LOCK_ACQUIRE, PgBackRestError, Stanza, endpoint_unreachable, repo_key
from activities.backup.rebuild import RebuiltStandby, rebuild_standby, undo_rebuild
from activities.backup.recover import RowRecovery, RowSelection, SelectionError, recover_rows
from activities.backup.restore import (
    FollowingScratch,
    RestoreError,
    RestoreTarget,
    Scratch,
    backup_set,
    check_target,
    connect_scratch,
    drop_scratch,
    port_free,
    restore_following,
    restore_to_scratch,
    scratch_attempt,
    scratch_config,
    start_backup,
    utcnow,
)
from activities.backup.take import PrimaryRemoteUnreachable, StanzaMissing, take_backup
from activities.heartbeat import heartbeating
from activities.postgres.row_spool import SpoolDir
from activities.postgres.status import connect, pg_status
from eagle_dr.config import EagleConfig, SecretUnavailable, scrub

log = structlog.get_logger(__name__)


class TakeBackupRequest(BaseModel):
    region: str  # the node (and worker) that runs pgBackRest
    primary: str  # the region whose node is primary now
    repo_region: str  # whose bucket the backup goes to
    type: Literal["full", "diff", "incr"] = "incr"
    # Unix seconds: a backup of this type on this repo that started since is this request's own
    # (a retry after the worker died between pgBackRest's end and the activity's).
    not_before: float
    from_standby: bool = False
    timeout_seconds: float = Field(default=6 * 3600, gt=0)
    # False: no pgBackRest expire after the backup; the workflow runs one of its own, under the
    # expiry lock (workflows/repo_lock.py), once it has looked for restores reading the buckets.
    expire_auto: bool = True


class ExpireRequest(BaseModel):
    region: str  # the node (and worker) that runs pgBackRest
    repo_region: str  # whose bucket
    dry_run: bool = False
    keep_fulls: int | None = Field(default=None, ge=1)


class GuardRequest(BaseModel):
    region: str  # the primary's: the node whose WAL waits and whose archive-push.conf is rewritten
    # Overrides backup.archive_backlog_max (a test, or an operator tightening it in an incident).
    backlog_max_bytes: int | None = Field(default=None, ge=16 << 20)
    probe_timeout_seconds: float = Field(default=10, gt=0, le=120)


class WritersGoneRequest(BaseModel):
    region: str  # the node whose pgBackRest processes are looked at
    timeout_seconds: float = Field(default=4 * 3600, gt=0)
    # The commands waited for (a restore waits for an expire alone).
    commands: list[Literal["backup", "expire", "stanza-create"]] = ["backup", "expire", "stanza-create"]


class StanzaReady(BaseModel):
    region: str
    config_changed: bool
    created: bool = False


class BackupActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _stanza(self, region: str) -> Stanza:
        try:
            return Stanza(self.cfg, region)
        except KeyError as e:
            raise ApplicationError(f"unknown region {region!r}", type="InvalidInput", non_retryable=True) from e

    @activity.defn
    def wait_repo_writers_gone(self, req: WritersGoneRequest) -> str:
        """Wait until no pgBackRest command that rewrites the repos (backup, expire,
        stanza-create) runs on this node. Called by the holder of the backup-repo lock right
        after it took it (workflows/repo_lock.py): a holder that was terminated (or timed out)
        gave the lock up at once, while the pgBackRest it started kept writing until it ended.
        Nothing is stopped here: it is finishing what it was asked to, and two writers at once
        is what the lock is for."""
        st = self._stanza(req.region)
        deadline, waited = time.monotonic() + req.timeout_seconds, None
        while (running := st.processes(*req.commands)):
            waited = waited or time.monotonic()
            if time.monotonic() > deadline:
                raise ApplicationError(f"pgBackRest still runs on {req.region} after {req.timeout_seconds:.0f} s "
                                       f"(pids {sorted(running)})", type="RepoBusy")
            activity.heartbeat({"waiting_for": sorted(running)})
            time.sleep(1)
        if waited is None:
            return f"{req.region}: no pgBackRest writing"
        return f"{req.region}: waited {time.monotonic() - waited:.0f} s for a pgBackRest left running"

    @staticmethod
    def _prune_gaps(st: Stanza, repo_region: str) -> list[str]:
        """The WAL-gap records of this bucket that the expire left no backup to meet, dropped."""
        if not any(g.repo_region == repo_region and g.until is not None for g in read_gaps(st)):
            return []  # nothing that could be dropped: no `info` round trip
        try:
            gone = prune_gaps(st, read_catalog(st), repo_region)
        except Exception as e:  # noqa: BLE001 - the expire itself succeeded; the next one prunes
            return [f"WAL-gap records not pruned: {scrub(str(e))[:200]}"]
        return [f"{len(gone)} WAL-gap record(s) dropped: every backup left in the bucket ended after them"] \
            if gone else []

    @activity.defn
    def ensure_backup_config(self, region: str) -> StanzaReady:
        """Write this node's pgBackRest files from the config (idempotent). The node's role
        does not enter them (pg1 is always the node itself), so a failover needs no rewrite."""
        try:
            changed = self._stanza(region).write_configs()
        except (SecretUnavailable, PgBackRestError) as e:
            raise ApplicationError(scrub(str(e)), type="ConfigError", non_retryable=True) from None
        return StanzaReady(region=region, config_changed=changed)

    @activity.defn
    def ensure_stanza(self, region: str) -> StanzaReady:
        """stanza-create on the primary's node: creates whichever repo lacks the stanza (a new
        bucket, one recreated after a loss) and is a no-op where it matches."""
        st = self._stanza(region)
        changed = st.write_configs()
        with heartbeating():
            r = st.run("stanza-create", "--log-level-console=info", timeout=300, check=False)
        if r.returncode != 0:
            raise ApplicationError(f"stanza-create on {region} failed: {scrub(r.stderr.strip()[-800:])}",
                                   type="StanzaCreateFailed")
        out = r.stdout + r.stderr
        # One "stanza-create for stanza ... on repoN" per repo, plus "already exists on repoN
        # and is valid" where there was nothing to do (src/command/stanza/create.c).
        created = out.count("stanza-create for stanza") > out.count("already exists on")
        if created:
            # archive-push failed every segment while a repo lacked archive.info, and the
            # archiver waits a minute after three failures: a reload wakes it, so the WAL a
            # backup taken right now waits for is pushed now.
            try:
                with connect(st.region.postgres, 5) as conn:
                    conn.execute("select pg_reload_conf()")
            except Exception as e:  # noqa: BLE001 - it wakes by itself within a minute
                activity.logger.info("could not wake the archiver", extra={"error": str(e)[:200]})
        return StanzaReady(region=region, config_changed=changed, created=created)

    @activity.defn
    def take_backup(self, req: TakeBackupRequest) -> BackupRecord:
        st = self._stanza(req.region)
        st.write_configs()
        if req.from_standby:
            s = pg_status(st.region.postgres, 5)
            if s.role != "standby":
                # The roles changed since the workflow looked: copying a "standby" that is now a
                # primary would work, but the workflow must decide where to read from.
                raise ApplicationError(f"{req.region} is no longer a standby ({s.role or s.error})",
                                       type="TopologyChanged", non_retryable=True)
        info = activity.info()

        def beat(d: dict) -> None:
            activity.heartbeat(d)

        try:
            return take_backup(st, req.primary, req.repo_region, req.type, req.not_before, req.from_standby,
                               beat, lambda: activity.is_cancelled() or activity.is_worker_shutdown(),
                               # The run id too: activity ids repeat from run to run, and some
                               # backups reuse a fixed workflow id (the archive guard's, the
                               # drill's), so a retry would take an earlier run's backup for its own.
                               owner=f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}",
                               timeout=req.timeout_seconds,
                               first_attempt=info.attempt == 1, expire_auto=req.expire_auto
                               ).model_copy(update={"expire_auto": req.expire_auto})
        except StanzaMissing as e:
            # Not retried here: a retry would fail the same way. The workflow runs stanza-create
            # on the primary's node and asks again.
            raise ApplicationError(str(e), type="StanzaMissing", non_retryable=True) from None
        except PrimaryRemoteUnreachable as e:
            # Not retried here: the workflow decides (a scheduled backup reads the primary).
            raise ApplicationError(str(e), type="PrimaryRemoteUnreachable", non_retryable=True) from None
        except PgBackRestError as e:
            activity.logger.warning("backup failed", extra={"attempt": info.attempt, "error": str(e)})
            raise ApplicationError(str(e), type="BackupFailed") from None

    @activity.defn
    def read_backup_catalog(self, region: str) -> Catalog:
        """``pgbackrest info`` from this node, both repos."""
        with heartbeating():
            try:
                return read_catalog(self._stanza(region))
            except PgBackRestError as e:
                raise ApplicationError(str(e), type="InfoFailed") from None

    @activity.defn
    def expire_backups(self, req: ExpireRequest) -> RepoExpiry:
        """``pgbackrest expire`` on one repo by the retention (or ``keep_fulls``). Idempotent: a
        second run finds nothing more to expire."""
        st = self._stanza(req.region)
        st.write_configs()
        try:
            with heartbeating():
                done = expire(st, req.repo_region, req.dry_run, req.keep_fulls)
                if not req.dry_run:
                    done.notes += self._prune_gaps(st, req.repo_region)
                return done
        except KeyError:
            raise ApplicationError(f"unknown repo region {req.repo_region!r}", type="InvalidInput",
                                   non_retryable=True) from None
        except PgBackRestError as e:
            # A backup holds the stanza's lock: retried (with back-off) until it ends.
            kind = "StanzaLocked" if e.code == LOCK_ACQUIRE else "ExpireFailed"
            raise ApplicationError(str(e), type=kind) from None

    @activity.defn
    def guard_archive(self, req: GuardRequest) -> GuardReport:
        """One round of the archive guard on the primary's node (archive.py). Idempotent: it
        reads the state and converges the dropped-repo file to it."""
        st = self._stanza(req.region)
        with heartbeating():
            try:
                return guard(st, req.backlog_max_bytes or self.cfg.backup.archive_backlog_max,
                             req.probe_timeout_seconds)
            except (SecretUnavailable, PgBackRestError) as e:
                raise ApplicationError(scrub(str(e)), type="ConfigError") from None


class RestoreRequest(BaseModel):
    region: str  # whose worker and host run the scratch instance
    repo_region: str  # whose bucket
    target: RestoreTarget
    # A directory name of its own per request (the workflow id): a retry replaces its own
    # half-made scratch and never another's.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    port: int | None = None  # None: the first free from backup.scratch_port
    timeout_seconds: float = Field(default=3600, gt=0)
    # When repo_region's bucket is unreadable or holds no backup, use the other region's
    # (the own bucket lost with its region); the check says so.
    fallback: bool = False
    # Every region's WAL-gap records, each read by its own worker (workflows/wal_gaps.py).
    # None: a run before they were, which reads this host's files only.
    gaps: list[WalGap] | None = None
    # Regions whose worker could not give its records: read here too, when this host has them.
    gaps_unread: list[str] = []


class FollowRestoreRequest(RestoreRequest):
    """Restore mode verify: the newest backup as a copy that follows ``primary_region``."""

    primary_region: str


class DropScratchRequest(BaseModel):
    region: str
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    port: int


class RebuildRequest(BaseModel):
    region: str  # the standby to rebuild: its worker, its host, its data directory
    primary_region: str  # whom it follows once rebuilt
    repo_region: str  # whose bucket
    timeout_seconds: float = Field(default=3600, gt=0)


class RecoverRowsRequest(BaseModel):
    region: str  # whose host runs the scratch copy
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    port: int
    primary_region: str
    tables: list[RowSelection]
    restored_to: datetime  # the copy's point in time (the engine's "now")
    preview: bool = True
    approved_by: str | None = None


class TargetCheck(BaseModel):
    repo_region: str  # the repo to restore from (the other one when the asked one fell back)
    oldest_backup: str | None = None
    newest_backup: str | None = None
    fell_back: str | None = None  # why the asked repo was not used
    # Of RestoreRequest.gaps_unread: the regions whose gap records this host had after all.
    gaps_read_here: list[str] = []


def _drop_after_failure(st: Stanza, directory: Path, port: int) -> None:
    """The failed attempt's copy dropped; the restore's own error is the one reported."""
    try:
        drop_scratch(st, directory, port)
    except Exception as e:  # noqa: BLE001 - the run's final drop tries again
        log.warning("dropping a failed restore's copy failed", directory=str(directory), error=scrub(str(e))[:200])


def _restore_error(e: RestoreError) -> ApplicationError:
    return ApplicationError(str(e), {"field": e.field, "reason": str(e)} if e.field else None, type=e.kind,
                            non_retryable=e.kind in ("InvalidInput", "PortInUse", "NoBackup", "ScratchExists",
                                                        "ArchiveGap", "NoSpace", "ScratchDropped",
                                                        "LockUnavailable", "RebuildUndone"))


def _record_owner(st: Stanza, directory: Path) -> None:
    """Before the copy exists: a run that ends without dropping it (terminated, reset) leaves
    it to the next restore on this host (left_copies.py), which asks Temporal about its owner."""
    info = activity.info()
    try:
        record_owner(st, directory, CopyOwner(namespace=info.workflow_namespace, workflow_id=info.workflow_id,
                                              run_id=info.workflow_run_id))
    except OSError as e:
        # The restore goes on: a copy with no owner record is only never swept (left alone).
        log.warning("scratch copy owner not recorded", directory=str(directory), error=str(e)[:200])


@contextmanager
def _attempt(st: Stanza, directory: Path):
    """scratch_attempt, its refusals (the copy already dropped, no lock) as the activity's errors."""
    try:
        with scratch_attempt(st, directory):
            yield
    except RestoreError as e:
        raise _restore_error(e) from None


# What a restore needs beyond the backup's database size: the WAL it replays into the copy
# (recycled as it goes, but a segment set at a time) and a margin the volume's other users
# (the standby sharing it) keep.
RESTORE_SLACK = 0.1
RESTORE_SLACK_BYTES = 64 * 2**20


def _target_time(req: RestoreRequest) -> datetime:
    """Where a restore stops, as a time: its target time, else now (latest, an LSN, a name)."""
    return req.target.time if req.target.kind == "time" and req.target.time else utcnow()


def closed_by_later_backups(gaps: list[WalGap], repo: str, backups: list[BackupRecord]) -> list[WalGap]:
    """An open gap (no ``until``) in ``repo`` ends where the first backup to that repo that
    started after it began: the backup succeeded, so the archive reached the repo again by
    then. Only the guard on the node that recorded it closes it otherwise, and a node that is no
    longer the primary runs no guard: its open record would refuse every later restore from
    that bucket for good."""
    out = []
    for g in gaps:
        if g.until is None and g.repo_region == repo:
            first = min((b.started for b in backups if b.started > g.since), default=None)
            if first is not None:
                g = g.model_copy(update={"until": first})
        out.append(g)
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class RestoreActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _primary_timeline(self) -> int | None:
        """The one reachable writable primary's timeline (None when there is not exactly one).
        A fenced old primary (read-only, beside the live one after a failover) is not the live
        branch: counted, it made two and the restore followed "latest", maybe a dead branch."""
        tlis = [s.timeline for s in (pg_status(r.postgres, 5) for r in self.cfg.regions)
                if s.reachable and s.role == "primary" and not s.read_only]
        return tlis[0] if len(tlis) == 1 else None

    def scratch_dir(self, region: str, name: str) -> Path:
        b = self.cfg.backup
        base = Path(b.scratch_dir) if b.scratch_dir else Stanza(self.cfg, region).dir.parent / "scratch"
        return base / name

    @activity.defn
    def read_wal_gaps(self, region: str) -> list[WalGap]:
        """The WAL-gap records this node's archive guard wrote (region-bound: its own files),
        each once (the guard can record the same one again)."""
        seen, out = set(), []
        for g in read_gaps(Stanza(self.cfg, region)):
            if (k := g.model_dump_json()) not in seen:
                seen.add(k)
                out.append(g)
        return out

    @activity.defn
    def check_restore_target(self, req: RestoreRequest) -> TargetCheck:
        """Refuse a target no backup in the repo reaches, before anything is written."""
        st = Stanza(self.cfg, req.region)
        st.write_configs()
        repo, why = req.repo_region, None
        try:
            cat = self._catalog_of(st, repo)
            check_target(req.target, cat, repo, utcnow())
        except RestoreError as e:
            if not (req.fallback and e.kind in ("RepoUnavailable", "NoBackup")):
                raise _restore_error(e) from None
            repo, why = self.cfg.other(req.repo_region).name, str(e)
            try:
                cat = self._catalog_of(st, repo)
                check_target(req.target, cat, repo, utcnow())
            except RestoreError as e2:
                raise _restore_error(RestoreError(f"{why}; and {e2}", e2.field, e2.kind)) from None
        on = cat.on(repo)
        gap, read_here = self._gap_in_the_way(req, repo, on)
        if gap is not None:
            raise _restore_error(RestoreError(
                f"{repo}'s bucket lacks the WAL written from {gap.since.isoformat(timespec='seconds')} to "
                f"{gap.until.isoformat(timespec='seconds') if gap.until else 'now'} ({gap.cause}): a restore from it "
                f"would stop there; choose a target before it, the other bucket, or wait for the full backup "
                f"that heals it", "target", "InvalidInput"))
        return TargetCheck(repo_region=repo, oldest_backup=on[0].label if on else None,
                           newest_backup=on[-1].label if on else None, fell_back=why, gaps_read_here=read_here)

    def _catalog_of(self, st: Stanza, repo: str) -> Catalog:
        """That bucket's part of the catalog, or RepoUnavailable at once when its endpoint does
        not answer. ``info`` of both buckets waited a minute on a lost region's dead endpoint
        (pgBackRest retries the connection per request), the region a restore is run for."""
        with heartbeating():
            # A refused, silent or blackholed endpoint is said within endpoint_unreachable's
            # bounds (seconds); pgBackRest's own look (repo-ls, below) retries a refused
            # connection for about 12.
            why = endpoint_unreachable(self.cfg, repo)
            if why is None and not (probe := probe_repo(st, repo, timeout=6)).reachable:
                why = probe.error
            if why is not None:
                raise RestoreError(f"the repo in {repo}'s bucket is unreadable ({why}): the bucket is gone or "
                                   "unreachable, or the cipher passphrase is wrong", "repo", "RepoUnavailable")
            return read_catalog(st, f"--repo={repo_key(self.cfg, st.region.name, repo)}")

    def _gap_in_the_way(self, req: RestoreRequest, repo: str, backups) -> tuple["WalGap | None", list[str]]:
        """A WAL gap the archive guard recorded (activities/backup/archive.py) between the backup
        the restore would start from and the target, and the regions of ``req.gaps_unread``
        whose records this host had. Restoring across a gap would stop at it and promote a copy
        missing everything after it, as if that were the target.

        The gap records live beside each node's pgBackRest files: the workflow has each region's
        worker read its own and passes them in; a region whose worker did not answer (its region
        lost, the usual reason to restore) is read here when this host has its files (one host,
        or a shared volume). Without them (a run from before), this reads this host's files."""
        gaps, read_here = list(req.gaps or []), []
        for r in self.cfg.regions:
            if req.gaps is not None and r.name not in req.gaps_unread:
                continue
            try:
                st = Stanza(self.cfg, r.name)
                if st.gaps_file.exists():
                    gaps += read_gaps(st)
                    read_here.append(r.name)
            except Exception:  # noqa: BLE001 - another node's files, unreadable from here
                continue
        if not gaps or not backups:
            return None, read_here
        target = _target_time(req)
        start = start_backup(backups, req.target, target) or backups[0]
        return pitr_blocked(closed_by_later_backups(gaps, repo, backups), repo, start.stopped, target), read_here

    @activity.defn
    def restore_scratch(self, req: RestoreRequest) -> Scratch:
        st = Stanza(self.cfg, req.region)
        st.write_configs()
        directory = self.scratch_dir(req.region, req.name)
        ports = [req.port] if req.port else range(self.cfg.backup.scratch_port, self.cfg.backup.scratch_port + 50)
        # A side thread beats through pgbackrest restore too (one blocking call, minutes on a
        # big database), not only through the replay loop; and while a live earlier attempt
        # holds the directory.
        with heartbeating(every=10), _attempt(st, directory):
            try:
                # A retry starts over: what an earlier attempt left in this request's own
                # directory goes, its restore if its worker died (pg_ctl finds its server by the
                # data directory, whatever port it took).
                drop_scratch(st, directory, ports[0])
            except RestoreError as e:
                raise _restore_error(e) from None
            _record_owner(st, directory)
            port = next((p for p in ports if port_free(p)), None)
            if port is None:
                what = f"port {req.port} is already taken on this host" if req.port else \
                    f"no free port in {ports.start}..{ports.stop - 1}"
                raise _restore_error(RestoreError(what, "port", "PortInUse"))
            backups = self._room_for(st, req, directory)
            try:
                return restore_to_scratch(st, directory, port, req.target, req.repo_region, activity.heartbeat,
                                          timeout=req.timeout_seconds, timeline=self._primary_timeline(),
                                          backup=backup_set(backups or [], req.target, utcnow()))
            except RestoreError as e:
                _drop_after_failure(st, directory, port)
                raise _restore_error(e) from None

    def _room_for(self, st: Stanza, req: RestoreRequest, directory: Path) -> list[BackupRecord] | None:
        """Refuse, before anything is written, a restore the scratch volume cannot hold. By
        default the scratch copy is made on a standby's host, beside its data directory: a
        restore that fills that volume stops the standby's replication (its WAL receiver cannot
        write), every day a drill runs. Sized from the backup the restore starts from (its
        database bytes) plus the replay's WAL and a margin; unknown sizes are not guessed at.
        Returns that bucket's backups (None: unread), from which the restore picks its set."""
        try:
            with heartbeating():
                # That bucket alone: the other may be a lost region's, whose dead endpoint costs
                # pgBackRest a minute of retries.
                backups = read_catalog(st, f"--repo={repo_key(self.cfg, st.region.name, req.repo_region)}"
                                       ).on(req.repo_region)
        except Exception as e:  # noqa: BLE001 - the check before read it; the restore says why if it cannot
            activity.logger.warning("restore space check skipped: catalog unreadable: %s", e)
            return None
        start = start_backup(backups, req.target, utcnow())
        if start is None or not start.size:
            return backups
        probe = directory
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        need = int(start.size * (1 + RESTORE_SLACK)) + RESTORE_SLACK_BYTES
        if free < need:
            raise _restore_error(RestoreError(
                f"backup {start.label} restores {_gib(start.size)} of database; {probe} on {req.region}'s "
                f"host has {_gib(free)} free, about {_gib(need)} needed with the replay's WAL: the restore would fill "
                "that volume (a standby's data directory on it would stop replicating). Free space there, set "
                "backup.scratch_dir to a larger volume, or run the copy on another region's host (region)",
                "region", "NoSpace"))
        return backups

    @activity.defn
    def restore_following_scratch(self, req: FollowRestoreRequest) -> FollowingScratch:
        """The newest backup restored into a scratch that replays the archive to the primary's
        newest archived segment (a gap is an ArchiveGap error), then streams from the primary."""
        st = Stanza(self.cfg, req.region)
        st.write_configs()
        directory = self.scratch_dir(req.region, req.name)
        ports = [req.port] if req.port else range(self.cfg.backup.scratch_port, self.cfg.backup.scratch_port + 50)
        with heartbeating(every=10), _attempt(st, directory):
            try:
                drop_scratch(st, directory, ports[0])  # a retry starts over, as restore_scratch does
            except RestoreError as e:
                raise _restore_error(e) from None
            _record_owner(st, directory)
            port = next((p for p in ports if port_free(p)), None)
            if port is None:
                raise _restore_error(RestoreError(f"no free port for the scratch copy (from {ports[0]})", "port",
                                                  "PortInUse"))
            self._room_for(st, req, directory)
            primary = self.cfg.region(req.primary_region).postgres
            try:
                return restore_following(st, directory, port, req.repo_region, primary, activity.heartbeat,
                                         timeout=req.timeout_seconds, timeline=pg_status(primary, 5).timeline)
            except RestoreError as e:
                _drop_after_failure(st, directory, port)
                raise _restore_error(e) from None

    @activity.defn
    def find_left_copies(self, req: FindLeftRequest) -> list[LeftCopy]:
        """The scratch copies on this host old enough to judge, with their owners (left_copies.py)."""
        return find_copies(Stanza(self.cfg, req.region), self._scratch_base(req.region), req.looked_at)

    @activity.defn
    def drop_left_copies(self, req: DropLeftRequest) -> DropLeftResult:
        """The named copies on this host dropped: their runs have ended (left_copies.py)."""
        with heartbeating():
            return drop_copies(Stanza(self.cfg, req.region), self._scratch_base(req.region), req.names, req.looked_at)

    def _scratch_base(self, region: str) -> Path:
        return self.scratch_dir(region, "x").parent

    @activity.defn
    def drop_scratch(self, req: DropScratchRequest) -> bool:
        with heartbeating():
            try:
                return drop_scratch(Stanza(self.cfg, req.region), self.scratch_dir(req.region, req.name), req.port,
                                    last=True)
            except RestoreError as e:
                raise _restore_error(e) from None

    @activity.defn
    def rebuild_standby(self, req: RebuildRequest) -> RebuiltStandby:
        """Replace the region's standby with a restore of the newest backup (region-bound: its
        data directory). The old directory is kept aside until the new one streams."""
        if req.region == req.primary_region:
            raise _restore_error(RestoreError(f"{req.region} is the primary: only a standby is rebuilt", "region",
                                              "InvalidInput"))
        st = Stanza(self.cfg, req.region)
        st.write_configs()
        node = self.cfg.region(req.region)
        try:
            # A side thread beats through the long blocking calls (pgbackrest restore, waiting
            # for another attempt's lock): the steps' own beats come only between them.
            with heartbeating():
                info = activity.info()
                return rebuild_standby(st, self.cfg.region(req.primary_region).postgres, req.repo_region,
                                       application_name=node.name, slot=node.postgres.slot_name,
                                       beat=activity.heartbeat, timeout=req.timeout_seconds,
                                       attempt_of=f"{info.workflow_id}/{info.workflow_run_id}")
        except RestoreError as e:
            raise _restore_error(e) from None

    @activity.defn
    def undo_rebuild(self, req: RebuildRequest) -> str:
        """The rebuild's undo when it failed or was cancelled (region-bound: its data directory):
        the original directory back in place and the node as the rebuild found it, if the
        rebuild's own cleanup did not get to it; returns what it did and where the node stands."""
        st = Stanza(self.cfg, req.region)
        node = self.cfg.region(req.region)
        info = activity.info()
        with heartbeating():
            try:
                return undo_rebuild(st, self.cfg.region(req.primary_region).postgres, slot=node.postgres.slot_name,
                                    attempt_of=f"{info.workflow_id}/{info.workflow_run_id}")
            except RestoreError as e:
                raise _restore_error(e) from None

    @activity.defn
    def recover_rows(self, req: RecoverRowsRequest) -> RowRecovery:
        """The selected rows of the scratch copy, decided against the primary by the conflict
        engine: rolled back (``preview``) or applied with an audit row per key. Idempotent per run."""
        st = Stanza(self.cfg, req.region)
        sc = scratch_config(st, self.scratch_dir(req.region, req.name), req.port)
        info = activity.info()
        # The copy's rows wait on the worker's disk, not in its memory (postgres/row_spool.py).
        spool_dir = SpoolDir(info.workflow_run_id)
        try:
            with heartbeating(), spool_dir as spool, connect_scratch(sc, timeout=10) as copy, \
                    connect(self.cfg.region(req.primary_region).postgres, 10) as primary:
                return recover_rows(copy, primary, req.tables, dict(self.cfg.conflicts), req.primary_region,
                                    req.restored_to, info.workflow_id, info.workflow_run_id, req.approved_by,
                                    req.preview, spool)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # Retried: the space may be freed, or the next attempt land on another worker.
            raise ApplicationError(
                f"the worker's spool for the copy's rows ({spool_dir.root}, TMPDIR) ran out of space; nothing was "
                "written to the primary. Free space there, point TMPDIR at a larger volume or select fewer rows; "
                "the step is retried.", type="SpoolFull") from None
        except SelectionError as e:
            raise ApplicationError(str(e), {"field": e.field, "reason": str(e)}, type="InvalidInput",
                                   non_retryable=True) from None
        except ValueError as e:
            # The engine's own refusal (columns the config names that the table lacks, ...).
            raise ApplicationError(f"rows cannot be recovered: {e}", type="RecoverRefused",
                                   non_retryable=True) from None
