"""Backup activities (pgBackRest). Each runs on the worker of the region whose node it acts
on: pgBackRest reads that node's data directory and config files.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.backup.catalog import BackupRecord, Catalog, read_catalog
from activities.backup.expire import RepoExpiry, expire
from activities.backup.pgbackrest import LOCK_ACQUIRE, PgBackRestError, Stanza
from activities.backup.take import take_backup
from activities.heartbeat import heartbeating
from activities.postgres.status import pg_status
from eagle_dr.config import EagleConfig, SecretUnavailable, scrub


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


class ExpireRequest(BaseModel):
    region: str  # the node (and worker) that runs pgBackRest
    repo_region: str  # whose bucket
    dry_run: bool = False
    keep_fulls: int | None = Field(default=None, ge=1)


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
            r = st.run("stanza-create", timeout=300, check=False)
        if r.returncode != 0:
            raise ApplicationError(f"stanza-create on {region} failed: {scrub(r.stderr.strip()[-800:])}",
                                   type="StanzaCreateFailed")
        return StanzaReady(region=region, config_changed=changed, created="completed successfully" in r.stdout + r.stderr)

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
                               owner=f"{info.workflow_id}/{info.activity_id}", timeout=req.timeout_seconds)
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
                return expire(st, req.repo_region, req.dry_run, req.keep_fulls)
        except KeyError:
            raise ApplicationError(f"unknown repo region {req.repo_region!r}", type="InvalidInput",
                                   non_retryable=True) from None
        except PgBackRestError as e:
            # A backup holds the stanza's lock: retried (with back-off) until it ends.
            kind = "StanzaLocked" if e.code == LOCK_ACQUIRE else "ExpireFailed"
            raise ApplicationError(str(e), type=kind) from None
