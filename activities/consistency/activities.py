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
from activities.consistency.check import Position, compare_table
from activities.consistency.redis import compare_redis
from activities.consistency.results import RedisResult, TableResult
from activities.consistency.tables import Table, TableError, list_tables
from activities.redis.status import client as redis_client, redis_status
from eagle_dr.config import EagleConfig

log = structlog.get_logger(__name__)


class ListTablesRequest(BaseModel):
    region: str
    database: str | None = None
    tables: list[str] = []  # empty: the config's consistency.tables, else every user table


class CompareTableRequest(BaseModel):
    region_a: str
    region_b: str
    # A database on that region's server other than the service's (a copy, a restore).
    database_a: str | None = None
    database_b: str | None = None
    # B is A's physical standby: compare at A's LSN, re-check in-flight rows.
    follower: bool
    table: Table
    chunk_rows: int | None = None  # default: the config's
    max_lag_seconds: float | None = None  # default: the config's


class CompareRedisRequest(BaseModel):
    region_a: str
    region_b: str


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


class ConsistencyActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    def _dsn(self, region: str, database: str | None = None) -> str:
        return self.cfg.region(region).postgres.dsn(database, application_name="eagle-dr-check")

    @activity.defn
    def list_check_tables(self, req: ListTablesRequest) -> list[Table]:
        asked = req.tables or self.cfg.consistency.tables
        field = "tables" if req.tables else "consistency.tables (config)"
        with psycopg.connect(self._dsn(req.region, req.database), autocommit=True, connect_timeout=10) as conn:
            try:
                return list_tables(conn, asked, field)
            except TableError as e:
                raise ApplicationError(f"invalid input: {e.field}: {e.reason}", {"field": e.field, "reason": e.reason},
                                       type="InvalidInput", non_retryable=True) from None

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
                self._dsn(req.region_a, req.database_a), self._dsn(req.region_b, req.database_b), req.table,
                follower=req.follower, chunk_rows=req.chunk_rows or c.chunk_rows, parallel=c.parallel, max_lag=req.max_lag_seconds or c.max_lag_seconds,
                cap=c.sample_cap, resume=resume,
                beat=lambda pos: activity.heartbeat(pos.model_dump(mode="json")))
        except TimeoutError as e:
            # A standby that does not replay within the bound: retried (it may catch up), then reported.
            raise ApplicationError(str(e), type="ReplayTimeout") from None

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
