"""The consistency check's activities. They run on the control worker: each side is reached
over the network (as postgres_status does), and nothing runs on a region's own disk."""

from __future__ import annotations

from datetime import datetime

import psycopg
import structlog
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.consistency import store
from activities.heartbeat import heartbeating
from activities.consistency.check import Position, compare_table
from activities.consistency.keys import AuditedKeysResult, compare_audited_keys
from activities.consistency.redis import compare_redis
from activities.conflicts.apply import ApplySummary
from activities.conflicts.engine import collision
from activities.conflicts.foreign_keys import broken_after_run
from activities.consistency.results import KeyDiff, RedisResult, TableResult
from activities.consistency.rowhash import SchemaDiffers
from activities.consistency.sync import SyncError, recopy_keys
from activities.consistency.tables import Table, TableError, list_tables, one_sided
from activities.redis.status import client as redis_client, redis_status
from eagle_dr.config import EagleConfig, TableName

log = structlog.get_logger(__name__)


class ListTablesRequest(BaseModel):
    region: str
    database: str | None = None
    tables: list[str] = []  # empty: the config's consistency.tables, else every user table
    # Kept for histories of workers before every-user-table checks always listed keyless tables
    # (the activity ignores it: with no tables named, a keyless one comes back with no key).
    skip_without_key: bool = False


class OneSidedRequest(BaseModel):
    region_a: str
    region_b: str
    database_b: str | None = None
    listed: list[Table]  # A's tables the check is about to compare
    every: bool  # no tables named: also name every user table only B holds


class OneSided(BaseModel):
    only_a: list[str] = []
    only_b: list[str] = []


class ScratchRef(BaseModel):
    """A restored copy on a region's host (restore mode verify): it listens on that host only,
    on its own socket directory and port."""

    region: str
    port: int
    socket_dir: str


class CompareTableRequest(BaseModel):
    region_a: str
    region_b: str
    # A database on that region's server other than the service's (a copy, a restore).
    database_a: str | None = None
    database_b: str | None = None
    # B is this scratch copy instead of region_b's server (run on region_b's worker).
    scratch_b: ScratchRef | None = None
    # B is A's physical standby: compare at A's LSN, re-check in-flight rows.
    follower: bool
    table: Table
    chunk_rows: int | None = None  # default: the config's
    max_lag_seconds: float | None = None  # default: the config's


class CompareRedisRequest(BaseModel):
    region_a: str
    region_b: str


class ReadRunRequest(BaseModel):
    regions: list[str]  # where to look, in order (the primary first): the check records on its primary
    workflow_id: str


class SyncTableRequest(BaseModel):
    region_a: str  # the source: its version of each key wins
    region_b: str  # written: a copy database (database_b) or a separate writable primary
    database_b: str | None = None
    table: str  # schema.table, as the check reports it
    approved: KeyDiff  # what the check found and the approver saw (counts, and the keys unless capped)
    # A capped sample is completed by re-running the table's bisect, up to this many keys.
    max_keys: int = Field(ge=1)
    chunk_rows: int | None = None
    approved_by: str | None = None
    decided_at: datetime  # the engine's "now" (a workflow time: a retry decides the same way)
    # The run's other tables, synced in steps of their own: foreign keys to or from them are
    # left to those steps (activities/consistency/sync.py). Every other table's are checked.
    settled: list[str] = []


class SyncedKeysRequest(BaseModel):
    region_a: str  # the source
    region_b: str
    database_b: str | None = None
    tables: list[str]  # the tables the run's steps synced, as the check named them


class SyncedTable(ApplySummary):
    keys: int  # the differing keys re-copied (A's rows + B-only keys)
    recollected: bool = False  # the check's sample was capped: the keys were bisected again
    # Keys still breaking a foreign key after the holds' last round: committed and reported.
    foreign_keys_broken: list[str] = []


