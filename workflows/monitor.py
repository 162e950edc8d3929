"""Health monitoring: watch the primary region and, when allowed, fail over by itself.

Every ``interval`` the primary region is probed from several vantage points at once: the
control worker and every region's worker, each over the network. A region is down in a
round only when a majority of the vantage points that answered see its PostgreSQL
unreachable; ``failure_threshold`` such rounds in a row declare it down. A vantage point
that does not pick its probe up in time casts no vote: its worker is down, which is a
"worker down" finding (details, ``monitor_state``), never a failover. A lone worker's view
is not a region's: a kill -9 of the primary region's worker, or a partition between one
worker and the database, must not fence a healthy primary. (Histories recorded before
the ``monitor-vantage-quorum`` patch replay the old rule: the primary's own worker alone.)

Then, with ``auto_failover``, the monitor starts the failover runbook (same
single-flight id as a human would) with ``detected_at`` set to the first failed probe;
without it, it records the outage in its search attributes and details for alerting.

It also watches for a split brain (two writable primaries, two Redis masters, routing that
disagrees) from the control worker: seen twice in a row, it is recorded, and with
``auto_resolve_split_brain`` the split-brain runbook starts (same single-flight id).

The monitor follows the primary: when a majority of the answering vantage points see
another region as the one writable primary (after a switchover, a failover or a failback),
it watches that region from then on. A failover that collides with a running move, or that
the runbook refuses or fails, is recorded and the monitor keeps watching: an unwatched
service is worse than a repeated alert.

An ``alert`` signal (an Alertmanager alert routed here by ``eagle-dr alerts serve``) is
recorded in the findings and cuts the wait short: the next quorum round starts at once, so
an alert shortens detection without ever counting as a vote itself. (Histories recorded
before the ``monitor-alert-wakeup`` patch replay the plain sleep.)

The loop continues as new every ``iterations_per_run`` probes (or sooner, when Temporal
suggests it) to keep history short.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities, ProbeRequest, VantageReport
    from activities.split_brain import SplitBrainActivities
    from eagle_dr.temporal import DR_OUTCOME, DR_RUNBOOK, DR_SERVICE, DR_TRIGGER
    from workflows.failover import FailoverWorkflow
    from workflows.models import AlertNotice, FailoverInput, RunbookResult, Trigger
    from workflows.runbook import Runbook, move_id
    from workflows.split_brain import SplitBrainInput, SplitBrainResult, SplitBrainWorkflow
    from workflows.validation import RawInput, validated


class MonitorInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = "eagle-alert"
    interval_seconds: float = Field(default=10, gt=0, le=3600)
    failure_threshold: int = Field(default=3, ge=1, le=100)
    auto_failover: bool = False
    watch_split_brain: bool = True
    auto_resolve_split_brain: bool = False
    max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    # Stop after one automatic runbook (benchmarks, drills, tests) instead of watching on.
    stop_after_failover: bool = False
    # Bounded: each round adds a few activities to the history, and Temporal caps its length.
    iterations_per_run: int = Field(default=500, ge=1, le=10000)
    primary_region: str | None = None


class MonitorState(BaseModel):
    """What the monitor sees now (the ``monitor_state`` query)."""

    service: str = ""
    watched_region: str = ""
    rounds: int = 0
    failures: int = 0
    failure_threshold: int = 0
    # Vantage point -> what it saw of the watched region this round (or "no answer").
    votes: dict[str, str] = {}
    # Vantage points whose worker did not pick up its probe this round.
    workers_down: list[str] = []
    # Notable events, oldest first (the last few only).
    findings: list[str] = []
    failovers_started: int = 0


class MonitorReport(BaseModel):
    service: str
    watched_region: str
    first_failure_at: datetime | None = None
    detected_at: datetime | None = None
    failover: RunbookResult | None = None
    split_brain: SplitBrainResult | None = None
    error: str | None = None


MAX_FINDINGS = 20


@workflow.defn
class MonitorWorkflow(Runbook):
    runbook = "monitor"

    def __init__(self) -> None:
        super().__init__()
        self.state = MonitorState()
        self._alerted = False
        self._woke_early = False

    @workflow.query
    def monitor_state(self) -> MonitorState:
        return self.state

    @workflow.signal
    def alert(self, notice: AlertNotice) -> None:
        what = ", ".join(f"{k}={v}" for k, v in sorted(notice.group_labels.items()))
        self._finding(f"alert ({notice.rule}): {notice.firing} firing, {notice.resolved} resolved [{what}] "
                      f"from {notice.incident_id}")
        # A resolved alert is news, not a reason to probe sooner.
        self._alerted = self._alerted or notice.firing > 0

    async def _pause(self, wait: timedelta) -> None:
        """Sleep until the next round, or until a firing alert asks for one now."""
        if not workflow.patched("monitor-alert-wakeup"):
            await workflow.sleep(wait)
            return
        if self._woke_early:
            # At most one early round in a row: a storm of alerts must not turn the interval
            # into back-to-back rounds, which would count failure_threshold failed rounds
            # within a transient stall that the interval exists to ride out.
            self._woke_early = False
            await workflow.sleep(wait)
            return
        try:
            await workflow.wait_condition(lambda: self._alerted, timeout=wait)
            self._woke_early = True
        except asyncio.TimeoutError:
            pass
        self._alerted = False

    def _finding(self, what: str) -> None:
        self.state.findings = [*self.state.findings, f"{workflow.now().isoformat(timespec='seconds')} {what}"][
            -MAX_FINDINGS:]
        workflow.logger.info("monitor finding", extra={"finding": what})

    @workflow.run
    async def run(self, raw: RawInput) -> MonitorReport:
        inp = validated(MonitorInput, raw)
        self.service = inp.service
        workflow.upsert_search_attributes([DR_RUNBOOK.value_set("monitor"), DR_SERVICE.value_set(inp.service),
                                           DR_TRIGGER.value_set("automatic" if inp.auto_failover else "schedule")])
        if workflow.patched("monitor-vantage-quorum"):
            return await self._watch(inp)
        topo = await self.topology()
        primary = inp.primary_region or await self.find_primary(topo) or \
            next(r.name for r in topo.regions if r.configured_role == "primary")
        self.target_region = primary
        interval = timedelta(seconds=inp.interval_seconds)
        failures, first_failure = 0, None
        splits, first_split = 0, None
        for _ in range(inp.iterations_per_run):
            started = workflow.now()
            # Histories recorded before the split-brain watch existed replay without it. It runs
            # beside the probe so a slow answer from one region never delays the other check.
            split_check = asyncio.create_task(self._split_findings(workflow.info().task_queue)) \
                if inp.watch_split_brain and workflow.patched("watch-split-brain") else None
            ok, why = await self._probe(topo.region(primary).task_queue, primary, inp.interval_seconds)
            if split_check is not None:
                findings = await split_check
                splits, first_split = (splits + 1, first_split or started) if findings else (0, None)
                if splits >= 2 and (done := await self._split_brain(inp, primary, findings, first_split)):
                    return done
            if ok:
                failures, first_failure = 0, None
            else:
                failures += 1
                first_failure = first_failure or started
                workflow.set_current_details(f"{primary}: {failures}/{inp.failure_threshold} failed probes ({why})")
            if failures >= inp.failure_threshold:
                return await self._region_down(inp, topo, primary, first_failure)
            elapsed = workflow.now() - started
            if elapsed < interval:
                await workflow.sleep(interval - elapsed)
        workflow.continue_as_new(inp.model_copy(update={"primary_region": primary}))

    # -- the vantage-quorum monitor ----------------------------------------------------------

    async def _watch(self, inp: MonitorInput) -> MonitorReport:
        topo = await self.topology()
        # The first round's sightings correct a wrong guess (see _follow): no probe of a
        # possibly dead region's own worker has to time out before the watch begins.
        primary = inp.primary_region or next(r.name for r in topo.regions if r.configured_role == "primary")
        self.target_region = primary
        self.state = MonitorState(service=inp.service, watched_region=primary, failure_threshold=inp.failure_threshold)
        interval = timedelta(seconds=inp.interval_seconds)
        failures, first_failure = 0, None
        splits, first_split = 0, None
        for _ in range(inp.iterations_per_run):
            started = workflow.now()
            split_check = asyncio.create_task(self._split_findings(topo.control_task_queue)) \
                if inp.watch_split_brain else None
            reports = await self._vantage_round(topo, inp.interval_seconds)
            self.state.rounds += 1
            if split_check is not None:
                findings = await split_check
                splits, first_split = (splits + 1, first_split or started) if findings else (0, None)
                if splits >= 2 and (done := await self._split_brain(inp, primary, findings, first_split,
                                                                      keep_watching=True)):
                    return done
            self._note_workers(reports)
            if (moved := self._follow(primary, reports)) is not None:
                # A switchover, failover or failback moved the primary: watch where it is now.
                # The old primary (a standby, or stopped mid-move) is no failure to act on.
                self._finding(f"primary moved: {primary} -> {moved}; now watching {moved}")
                primary, failures, first_failure = moved, 0, None
                self.target_region = self.state.watched_region = primary
            down, answered = self._tally(primary, reports)
            if answered and down * 2 > answered:
                failures += 1
                first_failure = first_failure or started
            elif answered:
                failures, first_failure = 0, None
            # No vantage point answered: no verdict either way, the count stands.
            self.state.failures = failures
            self._show(primary, failures, down, answered, inp.failure_threshold)
            if failures >= inp.failure_threshold:
                if (done := await self._region_down(inp, topo, primary, first_failure, keep_watching=True)):
                    return done
                # Refused, failed, or another move holds the id: recorded; watch on, and let the
                # next rounds say where the primary is (the move that collided may move it).
                failures, first_failure = 0, None
            elapsed = workflow.now() - started
            if elapsed < interval:
                await self._pause(interval - elapsed)
            if workflow.info().is_continue_as_new_suggested():
                break
        workflow.continue_as_new(inp.model_copy(update={"primary_region": primary}))

    async def _vantage_round(self, topo, interval_seconds: float) -> dict[str, VantageReport | None]:
        """Every vantage point probes every region, in parallel; None: it did not answer."""
        # A round waits for its slowest vantage point, and a dead worker's probe ends only at
        # its schedule-to-start timeout: one interval keeps a round one interval long, as
        # detection time needs. A live worker picks a task up in milliseconds; the 1 s floor
        # spares a loaded host false "worker down" findings (which cost no failover anyway).
        budget = max(interval_seconds, 1.0)
        req = ProbeRequest(regions=[r.name for r in topo.regions], timeout_seconds=min(budget, 5.0))
        vantages = {"control": topo.control_task_queue, **{r.name: r.task_queue for r in topo.regions}}

        async def ask(queue: str) -> VantageReport | None:
            try:
                return await self.act(HealthActivities.probe_regions_from_here, req, queue=queue,
                                      schedule_to_start=budget, timeout=req.timeout_seconds * 4 * len(req.regions) + 5,
                                      attempts=1)
            except ActivityError:
                return None

        answers = await asyncio.gather(*(ask(q) for q in vantages.values()))
        return dict(zip(vantages, answers))

    def _follow(self, watched: str, reports: dict[str, VantageReport | None]) -> str | None:
        """The region a majority of answering vantage points see as the one writable primary,
        when that is not the watched one; else None (no move, or no clear answer)."""
        answered = [r for r in reports.values() if r is not None]
        regions = {s.region for r in answered for s in r.sightings}
        writable = [name for name in sorted(regions)
                    if sum((s := r.of(name)) is not None and s.verdict == "up" for r in answered) * 2 > len(answered)]
        # Two writable primaries is a split brain, not a move: the split watch handles it.
        return writable[0] if len(writable) == 1 and writable[0] != watched else None

    def _tally(self, region: str, reports: dict[str, VantageReport | None]) -> tuple[int, int]:
        """(vantage points that see the region's PostgreSQL down, vantage points that answered)."""
        votes = {}
        for vantage, report in reports.items():
            seen = report.of(region) if report else None
            votes[vantage] = seen.verdict if seen else "no answer"
        self.state.votes = votes
        answered = [v for v in votes.values() if v != "no answer"]
        return sum(v == "down" for v in answered), len(answered)

    def _note_workers(self, reports: dict[str, VantageReport | None]) -> None:
        gone = sorted(v for v, r in reports.items() if r is None)
        for v in gone:
            if v not in self.state.workers_down:
                self._finding(f"worker down: {v} did not pick up its probe (no vote; not a region failure)")
        for v in self.state.workers_down:
            if v not in gone:
                self._finding(f"worker back: {v}")
        self.state.workers_down = gone

    def _show(self, primary: str, failures: int, down: int, answered: int, threshold: int) -> None:
        lines = [f"**monitor** {self.service}: watching {primary}",
                 f"{down}/{answered} answering vantage points see it down; {failures}/{threshold} failed rounds",
                 "", *(f"- {v}: {seen}" for v, seen in self.state.votes.items())]
        if self.state.workers_down:
            lines += ["", f"**WORKER DOWN**: {', '.join(self.state.workers_down)}"]
        if self.state.findings:
            lines += ["", "Recent:", *(f"- {f}" for f in self.state.findings[-5:])]
        workflow.set_current_details("\n".join(lines))

    # -- the primary's own worker alone (histories before monitor-vantage-quorum) ----------------

    async def _probe(self, queue: str, region: str, budget: float) -> tuple[bool, str]:
        try:
            health = await self.act(HealthActivities.probe_region, region, queue=queue, timeout=budget,
                                    schedule_to_start=budget, attempts=1)
        except ActivityError as e:
            return False, f"worker did not answer: {e.cause or e}"
        if health.postgres.role != "primary":
            return False, health.postgres.error or f"postgres is {health.postgres.role}"
        return True, ""

    async def _split_findings(self, control: str) -> list[str]:
        try:
            report = await self.act(SplitBrainActivities.detect_split_brain, queue=control, timeout=30, attempts=1)
        except ActivityError:
            return []  # no verdict: the next round asks again
        return report.findings

    async def _split_brain(self, inp: MonitorInput, primary: str, findings: list[str], since,
                           keep_watching: bool = False) -> MonitorReport | None:
        report = MonitorReport(service=inp.service, watched_region=primary, first_failure_at=since,
                               detected_at=workflow.now())
        what = "; ".join(findings)
        if not inp.auto_resolve_split_brain:
            workflow.upsert_search_attributes([DR_OUTCOME.value_set("split-brain")])
            workflow.set_current_details(f"**SPLIT BRAIN** since {since}: {what}; automatic resolution is off")
            return report
        workflow.set_current_details(f"**SPLIT BRAIN**: {what}; resolving")
        try:
            report.split_brain = await workflow.execute_child_workflow(
                SplitBrainWorkflow.run, SplitBrainInput(service=inp.service, trigger=Trigger.automatic, reason=what,
                                                        detected_at=since),
                id=move_id(inp.service), task_queue=workflow.info().task_queue,
                static_summary=f"automatic split-brain resolution {inp.service}")
        except ChildWorkflowError as e:
            # The runbook says why in its own history; the monitor ends visibly, not by crashing.
            workflow.upsert_search_attributes([DR_OUTCOME.value_set("split-brain-unresolved")])
            report.error = f"split-brain resolution failed: {e.cause or e}"
            workflow.set_current_details(f"**SPLIT BRAIN NOT RESOLVED**: {report.error}")
            if keep_watching:
                # An unwatched service is worse than a noisy one: say it, and keep watching.
                self._finding(f"**SPLIT BRAIN NOT RESOLVED**: {report.error}")
                return None
            return report
        except WorkflowAlreadyStartedError:
            # A move is already running (it may be what made the split look real): watch on.
            workflow.set_current_details(f"**SPLIT BRAIN**: {what}; a runbook already holds {move_id(inp.service)}")
            if keep_watching:
                self._finding(f"split brain ({what}): not resolved here, a runbook already holds "
                              f"{move_id(inp.service)}")
            return None
        if inp.stop_after_failover:
            return report
        workflow.continue_as_new(inp.model_copy(update={"primary_region": report.split_brain.choice.survivor
                                                        if report.split_brain.choice else primary}))

    async def _region_down(self, inp: MonitorInput, topo, primary: str, first_failure,
                           keep_watching: bool = False) -> MonitorReport | None:
        """Fail over (or report, without auto_failover). With ``keep_watching`` a collision with
        a running move, or a refused or failed failover, is recorded and returns None."""
        detected = workflow.now()
        report = MonitorReport(service=inp.service, watched_region=primary, first_failure_at=first_failure,
                               detected_at=detected)
        if not inp.auto_failover:
            workflow.upsert_search_attributes([DR_OUTCOME.value_set("primary-down")])
            workflow.set_current_details(f"**{primary} is DOWN** since {first_failure}; automatic failover is off")
            return report
        target = topo.other(primary).name
        workflow.set_current_details(f"**{primary} is DOWN**: failing over to {target}")
        try:
            # Started, then awaited (the same commands as execute_child_workflow): a collision
            # with a running move is told apart from a failover that ran and failed.
            child = await workflow.start_child_workflow(
                FailoverWorkflow.run, FailoverInput(service=inp.service, target_region=target,
                                                    trigger=Trigger.automatic,
                                                    reason=f"{primary} failed {inp.failure_threshold} health probes",
                                                    detected_at=first_failure, max_lag_bytes=inp.max_lag_bytes,
                                                    source_known_down=True),
                id=move_id(inp.service), task_queue=workflow.info().task_queue,
                static_summary=f"automatic failover {inp.service} {primary} -> {target}")
        except WorkflowAlreadyStartedError:
            if not keep_watching:
                raise
            # A human's (or another monitor's) move holds the single-flight id: it is acting.
            self._finding(f"{primary} down, but a move already holds {move_id(inp.service)}: not started")
            return None
        self.state.failovers_started += 1
        try:
            report.failover = await child
        except ChildWorkflowError as e:
            if not keep_watching:
                raise
            self._finding(f"automatic failover {primary} -> {target} refused or failed: {e.cause or e}")
            return None
        if inp.stop_after_failover:
            return report
        workflow.continue_as_new(inp.model_copy(update={"primary_region": target}))
