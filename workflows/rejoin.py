"""Steps shared by failback and split-brain resolution: a diverged region (the old primary
coming back, or the loser of a split) gives up what only it wrote, then rejoins the
survivor as a standby.

 measure: stop it, find the fork, read from its WAL what it committed after: the true RPO;
 review:  (when approval is asked for) decide every key without writing, show the counts
          and a sample in the UI and the ``review`` query, and wait for the approver;
 apply:   its post-fork rows, resolved per table strategy, written to the survivor and
          audited in eagle_dr.conflict_audit;
 rewind:  pg_rewind it onto the survivor (pg_basebackup when impossible, and why); it streams;
 redis:   snapshot its Redis to S3, copy the keys only it has, then REPLICAOF the survivor.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.consistency.activities import AuditedKeysRequest, ConsistencyActivities
    from activities.consistency.keys import AuditedKeysResult
    from activities.failback import Divergence, FailbackActivities, FailbackRequest, Reconciliation, \
        ReconcileRequest
    from activities.postgres.rewind import Rewound
    from activities.redis.failback import RedisFailback
    from workflows.data_sync import DataSyncInput, DataSyncResult, DataSyncWorkflow
    from workflows.models import ApprovalPolicy, ApprovalRecord
    from workflows.runbook import Runbook, described

# Heartbeats come every few seconds (activities/heartbeat.py): a dead worker's step is
# retried elsewhere, or on its restart, after this long.
HEARTBEAT_S = 20


class Rejoin(Runbook):
    def __init__(self) -> None:
        super().__init__()
        self.pending_review: Reconciliation | None = None

    @workflow.query
    def review(self) -> Reconciliation | None:
        """What applying the divergence would do (counts and a sample), while approval waits."""
        return self.pending_review

    def skip_postgres(self, req: FailbackRequest, who: str, why: str) -> None:
        """The PostgreSQL steps, shown as skipped under the names they run under."""
        for name in (_measure_step(who), "reconcile diverged rows", _rewind_step(req)):
            self.skip(name, why)

    async def measure_divergence(self, req: FailbackRequest, queue: str, who: str) -> Divergence:
        async with self.step(_measure_step(who)) as st:
            # Reads every WAL record the old primary wrote after the fork (pg_waldump, a few tens of
            # MB/s): 300 s capped a divergence at about 10 GB, and each of the retries read it all
            # again. The heartbeat finds a dead worker; the hour bounds a hung read.
            divergence = await self.act(FailbackActivities.measure_divergence, req, queue=queue, timeout=3600,
                                        heartbeat=HEARTBEAT_S)
            lost = divergence.lost
            st.detail = f"fork at {lost.fork_lsn}: {lost.lost_commits} commits, {lost.lost_bytes} bytes after it"
        return divergence

    async def reconcile(self, req: FailbackRequest, divergence: Divergence, queue: str, policy: ApprovalPolicy,
                        notes: list[str]) -> tuple[Reconciliation, ApprovalRecord | None]:
        rreq, approval = await self.review_reconciliation(req, divergence, queue, policy)
        return await self.apply_reconciliation(req, rreq, queue, notes), approval

    async def review_reconciliation(self, req: FailbackRequest, divergence: Divergence, queue: str,
                                    policy: ApprovalPolicy) -> tuple[ReconcileRequest, ApprovalRecord | None]:
        """Decide every key without writing and wait for the approver, when the policy asks."""
        rreq = ReconcileRequest(**req.model_dump(), divergence=divergence, decided_at=workflow.now())
        approval = None
        if policy.required:
            async with self.step("preview the reconciliation") as st:
                preview = await self.act(FailbackActivities.reconcile_diverged_rows,
                                         rreq.model_copy(update={"preview": True}), queue=queue, timeout=3600,
                                         heartbeat=HEARTBEAT_S)
                self.pending_review = preview
                st.detail = _counts(preview) + "; " + _sample(preview)
            approval = await self.approval(
                policy, f"apply to {req.primary_region}: {_counts(preview)} (sample: {_sample(preview)}; "
                        f"full list: the `review` query)")
            self.pending_review = None
            rreq.approved_by = approval.approver or approval.outcome
        return rreq, approval

    async def apply_reconciliation(self, req: FailbackRequest, rreq: ReconcileRequest, queue: str,
                                   notes: list[str]) -> Reconciliation:
        """The point of no return of failback and split brain: rows are written to the survivor,
        and the rewind that follows erases the loser's copy of them."""
        async with self.step("reconcile diverged rows") as st:
            reconciliation = await self.act(FailbackActivities.reconcile_diverged_rows, rreq, queue=queue,
                                            timeout=3600, heartbeat=HEARTBEAT_S)
            st.detail = _counts(reconciliation) + _reads(reconciliation)
            if flagged := reconciliation.totals()[2]:
                notes.append(f"{flagged} changes were flagged for a human, not applied (immutable-append-only "
                             "tables, insert-insert key collisions, writes that would break a foreign key): see "
                             "eagle_dr.conflict_audit where action = 'flag'")
            if reconciliation.foreign_keys_broken:
                notes.append(f"{len(reconciliation.foreign_keys_broken)} applied changes still break a foreign key "
                             f"on {req.primary_region}: {'; '.join(reconciliation.foreign_keys_broken[:5])}")
            if blind := [t.table for t in reconciliation.tables if t.loser_rows and t.created_column is None]:
                notes.append(f"no creation column (created_at, or created_column under conflicts:) on "
                             f"{', '.join(blind)}: a key both sides inserted after the fork, or a row "
                             f"{req.primary_region} deleted that {req.region} then updated, was decided there "
                             "like an update")
            if reconciliation.survivor_xid_from is None and any(
                    t.loser_rows or t.deleted_keys for t in reconciliation.tables):
                notes.append(f"{req.primary_region}'s changes since the fork were judged by their timestamp columns "
                             f"alone (the WAL read named no transaction before the fork): a row it changed without "
                             f"moving the timestamp counted as unchanged, and {req.region}'s version replaced it")
            elif reconciliation.rewritten:
                notes.append(f"{', '.join(reconciliation.rewritten)} rewritten since the fork (a migration, pg_repack): "
                             f"{req.primary_region}'s changes there were judged by their timestamp columns alone")
            if reconciliation.unplaced_commits:
                notes.append(f"{reconciliation.unplaced_commits} transactions {req.region} committed after the fork "
                             "could not be traced in its WAL (running since before the WAL still on disk, or no "
                             "snapshot of the running transactions in reach): listed tables were read in full for "
                             "them, but a table nobody listed that they wrote before that WAL cannot be named, and "
                             "the rewind discards such changes")
            if reconciliation.unlisted_reconciled:
                notes.append(f"tables not listed under conflicts: were reconciled last-write-wins "
                             f"(unlisted_tables): {', '.join(reconciliation.unlisted_reconciled)}")
            if reconciliation.catalog_changes:
                notes.append(f"{req.region} changed system catalogs after the fork (schema changes are not "
                             f"reconciled; temporary tables also show here): "
                             f"{'; '.join(reconciliation.catalog_changes)}")
        return reconciliation

    async def rewind(self, req: FailbackRequest, queue: str, notes: list[str]) -> Rewound:
        async with self.step(_rewind_step(req)) as st:
            rewound = await self.act(FailbackActivities.rewind_old_primary, req, queue=queue, timeout=3600,
                                     heartbeat=HEARTBEAT_S)
            st.detail = rewound.summary()
            if rewound.fallback_reason:
                notes.append(f"pg_rewind was impossible ({rewound.fallback_reason}); rebuilt with pg_basebackup")
        return rewound

    async def verify_by_data(self, survivor: str, rejoined: str, policy: ApprovalPolicy,
                             trigger: str) -> DataSyncResult | None:
        """The last step: the rejoined standby's data against the survivor's, every table to exact
        keys (DataSyncWorkflow). Nothing differs: green. Something does: the sync asks ``policy``'s
        approval to rebuild the standby (never a write to it) and checks again; the run is green
        only when that follow-up check is clean."""
        async with self.step(f"verify {rejoined}'s data against {survivor}") as st:
            try:
                res = await workflow.execute_child_workflow(
                    DataSyncWorkflow.run, DataSyncInput(regions=[survivor, rejoined], approval=policy,
                                                        trigger=trigger[:100], skip_tables_without_key=True),
                    id=f"{workflow.info().workflow_id}-verify", task_queue=workflow.info().task_queue,
                    static_summary=f"verify {rejoined} against {survivor}")
            except ChildWorkflowError as e:
                st.status, st.detail = "failed", f"FAILED: {e.cause or e}"
                self.degrade(f"verifying {rejoined}'s data against {survivor}", e.cause or e,
                             f"eagle-dr check --regions {survivor},{rejoined}, then eagle-dr sync --check <its id>")
                return None
            unread = (f"; not compared: {', '.join(res.not_compared)} (no primary key, or unlogged)"
                      if res.not_compared else "")
            if res.outcome == "succeeded" and res.path == "none":
                st.detail = f"identical (check {res.check_workflow_id}){unread}"
            elif res.outcome == "succeeded":
                st.detail = f"differences repaired by {res.path}; the follow-up check is clean{unread}"
            else:
                st.status = "failed"
                st.detail = f"{res.outcome}: {'; '.join(res.degraded) or res.why}"
                self.degrade(f"verifying {rejoined}'s data against {survivor}", st.detail,
                             f"eagle-dr sync --check {res.check_workflow_id}")
            return res

    async def verify_divergence(self, survivor: str, rejoined: str, reconciliation: Reconciliation
                                ) -> tuple[AuditedKeysResult | None, bool]:
        """The last step when it follows the divergence (keys.py): every key the reconcile
        audited, compared on the survivor and the rejoined standby. Returns the result and
        whether a full verify must follow: a difference (the full verify then finds all of
        them and repairs by its approval policy) or no result (the step failed: say so, and
        verify in full rather than not at all)."""
        tables = [t.table for t in reconciliation.tables if t.loser_rows or t.deleted_keys]
        async with self.step(f"verify the reconciled keys on {rejoined} against {survivor}") as st:
            if not tables:
                st.detail = (f"nothing to compare: {rejoined} wrote no row of a table after the fork, so the run "
                             f"reconciled none; eagle-dr check --regions {survivor},{rejoined} reads every row")
                return None, False
            info = workflow.info()
            try:
                res = await self.act(ConsistencyActivities.compare_audited_keys,
                                     AuditedKeysRequest(survivor=survivor, standby=rejoined,
                                                        workflow_id=info.workflow_id, run_id=info.run_id,
                                                        tables=tables),
                                     queue=info.task_queue, timeout=3600, heartbeat=HEARTBEAT_S, attempts=3)
            except ActivityError as e:
                st.status, st.detail = "failed", f"FAILED: {e.cause or e}; verifying every table instead"
                return None, True
            unread = [t.table for t in res.tables if t.missing or not t.keys]
            if unread:
                # The reconcile wrote rows there, and the audit gave none of their keys back (a
                # reset run under another run id, a table renamed since): compared nothing is not
                # identical. Read every row instead.
                st.status = "failed"
                st.detail = (f"no audited key of {', '.join(unread)} could be read back ({res.keys} keys compared "
                             "elsewhere); verifying every table instead")
                return res, True
            if res.differences:
                st.status = "failed"
                st.detail = (f"{res.differences} of {res.keys} reconciled keys differ on {rejoined} "
                             f"({', '.join(f'{t.table} {t.differences}' for t in res.tables if t.differences)}); "
                             "verifying every table, which repairs by its approval policy")
                return res, True
            moving = sum(t.in_flight for t in res.tables)
            st.detail = (f"{res.keys} reconciled keys ({', '.join(tables)}) identical on both"
                         f"{f', {moving} still being written' if moving else ''}; every other row not read: "
                         f"eagle-dr check --regions {survivor},{rejoined} (or the scheduled check) reads them")
            return res, False

    async def rejoin_redis(self, req: FailbackRequest, queue: str) -> RedisFailback:
        async with self.step("preserve and re-attach Redis") as st:
            try:
                redis = await self.act(FailbackActivities.preserve_redis_and_rejoin, req, queue=queue, timeout=600,
                                       heartbeat=HEARTBEAT_S)
            except ActivityError as e:
                # Past the point of no return (PostgreSQL is being, or has been, rejoined): a
                # Redis that cannot be re-attached now (the primary region's is not a master, or
                # is down) is reported, and PostgreSQL's part goes on. Runs before the patch failed.
                # A newer move acts now (StaleEpoch): this run stops acting, as everywhere else.
                if isinstance(e.cause, CancelledError) or (isinstance(e.cause, ApplicationError)
                                                           and e.cause.type == "StaleEpoch") \
                        or not workflow.patched("redis-rejoin-failure-degrades"):
                    raise
                why = described(e)
                st.status, st.detail = "failed", f"FAILED: {why}"
                self.degrade(f"re-attaching {req.region}'s Redis to {req.primary_region}'s", why,
                             f"once {req.primary_region}'s Redis is a writable master, eagle-dr failback --region "
                             f"{req.region} (it re-attaches Redis; a PostgreSQL already streaming is left as it is)")
                return RedisFailback(reachable=None, failed=why)
            st.detail = redis.kept(req.primary_region) if redis.reachable else \
                "its Redis is unreachable: nothing to keep (no persistence)"
        return redis