class RecordRequest(BaseModel):
    region: str  # the primary: the table lives there
    workflow_id: str
    run_id: str
    started_at: datetime
    region_a: str
    region_b: str
    outcome: str
    differences: int = Field(ge=0)
    result: dict


class AuditedKeysRequest(BaseModel):
    survivor: str  # the primary the run reconciled into
    standby: str  # the node rebuilt from it (a physical standby of it)
    # The run whose audit rows name the keys (the failback's own workflow and run).
    workflow_id: str
    run_id: str
    tables: list[str]  # as the reconcile named them (the audit's table_name)


class ConsistencyActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _dsn(self, region: str, database: str | None = None) -> str:
        return self.cfg.region(region).postgres.dsn(database, application_name="eagle-dr-check")

    def _scratch_dsn(self, ref: ScratchRef) -> str:
        pg = self.cfg.region(ref.region).postgres
        # Through its socket (never TLS: the host's own): the copy has the service's database
        # and users, being a restore of it.
        return pg.model_copy(update={"host": ref.socket_dir, "port": ref.port}).dsn(
            application_name="eagle-dr-check", sslmode="disable")

    @activity.defn
    def list_check_tables(self, req: ListTablesRequest) -> list[Table]:
        asked = req.tables or self.cfg.consistency.tables
        field = "tables" if req.tables else "consistency.tables (config)"
        with psycopg.connect(self._dsn(req.region, req.database), autocommit=True, connect_timeout=10) as conn:
            try:
                # Named tables must each have a key; with none named (every user table), a keyless
                # one comes back without a key, and the workflow says it was not compared.
                return list_tables(conn, asked, field, skip_without_key=not asked)
            except TableError as e:
                raise ApplicationError(f"invalid input: {e.field}: {e.reason}", {"field": e.field, "reason": e.reason},
                                       type="InvalidInput", non_retryable=True) from None

    @activity.defn
    def tables_on_one_side(self, req: OneSidedRequest) -> OneSided:
        """The listed tables B lacks, and (``every``, with no ``consistency.tables`` configured)
        the user tables only B holds. Reads the catalogs only."""
        every = req.every and not self.cfg.consistency.tables
        with psycopg.connect(self._dsn(req.region_a), autocommit=True, connect_timeout=10) as a, \
                psycopg.connect(self._dsn(req.region_b, req.database_b), autocommit=True, connect_timeout=10) as b:
            only_a, only_b = one_sided(a, b, req.listed, every)
        return OneSided(only_a=only_a, only_b=only_b)

    @activity.defn
    def compare_table(self, req: CompareTableRequest) -> TableResult:
        c = self.cfg.consistency
        details = activity.info().heartbeat_details
        resume = None
        if details:
            try:
                resume = Position.model_validate(details[0])
            except Exception as e:  # noqa: BLE001 - an unreadable position: start the table over
                log.warning("heartbeat position unreadable; starting the table over", error=str(e))
        if resume is not None:
            log.info("resuming from the heartbeat", table=resume.table, done=len(resume.done),
                     ranges=len(resume.ranges))
        try:
            return compare_table(
                self._dsn(req.region_a, req.database_a),
                self._scratch_dsn(req.scratch_b) if req.scratch_b else self._dsn(req.region_b, req.database_b), req.table,
                follower=req.follower, chunk_rows=req.chunk_rows or c.chunk_rows, parallel=c.parallel, max_lag=req.max_lag_seconds or c.max_lag_seconds,
                cap=c.sample_cap, resume=resume,
                beat=lambda pos: activity.heartbeat(pos.model_dump(mode="json")))
        except TimeoutError as e:
            # A standby that does not replay within the bound: retried (it may catch up), then reported.
            raise ApplicationError(str(e), type="ReplayTimeout") from None
        except SchemaDiffers as e:
            # A migration run on one side only: no retry makes the rows comparable.
            raise ApplicationError(str(e), {"table": req.table.qualified}, type="SchemaDiffers",
                                   non_retryable=True) from None

    @activity.defn
    def compare_audited_keys(self, req: AuditedKeysRequest) -> AuditedKeysResult:
        """A failback's verify that follows the divergence (keys.py). Idempotent (reads only);
        a retry compares again from the first key: the keys are few beside the tables."""
        c = self.cfg.consistency
        try:
            # The side thread beats through a replay wait (up to a minute); each batch says its progress.
            with heartbeating(details="comparing the audited keys"):
                return compare_audited_keys(
                    self._dsn(req.survivor), self._dsn(req.standby), req.survivor, req.standby, req.workflow_id,
                    req.run_id, req.tables, max_lag=c.max_lag_seconds, cap=c.sample_cap, beat=activity.heartbeat)
        except TimeoutError as e:
            raise ApplicationError(str(e), type="ReplayTimeout") from None
        except SchemaDiffers as e:
            raise ApplicationError(str(e), type="SchemaDiffers", non_retryable=True) from None
        except ValueError as e:
            # The table changed its key columns since the reconcile: no retry reads them back.
            raise ApplicationError(str(e), type="AuditKeysUnreadable", non_retryable=True) from None

    @activity.defn
    def compare_redis(self, req: CompareRedisRequest) -> RedisResult:
        """The master as A and its replica as B, whichever region each is in now (Sentinel moves
        the master on its own); two unlinked servers are compared as they are."""
        ra, rb = self.cfg.region(req.region_a).redis, self.cfg.region(req.region_b).redis
        sa, sb = redis_status(ra), redis_status(rb)
        if sb.role == "master" and sa.role == "slave" and sa.master == f"{rb.host}:{rb.port}":
            (ra, sa, na), (rb, sb, nb) = (rb, sb, req.region_b), (ra, sa, req.region_a)
        else:
            na, nb = req.region_a, req.region_b
        follower = sa.role == "master" and sb.role == "slave" and sb.master == f"{ra.host}:{ra.port}"
        a, b = redis_client(ra, timeout=10, decode=False), redis_client(rb, timeout=10, decode=False)
        try:
            return compare_redis(a, b, name_a=na, name_b=nb, follower=follower,
                                 sample=self.cfg.consistency.redis_sample)
        except TimeoutError as e:
            raise ApplicationError(str(e), type="ReplayTimeout") from None
        finally:
            a.close()
            b.close()

    @activity.defn
    def record_consistency_run(self, req: RecordRequest) -> int | None:
        return store.record_run(self._dsn(req.region), workflow_id=req.workflow_id, run_id=req.run_id,
                                started_at=req.started_at, region_a=req.region_a, region_b=req.region_b,
                                outcome=req.outcome, differences=req.differences, result=req.result)

    @activity.defn
    def read_consistency_run(self, req: ReadRunRequest) -> dict | None:
        """A finished check's result, from ``eagle_dr.consistency_runs`` (the newest run of that id)."""
        for region in req.regions:
            try:
                found = store.read_run(self._dsn(region), req.workflow_id)
            except psycopg.OperationalError as e:
                log.warning("consistency_runs unreadable", region=region, error=str(e))
                continue
            if found is not None:
                return found
        return None

    @activity.defn
    def check_synced_foreign_keys(self, req: SyncedKeysRequest) -> list[str]:
        """After every table's step: the keys this run wrote on B that break a foreign key as B
        stands now (each step left the run's other tables to their own steps). Read-only in
        effect (rolled back); idempotent."""
        info = activity.info()
        with heartbeating(), psycopg.connect(self._dsn(req.region_b, req.database_b), autocommit=True,
                                             connect_timeout=10) as b:
            tables = {}
            for name in req.tables:
                try:
                    t = list_tables(b, [name], "table")[0]
                    TableName.parse(t.qualified, catalog=True)
                except (TableError, ValueError):
                    continue  # gone since, or a name no identifier spells: its own step checked it
                tables[t.qualified] = t.key
            target = req.region_b + (f"/{req.database_b}" if req.database_b else "")
            return broken_after_run(b, tables, target, info.workflow_id, info.workflow_run_id,
                                    collision(target, req.region_a))

    @activity.defn
    def sync_table(self, req: SyncTableRequest) -> SyncedTable:
        """The differing keys of one table re-copied from A to B (idempotent: a retry decides
        against the rows the first attempt wrote, and the audit keeps one row per key and run)."""
        keys = req.approved.inserted_keys + req.approved.updated_keys + req.approved.deleted_keys
        recollected = False
        dsn_a, dsn_b = self._dsn(req.region_a), self._dsn(req.region_b, req.database_b)
        with psycopg.connect(dsn_a, autocommit=True, connect_timeout=10) as conn:
            standby, receiving = conn.execute(
                "select pg_is_in_recovery(), (select status from pg_stat_wal_receiver)").fetchone()
            if standby and receiving != "streaming":
                # A failover or split-brain resolution since the check (the approval can wait for
                # hours) left A held or fenced, a standby of nothing, and B may be the live
                # primary. A streaming standby holds the primary's rows (the check's own A can
                # be one, against a copy database on the primary's server).
                raise ApplicationError(f"{req.region_a}, the source, is a standby streaming from nothing "
                                       f"({receiving or 'no WAL receiver'}): its rows may be stale. Nothing was "
                                       "written; run a new check and sync from it",
                                       type="SourceStale", non_retryable=True)
            try:
                table = list_tables(conn, [req.table], "table")[0]  # its key's types, as the check read them
            except TableError as e:
                raise ApplicationError(f"{req.table}: {e.reason}", type="CannotSync", non_retryable=True) from None
        if len(keys) < req.approved.total:
            # The check kept a sample; the counts are exact. Bisect again for every key, bounded.
            if req.approved.total > req.max_keys:
                raise ApplicationError(
                    f"{req.table}: {req.approved.total} differing keys, more than max_keys "
                    f"({req.max_keys}): re-copy the table (or restore B) instead of a key-wise sync",
                    type="TooManyDifferences", non_retryable=True)
            c = self.cfg.consistency
            found = compare_table(dsn_a, dsn_b, table, follower=False, chunk_rows=req.chunk_rows or c.chunk_rows,
                                  parallel=c.parallel, max_lag=c.max_lag_seconds, cap=req.max_keys, resume=None,
                                  beat=lambda pos: activity.heartbeat())
            d = found.diff
            if (d.inserted, d.updated, d.deleted) != (req.approved.inserted, req.approved.updated,
                                                      req.approved.deleted):
                # The approver allowed what the check found; something else differs now.
                raise ApplicationError(
                    f"{req.table}: the differences changed since the check (approved +{req.approved.inserted}"
                    f" ~{req.approved.updated} -{req.approved.deleted}, now +{d.inserted} ~{d.updated} "
                    f"-{d.deleted}): run a new check and sync from it", type="DifferencesChanged", non_retryable=True)
            keys, recollected = d.inserted_keys + d.updated_keys + d.deleted_keys, True
        info = activity.info()
        target = req.region_b + (f"/{req.database_b}" if req.database_b else "")
        with heartbeating(), \
                psycopg.connect(dsn_a, autocommit=True, connect_timeout=10) as a, \
                psycopg.connect(dsn_b, autocommit=True, connect_timeout=10) as b:
            try:
                summary, broken = recopy_keys(a, b, table, keys, dict(self.cfg.conflicts), req.region_a, target,
                                              req.decided_at, info.workflow_id, info.workflow_run_id,
                                              req.approved_by, settled=req.settled)
            except SyncError as e:
                raise ApplicationError(str(e), type="CannotSync", non_retryable=True) from None
        log.info("table synced", table=req.table, keys=len(keys), inserted=summary.inserted,
                 updated=summary.updated, deleted=summary.deleted, flagged=summary.flagged)
        return SyncedTable(**summary.model_dump(), keys=len(keys), recollected=recollected,
                           foreign_keys_broken=broken)
