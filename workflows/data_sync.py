"""Data sync (the seed's data-sync-job): repair what a consistency check found.

The runbook, as an operator would do it:

1. Take the check's result (``eagle_dr.consistency_runs``, by the check's workflow id), or run a
   fresh check (a child ConsistencyCheckWorkflow) with the tables and regions given.
2. Decide the path, and say why:
   - B's server is a physical standby: it is never written (it is read-only, and a write
     would be overwritten by, or break, replay). Its differences are lost or corrupt pages,
     and the repair is a re-clone from backup (RestoreWorkflow, mode rebuild-standby, the
     runbook a standby is rebuilt with). pg_rewind is not used: it copies only the blocks
     changed after a timeline fork, and a standby still on the primary's timeline has none,
     so it would leave the differing pages as they are.
   - B is writable (a copy database via ``database_b``, or a region that is a separate
     primary): A's version of each differing key is re-copied to B through the conflict engine
     (source-priority, A the source), one audit row per key, deletes included. Only those keys.
3. An approval gate showing the counts per table and a sample of keys.
4. The repair, then a follow-up check (a child ConsistencyCheckWorkflow): the run is green only
   when it finds no differences; otherwise "degraded", naming the tables.

Not repaired here: Redis (a replica resyncs from its master on its own; a check's Redis
differences are reported, not synced).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.consistency.activities import (
        ConsistencyActivities,
        ReadRunRequest,
        SyncedKeysRequest,
        SyncedTable,
        SyncTableRequest,
    )
    from activities.consistency.results import KeyDiff
    from activities.postgres.status import PgStatus
    from activities.topology import TopologyActivities
    from eagle_dr.config import TableName
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TARGET_REGION, DR_TRIGGER
    from workflows.consistency import ConsistencyCheckWorkflow, ConsistencyResult
    from workflows.models import ApprovalPolicy, ApprovalRecord, RequiredApproval
    from workflows.restore import RestoreResult, RestoreWorkflow
    from workflows.runbook import Runbook, described
    from workflows.validation import RawInput, invalid, validated

# Keys shown per table at the approval gate and in the step details.
SAMPLE = 10
# The bound on a key-wise sync, per table. A capped sample is completed inside the activity
# (the keys never enter history), but every key's row then crosses the network and the whole
# table's apply is one transaction holding B's table against writes: past this many keys,
# re-copying (or restoring) the table is the faster and shorter-locking repair.
MAX_KEYS = 20_000


class DataSyncInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The check to repair (its workflow id); or none, to run a fresh check with the fields below.
    check_workflow_id: str | None = Field(default=None, min_length=1, max_length=400)
    tables: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    database_b: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
    # A sync writes to a database (or replaces a standby): approval is asked unless turned off.
    approval: RequiredApproval = ApprovalPolicy(required=True)
    max_keys: int = Field(default=MAX_KEYS, ge=1, le=MAX_KEYS)
    trigger: str = Field(default="manual", max_length=100)
    # For a runbook's final verify: tables without a primary key are listed, not compared.
    skip_tables_without_key: bool = False

    @field_validator("tables")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for t in v:
            TableName.parse(t, catalog=True)
        return v

    @field_validator("regions")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if v and len(v) != 2:
            raise ValueError(f"expected two regions A,B, got {len(v)}")
        if v and v[0] == v[1]:
            raise ValueError(f"the same region twice ({v[0]!r})")
        return v

class DataSyncResult(BaseModel):
    service: str
    check_workflow_id: str
    region_a: str
    region_b: str
    database_b: str | None = None
    path: str  # "recopy" (B writable), "rebuild" (B a physical standby) or "none" (nothing differed)
    why: str
    approval: ApprovalRecord | None = None
    synced: list[SyncedTable] = []
    rebuilt: RestoreResult | None = None
    verify_workflow_id: str | None = None
    remaining: int | None = None  # differences the follow-up check found
    degraded: list[str] = []
    # Tables the check listed and did not compare (no primary key, unlogged): a runbook's final
    # verify must say them, never count them as identical.
    not_compared: list[str] = []
    outcome: str


@workflow.defn
class DataSyncWorkflow(Runbook):
    runbook = "data-sync"

    @workflow.run
    async def run(self, raw: RawInput) -> DataSyncResult:
        inp = validated(DataSyncInput, raw)
        if inp.approval.auto_approve_as and inp.trigger != "drill" and workflow.info().parent is None:
            raise invalid("approval.auto_approve_as", "honoured only for drills (trigger 'drill') and runs started by "
                                                      "another runbook; leave it unset")
        if inp.check_workflow_id and (inp.tables or inp.regions or inp.database_b):
            raise invalid("check_workflow_id", "give a check to repair, or tables/regions/database_b for a fresh "
                                               "check, not both")
        self._trigger = inp.trigger
        wid = workflow.info().workflow_id
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        for i, r in enumerate(inp.regions):
            self.known_region(topo, f"regions.{i}", r)
        control = topo.control_task_queue
        status = await self.postgres_statuses(topo, control)
        primaries = self.primaries(status)

        if inp.check_workflow_id:
            check_id = inp.check_workflow_id
            async with self.step("Read the check's result") as rec:
                order = primaries + [r.name for r in topo.regions if r.name not in primaries]
                found = await self.act(ConsistencyActivities.read_consistency_run,
                                       ReadRunRequest(regions=order, workflow_id=check_id), queue=control,
                                       timeout=60, attempts=3)
                if found is None:
                    raise invalid("check_workflow_id", f"no recorded consistency check {check_id!r} in "
                                                       "eagle_dr.consistency_runs (is it finished?)")
                check = ConsistencyResult.model_validate(found)
                rec.detail = f"{check_id}: {check.differences} differences, {check.outcome}"
            if check.scratch_b is not None:
                # A restore verify's check: its B was a backup restored on a scratch port, gone
                # since. Its differences are the backup's. Taken as the region's, they sent a
                # healthy standby to be re-cloned from that very backup, and the follow-up check
                # (the standby against the primary) came back green.
                raise invalid("check_workflow_id", f"{check_id} compared the primary with a restored backup (restore "
                                                   f"verify on {check.scratch_b.region}, port {check.scratch_b.port}): "
                                                   "its differences are the backup's, not a server's; there is "
                                                   "nothing to sync. Take a new backup and verify it again")
        else:
            check_id = f"{wid}-check"
            async with self.step("Run a consistency check") as rec:
                check = await workflow.execute_child_workflow(
                    ConsistencyCheckWorkflow.run,
                    {"tables": inp.tables, "regions": inp.regions, "database_b": inp.database_b, "redis": False,
                     "skip_tables_without_key": inp.skip_tables_without_key,
                     "trigger": f"data-sync {wid}"},
                    id=check_id, result_type=ConsistencyResult)
                rec.detail = f"{check_id}: {check.differences} differences"
        a, b = check.region_a, check.region_b
        self.source_region, self.target_region = a, b + (f"/{check.database_b}" if check.database_b else "")
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set(self.runbook), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger), DR_SOURCE_REGION.value_set(a),
                                           DR_TARGET_REGION.value_set(b)])
        differing = [t for t in check.tables if t.differences]
        if check.only_on_a or check.only_on_b:
            # Not synced: creating or dropping a table is a schema change, a human's call.
            self.degraded.append(f"tables on one side only, not compared nor synced: "
                                 + "; ".join(f"only on {r}: {', '.join(ts)}" for r, ts in
                                             ((a, check.only_on_a), (b, check.only_on_b)) if ts))
        if check.redis is not None and check.redis.differences:
            self.degraded.append(f"Redis differences are not synced (a replica resyncs from its master): "
                                 f"{check.redis.missing_count} missing, {check.redis.changed_count} changed")

        if differing and inp.check_workflow_id and not _current(status.get(a), a in primaries) and \
                workflow.patched("sync-refuses-stale-source"):
            # A recorded check can predate a failover or a split brain resolved the other way:
            # its A, the source of every row, is then held or fenced (a standby of nothing) or
            # gone, and its B may be the live primary. A re-copy would write the stale side's
            # rows into it. (A standby that streams holds the primary's rows: reading it is
            # reading the primary, a lag behind.)
            st = status.get(a)
            now = "unreachable" if st is None or not st.reachable else \
                f"{st.role}, {'receiving ' + st.receiver_status if st.receiver_status else 'streaming from nothing'}"
            raise invalid("check_workflow_id", f"{a}, the check's A (the source of every row), is neither a primary "
                                               f"nor a streaming standby now ({now}; primary: "
                                               f"{', '.join(primaries) or 'none'}): its rows may be stale. Run a "
                                               "new check and sync from it")
        async with self.step("Decide the repair") as rec:
            b_standby = b in status and status[b].reachable and status[b].role == "standby"
            if not differing:
                path, why = "none", "the check found no PostgreSQL differences: nothing to repair"
            elif check.follower or b_standby:
                path = "rebuild"
                why = (f"{b}'s server is a physical standby: never written (read-only; every database on it is "
                       f"replayed from {a}'s WAL). Its differences are lost or corrupt pages: it is re-cloned from "
                       "backup (rebuild-standby). pg_rewind is not used: it copies only blocks changed after a "
                       "timeline fork, and a standby still on the primary's timeline has none")
            else:
                path = "recopy"
                what = f"database {check.database_b} on {b}'s server (a copy)" if check.database_b else \
                    f"{b} ({status[b].role if b in status and status[b].reachable else 'unknown role'}, not a standby)"
                why = (f"B is writable: {what}. {a}'s version of each differing key is re-copied to it through "
                       f"the conflict engine (source-priority, {a} the source), one audit row per key, deletes "
                       "included; only the differing keys")
            rec.detail = f"{path}: {why}"

        result = DataSyncResult(service=topo.service, check_workflow_id=check_id, region_a=a, region_b=b,
                                database_b=check.database_b, path=path, why=why, outcome="succeeded",
                                not_compared=check.not_compared)
        if path == "none":
            result.degraded = self.degraded
            result.outcome = "degraded" if self.degraded else "succeeded"
            self.finish(result.outcome)
            return result
        if path == "recopy":
            capped = [t.table for t in differing if _sample_keys(t.diff) < t.differences]
            if too_many := [f"{t.table} ({t.differences})" for t in differing if t.differences > inp.max_keys
                            and _sample_keys(t.diff) < t.differences]:
                raise ApplicationError(f"more differing keys than max_keys ({inp.max_keys}) in {', '.join(too_many)}:"
                                       " re-copy those tables (or restore B) instead of a key-wise sync",
                                       type="TooManyDifferences", non_retryable=True)

        counts = "; ".join(f"{t.table}: +{t.diff.inserted} ~{t.diff.updated} -{t.diff.deleted}" for t in differing)
        sample = "; ".join(f"{t.table} " + ", ".join("(" + ",".join(k) + ")" for k in _keys(t.diff)[:SAMPLE])
                           for t in differing)
        if path == "rebuild":
            what = f"rebuild {b}'s standby from backup ({counts}; sample keys: {sample})"
        else:
            what = (f"re-copy {a}'s rows to {self.target_region}: {counts} (B relative to A: + only on B, deleted; "
                    f"~ updated; - missing on B, inserted); sample keys: {sample}"
                    + (f"; {', '.join(capped)}: the check's sample was capped, all keys are bisected again "
                       f"(at most {inp.max_keys})" if capped else ""))
        self.plan_text = what
        async with self.step("Review the repair") as rec:
            rec.detail = what  # in the step list too: what the approver is asked to allow, counts and keys
        result.approval = await self.approval(inp.approval, what)
        approver = result.approval.approver or f"{result.approval.outcome} (data-sync {wid})"

        if path == "rebuild":
            async with self.step(f"Rebuild {b}'s standby") as rec:
                result.rebuilt = await workflow.execute_child_workflow(
                    RestoreWorkflow.run,
                    {"mode": "rebuild-standby", "region": b, "trigger": f"data-sync {wid}",
                     # Approved here, at this run's gate: the child must not ask again.
                     "approval": {"required": True, "auto_approve_as": approver}},
                    id=f"{wid}-rebuild", result_type=RestoreResult)
                rec.detail = result.rebuilt.outcome
        else:
            synced: list[str] = []
            for t in differing:
                async with self.step(f"Re-copy {t.table}") as rec:
                    try:
                        s = await self.act(
                            ConsistencyActivities.sync_table,
                            SyncTableRequest(region_a=a, region_b=b, database_b=check.database_b,
                                             table=t.table, approved=t.diff, max_keys=inp.max_keys,
                                             approved_by=approver, decided_at=workflow.now(),
                                             # Their own steps bring them to A's state: foreign
                                             # keys between them and this table hold at the end.
                                             settled=[o.table for o in differing if o.table != t.table]),
                            queue=control, timeout=3600, heartbeat=30, attempts=3, summary=f"sync {t.table}")
                    except ActivityError as e:
                        cause = e.cause
                        if isinstance(cause, ApplicationError) and cause.non_retryable:
                            rec.status, rec.detail = "failed", cause.message
                            self.degraded.append(f"{t.table} not synced: {cause.message}")
                            continue
                        raise
                    result.synced.append(s)
                    synced.append(t.table)
                    rec.detail = (f"{s.keys} keys: {s.inserted} inserted, {s.updated} updated, {s.deleted} deleted, "
                                  f"{s.kept} kept, {s.flagged} flagged; {s.audit_rows} audit rows"
                                  + ("; keys bisected again (the check's sample was capped)" if s.recollected else ""))
                    if s.flagged:
                        self.degraded.append(f"{t.table}: {s.flagged} keys flagged for a human (a different row "
                                             "under the same key, or a foreign key to or from a table outside the run "
                                             "that the write would break): see eagle_dr.conflict_audit where "
                                             "action = 'flag'")
                    if s.foreign_keys_broken:
                        self.degraded.append(f"{t.table}: {len(s.foreign_keys_broken)} keys written that still break "
                                             f"a foreign key: {'; '.join(s.foreign_keys_broken[:5])}")
            # Each step left the run's other tables to their own steps; a failed one, or a write
            # on either side between the steps, can leave a written key breaking a foreign key.
            if len(differing) > 1 and synced and workflow.patched("datasync-foreign-keys-after-steps"):
                async with self.step("Check foreign keys across the synced tables") as rec:
                    try:
                        broken = await self.act(
                            ConsistencyActivities.check_synced_foreign_keys,
                            SyncedKeysRequest(region_a=a, region_b=b, database_b=check.database_b, tables=synced),
                            queue=control, timeout=1800, heartbeat=30, attempts=3, summary="foreign keys")
                    except ActivityError as e:
                        # Only a report, after the writes committed: the run goes on to its check.
                        broken = None
                        rec.status, rec.detail = "failed", f"could not check: {described(e)}"
                        self.degraded.append(f"foreign keys across the synced tables not checked ({described(e)})")
                    if broken is not None:
                        rec.detail = f"{len(broken)} written keys break a foreign key" if broken else "none broken"
                    if broken:
                        rec.status = "failed"
                        self.degraded.append(f"{len(broken)} keys this run wrote break a foreign key on "
                                             f"{self.target_region}: {'; '.join(broken[:5])}")

        verify_id = f"{wid}-verify"
        async with self.step("Check again") as rec:
            after = await workflow.execute_child_workflow(
                ConsistencyCheckWorkflow.run,
                {"tables": [t.table for t in check.tables], "regions": [a, b], "database_b": check.database_b,
                 "redis": False, "trigger": f"data-sync {wid}"},
                id=verify_id, result_type=ConsistencyResult)
            result.verify_workflow_id, result.remaining = verify_id, after.differences
            left = [t.table for t in after.tables if t.differences]
            rec.detail = f"{after.differences} differences" + (f" in {', '.join(left)}" if left else "")
            if left:
                rec.status = "failed"
                self.degraded.append(f"still different after the sync: {', '.join(left)} "
                                     f"({after.differences} keys; check {verify_id})")
        result.degraded = self.degraded
        result.outcome = "degraded" if self.degraded else "succeeded"
        self.finish(result.outcome)
        return result


def _current(st: PgStatus | None, primary: bool) -> bool:
    """A server whose rows are the service's now: the primary, or a standby streaming from it."""
    return primary or (st is not None and st.reachable and st.role == "standby" and st.receiver_status == "streaming")


def _keys(d: KeyDiff) -> list[list[str]]:
    return d.updated_keys + d.inserted_keys + d.deleted_keys


def _sample_keys(d: KeyDiff) -> int:
    return len(d.inserted_keys) + len(d.updated_keys) + len(d.deleted_keys)

