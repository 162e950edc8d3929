"""``--plan``: run a runbook's preflight for real, read-only, and return what it would do.

One short workflow for every runbook (its input names which), not a ``plan_only`` flag on the
runbooks: their command sequences stay exactly as recorded (tests/histories replay), and a
plan can never take what a move takes. It runs under its own id (``dr-plan-...``), never
``dr-move-<service>``, so it neither waits for nor blocks a move; it takes no epoch, fences
nothing, and asks only activities that read (health probes, split-brain detection, the
restore target check, activities/plan.py). The runbook's own guard functions judge what it
read, so the plan refuses exactly where the runbook would (``Plan.blocked``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import RestoreActivities, RestoreRequest
    from activities.health import HealthActivities
    from activities.plan import PlanActivities, RejoinPlanRequest, RejoinView, RoutingView
    from activities.split_brain import SplitBrainActivities, SplitBrainReport, choose_survivor
    from workflows import failover, switchover
    from workflows.failback import FailbackInput
    from workflows.models import FailoverInput, SwitchoverInput
    from workflows.plan import Plan, Runbook as RunbookName, failback_plan, failover_plan, restore_plan, \
        split_brain_plan, switchover_plan
    from workflows.restore import RestoreInput, _dir_name
    from workflows.runbook import Runbook
    from workflows.split_brain import RULES, SplitBrainInput
    from workflows.validation import RawInput, invalid, validated
    from workflows.wal_gaps import unread_note, with_gaps


class PlanInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runbook: RunbookName
    # The runbook's own input, checked by its own model (a typo is refused naming the field).
    input: dict[str, Any] = {}


def _refusal(e: BaseException) -> str:
    cause = e.cause if isinstance(e, ActivityError) and e.cause is not None else e
    return getattr(cause, "message", None) or str(cause)


@workflow.defn
class PlanWorkflow(Runbook):
    runbook = "plan"
    # A plan is no incident: nobody is paged for one, started or failed.
    notifies = "none"

    @workflow.run
    async def run(self, raw: RawInput) -> Plan:
        inp = validated(PlanInput, raw)
        builder = {"failover": self._failover, "switchover": self._switchover, "failback": self._failback,
                   "split-brain": self._split_brain, "restore": self._restore}[inp.runbook]
        plan = await builder(inp.input)
        self.finish("blocked" if plan.blocked else "planned")
        return plan

    def _sub(self, model, raw: dict):
        # The runbook's own model: a plan refuses the input its runbook would refuse.
        return validated(model, raw)

    async def _probe(self, region: str, queue: str, timeout: float = 30, schedule_to_start: float = 30,
                     attempts: int = 2):
        return await self.act(HealthActivities.probe_region, region, queue=queue, timeout=timeout,
                              schedule_to_start=schedule_to_start, attempts=attempts)

    async def _routing(self) -> RoutingView | None:
        try:
            return await self.act(PlanActivities.read_routing, queue=workflow.info().task_queue, timeout=60,
                                  attempts=2)
        except ActivityError:
            return None

    async def _rejoin(self, region: str, primary: str, queue: str) -> RejoinView | None:
        try:
            return await self.act(PlanActivities.inspect_rejoin, RejoinPlanRequest(region=region,
                                  primary_region=primary), queue=queue, timeout=300, schedule_to_start=30,
                                  attempts=2)
        except ActivityError:
            return None

    # -- the moves --------------------------------------------------------------------------

    async def _failover(self, raw: dict) -> Plan:
        inp: FailoverInput = self._sub(FailoverInput, raw)
        self.service, self.target_region = inp.service, inp.target_region
        async with self.step("preflight (read-only)") as st:
            where = await self.place(inp)
            source, target = where.source, where.target
            blocked, notes = None, []
            s_health = t_health = None
            try:
                t_health = await self._probe(target, where.target_queue)
                failover.check_target(target, t_health)
            except (ActivityError, ApplicationError) as e:
                blocked = _refusal(e)
            if not inp.source_known_down:
                try:
                    s_health = await self._probe(source, where.source_queue, timeout=15, schedule_to_start=5,
                                                 attempts=1)
                except ActivityError:
                    notes.append(f"source region {source} worker did not answer the preflight probe")
            lag, basis = failover.standby_lag(s_health.postgres if s_health else None, t_health.postgres) \
                if t_health else (None, "target not probed")
            if blocked is None:
                try:
                    failover.lag_guard(inp, lag, basis, notes)
                except ApplicationError as e:
                    blocked = e.message
            routing = await self._routing()
            st.detail = blocked or f"lag {lag} bytes"
        plan = failover_plan(inp.service, source, target, source_worker=s_health is not None, lag=lag, basis=basis,
                             max_lag_bytes=inp.max_lag_bytes, force=inp.force, routing=routing, blocked=blocked)
        plan.notes += notes
        return plan

    async def _switchover(self, raw: dict) -> Plan:
        inp: SwitchoverInput = self._sub(SwitchoverInput, raw)
        self.service, self.target_region = inp.service, inp.target_region
        async with self.step("preflight (read-only)") as st:
            where = await self.place(inp)
            source, target = where.source, where.target
            blocked, lag = None, None
            try:
                t_health = await self._probe(target, where.target_queue)
                s_health = await self._probe(source, where.source_queue)
                lag = switchover.check_preflight(inp, where.topology, source, target, s_health, t_health)
                switchover.lag_guard(inp, lag)
            except (ActivityError, ApplicationError) as e:
                blocked = _refusal(e)
            routing = await self._routing()
            st.detail = blocked or f"lag {lag} bytes"
        return switchover_plan(inp.service, source, target, lag=lag, max_lag_bytes=inp.max_lag_bytes,
                               routing=routing, blocked=blocked)

    # -- rejoining a diverged region --------------------------------------------------------

    async def _failback(self, raw: dict) -> Plan:
        inp: FailbackInput = self._sub(FailbackInput, raw)
        self.service, self.target_region = inp.service, inp.region
        async with self.step("preflight (read-only)") as st:
            topo = await self.topology()
            self.known_region(topo, "region", inp.region)
            primary = topo.other(inp.region).name
            pq, oq = topo.region(primary).task_queue, topo.region(inp.region).task_queue
            self.source_region = primary
            blocked, o_health, view = None, None, None
            try:
                p_health = await self._probe(primary, pq)
                o_health = await self._probe(inp.region, oq)
                if p_health.postgres.role != "primary":
                    blocked = f"{primary} is not the primary ({p_health.postgres.role}); nothing to fail back to"
            except ActivityError as e:
                blocked = f"failback needs both regions' workers: {_refusal(e)}"
            pg = o_health.postgres if o_health else None
            # As the runbook decides (skip-streaming): a standby already streaming has no fork.
            streaming = pg.upstream if pg is not None and pg.role == "standby" and \
                pg.receiver_status == "streaming" else None
            if blocked is None and not streaming:
                view = await self._rejoin(inp.region, primary, oq)
            routing = await self._routing() if inp.switch_back else None
            st.detail = blocked or (f"{inp.region} streams already" if streaming else
                                    f"fork at {view.fork_lsn if view else 'unknown'}")
        return failback_plan(inp.service, inp.region, primary, role=pg.role if pg and pg.reachable else None,
                             streaming_from=streaming, switch_back=inp.switch_back, view=view, routing=routing,
                             blocked=blocked, verify=inp.verify)

    async def _split_brain(self, raw: dict) -> Plan:
        inp: SplitBrainInput = self._sub(SplitBrainInput, raw)
        if inp.survivor_rule is not None and inp.survivor_rule not in RULES:
            raise invalid("survivor_rule", f"unknown rule {inp.survivor_rule!r} (known: {', '.join(RULES)})")
        self.service = inp.service
        async with self.step("detect (read-only)") as st:
            topo = await self.topology()
            if inp.survivor is not None:
                self.known_region(topo, "survivor", inp.survivor)
            report: SplitBrainReport = await self.act(SplitBrainActivities.detect_split_brain,
                                                      queue=workflow.info().task_queue, timeout=60)
            st.detail = report.detail  # as the runbook's detect step says it
            if not report.split:
                return split_brain_plan(inp.service, findings=[], survivor=None, loser=None, why="", epoch=None,
                                        pg_split=False, redis_split=False, unseen=report.unseen_note,
                                        fenced_notes=report.fenced_notes)
            blocked = None
            try:
                choice = choose_survivor(inp.survivor_rule or topo.survivor_rule, report,
                                         {r.name: r.priority for r in topo.regions}, inp.survivor)
            except ValueError as e:
                raise invalid("survivor", str(e)) from None
            survivor, loser = choice.survivor, choice.loser
            self.source_region, self.target_region = loser, survivor
            # The same tests as the runbook's fence step (workflows/split_brain.py).
            pg_split = loser in report.postgres_primaries or loser in report.fenced_primaries or \
                f"{loser}/postgres" in report.unreachable
            redis_split = len(report.all_redis_masters) > 1 and loser in report.all_redis_masters
            view = await self._rejoin(loser, survivor, topo.region(loser).task_queue) if pg_split else None
            routing = await self._routing()
        return split_brain_plan(inp.service, findings=report.findings, survivor=survivor, loser=loser,
                                why=f"{choice.rule}: {choice.why}", epoch=max(report.epochs.values(), default=0) + 1,
                                pg_split=pg_split, redis_split=redis_split, view=view, routing=routing,
                                blocked=blocked, verify=inp.verify)

    # -- restore -----------------------------------------------------------------------------

    async def _restore(self, raw: dict) -> Plan:
        inp: RestoreInput = self._sub(RestoreInput, raw)
        async with self.step("check the target against the backups (read-only)") as st:
            topo = await self.topology()
            self.service = topo.service
            names = [r.name for r in topo.regions]
            if inp.region is not None:
                self.known_region(topo, "region", inp.region)
            if inp.repo is not None and inp.repo not in names:
                raise invalid("repo", f"unknown repo {inp.repo!r}: repos are named by region "
                                            f"({', '.join(names)})")
            # As RestoreWorkflow picks them: a host that is not the primary's now, its own bucket.
            if inp.region is not None:
                region = inp.region
            elif workflow.patched("restore-scratch-off-primary"):
                region = await self.scratch_region(topo)
            else:
                region = next((r.name for r in topo.regions if r.configured_role != "primary"), names[0])
            repo = inp.repo or region
            self.source_region, self.target_region = repo, region
            blocked, chk, primary = None, None, None
            if inp.mode != "pitr":
                primary = await self.find_primary(topo)
                if primary is None:
                    blocked = "no region's PostgreSQL answers as primary"
                elif inp.mode == "rebuild-standby" and primary == inp.region:
                    blocked = f"{primary} is the primary: only a standby is rebuilt from backup"
                elif inp.mode == "verify" and inp.target.kind != "latest":
                    blocked = "verify restores the newest backup to the end of the archive: leave the target at latest"
            req, unread = await with_gaps(self, topo, RestoreRequest(
                region=region, repo_region=repo, target=inp.target, name=_dir_name(workflow.info()), port=inp.port,
                fallback=inp.repo is None))
            try:
                chk = await self.act(RestoreActivities.check_restore_target, req, queue=topo.region(region).task_queue,
                                     timeout=180, heartbeat=30, schedule_to_start=60, attempts=2)
            except ActivityError as e:
                blocked = blocked or _refusal(e)
            st.detail = blocked or f"{chk.repo_region}'s bucket: {chk.oldest_backup} .. {chk.newest_backup}"
            if not blocked and chk and (note := unread_note(unread, chk.gaps_read_here)):
                st.detail += f"; {note}"
        return restore_plan(topo.service, inp.mode, region, chk.repo_region if chk else repo,
                            target=inp.target.describe(), backup=chk.newest_backup if chk else None,
                            oldest=chk.oldest_backup if chk else None, fell_back=chk.fell_back if chk else None,
                            primary=primary, tables=[t.table for t in inp.tables], keep_minutes=inp.keep_minutes,
                            blocked=blocked)
