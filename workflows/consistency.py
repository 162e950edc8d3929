"""Consistency check: are two regions' data the same? PostgreSQL per table by primary-key
ranges (activities/consistency/), and Redis master vs replica.

The runbook, as an operator would do it:

1. Read the topology; A and B are the primary and its standby, or the two regions asked for
   (the primary as A when one of them is, since only the primary gives a consistent point).
2. List the tables (the asked ones, the config's, or every user table) on A, with their keys.
3. Compare each table: hashed ranges, bisected to exact keys, at A's LSN on a standby; the
   activity heartbeats its position, so a killed worker's retry goes on where it was.
4. Compare Redis (counts, offsets, a sample of values), when comparing the service's databases.

B may instead be a restored backup that follows the primary (``scratch_b``, from restore mode
verify, workflows/restore.py): it is compared as the primary's standby, on the worker of the
host it runs on (it listens there only).
5. Record the run in ``eagle_dr.consistency_runs`` on the primary; differences end the run
   "degraded", which notifies through the channels (workflows/notify.py) and keeps the incident
   open until a later check is clean.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.consistency.activities import (
        CompareRedisRequest,
        CompareTableRequest,
        ConsistencyActivities,
        ListTablesRequest,
        OneSidedRequest,
        RecordRequest,
        ScratchRef,
    )
    from activities.consistency.results import RedisResult, TableResult
    from activities.topology import TopologyActivities
    from eagle_dr import metrics
    from eagle_dr.config import TableName
    from eagle_dr.temporal import (
        DR_CHECK_DIFFERENCES,
        DR_CHECK_TABLES,
        DR_RUNBOOK,
        DR_SERVICE,
        DR_SOURCE_REGION,
        DR_TARGET_REGION,
        DR_TRIGGER,
    )
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, invalid, validated


class ConsistencyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # ``table`` or ``schema.table``; empty: the config's consistency.tables, else every user table.
    tables: list[str] = Field(default_factory=list)
    # Two regions [A, B]; empty: the primary and its standby.
    regions: list[str] = Field(default_factory=list)
    # A database on B's server to compare against instead of the service's (a copy, a restore):
    # B is then not A's live standby, and Redis is not compared.
    database_b: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
    # B is a restored copy on that region's host, streaming from the primary (restore mode
    # verify): A is the primary; regions and database_b stay unset; Redis is not compared.
    scratch_b: ScratchRef | None = None
    redis: bool = True
    # Rows per top-level range for this run (default: the config's consistency.chunk_rows).
    chunk_rows: int | None = Field(default=None, ge=100, le=10_000_000)
    # Pause past this standby replay lag, for this run (default: the config's consistency.max_lag_seconds).
    max_lag_seconds: float | None = Field(default=None, gt=0, le=3600)
    trigger: str = Field(default="manual", max_length=100)
    # With no tables named (every user table), a table without a primary key is never compared:
    # it is listed in not_compared, and the check is "degraded" for it (the scheduled check: an
    # hourly failure for one keyless table would leave every other table unchecked). With this
    # on (a runbook's final verify) it is listed only. A named keyless table is an input error.
    skip_tables_without_key: bool = False

    @field_validator("tables")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for t in v:
            TableName.parse(t, catalog=True)  # the error names the field (validated() reports the first)
        return v

    @field_validator("regions")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if v and len(v) != 2:
            raise ValueError(f"expected two regions A,B, got {len(v)}")
        if v and v[0] == v[1]:
            raise ValueError(f"the same region twice ({v[0]!r}): a check compares two regions")
        return v


class ConsistencyResult(BaseModel):
    service: str
    region_a: str
    region_b: str
    database_b: str | None = None
    scratch_b: ScratchRef | None = None
    follower: bool  # B was A's streaming standby: compared at A's LSN
    tables: list[TableResult] = []
    redis: RedisResult | None = None
    differences: int = 0
    run_row: int | None = None  # eagle_dr.consistency_runs.id
    degraded: list[str] = []
    outcome: str
    # Tables left out because they have no primary key or are unlogged (none named), or
    # because only one side has them: said, never reported as consistent.
    not_compared: list[str] = []
    # Tables only one side holds (B not A's physical standby): A's listed ones B lacks, and
    # with no tables named, B's user tables A lacks.
    only_on_a: list[str] = []
    only_on_b: list[str] = []


@workflow.defn
class ConsistencyCheckWorkflow(Runbook):
    runbook = "consistency-check"
    notifies = "failures"  # hourly: a clean check is not news, differences are (outcome "degraded")

    @workflow.run
    async def run(self, raw: RawInput) -> ConsistencyResult:
        inp = validated(ConsistencyInput, raw)
        started = workflow.now()
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        for i, r in enumerate(inp.regions):
            self.known_region(topo, f"regions.{i}", r)
        if inp.scratch_b is not None:
            self.known_region(topo, "scratch_b.region", inp.scratch_b.region)
        control = topo.control_task_queue

        async with self.step("Find the primary and its standby") as rec:
            status = await self.postgres_statuses(topo, control)
            primaries = self.primaries(status)
            primary = primaries[0] if len(primaries) == 1 else None
            if inp.scratch_b is not None:
                if inp.regions or inp.database_b:
                    raise invalid("scratch_b", "a restored copy is compared with the primary: leave regions and "
                                               "database_b unset")
                if primary is None:
                    raise ApplicationError(f"no single primary ({self.no_single_primary(status, primaries)}) for the "
                                           "restored copy to follow", type="NoPrimary", non_retryable=True)
                a, b = primary, inp.scratch_b.region
            elif inp.regions:
                a, b = inp.regions
                if b == primary and inp.database_b is None:
                    a, b = b, a  # the primary's LSN is the consistent point: it must be A
            else:
                if primary is None:
                    raise ApplicationError(f"no single primary ({self.no_single_primary(status, primaries)}); name "
                                           "the regions to compare", type="NoPrimary", non_retryable=True)
                a, b = primary, topo.other(primary).name
            follower = inp.database_b is None and a == primary and status[b].reachable and status[b].role == "standby"
            if inp.scratch_b is not None:
                follower = True  # it streams from the primary; compare_table checks it is in recovery
            rec.detail = f"A {a}{' (primary)' if a == primary else ''}, B {b}" + \
                (f" restored copy on port {inp.scratch_b.port}" if inp.scratch_b else "") + \
                (f" database {inp.database_b}" if inp.database_b else "") + \
                (" (its standby: compared at the primary's LSN)" if follower else "")
        self.source_region, self.target_region = a, b
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set(self.runbook), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger), DR_SOURCE_REGION.value_set(a),
                                           DR_TARGET_REGION.value_set(b)])
        self._trigger = inp.trigger

        async with self.step("List the tables") as rec:
            try:
                tables = await self.act(ConsistencyActivities.list_check_tables,
                                        ListTablesRequest(region=a, tables=inp.tables,
                                                          skip_without_key=inp.skip_tables_without_key),
                                        queue=control, timeout=60,
                                        attempts=3)
            except ActivityError as e:
                cause = e.cause
                if isinstance(cause, ApplicationError) and cause.type == "InvalidInput" and cause.details:
                    d = cause.details[0]
                    raise invalid(d["field"], d["reason"]) from None
                raise
            keyless = [t.qualified for t in tables if not t.key and not t.unlogged]
            unlogged = [t.qualified for t in tables if t.unlogged]
            skipped = keyless + unlogged
            tables = [t for t in tables if t.key and not t.unlogged]
            if keyless and not inp.skip_tables_without_key:
                self.degraded.append(f"NOT COMPARED (no primary key, rows cannot be matched): {', '.join(keyless)}; "
                                     "add a key, or list the tables to check in consistency.tables")
            if unlogged and not inp.skip_tables_without_key:
                self.degraded.append(f"NOT COMPARED (unlogged, never replicated: {b} cannot have their rows, and a "
                                     f"failover empties them): {', '.join(unlogged)}; ALTER TABLE ... SET LOGGED "
                                     "to carry them")
            only_a: list[str] = []
            only_b: list[str] = []
            if not follower and inp.scratch_b is None and workflow.patched("check-one-sided-tables"):
                # Not A's physical standby: its tables can differ (one made on one side of a
                # split brain, a copy from before a migration). One B lacks cannot be compared
                # (it failed the whole check), and one only B has was never named.
                sided = await self.act(ConsistencyActivities.tables_on_one_side,
                                       OneSidedRequest(region_a=a, region_b=b, database_b=inp.database_b, listed=tables,
                                                       every=not inp.tables), queue=control, timeout=60, attempts=3)
                only_a, only_b = sided.only_a, sided.only_b
                tables = [t for t in tables if t.qualified not in only_a]
                b_name = b + (f"/{inp.database_b}" if inp.database_b else "")
                if only_a:
                    self.degraded.append(f"NOT COMPARED (only on {a}; {b_name} has no such table): {', '.join(only_a)}")
                if only_b:
                    self.degraded.append(f"NOT COMPARED (only on {b_name}; {a} has no such table): {', '.join(only_b)}")
                skipped = skipped + only_a + only_b
            rec.detail = (", ".join(t.qualified for t in tables) or "no user tables") + \
                (f"; NOT COMPARED (no primary key): {', '.join(keyless)}" if keyless else "") + \
                (f"; NOT COMPARED (unlogged): {', '.join(unlogged)}" if unlogged else "") + \
                (f"; NOT COMPARED (only on {a}): {', '.join(only_a)}" if only_a else "") + \
                (f"; NOT COMPARED (only on {b}): {', '.join(only_b)}" if only_b else "")

        results: list[TableResult] = []
        for t in tables:
            async with self.step(f"Compare {t.qualified}") as rec:
                r = await self.act(
                    ConsistencyActivities.compare_table,
                    CompareTableRequest(region_a=a, region_b=b, database_b=inp.database_b, follower=follower, table=t,
                                        chunk_rows=inp.chunk_rows, max_lag_seconds=inp.max_lag_seconds,
                                        scratch_b=inp.scratch_b),
                    queue=topo.region(b).task_queue if inp.scratch_b else control, timeout=6 * 3600, heartbeat=10,
                    attempts=5, summary=f"compare {t.qualified}")
                results.append(r)
                rec.detail = _table_line(r)
                # A restored copy's check is the restore's result, not the service's consistency.
                if inp.scratch_b is None:
                    metrics.consistency_table(workflow.metric_meter(), topo.service, r.table,
                                              differences=r.differences, in_flight=r.in_flight, rows=r.rows_a,
                                              seconds=r.seconds, throttled_seconds=r.throttled_seconds)
                if r.differences:
                    rec.status = "failed"

        redis: RedisResult | None = None
        if inp.redis and inp.database_b is None and inp.scratch_b is None:
            async with self.step("Compare Redis") as rec:
                try:
                    redis = await self.act(ConsistencyActivities.compare_redis,
                                           CompareRedisRequest(region_a=a, region_b=b), queue=control, timeout=600,
                                           attempts=3)
                    rec.detail = _redis_line(redis)
                    if redis.differences:
                        rec.status = "failed"
                except ActivityError as e:
                    rec.status, rec.detail = "failed", str(e.cause or e)[:300]
                    self.degraded.append(f"Redis not compared: {e.cause or e}")

        differences = sum(r.differences for r in results) + (redis.differences if redis else 0)
        for r in results:
            if r.differences:
                d = r.diff
                self.degraded.append(f"{r.table}: {r.differences} differing keys on {b} (inserted {d.inserted}, "
                                     f"updated {d.updated}, deleted {d.deleted}); e.g. "
                                     + ", ".join(",".join(k) for k in (d.updated_keys + d.inserted_keys
                                                                       + d.deleted_keys)[:5]))
        if redis and redis.differences:
            self.degraded.append(f"Redis: {_redis_line(redis)}")
        outcome = "degraded" if self.degraded else "succeeded"
        workflow.upsert_search_attributes([DR_CHECK_DIFFERENCES.value_set(differences),
                                           DR_CHECK_TABLES.value_set([r.table for r in results if r.differences])])
        result = ConsistencyResult(service=topo.service, region_a=a, region_b=b, database_b=inp.database_b,
                                   scratch_b=inp.scratch_b, follower=follower, tables=results, redis=redis, differences=differences,
                                   degraded=self.degraded, outcome=outcome, not_compared=skipped,
                                   only_on_a=only_a, only_on_b=only_b)

        where = primary or a
        async with self.step("Record the run") as rec:
            info = workflow.info()
            result.run_row = await self.act(
                ConsistencyActivities.record_consistency_run,
                RecordRequest(region=where, workflow_id=info.workflow_id, run_id=info.run_id, started_at=started,
                              region_a=a, region_b=b, outcome=outcome, differences=differences,
                              result=result.model_dump(mode="json")),
                queue=control, timeout=60, attempts=5)
            rec.detail = f"eagle_dr.consistency_runs on {where}"
        if inp.scratch_b is None:
            metrics.consistency_run(workflow.metric_meter(), topo.service, differences=differences,
                                    redis_differences=redis.differences if redis else None,
                                    at=workflow.now().timestamp())
        self.finish(outcome)
        return result


def _table_line(r: TableResult) -> str:
    d = r.diff
    line = (f"{r.rows_a} rows, {r.ranges} ranges ({r.ranges_checked} hashed), {r.differences} differences "
            f"(+{d.inserted} ~{d.updated} -{d.deleted}), {r.seconds:.1f} s")
    if r.in_flight:
        line += f"; {r.in_flight} keys in flight (not counted)"
    if r.throttled_seconds:
        line += f"; THROTTLED {r.throttled_seconds:.0f} s for replica lag"
    if r.resumed_ranges:
        line += f"; resumed after {r.resumed_ranges} ranges"
    return line


def _redis_line(r: RedisResult) -> str:
    counts = ", ".join(f"db{c.db} {c.keys_a}/{c.keys_b}" for c in r.counts) or "no keys"
    return (f"keys {counts}; offsets {r.offset_a}/{r.offset_b}; {r.sampled} sampled: {r.missing_count} missing, "
            f"{r.changed_count} changed" + (f", {r.in_flight} in flight" if r.in_flight else ""))
