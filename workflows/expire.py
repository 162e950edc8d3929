"""Expire: ``pgbackrest expire`` per repo by the configured retention, and what it removed.

A workflow of its own rather than an option of BackupWorkflow: every backup already ends with
an expire of its own, so this one matters exactly when backups do not run (failing for days:
no backup, no expiry) or when an operator must free a bucket now (``keep_fulls``); it has its
own schedule and its own outcome.

0. Hold the service's backup-repo lock (workflows/repo_lock.py) throughout: never beside a
   backup or another expire, whichever node those run on.
1. Find the primary (the node whose worker runs it; when none is reachable, any reachable
   node: expire reads and writes only the repos, never the database).
2. Its pgBackRest files up to date.
3. Hold the expiry lock and look for running restores (workflows/repo_lock.py): while one
   reads the buckets, nothing is deleted (the set it restores, or the WAL it replays, would go
   from under it); the expiry is deferred to the next run and the run says so.
4. One expire per repo, each its own step: one bucket down does not stop the other's expiry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import BackupActivities, ExpireRequest
    from activities.backup.expire import RepoExpiry
    from activities.postgres.activities import PostgresActivities
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_SOURCE_REGION, DR_TRIGGER
    from workflows.repo_lock import expiry_lock, repo_lock
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, validated


class ExpireInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Regions whose bucket to expire; empty means every region's.
    repos: list[str] = Field(default_factory=list)
    dry_run: bool = False
    # Keep only this many newest full backups (and what they need) this once, instead of the
    # configured time retention: for a bucket running out of space.
    keep_fulls: int | None = Field(default=None, ge=1, le=1000)
    trigger: str = Field(default="manual", max_length=100)


class ExpireResult(BaseModel):
    service: str
    ran_on: str
    repos: list[RepoExpiry] = []
    failed: dict[str, str] = {}
    # Restores (workflow ids) that were reading the buckets: nothing was expired because of them.
    deferred_for: list[str] = []
    outcome: str


@workflow.defn
class ExpireWorkflow(Runbook):
    runbook = "expire"
    notifies = "failures"  # scheduled: news only when it fails (runbook.py)

    @workflow.run
    async def run(self, raw: RawInput) -> ExpireResult:
        inp = validated(ExpireInput, raw)
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        names = [r.name for r in topo.regions]
        for i, r in enumerate(inp.repos):
            self.known_region(topo, f"repos.{i}", r)
        repos = inp.repos or names
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("expire"), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger)])
        if workflow.patched("backup-repo-lock"):
            # A backup on the standby's node and this expire on the primary's would each rewrite
            # backup.info, and one would lose the other's entries (workflows/repo_lock.py).
            async with repo_lock(self, topo.service, topo.control_task_queue,
                                 nodes={r.name: r.task_queue for r in topo.regions}):
                return await self._expire(inp, topo, repos)
        return await self._expire(inp, topo, repos)

    async def _expire(self, inp: ExpireInput, topo, repos: list[str]) -> ExpireResult:

        async with self.step("Find the node to run pgBackRest on") as rec:
            reachable, primary = [], None
            for r in topo.regions:
                s = await self.act(PostgresActivities.postgres_status, r.name, queue=topo.control_task_queue,
                                   timeout=30, attempts=2)
                if s.reachable:
                    reachable.append(r.name)
                    if s.role == "primary":
                        primary = r.name
            node = primary or (reachable[0] if reachable else None)
            if node is None:
                raise ApplicationError("no PostgreSQL node reachable to run pgbackrest expire on",
                                       type="NoNode", non_retryable=True)
            rec.detail = f"{node} ({'primary' if node == primary else 'no primary reachable'})"
        self.source_region, self.target_region = node, ", ".join(repos)
        workflow.upsert_search_attributes([DR_SOURCE_REGION.value_set(node)])
        queue = topo.region(node).task_queue

        async with self.step("Bring pgBackRest's config up to date"):
            await self.act(BackupActivities.ensure_backup_config, node, queue=queue, timeout=60,
                           schedule_to_start=60, attempts=3)

        if not workflow.patched("expire-defers-to-restores"):
            return self._result(topo, node, *await expire_each(self, repos, node, queue, inp.dry_run, inp.keep_fulls))
        async with expiry_lock(self, topo.service, topo.control_task_queue) as readers:
            if readers and not inp.dry_run:
                self.degraded.append(f"nothing expired: restores read the buckets ({', '.join(readers)}); "
                                     "the next expire or backup expires once they end")
                self.finish("degraded")
                return ExpireResult(service=topo.service, ran_on=node, deferred_for=readers, outcome="degraded")
            done, failed = await expire_each(self, repos, node, queue, inp.dry_run, inp.keep_fulls)
        return self._result(topo, node, done, failed)

    def _result(self, topo, node: str, done: list[RepoExpiry], failed: dict[str, str]) -> ExpireResult:
        if failed:
            self.degraded += [f"no expiry in {r}'s bucket: {why}" for r, why in failed.items()]
        if not done:
            self.finish("failed")
            raise ApplicationError("no expire succeeded: " + "; ".join(f"{r}: {w}" for r, w in failed.items()),
                                   type="ExpireFailed", non_retryable=True)
        outcome = "degraded" if failed else "succeeded"
        self.finish(outcome)
        return ExpireResult(service=topo.service, ran_on=node, repos=done, failed=failed, outcome=outcome)


async def expire_each(runbook, repos: list[str], node: str, queue: str, dry_run: bool = False,
                      keep_fulls: int | None = None) -> tuple[list[RepoExpiry], dict[str, str]]:
    """``pgbackrest expire`` in each repo from ``node``, each its own step of ``runbook``: one
    bucket down does not stop the other's expiry. Returns what each did, and why each failed
    (ExpireWorkflow and a backup's own expire steps)."""
    done: list[RepoExpiry] = []
    failed: dict[str, str] = {}
    for repo in repos:
        async with runbook.step(f"expire in {repo}'s bucket" + (" (dry run)" if dry_run else "")) as rec:
            try:
                e = await runbook.act(BackupActivities.expire_backups,
                                      ExpireRequest(region=node, repo_region=repo, dry_run=dry_run,
                                                    keep_fulls=keep_fulls),
                                      queue=queue, timeout=1800, heartbeat=30, schedule_to_start=300, attempts=5)
            except ActivityError as err:
                failed[repo] = str(err.cause or err)
                rec.status, rec.detail = "failed", failed[repo][:300]
                continue
            done.append(e)
            rec.detail = (f"{e.policy}: {len(e.removed_backups)} backups, "
                          f"{len(e.archive_removed)} WAL ranges removed" + (f"; {'; '.join(e.notes)}" if e.notes else ""))
    return done, failed
