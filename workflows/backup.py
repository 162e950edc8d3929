"""Backup: one pgBackRest backup of the service's database to each region's bucket.

The runbook, as an operator would do it:

1. Find who is primary now and whether a standby streams (a Schedule never names a node: the
   backup follows the primary through failovers without anyone editing it).
2. Bring every reachable node's pgBackRest files up to date (the nodes concurrently). The
   stanza is made (``stanza-create``) only when a backup finds a repo without it: a new
   bucket, or one lost and recreated empty. Run before every backup it cost a second of S3
   round trips to both buckets, and failed the whole run when the other region's was down.
3. Hold the service's backup-repo lock (workflows/repo_lock.py) from here to the end: no
   other backup or expire writes the buckets meanwhile, from any node.
4. Take the backup on the standby's node where one streams (``backup-standby``: the
   primary only starts and stops it), else on the primary's; once per repo, own bucket first.
5. Expire by the retention in each bucket that got a backup, under the expiry lock and only
   while no restore reads the buckets (workflows/repo_lock.py). pgBackRest's own expire at the
   end of a backup (``expire-auto``) is turned off for it: it deleted the set, or the WAL, a
   restore beside it was reading. With a restore running, the expiry waits for the next run.
6. Report each backup's label, size, WAL range, duration and repo, in the result and in
   search attributes.

Nothing here is destructive: a failure leaves at worst a partial backup that pgBackRest never
lists as valid and the next backup resumes. A repo that fails while the other succeeds is
"degraded" (the other region's bucket is down, say); none succeeding fails the run.

A cancel stops the step in flight (its worker stops pgBackRest, whose partial copy the next
backup resumes or removes) and starts nothing more. The run ends cancelled, and its details
and search attributes name the backups it completed, which stay (a cancelled run has no
result): the catalog tells whether the backup in flight finished all the same.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import BackupActivities, TakeBackupRequest
    from activities.backup.catalog import BackupRecord
    from activities.backup.take import STEP_KEY
    from activities.backup.expire import RepoExpiry
    from activities.postgres.activities import PostgresActivities
    from activities.topology import TopologyActivities
    from eagle_dr.temporal import (
        DR_BACKUP_BYTES,
        DR_BACKUP_LABEL,
        DR_BACKUP_REPO,
        DR_BACKUP_SECONDS,
        DR_BACKUP_TYPE,
        DR_BACKUP_WAL,
        DR_RUNBOOK,
        DR_SERVICE,
        DR_SOURCE_REGION,
        DR_TRIGGER,
    )
    from workflows.expire import expire_each
    from workflows.repo_lock import expiry_lock, repo_lock
    from workflows.runbook import Runbook
    from workflows.validation import RawInput, validated


class BackupInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["full", "diff", "incr"] = "incr"
    # Regions whose bucket gets the backup; empty means every region's.
    repos: list[str] = Field(default_factory=list)
    # auto: per backup.read_from (the standby when one streams), else the primary.
    source: Literal["auto", "primary", "standby"] = "auto"
    trigger: str = Field(default="manual", max_length=100)
    # How long one backup may run before it is stopped (it resumes on the next run).
    timeout_seconds: float = Field(default=6 * 3600, gt=0, le=7 * 86400)


class BackupResult(BaseModel):
    service: str
    type: str
    primary_region: str
    source_region: str
    from_standby: bool
    backups: list[BackupRecord] = []
    # repo region -> why its backup failed
    failed: dict[str, str] = {}
    degraded: list[str] = []
    # The expire after the backups (empty for runs recorded before it was a step of its own).
    expired: list[RepoExpiry] = []
    # Restores (workflow ids) reading the buckets: the expiry was left to the next run.
    expiry_deferred_for: list[str] = []
    outcome: str


@workflow.defn
class BackupWorkflow(Runbook):
    runbook = "backup"
    notifies = "failures"  # scheduled: news only when it fails (runbook.py)

    @workflow.run
    async def run(self, raw: RawInput) -> BackupResult:
        inp = validated(BackupInput, raw)
        async with self.step("Read the topology"):
            topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        self.service = topo.service
        names = [r.name for r in topo.regions]
        for i, r in enumerate(inp.repos):
            self.known_region(topo, f"repos.{i}", r)
        repos = inp.repos or names
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("backup"), DR_SERVICE.value_set(topo.service),
                                           DR_TRIGGER.value_set(inp.trigger), DR_BACKUP_TYPE.value_set(inp.type)])
        if workflow.patched("backup-repo-lock"):
            # Before the primary is looked for: a run that waited has the topology of now.
            async with repo_lock(self, topo.service, topo.control_task_queue,
                                 nodes={r.name: r.task_queue for r in topo.regions}):
                try:
                    return await self._backup(inp, topo, repos)
                except asyncio.CancelledError:
                    if not workflow.patched("backup-cancel-says-what-it-kept"):
                        raise
                    raise await self._cancelled(topo) from None
        return await self._backup(inp, topo, repos)

    async def _cancelled(self, topo) -> asyncio.CancelledError:
        """A cancel stops the step in flight (a pgBackRest backup, or an expire) and starts
        nothing more. The backups already taken are complete and stay; a cancelled run has no
        result, so its details and search attributes name them. The backup in flight may have
        finished all the same (before the cancel reached its worker, or with that worker gone):
        the catalog says, by this run's annotation, and when it cannot be read, the run says
        that whether it finished is unknown."""
        taken: list[BackupRecord] = list(getattr(self, "_taken", []))
        stopped: list[str] = []
        doing = getattr(self, "_doing", None)
        if doing is not None and doing[0] == "backup":
            _, repo, rec, nodes = doing
            if workflow.patched("backup-cancel-reads-catalog"):
                found, why, running = await self._ours_in_catalog(topo, nodes, repo)
                late = [b for b in found if b.repo_region == repo and b.label not in {t.label for t in taken}]
                if late:
                    taken += late
                    rec.status = "failed" if late[-1].error else "done"
                    rec.detail = f"{late[-1].label}: finished before the cancel could stop it" + (
                        "; PAGE CHECKSUM ERRORS" if late[-1].error else "")
                elif why:
                    stopped.append(f"the backup to {repo}'s bucket, which may have finished all the same: the catalog "
                                   f"could not be read to tell ({why})")
                elif running:
                    stopped.append(f"the backup to {repo}'s bucket, whose pgBackRest still held the stanza's lock on "
                                   f"{nodes[0]}'s node: it may yet finish, `pgbackrest info` will tell")
                else:
                    stopped.append(f"the backup to {repo}'s bucket, unfinished (pgBackRest resumes or removes its "
                                   "partial copy at the next backup)")
            else:
                stopped.append(f"the backup to {repo}'s bucket")
        elif doing is not None and doing[0] == "stanza":
            stopped.append(f"the stanza-create for {doing[1]}'s bucket (the next backup makes it if it is still "
                           "missing)")
        elif doing is not None:
            stopped.append("the expiry, where it was (the next backup or expire goes on from there)")
        if taken:
            workflow.upsert_search_attributes([DR_BACKUP_LABEL.value_set([b.label for b in taken]),
                                               DR_BACKUP_REPO.value_set([b.repo_region for b in taken])])
        return self.cancelled([], stopped=stopped, kept=[
            f"backup {b.label} in {b.repo_region}'s bucket (complete" + (", with PAGE CHECKSUM ERRORS" if b.error else "")
            + ")" for b in taken])

    async def _ours_in_catalog(self, topo, nodes: list[str], repo: str) -> tuple[list[BackupRecord], str | None, bool]:
        """This run's backups in the catalog (by the step annotation take.py writes), read from
        the first of ``nodes`` whose worker answers and reads ``repo``'s bucket; why none could,
        if none did; and whether a pgBackRest backup still runs on the first node (the source:
        pgBackRest's lock there). Bounded: the repo lock is held meanwhile."""
        info = workflow.info()
        prefix = f"{info.workflow_id}/{info.run_id}/"
        why: list[str] = []
        for node in nodes:
            try:
                cat = await self.act(BackupActivities.read_backup_catalog, node, queue=topo.region(node).task_queue,
                                     timeout=60, schedule_to_start=20, attempts=1)
            except ActivityError as e:
                why.append(f"{node}: {e.cause or e}")
                continue
            # `info` exits 0 with a bucket it cannot read: its status says so, and "nothing
            # there" would then be a guess.
            st = cat.repo(repo)
            if st is None or st.code not in (0, 2):
                why.append(f"{node}: {repo}'s bucket: {st.message if st else 'not in its config'}")
                continue
            return ([b for b in cat.backups if b.annotation.get(STEP_KEY, "").startswith(prefix)], None,
                    node == nodes[0] and cat.backup_running)
        return [], "; ".join(why), False

    async def _backup(self, inp: BackupInput, topo, repos: list[str]) -> BackupResult:
        control = topo.control_task_queue

        # Fewer round trips around the same pgBackRest backup (the overhead goal, 1.2x a bare
        # one): the nodes read and configured concurrently, and stanza-create only when a repo
        # turns out to lack the stanza. Runs recorded before replay the old sequence.
        optimistic = workflow.patched("backup-optimistic-stanza")
        async with self.step("Find the primary and a streaming standby") as rec:
            if optimistic:
                got = await asyncio.gather(*[self.act(PostgresActivities.postgres_status, r.name, queue=control,
                                                      timeout=30, attempts=2) for r in topo.regions])
                status = {r.name: s for r, s in zip(topo.regions, got)}
            else:
                status = await self.postgres_statuses(topo, control)
            primaries = self.primaries(status)
            if len(primaries) != 1:
                raise ApplicationError(f"no single primary to back up ({self.no_single_primary(status, primaries)})",
                                       type="NoPrimary", non_retryable=True)
            primary = primaries[0]
            standby = next((n for n, s in status.items() if n != primary and s.reachable and s.role == "standby"
                            and s.receiver_status == "streaming"), None)
            if inp.source == "standby" and standby is None:
                raise ApplicationError("source 'standby' asked, but no standby streams", type="NoStandby",
                                       non_retryable=True)
            from_standby = standby is not None and (
                inp.source == "standby" or (inp.source == "auto" and topo.backup_read_from == "standby"))
            source = standby if from_standby else primary
            rec.detail = f"primary {primary}; backing up from {source}" + (" (standby)" if from_standby else "")
        self.source_region, self.target_region = source, ", ".join(repos)
        workflow.upsert_search_attributes([DR_SOURCE_REGION.value_set(source)])

        async with self.step("Bring pgBackRest's config " + ("up to date" if optimistic else
                                                               "and stanza up to date")) as rec:
            reachable = []
            for r in topo.regions:
                if not status[r.name].reachable:
                    # Its worker could not act on a down node's files; the node's config is
                    # rewritten the next time it is up and backed up or archived from.
                    self.degraded.append(f"{r.name}: PostgreSQL unreachable, its pgBackRest config not refreshed")
                    continue
                reachable.append(r)
                if not optimistic:
                    await self.act(BackupActivities.ensure_backup_config, r.name, queue=r.task_queue, timeout=60,
                                   schedule_to_start=60, attempts=3)
            if optimistic:
                await asyncio.gather(*[self.act(BackupActivities.ensure_backup_config, r.name, queue=r.task_queue,
                                                timeout=60, schedule_to_start=60, attempts=3) for r in reachable])
            else:
                await self.ensure_stanza(topo, primary)

        not_before = workflow.now().timestamp()
        own_expiry = workflow.patched("backup-expires-under-expiry-lock")
        backups: list[BackupRecord] = []
        self._taken = backups
        failed: dict[str, str] = {}
        # The source's own bucket first: the backup a restore in that region reaches soonest.
        stanza_made = not optimistic
        for repo in sorted(repos, key=lambda n: n != source):
            async with self.step(f"{inp.type} backup to {repo}'s bucket") as rec:
                take = TakeBackupRequest(region=source, primary=primary, repo_region=repo, type=inp.type,
                                         not_before=not_before, from_standby=from_standby,
                                         timeout_seconds=inp.timeout_seconds, expire_auto=not own_expiry)
                try:
                    # Each recovery at most once, in whichever order pgBackRest reports them (a
                    # recreated bucket first says "no stanza", then, made, the primary's server
                    # may turn out down too).
                    fell_back = False
                    while True:
                        try:
                            self._doing = ("backup", repo, rec, [source] + ([primary] if primary != source else []))
                            b = await self._take(topo, source, take)
                            self._doing = None
                            break
                        except ActivityError as e:
                            self._doing = None
                            kind = getattr(e.cause, "type", None)
                            if not fell_back and from_standby and inp.source == "auto" and \
                                    kind == "PrimaryRemoteUnreachable" and \
                                    workflow.patched("backup-primary-when-remote-down"):
                                # The standby's node cannot reach the primary's (its pgBackRest TLS
                                # server is down, or refuses us): a scheduled backup reads the
                                # primary rather than leave a gap in the backups, and says why.
                                fell_back = True
                                self.degraded.append(f"read from the primary ({primary}), not the standby: {e.cause}")
                                from_standby, source = False, primary
                                self.source_region = source
                                workflow.upsert_search_attributes([DR_SOURCE_REGION.value_set(source)])
                                rec.detail = f"the standby cannot reach the primary's pgBackRest: backing up from {source}"
                                take = take.model_copy(update={"region": source, "from_standby": False})
                                continue
                            # The bucket lacks the stanza (new, or lost and recreated empty): make it,
                            # once per run, and take the backup again. pgBackRest fails at once
                            # here, before copying anything, so trying first costs nothing.
                            if stanza_made or kind != "StanzaMissing":
                                raise
                            stanza_made = True
                            rec.detail = "no stanza in that bucket: stanza-create, then the backup"
                            self._doing = ("stanza", repo)
                            try:
                                await self.ensure_stanza(topo, primary)
                            except ActivityError:
                                self._doing = None  # failed, not cancelled: _cancelled must not name it
                                raise
                            self._doing = None
                except ActivityError as e:
                    why = str(e.cause or e)
                    failed[repo] = why
                    rec.status, rec.detail = "failed", why[:300]
                    continue
                backups.append(b)
                rec.detail = (f"{b.label}: {_size(b.size)} database, {_size(b.repo_size)} in the repo, "
                              f"WAL {b.wal_start}..{b.wal_stop}, {b.duration_seconds:.0f} s")
                if b.error:
                    # pgBackRest finished (exit 0) but copied pages that failed their checksum:
                    # the newest restore source holds corrupt pages, which only `backup list`
                    # showed. A finding, not a failure: the backup is still the best there is.
                    rec.status = "failed"
                    rec.detail += "; PAGE CHECKSUM ERRORS"
                    self.degraded.append(
                        f"backup {b.label} in {repo}'s bucket copied pages that failed their checksum (pgBackRest "
                        "logged which: `pgbackrest info --set` and its backup log); the source's data files are "
                        "damaged there, and a restore from it brings the damage back")
        if failed:
            self.degraded += [f"no backup in {r}'s bucket: {why}" for r, why in failed.items()]
        expired, deferred_for = [], []
        if own_expiry and backups:
            for b in backups:
                if b.expire_auto is not False:
                    # The worker that took it is older than this workflow: it dropped the option
                    # it did not know, and pgBackRest expired with no look for restores.
                    self.degraded.append(f"{source}'s worker let pgBackRest expire after backup {b.label} without "
                                         "looking for restores: upgrade the regional workers before the control "
                                         "worker")
            # On the primary's node, as ExpireWorkflow: the standby's worker may be the one lost.
            expired, deferred_for = await self._expire(topo, primary, [b.repo_region for b in backups])
        workflow.upsert_search_attributes([
            DR_BACKUP_LABEL.value_set([b.label for b in backups]), DR_BACKUP_REPO.value_set([b.repo_region for b in backups]),
            DR_BACKUP_BYTES.value_set(sum(b.repo_size or 0 for b in backups)),
            DR_BACKUP_SECONDS.value_set(float(sum(b.duration_seconds for b in backups))),
            *([DR_BACKUP_WAL.value_set(f"{backups[0].wal_start}..{backups[0].wal_stop}")] if backups else []),
        ])
        if not backups:
            self.finish("failed")
            raise ApplicationError("no backup succeeded: " + "; ".join(f"{r}: {w}" for r, w in failed.items()),
                                   type="BackupFailed", non_retryable=True)
        outcome = "degraded" if self.degraded else "succeeded"
        self.finish(outcome)
        return BackupResult(service=topo.service, type=inp.type, primary_region=primary, source_region=source,
                            from_standby=from_standby, backups=backups, failed=failed, degraded=self.degraded,
                            expired=expired, expiry_deferred_for=deferred_for, outcome=outcome)

    async def _expire(self, topo, node: str, repos: list[str]) -> tuple[list[RepoExpiry], list[str]]:
        """What ``expire-auto`` did, as steps of their own. A failure here is degraded, never
        failed: the backups are taken and listed."""
        try:
            async with expiry_lock(self, topo.service, topo.control_task_queue) as readers:
                if readers:
                    return [], readers
                self._doing = ("expiry",)  # only now does a cancel stop an expire
                done, failed = await expire_each(self, repos, node, topo.region(node).task_queue)
                self._doing = None
        except ActivityError as err:
            self.degraded.append(f"backed up, but nothing expired: {err.cause or err}")
            return [], []
        self.degraded += [f"backed up, but not expired in {r}'s bucket: {why[:300]}" for r, why in failed.items()]
        return done, []


    async def ensure_stanza(self, topo, primary: str) -> None:
        await self.act(BackupActivities.ensure_stanza, primary, queue=topo.region(primary).task_queue,
                       timeout=600, heartbeat=30, schedule_to_start=60, attempts=3)

    async def _take(self, topo, source: str, req: TakeBackupRequest) -> BackupRecord:
        return await self.act(BackupActivities.take_backup, req, queue=topo.region(source).task_queue,
                              timeout=req.timeout_seconds + 600, heartbeat=60, schedule_to_start=300, attempts=3,
                              summary=f"{req.type} backup to {req.repo_region}")


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["BackupWorkflow", "BackupInput", "BackupResult", "timedelta"]
