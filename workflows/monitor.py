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

Every ``readiness_every_seconds`` (config ``readiness.every``; patch ``monitor-readiness``)
the service loop also runs the readiness checks (activities/readiness.py) on the watched
primary's worker, beside the rounds and never inside one: a slow ``pgbackrest info`` must not
stretch detection. The last report is in ``monitor_state``; a check that turns warn or fail
is a "readiness degraded" finding and notification (``_readiness_changed``).

The loop continues as new every ``iterations_per_run`` probes (or sooner, when Temporal
suggests it) to keep history short.

As a service (``eagle-dr monitor``, one per service under ``dr-monitor-<service>``, patch
``monitor-service``): it never ends by itself. A primary that is down without automatic
failover, while paused, within the cooldown of the last automatic attempt, or with a target
that a majority of vantage points does not see as a live standby is a finding, not the end
of the watch. ``pause`` keeps it probing and reporting but it starts no runbook; ``resume``
lets it act again (on the next round, if the primary is still down); ``stop`` ends it after
the current round. Paused state, the start time and the last automatic attempt survive
continue-as-new. An automatic split-brain resolution (``auto_resolve_split_brain``) is held
and cooled down the same way (patch ``monitor-split-brain-held-and-cooled``): a drill's hold
stops it, and an attempt starts its own cooldown (and a failover's); a failover's does not
hold one back (an old primary back writable after it is the likeliest split brain).

Fast confirmation (patch ``monitor-fast-confirm``, ``confirm_interval_seconds`` set): a
round in which a majority of ALL vantage points see the watched region's PostgreSQL and
Redis ports actively refuse connections (the servers are gone, the hosts answer) is decided
as soon as that majority is in, and is re-checked every ``confirm_interval_seconds``;
``confirm_rounds`` such probes in a row declare the region down. (Patch
``monitor-confirm-in-probe``: the re-checks run inside one confirming probe per vantage
point, whose ports must refuse at every one of them; before it, in workflow rounds whose
timers the server may fire up to a second late.) Patch ``monitor-watch-in-probe``: no
workflow timer between rounds either. Each round's probe first waits out the rest of the
interval inside the activity, holding an idle session to the watched PostgreSQL
(``ProbeRequest.watch_*``); a server that dies closes it, and the probe and its confirmation
run at once, in the same activity. A session that cannot be opened waits the whole interval,
so a server already down never turns the interval into back-to-back rounds. A stalled server (frozen,
swapping, SIGSTOPped) keeps its listen socket: its probes time out, which is ambiguous, and
only ``failure_threshold`` rounds at ``interval`` declare it down. So a kill is confirmed
in about a second while a stall of up to ``failure_threshold x interval`` is ridden out:
tolerance of transient stalls is not traded for speed (bench/failover.py checks both).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError, \
    WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities, ProbeRequest, VantageReport
    from activities.readiness import ReadinessActivities, ReadinessReport, ReadinessRequest, better, \
        known_states, through_unknown, worse
    from activities.split_brain import SplitBrainActivities
    from eagle_dr.temporal import DR_OUTCOME, DR_RUNBOOK, DR_SERVICE, DR_TRIGGER
    from workflows.failover import FailoverWorkflow
    from eagle_dr import metrics
    from workflows.models import AlertNotice, ApprovalPolicy, MonitorHold, FailoverInput, RunbookResult, Trigger
    from workflows.runbook import Runbook, move_id, outlives_parent
    from workflows.split_brain import SplitBrainInput, SplitBrainResult, SplitBrainWorkflow
    from workflows.validation import RawInput, validated
    from activities.notify.event import NotifyEvent
    from workflows.notify import outage_key, readiness_event


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
    # No automatic failover within this long of the last automatic move of any kind, and no
    # automatic split-brain resolution within this long of the last one (see config.health).
    auto_failover_cooldown_seconds: float = Field(default=1800, ge=0)
    require_approval: bool = False
    # Carried across continue-as-new by the service monitor.
    paused: bool = False
    pause_reason: str = ""
    paused_since: datetime | None = None
    running_since: datetime | None = None
    last_auto_move_at: datetime | None = None
    # The last automatic split-brain resolution attempt: its own cooldown (a failover's does not
    # hold one back: an old primary back writable after it is the likeliest split brain).
    last_split_attempt_at: datetime | None = None
    # Fast confirmation of a region whose ports refuse connections (module docstring). None: off.
    confirm_interval_seconds: float | None = Field(default=None, gt=0, le=60)
    confirm_rounds: int = Field(default=3, ge=1, le=100)
    # Holds on automatic moves (a drill's), carried across continue-as-new.
    holds: list[MonitorHold] = []
    # The region whose outage was notified and not yet resolved (the pager's open incident).
    open_outage: str | None = None
    # Readiness checks notified as degraded and not yet restored.
    readiness_degraded: list[str] = []
    # Readiness checks every this many seconds on the primary's worker (None: none).
    readiness_every_seconds: float | None = Field(default=None, gt=0)
    # The last readiness verdicts (check key -> state), carried across continue-as-new so a
    # new run does not report a standing degradation as new.
    readiness_known: dict[str, str] = {}
    # The target's lag behind the watched primary at the last round that measured it, and when
    # (carried across continue-as-new: an outage that spans one must not forget it).
    target_lag_bytes: int | None = Field(default=None, ge=0)
    target_lag_at: datetime | None = None
    # When the watched primary's current outage began (its first failed round): unlike the
    # failure count, not reset by a refused or failed automatic attempt, and carried.
    outage_since: datetime | None = None


class Probe(BaseModel):
    """What one vantage point saw of one region in the last round."""

    verdict: str  # up | read-only | standby | down | no answer
    redis_up: bool | None = None
    seconds: float | None = None
    error: str | None = None
    # Its PostgreSQL and Redis ports refused connections (the servers are gone, not slow).
    refused: bool | None = None


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
    # The service monitor: running | paused (stopping once stop was asked).
    status: str = "running"
    auto_failover: bool = False
    running_since: datetime | None = None
    paused_since: datetime | None = None
    pause_reason: str = ""
    last_round_at: datetime | None = None
    # Vantage point -> region -> what it saw in the last round.
    probes: dict[str, dict[str, Probe]] = {}
    # No automatic failover before this (the cooldown after the last automatic attempt).
    cooldown_until: datetime | None = None
    # No automatic split-brain resolution before this (the cooldown after the last one).
    split_cooldown_until: datetime | None = None
    # Runbooks holding automatic moves back now (a drill), with until when.
    holds: list[MonitorHold] = []
    # The last readiness report (activities/readiness.py), when the monitor runs the checks.
    readiness: ReadinessReport | None = None
    # WAL the standby had not received of the watched primary's, at the last round that saw
    # both (the most any vantage point saw), and when: what an automatic failover is judged on.
    target_lag_bytes: int | None = None
    target_lag_at: datetime | None = None


class MonitorReport(BaseModel):
    service: str
    watched_region: str
    first_failure_at: datetime | None = None
    detected_at: datetime | None = None
    failover: RunbookResult | None = None
    split_brain: SplitBrainResult | None = None
    error: str | None = None
    # The service monitor ended by `eagle-dr monitor stop`: why.
    stopped: str | None = None


MAX_FINDINGS = 20


@workflow.defn
class MonitorWorkflow(Runbook):
    runbook = "monitor"
    notifies = "none"  # its own outage events, not a runbook's start and end

    def __init__(self) -> None:
        super().__init__()
        self.state = MonitorState()
        self._alerted = False
        self._woke_early = False
        self._end_on_down = False  # set per run (the monitor-round-ends-on-majority-down patch)
        self.stop_reason: str | None = None
        self._last_attempt = None  # this run's last automatic failover attempt (kept across continue-as-new)
        self._last_split_attempt = None  # and its last automatic split-brain resolution
        self.paused = False
        # What the current outage has already been reported as (one finding per outage, not per round).
        self._noted: str | None = None
        # The region whose outage the channels were told of (resolved when it is over).
        self._outage_open: str | None = None
        self._outage_since = None  # when the watched primary's current outage began (MonitorInput)
        self._fresh_count = False  # resumed: the failed rounds start again from none
        self._readiness_bad: set[str] = set()
        # The readiness checks in flight (they never hold up a probe round), when they are due next,
        # and the verdicts the last report gave.
        self._readiness_task: asyncio.Task | None = None
        self._readiness_due: datetime | None = None
        self._readiness_known: dict[str, str] = {}
        # Until the service loop has taken this run's input (paused state and holds carried by
        # continue-as-new), a resume or a release has nothing to act on: signals are handled
        # before the run's first task, and the carried pause or hold came back after them.
        # Vantage points whose probe ran and failed this round (why): alive, but no verdict.
        self._probe_failed: dict[str, str] = {}
        self._loaded = False
        self._resume_early = False
        self._released_early: set[str] = set()

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

    async def _wait_round(self, wait: timedelta, serving: bool = False) -> None:
        """Sleep until the next round, or until a firing alert asks for one now (serving: or a
        stop is asked). The legacy watch replays its plain sleep before ``monitor-alert-wakeup``;
        the service loop always waited on a condition with a timeout (one timer either way)."""
        stopping = (lambda: self.stop_reason is not None) if serving else (lambda: False)
        if not serving and not workflow.patched("monitor-alert-wakeup"):
            await workflow.sleep(wait)
            return
        if self._woke_early:
            # At most one early round in a row: a storm of alerts must not turn the interval
            # into back-to-back rounds, which would count failure_threshold failed rounds
            # within a transient stall that the interval exists to ride out. (An alert that
            # comes meanwhile stays pending: it wakes the round after.)
            self._woke_early = False
            try:
                await workflow.wait_condition(stopping, timeout=wait)
            except asyncio.TimeoutError:
                pass
            return
        try:
            await workflow.wait_condition(lambda: self._alerted or stopping(), timeout=wait)
            self._woke_early = self._alerted
        except asyncio.TimeoutError:
            pass
        self._alerted = False

    # Signals, not updates: an operator's pause must be recorded even while the control worker
    # is down, and is honoured at the next decision (signals are delivered before the timer
    # or activity result that wakes the loop).
    @workflow.signal
    def pause(self, reason: str = "") -> None:
        self._resume_early = False  # the later of the two stands
        if not self.paused:
            self.paused = True
            self.state.paused_since = workflow.now()
            self.state.pause_reason = reason
            self.state.status = "paused"
            self._finding("paused" + (f": {reason}" if reason else "") + " (watching, no automatic runbook)")

    @workflow.signal
    def resume(self) -> None:
        if not self._loaded:
            self._resume_early = True
        if self.paused:
            self.paused = False
            self.state.paused_since, self.state.pause_reason, self.state.status = None, "", "running"
            self._noted = None  # an outage still under way is reported (and acted on) afresh
            # The rounds counted while paused (a planned restart of the primary, say) must not
            # fail over at the first round after resume: a fresh run of failed rounds does.
            self._fresh_count = True
            self._finding("resumed")

    @workflow.signal
    def hold(self, hold: MonitorHold) -> None:
        self._released_early.discard(hold.holder)
        self.state.holds = [*(h for h in self.state.holds if h.holder != hold.holder), hold]
        self._finding(f"automatic moves held by {hold.holder} until {hold.until.isoformat(timespec='seconds')}"
                      + (f": {hold.reason}" if hold.reason else ""))

    @workflow.signal
    def release(self, holder: str) -> None:
        if not self._loaded:
            self._released_early.add(holder)
        if any(h.holder == holder for h in self.state.holds):
            self.state.holds = [h for h in self.state.holds if h.holder != holder]
            self._finding(f"released by {holder}")

    def _held(self) -> MonitorHold | None:
        now = workflow.now()
        self.state.holds = [h for h in self.state.holds if h.until > now]
        return self.state.holds[0] if self.state.holds else None

    @workflow.signal
    def stop(self, reason: str = "") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason or "stop requested"
            self._finding(f"stopping: {self.stop_reason}")

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
        # Histories recorded before the monitor became a service replay without it (and end
        # when the primary is down without automatic failover, as they did).
        if workflow.patched("monitor-service"):
            return await self._serve(inp)
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
                await self._wait_round(interval - elapsed)
            if workflow.info().is_continue_as_new_suggested():
                break
        workflow.continue_as_new(inp.model_copy(update={"primary_region": primary}))

    # -- the service monitor (patch monitor-service) ---------------------------------------------

    async def _serve(self, inp: MonitorInput) -> MonitorReport:
        topo = await self.topology()
        primary = inp.primary_region or next(r.name for r in topo.regions if r.configured_role == "primary")
        self.target_region = primary
        # A pause signalled before this first task ran (handlers run first) stands; so do a
        # resume and a release (of a carried pause or hold).
        early = self.state if self.paused else None
        resume_early = self._resume_early and inp.paused and workflow.patched("monitor-early-resume-release")
        released = self._released_early if self._released_early and \
            workflow.patched("monitor-early-resume-release") else set()
        self.paused = self.paused or inp.paused
        self.state = MonitorState(
            service=inp.service, watched_region=primary, failure_threshold=inp.failure_threshold,
            status="paused" if self.paused else "running", auto_failover=inp.auto_failover,
            running_since=inp.running_since or workflow.now(),
            paused_since=early.paused_since if early else inp.paused_since if inp.paused else None,
            pause_reason=early.pause_reason if early else inp.pause_reason if inp.paused else "",
            findings=self.state.findings, cooldown_until=self._cooldown_until(inp),
            split_cooldown_until=inp.last_split_attempt_at + timedelta(seconds=inp.auto_failover_cooldown_seconds)
            if inp.last_split_attempt_at else None,
            target_lag_bytes=inp.target_lag_bytes, target_lag_at=inp.target_lag_at,
            # A hold signalled before this first task ran stands beside the carried ones.
            holds=[*(h for h in inp.holds if h.holder not in released),
                   *(h for h in self.state.holds if h.holder not in {x.holder for x in inp.holds})])
        self._loaded = True
        for holder in sorted(released & {h.holder for h in inp.holds}):
            self._finding(f"released by {holder}")
        if resume_early and self.paused:
            self.resume()
        self._outage_open = inp.open_outage
        self._outage_since = inp.outage_since
        self._readiness_bad = set(inp.readiness_degraded)
        # Histories recorded before the readiness checks replay without them.
        readiness = inp.readiness_every_seconds is not None and workflow.patched("monitor-readiness")
        self._readiness_known = dict(inp.readiness_known)
        interval = timedelta(seconds=inp.interval_seconds)
        failures, first_failure = 0, None
        splits, first_split = 0, None
        # Rounds in a row in which a majority of all vantage points saw the primary's ports refuse.
        fast = inp.confirm_interval_seconds is not None and workflow.patched("monitor-fast-confirm")
        # Histories recorded before it confirm in workflow rounds, timers apart; now one confirming
        # probe per vantage point does it (a timer can fire up to a second late).
        in_probe = fast and workflow.patched("monitor-confirm-in-probe")
        # Histories recorded before it wait for the next round on a workflow timer; now the
        # round's probe activity waits, watching the primary's PostgreSQL session, and probes at
        # once when the server closes it (a timer can fire a second late: it was most of the
        # detection time of a kill).
        watching = in_probe and workflow.patched("monitor-watch-in-probe")
        # A region that dies takes its own worker with it, mid-watch: its activity answers only
        # when its heartbeat times out. A round no longer waits for it once a majority of ALL
        # vantage points sees the primary down: no answer could change that verdict.
        self._end_on_down = watching and workflow.patched("monitor-round-ends-on-majority-down")
        watch = 0.0
        hard = 0
        for _ in range(inp.iterations_per_run):
            if self.stop_reason is not None:
                break
            started = workflow.now()
            split_check = asyncio.create_task(self._split_findings(topo.control_task_queue)) \
                if inp.watch_split_brain else None
            if watching:
                reports, watched = await self._watched_round(topo, inp, primary, watch)
                if reports is None:  # a stop ended the watch
                    if split_check is not None:
                        split_check.cancel()
                    break
                # The round began when the probe did, not when the watch before it did.
                started += timedelta(seconds=watched)
            else:
                reports = await self._vantage_round(topo, inp.interval_seconds,
                                                    decide_for=primary if fast else None)
            self.state.rounds += 1
            self.state.last_round_at = workflow.now()
            self._note_probes(reports)
            if split_check is not None:
                findings = await split_check
                if findings is None and workflow.patched("monitor-split-brain-held-and-cooled"):
                    pass  # no verdict (the detection failed): the count of rounds in a row stands
                else:
                    splits, first_split = (splits + 1, first_split or started) if findings else (0, None)
                if findings is not None and not findings:  # a verdict of no split, not a detection that failed
                    self._clear_outcome("split-brain", "split-brain-unresolved")
                if splits >= 2:
                    # A drill's hold and the cooldown after an automatic attempt stop this as
                    # they stop a failover: a failed resolution (a node left for a human to
                    # fence) was started again every round while that human worked.
                    blocked = self._auto_move_blocked("split-brain resolution", "eagle-dr split-brain",
                                                      self.state.split_cooldown_until) \
                        if not self.paused and inp.auto_resolve_split_brain \
                        and workflow.patched("monitor-split-brain-held-and-cooled") else None
                    if self.paused or not inp.auto_resolve_split_brain or blocked:
                        self._note_once(f"**SPLIT BRAIN**: {'; '.join(findings)}; "
                                        + ("paused: not resolving" if self.paused else
                                           blocked or "automatic resolution is off"))
                        # A failed resolution's outcome stands while its cooldown holds the next.
                        unresolved = workflow.info().typed_search_attributes.get(DR_OUTCOME) == \
                            "split-brain-unresolved"
                        workflow.upsert_search_attributes([DR_OUTCOME.value_set(
                            "split-brain-unresolved" if unresolved else "split-brain")])
                    elif done := await self._split_brain(inp, primary, findings, first_split, keep_watching=True):
                        return done
            self._note_workers(reports)
            if (moved := self._follow(primary, reports)) is not None:
                self._finding(f"primary moved: {primary} -> {moved}; now watching {moved}")
                self._outage_over(inp.service, f"the primary moved to {moved}")
                self._clear_outcome("primary-down")
                primary, failures, first_failure = moved, 0, None
                self.target_region = self.state.watched_region = primary
                # A new pair: how far the new standby is behind is not known until measured.
                self.state.target_lag_bytes = self.state.target_lag_at = self._outage_since = None
            if readiness:
                self._readiness_tick(inp, topo, primary, reports)
            down, answered = self._tally(primary, reports)
            if self._fresh_count:
                self._fresh_count = False
                if workflow.patched("monitor-resume-counts-afresh"):
                    # The outage (and a split seen) while paused is the maintenance's: the one
                    # acted on, and its RTO, start now.
                    failures, first_failure, hard, splits, first_split = 0, None, 0, 0, None
                    self._outage_since = None
            if answered and down * 2 > answered:
                failures += 1
                first_failure = first_failure or started
                self._outage_since = self._outage_since or started
                hard = hard + 1 if fast and self._refused(primary, reports, 1 + len(topo.regions)) else 0
                if watching and hard:
                    hard = inp.confirm_rounds  # the round's own probes confirmed it (_watched_round)
                elif in_probe and hard == 1 and inp.confirm_rounds > 1:
                    confirm = await self._vantage_round(topo, inp.interval_seconds, decide_for=primary,
                                                        confirm=(inp.confirm_rounds - 1, inp.confirm_interval_seconds))
                    hard = inp.confirm_rounds if self._refused(primary, confirm, 1 + len(topo.regions)) else 0
            elif answered:
                self._note_lag(topo.other(primary).name, reports)
                self._outage_since = None
                if failures >= inp.failure_threshold or (fast and hard >= inp.confirm_rounds):
                    self._finding(f"{primary} answers again")
                self._outage_over(inp.service, f"{primary} answers again")
                self._clear_outcome("primary-down")
                failures, first_failure, hard = 0, None, 0
                self._noted = None
            self.state.failures = failures
            self._show(primary, failures, down, answered, inp.failure_threshold,
                       confirm=(hard, inp.confirm_rounds) if hard else None)
            metrics.monitor_round(workflow.metric_meter(), inp.service, paused=self.paused, failures=failures,
                                  workers_down=len(self.state.workers_down))
            confirmed = fast and hard >= inp.confirm_rounds
            if failures >= inp.failure_threshold or confirmed:
                since = self._outage_since or first_failure
                why_not = self._why_not_fail_over(inp, topo, primary, reports, since)
                self._outage(inp, topo, primary, since, why_not)
                if why_not is not None:
                    self._note_once(f"**{primary} is DOWN** since {since.isoformat(timespec='seconds')}: "
                                    f"{why_not}")
                    workflow.upsert_search_attributes([DR_OUTCOME.value_set("primary-down")])
                else:
                    why = (f"{primary}'s PostgreSQL and Redis refused connections in {hard} rounds in a row"
                           if confirmed and failures < inp.failure_threshold else None)
                    # The outage began at its first failed round, before a continue-as-new or a
                    # refused attempt restarted the count: the failover's RTO counts from there.
                    began = since if workflow.patched("monitor-rto-from-outage-start") else first_failure
                    if (done := await self._auto_failover(inp, topo, primary, began, why)):
                        return done
                    # Refused, failed, or another move holds the id: recorded; the cooldown
                    # holds the next attempt back, and the next rounds say where the primary is.
                    failures, first_failure, hard = 0, None, 0
            elapsed = workflow.now() - started
            wait = interval - elapsed
            if not in_probe and 0 < hard < inp.confirm_rounds:
                # Confirm a refusal at once: the evidence is unambiguous, the interval is for stalls.
                wait = timedelta(seconds=inp.confirm_interval_seconds)
            if watching:
                watch = max(wait.total_seconds(), 0.0)  # the next round's probe waits, watching
            elif wait > timedelta(0) and self.stop_reason is None:
                await self._wait_round(wait, serving=True)
            if workflow.info().is_continue_as_new_suggested():
                break
        if (task := self._readiness_task) is not None:
            # Not waited for: a stop is prompt, and the next run checks again at once.
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:  # cancelled before it started
                pass
        # Deliveries still in flight are dropped by continue-as-new or the end: wait for them.
        await self.notifier.flush()
        if self.stop_reason is not None:
            self.state.status = "stopped"
            workflow.set_current_details(f"**monitor** {inp.service}: stopped ({self.stop_reason})")
            return MonitorReport(service=inp.service, watched_region=primary, stopped=self.stop_reason)
        workflow.continue_as_new(self._carry(inp, primary))

    def _carry(self, inp: MonitorInput, primary: str, **more) -> MonitorInput:
        """The next run's input: what must survive continue-as-new."""
        return inp.model_copy(update={"primary_region": primary, "paused": self.paused,
                                      "open_outage": self._outage_open,
                                      "readiness_degraded": sorted(self._readiness_bad),
                                      "pause_reason": self.state.pause_reason, "paused_since": self.state.paused_since,
                                      "running_since": self.state.running_since,
                                      "holds": [h for h in self.state.holds if h.until > workflow.now()],
                                      "readiness_known": self._readiness_known,
                                      # Measured against the primary watched now: a run that goes on
                                      # watching another (after its own failover) starts unmeasured.
                                      **({"target_lag_bytes": self.state.target_lag_bytes,
                                          "target_lag_at": self.state.target_lag_at,
                                          "outage_since": self._outage_since}
                                         if primary == self.state.watched_region else
                                         {"target_lag_bytes": None, "target_lag_at": None, "outage_since": None}),
                                      # A refused or failed automatic attempt starts the cooldown too:
                                      # dropped here, the next run would try again at once.
                                      "last_auto_move_at": self._last_attempt or inp.last_auto_move_at,
                                      "last_split_attempt_at": self._last_split_attempt or inp.last_split_attempt_at,
                                      **more})

    def _auto_move_blocked(self, what: str, command: str, until) -> str | None:
        """Why no automatic move starts now: a hold (a drill's), or ``until``, the end of its
        cooldown (a human acts after an automatic attempt)."""
        if (held := self._held()) is not None:
            return (f"automatic {what} held by {held.holder} until {held.until.isoformat(timespec='seconds')}"
                    + (f" ({held.reason})" if held.reason else ""))
        if until is not None and workflow.now() < until:
            return (f"automatic {what} refused: within the cooldown until {until.isoformat(timespec='seconds')} "
                    f"after the last automatic attempt; a human decides ({command})")
        return None

    def _cooldown_until(self, inp: MonitorInput):
        if inp.last_auto_move_at is None:
            return None
        return inp.last_auto_move_at + timedelta(seconds=inp.auto_failover_cooldown_seconds)

    def _why_not_fail_over(self, inp: MonitorInput, topo, primary: str, reports, first_failure=None) -> str | None:
        """Why no automatic failover now (None: go). Checked every round past the threshold,
        so a target that comes up, a resume or the end of the cooldown lets the next round act."""
        if not inp.auto_failover:
            return "automatic failover is off"
        if self.paused:
            return "the monitor is paused: no automatic failover (eagle-dr monitor resume)"
        if (blocked := self._auto_move_blocked("failover", "eagle-dr failover", self.state.cooldown_until)) is not None:
            return blocked
        target = topo.other(primary).name
        answered = [r for r in reports.values() if r is not None]
        stale = sum(bool((s := r.of(target)) is not None and s.stale) for r in answered)
        if answered and stale * 2 > len(answered):
            # The failover would refuse it too (TargetStale); said here, the pager hears why
            # instead of "failover starting", and no doomed run is started every cooldown.
            return (f"automatic failover refused: the target {target} is an old primary held by a stop fence, not "
                    f"a replica ({stale}/{len(answered)} vantage points see the fence's marker); promoting it would "
                    f"lose what {primary} wrote since. A human decides: bring {primary} back (no runbook accepts that "
                    f"loss; see the failover's TargetStale refusal)")
        live = sum((s := r.of(target)) is not None and s.verdict == "standby" for r in answered)
        if not answered or live * 2 <= len(answered):
            # A failover to a region that is itself down or not a standby only adds a second outage.
            return (f"automatic failover refused: the target {target} is not a live standby for a majority of the "
                    f"vantage points ({live}/{len(answered)})")
        # Histories recorded before it failed over with the lag unknown (the failover's own
        # guard lets an unknown lag through: with the primary dead, the standby cannot say).
        if workflow.patched("monitor-target-lag"):
            return self._lag_refusal(inp, primary, target, first_failure or workflow.now())
        return None

    def _lag_refusal(self, inp: MonitorInput, primary: str, target: str, first_failure) -> str | None:
        """Why the standby is no automatic failover target for what it may lack (None: it is).

        With the primary dead its lag cannot be read any more, and promoting a standby that had
        stopped receiving an hour before would drop an hour of writes with no human asked. So
        the monitor judges on what it measured while the primary still answered: the lag at the
        last round that saw both, and how long before the outage that was. Past the lag guard,
        never measured, or measured too long before: a human decides, with ``--plan``'s numbers."""
        at, lag = self.state.target_lag_at, self.state.target_lag_bytes
        human = f"a human decides (eagle-dr failover --to {target} --plan shows what it would lose)"
        if at is None or lag is None:
            return (f"automatic failover refused: this monitor never measured how far {target} was behind {primary} "
                    f"while {primary} answered, so what a failover would lose is unknown; {human}")
        when = at.isoformat(timespec="seconds")
        if lag > inp.max_lag_bytes:
            return (f"automatic failover refused: {target} was {lag} bytes behind {primary} at {when} (the last round "
                    f"that saw both), past max_lag_bytes {inp.max_lag_bytes}; failing over would lose that; {human}")
        # A round measures it every interval while both answer: older than a few of them, the
        # standby had stopped being seen (unreachable, or not streaming) before the outage.
        limit = max(60.0, 3 * inp.interval_seconds)
        age = (first_failure - at).total_seconds()
        if age > limit:
            return (f"automatic failover refused: {target} was last measured {lag} bytes behind {primary} at {when}, "
                    f"{age:.0f} s before {primary} went down (more than {limit:.0f} s): what {primary} wrote in "
                    f"between may be lost; {human}")
        return None

    def _note_lag(self, target: str, reports: dict[str, VantageReport | None]) -> None:
        """The round saw the primary up: keep the target's lag behind it, the most any vantage
        point saw (a round in which none could measure it keeps the last measurement, aging)."""
        lags = [s.lag_bytes for r in reports.values() if r is not None
                and (s := r.of(target)) is not None and s.lag_bytes is not None]
        if lags:
            self.state.target_lag_bytes, self.state.target_lag_at = max(lags), workflow.now()

    async def _auto_failover(self, inp: MonitorInput, topo, primary: str, first_failure,
                             why: str | None = None) -> MonitorReport | None:
        target = topo.other(primary).name
        attempt = self._last_attempt = workflow.now()
        self.state.cooldown_until = attempt + timedelta(seconds=inp.auto_failover_cooldown_seconds)
        workflow.set_current_details(f"**{primary} is DOWN**: failing over to {target}")
        report = MonitorReport(service=inp.service, watched_region=primary, first_failure_at=first_failure,
                               detected_at=attempt)
        try:
            child = await workflow.start_child_workflow(
                FailoverWorkflow.run, FailoverInput(
                    service=inp.service, target_region=target, trigger=Trigger.automatic,
                    reason=why or f"{primary} failed {inp.failure_threshold} health rounds", detected_at=first_failure,
                    # The lag guard is never forced automatically: past it, a human decides.
                    max_lag_bytes=inp.max_lag_bytes, source_known_down=True,
                    approval=ApprovalPolicy(required=inp.require_approval)),
                id=move_id(inp.service), task_queue=workflow.info().task_queue,
                static_summary=f"automatic failover {inp.service} {primary} -> {target}",
                **outlives_parent("monitor-moves-outlive-it"))
        except WorkflowAlreadyStartedError:
            self._finding(f"{primary} down, but a move already holds {move_id(inp.service)}: not started")
            return None
        self.state.failovers_started += 1
        self._finding(f"automatic failover {primary} -> {target} started")
        try:
            report.failover = await child
        except ChildWorkflowError as e:
            self._finding(f"automatic failover {primary} -> {target} refused or failed: {e.cause or e}")
            return None
        self._finding(f"automatic failover {primary} -> {target}: {report.failover.outcome}")
        if report.failover.outcome in ("succeeded", "degraded"):
            self._outage_over(inp.service, f"failed over to {target}: {report.failover.outcome}")
        await self.notifier.flush()
        if inp.stop_after_failover:
            return report
        workflow.continue_as_new(self._carry(inp, target, last_auto_move_at=attempt))

    # -- notifications (workflows/notify.py): one incident per outage, resolved when it is over --

    def _outage_event(self, service: str, region: str, down: bool, lines: list[str]) -> NotifyEvent:
        info = workflow.info()
        return NotifyEvent(kind="outage" if down else "outage-resolved", service=service,
                           summary=f"{region} is DOWN" if down else f"{region} outage over",
                           action="trigger" if down else "resolve", severity="critical",
                           dedup_key=outage_key(service, region), at=workflow.now(), runbook="monitor",
                           workflow_id=info.workflow_id, namespace=info.namespace, region=region, lines=lines)

    def _outage(self, inp: MonitorInput, topo, primary: str, first_failure, why_not: str | None) -> None:
        """The channels hear of an outage once (not every round), when the threshold is crossed."""
        if not self.notifier.active or self._outage_open == primary:
            return
        self._outage_open = primary
        votes = ", ".join(f"{v}: {seen}" for v, seen in self.state.votes.items())
        action = why_not or f"automatic failover to {topo.other(primary).name} is starting" + \
            (" (it waits for approval: the approve command follows)" if inp.require_approval else "")
        self.notifier.send(self._outage_event(inp.service, primary, True, [
            f"down since {first_failure.isoformat(timespec='seconds')} ({inp.failure_threshold} failed rounds)",
            f"vantage points: {votes}", action]))

    def _clear_outcome(self, *values: str) -> None:
        """Unset DrOutcome when it says one of ``values`` (the state is over): set for alerting,
        it stood after the primary answered again, and continue-as-new carried it on, so a
        query or an alert on DrOutcome="primary-down" found the monitor down for good."""
        if workflow.info().typed_search_attributes.get(DR_OUTCOME) in values \
                and workflow.patched("monitor-outcome-cleared"):
            workflow.upsert_search_attributes([DR_OUTCOME.value_unset()])

    def _outage_over(self, service: str, why: str) -> None:
        if self._outage_open is None:
            return
        region, self._outage_open = self._outage_open, None
        self.notifier.send(self._outage_event(service, region, False, [why]))

    def readiness_changed(self, service: str, check: str, ok: bool, detail: str, region: str | None = None) -> None:
        """For the readiness checks (wired by their round): call it with every check's state each
        round; the channels hear only of changes, a degraded check once until it is restored."""
        if not self.notifier.active or ok == (check not in self._readiness_bad):
            return
        if ok:
            self._readiness_bad.discard(check)
        else:
            self._readiness_bad.add(check)
        self.notifier.send(readiness_event(service, check, detail, degraded=not ok, at=workflow.now(),
                                           region=region, workflow_id=workflow.info().workflow_id))
    # -- readiness checks (patch monitor-readiness) -----------------------------------------------

    def _readiness_tick(self, inp: MonitorInput, topo, primary: str,
                        reports: dict[str, VantageReport | None]) -> None:
        """Start the readiness checks when due and none are in flight. They run beside the
        probe rounds, never in them: a slow pgbackrest info or a dead DNS API must not stretch
        a round, which is detection time."""
        if self._readiness_task is not None or (self._readiness_due and workflow.now() < self._readiness_due):
            return
        self._readiness_due = workflow.now() + timedelta(seconds=inp.readiness_every_seconds)
        # The workers check from this round's vantage points: one that did not answer is down.
        alive = {v: r is not None for v, r in reports.items()}
        self._readiness_task = asyncio.create_task(self._assess_readiness(inp, topo, primary, alive))

    async def _assess_readiness(self, inp: MonitorInput, topo, primary: str, alive: dict[str, bool]) -> None:
        budget = max(inp.interval_seconds, 5.0)
        try:
            # One attempt: the next is due in readiness_every_seconds anyway. TRY_CANCEL: a stop
            # or continue-as-new drops the checks in flight without waiting for them (they
            # only read; nothing to undo).
            report = await workflow.execute_activity_method(
                ReadinessActivities.assess_readiness, ReadinessRequest(primary=primary, workers=alive),
                task_queue=topo.region(primary).task_queue, schedule_to_start_timeout=timedelta(seconds=budget),
                start_to_close_timeout=timedelta(seconds=60), retry_policy=RetryPolicy(maximum_attempts=1),
                cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL)
        except ActivityError as e:
            if isinstance(e.cause, CancelledError):
                return  # dropped at a stop or continue-as-new: no verdict, nothing to report
            # Not assessed (the primary's worker is down, or the checks timed out): no check is
            # ok, and the last verdicts stay the comparison base.
            report = ReadinessReport(primary=primary, at=workflow.now(),
                                     error=f"readiness checks did not run on {primary}'s worker: {e.cause or e}")
        except asyncio.CancelledError:
            return
        finally:
            self._readiness_task = None
        metrics.readiness_assessed(workflow.metric_meter(), inp.service, bool(report.checks))
        old = self._readiness_known
        if report.checks:
            known = known_states(report)
            # A check that could not be looked at keeps its last verdict as the comparison base.
            self._readiness_known = through_unknown(old, known) \
                if workflow.patched("monitor-readiness-through-unknown") else known
        self.state.readiness = report
        self._readiness_changed(old, report)

    def _readiness_changed(self, old: dict[str, str], new: ReadinessReport) -> None:
        """Where readiness transitions surface: ``old`` is the previous verdicts (check key ->
        state), ``new`` the report just made. A check that went to warn or fail is "readiness
        degraded" (the notifier's event), one back to ok "readiness recovered"; both are
        findings, and the configured channels hear of each (readiness_changed: once per change)."""
        for c in worse(old, new):
            self._finding(f"readiness degraded: {c.key} {c.state}: {c.reason}")
            self.readiness_changed(self.service, c.key, False, f"{c.state}: {c.reason}", region=c.region)
        for c in better(old, new):
            self._finding(f"readiness recovered: {c.key} ok")
            self.readiness_changed(self.service, c.key, True, "ok", region=c.region)

    def _note_once(self, what: str) -> None:
        if self._noted != what:
            self._noted = what
            self._finding(what)

    def _note_probes(self, reports: dict[str, VantageReport | None]) -> None:
        regions = [s.region for r in reports.values() if r for s in r.sightings]
        probes: dict[str, dict[str, Probe]] = {}
        for vantage, report in reports.items():
            if report is None:
                probes[vantage] = {name: Probe(verdict="no answer") for name in dict.fromkeys(regions)}
                continue
            probes[vantage] = {s.region: Probe(verdict=s.verdict, redis_up=s.redis_up, seconds=s.probe_seconds,
                                               error=s.error, refused=s.refused) for s in report.sightings}
        self.state.probes = probes

    async def _watched_round(self, topo, inp: MonitorInput, primary: str,
                             watch: float) -> tuple[dict[str, VantageReport | None] | None, float]:
        """The next round, its probes first watching ``primary`` for ``watch`` seconds (the rest
        of the interval); (reports, how long the watch lasted). A stop ends it (None); a firing
        alert cuts the watch short and probes at once, at most once in a row as ``_wait_round``."""
        # A refusal is confirmed in the same activity: no second round trip for it.
        confirm = (inp.confirm_rounds - 1, inp.confirm_interval_seconds) if inp.confirm_rounds > 1 else None
        if watch <= 0:
            return await self._vantage_round(topo, inp.interval_seconds, decide_for=primary, confirm=confirm,
                                             all_regions=True, end_on_down=self._end_on_down), 0.0
        wake_on_alert = not self._woke_early
        self._woke_early = False
        task = asyncio.ensure_future(self._vantage_round(topo, inp.interval_seconds, decide_for=primary,
                                                         confirm=confirm, all_regions=True, watch=(primary, watch),
                                                         end_on_down=self._end_on_down))
        await workflow.wait_condition(lambda: task.done() or self.stop_reason is not None
                                      or (wake_on_alert and self._alerted))
        if task.done():
            reports = task.result()
            seen = [r.watched_seconds for r in reports.values() if r is not None and r.watched_seconds is not None]
            return reports, min(seen, default=0.0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if self.stop_reason is not None:
            return None, 0.0
        self._alerted, self._woke_early = False, True
        return await self._vantage_round(topo, inp.interval_seconds, decide_for=primary, confirm=confirm,
                                         all_regions=True, end_on_down=self._end_on_down), 0.0

    async def _vantage_round(self, topo, interval_seconds: float, decide_for: str | None = None,
                             confirm: tuple[int, float] | None = None, all_regions: bool = False,
                             watch: tuple[str, float] | None = None,
                             end_on_down: bool = False) -> dict[str, VantageReport | None]:
        """Every vantage point probes every region, in parallel; None: it did not answer.

        ``decide_for``: the round ends as soon as a majority of ALL vantage points see that
        region's ports refuse (``_refused``), without waiting for the rest: no answer could
        change that verdict, and a dead region's own worker would hold the round until its
        probe's schedule-to-start timeout. The vantage points still out are left out of the
        result (not None: they have not failed to answer, they were not waited for)."""
        # A round waits for its slowest vantage point, and a dead worker's probe ends only at
        # its schedule-to-start timeout: one interval keeps a round one interval long, as
        # detection time needs. A live worker picks a task up in milliseconds; the 1 s floor
        # spares a loaded host false "worker down" findings (which cost no failover anyway).
        budget = max(interval_seconds, 1.0)
        req = ProbeRequest(regions=[r.name for r in topo.regions], timeout_seconds=min(budget, 5.0))
        if confirm is not None:
            # ``confirm``: (probes, seconds apart) of ``decide_for``'s refused ports, in the activity
            # (``all_regions``: in a full round, every region probed once, the primary confirmed).
            req = req.model_copy(update={"regions": req.regions if all_regions else [decide_for],
                                         "confirm_region": decide_for,
                                         "confirm_probes": confirm[0], "confirm_interval_seconds": confirm[1]})
        if watch is not None:
            req = req.model_copy(update={"watch_region": watch[0], "watch_seconds": watch[1]})
        vantages = {"control": topo.control_task_queue, **{r.name: r.task_queue for r in topo.regions}}

        self._probe_failed = {}

        async def ask(vantage: str, queue: str) -> VantageReport | None:
            try:
                if watch is not None:
                    # Not through ``act``: a firing alert or a stop cancels the watch, and
                    # the round must not wait for the activity to see that (TRY_CANCEL).
                    return await workflow.execute_activity_method(
                        HealthActivities.probe_regions_from_here, req, task_queue=queue,
                        schedule_to_start_timeout=timedelta(seconds=budget),
                        start_to_close_timeout=timedelta(seconds=watch[1] + req.timeout_seconds * 4 * len(req.regions)
                                                         + 5 + req.confirm_probes * (req.confirm_interval_seconds
                                                                                     + 2 * req.timeout_seconds)),
                        # It beats at least once a second while it watches, and after each
                        # bounded probe: a dead worker's watch ends within this, not at the
                        # start-to-close timeout.
                        heartbeat_timeout=timedelta(seconds=req.timeout_seconds + 2 * min(req.timeout_seconds, 2.0)
                                                    + 3),
                        retry_policy=RetryPolicy(maximum_attempts=1),
                        cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL)
                return await self.act(HealthActivities.probe_regions_from_here, req, queue=queue,
                                      schedule_to_start=budget, timeout=req.timeout_seconds * 4 * len(req.regions) + 5
                                      + req.confirm_probes * (req.confirm_interval_seconds + 2 * req.timeout_seconds),
                                      attempts=1)
            except ActivityError as e:
                if isinstance(e.cause, ApplicationError):
                    # It ran and failed (a password it cannot read, say): no vote, but its
                    # worker is up, and "worker down" sent the reader to the wrong place.
                    self._probe_failed[vantage] = e.cause.message[:300]
                return None

        if decide_for is None:
            answers = await asyncio.gather(*(ask(v, q) for v, q in vantages.items()))
            return dict(zip(vantages, answers))
        tasks = {v: asyncio.ensure_future(ask(v, q)) for v, q in vantages.items()}

        def decided() -> bool:
            done = {v: t.result() for v, t in tasks.items() if t.done()}
            return len(done) == len(tasks) or self._refused(decide_for, done, len(tasks)) or \
                (end_on_down and self._down_by_majority(decide_for, done, len(tasks)))

        try:
            await workflow.wait_condition(decided)
        except asyncio.CancelledError:
            for t in tasks.values():  # a cut-short watch: its probes go with it
                t.cancel()
            raise
        return {v: t.result() for v, t in tasks.items() if t.done()}

    @staticmethod
    def _down_by_majority(region: str, reports: dict[str, VantageReport | None], vantages: int) -> bool:
        """A majority of all ``vantages`` saw the region's PostgreSQL down (refused or timed out):
        the round is a failed round whatever the others say (``_tally``: down x 2 > answered)."""
        seen = [r.of(region) for r in reports.values() if r is not None]
        return sum(s is not None and s.verdict == "down" for s in seen) * 2 > vantages

    @staticmethod
    def _refused(region: str, reports: dict[str, VantageReport | None], vantages: int) -> bool:
        """A majority of all ``vantages`` (not only of those that answered) saw the region's
        PostgreSQL down and both its ports refusing connections: gone, not stalled."""
        seen = [r.of(region) for r in reports.values() if r is not None]
        return sum(s is not None and s.verdict == "down" and bool(s.refused) for s in seen) * 2 > vantages

    def _follow(self, watched: str, reports: dict[str, VantageReport | None]) -> str | None:
        """The region a majority of answering vantage points see as the one writable primary,
        when that is not the watched one; else None (no move, or no clear answer)."""
        answered = [r for r in reports.values() if r is not None]
        regions = {s.region for r in answered for s in r.sightings}
        writable = [name for name in sorted(regions)
                    if sum((s := r.of(name)) is not None and s.verdict == "up" for r in answered) * 2 > len(answered)]
        # Two writable primaries is a split brain, not a move: the split watch handles it.
        if len(writable) == 1 and writable[0] != watched:
            return writable[0]
        if not writable and answered and workflow.patched("monitor-follow-down-primary"):
            # No region writable at all, the watched one a live standby and exactly one other
            # down, each for a majority: that one is the primary, gone down before this monitor
            # (or its guess) ever saw it up. Watching the standby, its outage never counted.
            def most(name: str, verdict: str) -> bool:
                return sum((s := r.of(name)) is not None and s.verdict == verdict for r in answered) * 2 > len(answered)

            down = [name for name in sorted(regions) if name != watched and most(name, "down")]
            if most(watched, "standby") and len(down) == 1:
                self._finding(f"no region is writable: {watched} is a standby and {down[0]} is down; "
                              f"{down[0]} is the primary lost")
                return down[0]
        return None

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
        # A vantage point missing from the round was not waited for (a decided round): as before.
        gone = sorted({v for v, r in reports.items() if r is None}
                      | {v for v in self.state.workers_down if v not in reports})
        for v in gone:
            if v not in self.state.workers_down:
                why = self._probe_failed.get(v)
                self._finding(f"no vote from {v}: its probe failed ({why}); not a region failure" if why else
                              f"worker down: {v} did not pick up its probe (no vote; not a region failure)")
        for v in self.state.workers_down:
            if v not in gone:
                self._finding(f"worker back: {v}")
        self.state.workers_down = gone

    def _show(self, primary: str, failures: int, down: int, answered: int, threshold: int,
              confirm: tuple[int, int] | None = None) -> None:
        lines = [f"**monitor** {self.service}: watching {primary}" + (" (**PAUSED**: no automatic runbook)"
                                                                       if self.paused else ""),
                 f"{down}/{answered} answering vantage points see it down; {failures}/{threshold} failed rounds"
                 + (f"; ports refusing: {confirm[0]}/{confirm[1]} confirmation rounds" if confirm else ""),
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

    async def _split_findings(self, control: str) -> list[str] | None:
        try:
            report = await self.act(SplitBrainActivities.detect_split_brain, queue=control, timeout=30, attempts=1)
        except ActivityError:
            return None  # no verdict (falsy, as no split): the next round asks again
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
        if keep_watching and workflow.patched("monitor-split-brain-held-and-cooled"):
            # An attempt, whatever comes of it, starts its own cooldown and a failover's (both
            # carried by _carry): it is a move of the service.
            self._last_attempt = self._last_split_attempt = workflow.now()
            self.state.cooldown_until = self.state.split_cooldown_until = \
                self._last_attempt + timedelta(seconds=inp.auto_failover_cooldown_seconds)
        try:
            report.split_brain = await workflow.execute_child_workflow(
                SplitBrainWorkflow.run, SplitBrainInput(service=inp.service, trigger=Trigger.automatic, reason=what,
                                                        detected_at=since),
                id=move_id(inp.service), task_queue=workflow.info().task_queue,
                static_summary=f"automatic split-brain resolution {inp.service}",
                **outlives_parent("monitor-moves-outlive-it"))
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
        await self.notifier.flush()  # nothing in flight without channels: no command
        if inp.stop_after_failover:
            return report
        workflow.continue_as_new(self._carry(inp, report.split_brain.choice.survivor
                                             if report.split_brain.choice else primary))

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
                static_summary=f"automatic failover {inp.service} {primary} -> {target}",
                **outlives_parent("monitor-moves-outlive-it"))
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

