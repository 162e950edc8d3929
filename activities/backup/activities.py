"""Backup activities (pgBackRest). Each runs on the worker of the region whose node it acts
on: pgBackRest reads that node's data directory and config files.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.backup.archive import GuardReport, guard
from activities.backup.catalog import BackupRecord, Catalog, read_catalog
from activities.backup.pgbackrest import PgBackRestError, Stanza
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


class GuardRequest(BaseModel):
    region: str  # the primary's: the node whose WAL waits and whose archive-push.conf is rewritten
    # Overrides backup.archive_backlog_max (a test, or an operator tightening it in an incident).
    backlog_max_bytes: int | None = Field(default=None, ge=16 << 20)
    probe_timeout_seconds: float = Field(default=10, gt=0, le=120)


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