def _measure_step(who: str) -> str:
    return f"measure what {who} wrote after the fork"


def _rewind_step(req: FailbackRequest) -> str:
    return f"rewind {req.region} into a standby of {req.primary_region}"


def _counts(r: Reconciliation) -> str:
    written, conflicts, flagged = r.totals()
    verb = "would be written" if r.preview else "written"
    return f"{written} rows {verb}, {conflicts} conflicts, {flagged} flagged for a human"


def _reads(r: Reconciliation) -> str:
    """What reading the divergence cost: tables read by block, in full (why), or not at all."""
    modes = [t.read_mode for t in r.tables if t.read_mode]
    if not modes:
        return ""  # a result recorded before the reads were reported
    full = [f"{t.table} ({t.full_read_why})" for t in r.tables if t.read_mode == "full"]
    out = (f"; read: {modes.count('blocks')} tables by block "
           f"({sum(t.blocks_read for t in r.tables)} blocks), {modes.count('unchanged')} untouched")
    if full:
        out += f", in full: {', '.join(full)}"
    if r.loser_read_wal_bytes:
        out += f"; the reads wrote {r.loser_read_wal_bytes} bytes of WAL on the old primary (pg_rewind copies more)"
    return out


def _sample(r: Reconciliation) -> str:
    items = [f"{t.table} {s['key']}: {s['action']} ({s['reason']})" for t in r.tables for s in t.sample][:5]
    return "; ".join(items) or "nothing to apply"
