"""What every runbook workflow shares: steps an operator can watch, the approval gate, and
activity calls with explicit timeouts and retries.

The step list is the runbook as the operator sees it: the ``progress`` query returns it,
``set_current_details`` shows the step in the UI, and the report lists each step with its
duration.
"""

from __future__ import annotations

import asyncio
import functools
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, FailureError, \
    TimeoutError as ActivityTimeout, TimeoutType

with workflow.unsafe.imports_passed_through():
    from activities.health import HealthActivities
    from eagle_dr import metrics
    from activities.lab_hooks import AckedRequest, LabHooks, MarkRequest
    from activities.postgres.activities import EpochReadRequest, PostgresActivities
    from activities.postgres.epoch import EpochRecord
    from activities.postgres.status import PgStatus
    from activities.topology import Topology, TopologyActivities
    from activities.traffic import TrafficActivities
    from eagle_dr.temporal import (
        DR_EPOCH,
        DR_OUTCOME,
        DR_RUNBOOK,
        DR_SERVICE,
        DR_SOURCE_REGION,
        DR_TARGET_REGION,
        DR_TRIGGER,
    )
    from workflows.models import (
        ApprovalDecision,
        ApprovalPolicy,
        ApprovalRecord,
        DefaultAction,
        MoveInput,
        Progress,
        Rpo,
        Rto,
        StepRecord,
        Trigger,
    )
    from workflows.validation import invalid
    from activities.notify.event import NotifyEvent
    from workflows.notify import Notifier, incident_key, measurement_lines

# Retries for steps that talk to a live system: quick at first, capped, then give up and
# let the runbook decide (compensate, or report) instead of hammering a dead region.
# A step on a region's queue that no worker takes says so after this long, then at most this
# often (Runbook.act).
NO_WORKER_FIRST_S = 60.0
NO_WORKER_MAX_S = 300.0

RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2,
                    maximum_interval=timedelta(seconds=10), maximum_attempts=5,
                    non_retryable_error_types=["StaleEpoch", "InvalidInput"])


def _timed_out(error, kind: TimeoutType) -> bool:
    cause = error.cause if isinstance(error, ActivityError) else error
    return isinstance(cause, ActivityTimeout) and cause.type == kind


def not_picked_up(error) -> bool:
    """The step timed out waiting for a worker to take it (its worker is silent)."""
    return _timed_out(error, TimeoutType.SCHEDULE_TO_START)


def went_silent(error) -> bool:
    """The worker running the step stopped heartbeating."""
    return _timed_out(error, TimeoutType.HEARTBEAT)


def described(error) -> str:
    """A step's failure as the person on call reads it. The SDK's words for a timeout ("activity
    ScheduleToStart timeout") do not say that the region's worker is what is missing."""
    if not_picked_up(error):
        said = "no worker took the step within its schedule-to-start bound: is that region's worker running?"
        # A retry nobody took: the attempt before it failed, and how is worth saying.
        before = getattr(getattr(error, "cause", None), "cause", None)
        return f"{said} (its earlier attempt failed: {before})" if before is not None else said
    if went_silent(error):
        return "the worker running the step stopped heartbeating (crashed, frozen or cut off)"
    return str(error.cause or error if isinstance(error, ActivityError) else error)


def redis_fence_state(fence) -> str:
    """A Redis fence's result as a step reports it: "paused" only for a master whose writes are
    refused, and said when redis.conf could not keep it (a restart would lift it)."""
    if not fence.reachable:
        return "unreachable"
    if not fence.paused:
        return f"a {fence.role or 'node of unknown role'}, takes no writes: nothing to fence"
    if not fence.durable:
        return f"paused, NOT persisted ({fence.error or 'CONFIG REWRITE failed'}): a restart lifts the fence"
    return "paused"


def move_id(service: str) -> str:
    """One failover/switchover per service at a time: they share this workflow id."""
    return f"dr-move-{service}"


def outlives_parent(patch_id: str) -> dict:
    """Options for a move a workflow starts as its child (the monitor's automatic failover, a
    drill's moves, failback's switch back): it runs to its end whatever happens to the parent.
    Terminated or reset by an operator, or timed out, the parent would otherwise terminate the
    move too, past its point of no return (no_return guards against a cancel, not a
    termination): the old primary fenced, the target promoted, nothing routed. A cancel still
    reaches the child as a cancel. ``patch_id``: histories recorded before started it with the
    default policy."""
    if not workflow.patched(patch_id):
        return {}
    return {"parent_close_policy": workflow.ParentClosePolicy.ABANDON}


def monitor_id(service: str) -> str:
    """The one MonitorWorkflow of a service: whoever starts it (an alert, the CLI, the lab) uses
    this id, so a second start finds the running monitor instead of adding a second one."""
    return f"dr-monitor-{service}"


@dataclass
class Placement:
    """Where a move goes: from which region, to which, and their workers' task queues."""

    topology: Topology
    source: str
    target: str
    source_queue: str
    target_queue: str


def _notified(run):
    """A runbook's run method, wrapped so that its end is announced (and every notification
    still in flight delivered) before the run completes, whichever way it ends: result,
    failure or cancel. Continue-as-new passes straight through (the run goes on)."""

    @functools.wraps(run)
    async def wrapper(self: "Runbook", *args):
        try:
            result = await run(self, *args)
        except asyncio.CancelledError:
            await self.settled(self._notify_end(None, cancelled=True))
            raise
        except Exception as e:
            if _fails_the_run(e):
                await self.settled(self._notify_end(None, error=e))
            raise
        # The run is over: a cancel asked while its end is announced changes nothing (it would
        # turn a move that was made into "cancelled") and must not cut the messages short.
        _, asked = await self.settled(self._notify_end(result))
        if asked:
            workflow.logger.warning("cancel requested after the run had ended: nothing left to cancel")
        return result

    return wrapper


def _fails_the_run(e: BaseException) -> bool:
    """Whether ``e`` fails the workflow, as the SDK decides it (no runbook sets
    failure_exception_types). Anything else is a bug in the workflow code (a KeyError, a
    sandbox refusal): the SDK fails the workflow *task*, retries it, and the run waits, alive,
    for a fixed worker. A page saying "failed" would be untrue then, and its activities,
    recorded in the history, would make the fixed code's replay nondeterministic: the run
    could never go on."""
    return isinstance(e, (FailureError, asyncio.TimeoutError))


def _error_text(e: BaseException) -> str:
    cause = e.cause if isinstance(e, ActivityError) and e.cause is not None else e
    return getattr(cause, "message", None) or str(cause) or type(cause).__name__


class Runbook:
    """Base for runbook workflows (failover, switchover, ...)."""

    runbook = "runbook"
    # Which runbook events go out (workflows/notify.py): "all" for what a human starts or
    # must watch (moves, drills, restores); "failures" for scheduled housekeeping (a nightly
    # backup that worked is not news, one that failed is); "none" for the monitor, which
    # sends its own outage events.
    notifies = "all"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Every runbook's @workflow.run, wrapped before @workflow.defn reads it (functools.wraps
        # keeps the run marker, name and signature): one place announces every runbook's end.
        run = cls.__dict__.get("run")
        if run is not None and hasattr(run, "__temporal_workflow_run"):
            cls.run = _notified(run)

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.source_region: str | None = None
        self.target_region: str = ""
        self.service = ""
        self.epoch: int | None = None
        self.outcome: str | None = None
        self.awaiting_approval = False
        self.decision: ApprovalDecision | None = None
        # Past it, a failure or a cancel request no longer undoes: the runbook rolls forward.
        self.past_no_return = False
        self.cancel_refused: str | None = None
        self.degraded: list[str] = []
        # What an undo before the point of no return could not put back (undo_failed): a
        # cancel that leaves these is no clean cancel.
        self.undo_failures: list[str] = []
        self.notifier = Notifier()
        # What the runbook would do, from its preflight (workflows/plan.py): shown at the approval gate.
        self.plan_text: str | None = None
        self._announced = False
        self._trigger: str | None = None
        # A trigger went out (step failed, approval): the end must resolve or re-trigger it.
        self._paged = False
        self._gates = 0  # approval gates opened so far: each has an incident of its own

    # -- what the operator sees ----------------------------------------------------------------

    @workflow.query
    def progress(self) -> Progress:
        return Progress(runbook=self.runbook, service=self.service, source_region=self.source_region,
                        target_region=self.target_region, epoch=self.epoch, steps=self.steps,
                        awaiting_approval=self.awaiting_approval, outcome=self.outcome)

    def _details(self, current: str) -> None:
        marks = {"done": "✅", "running": "⏳", "failed": "❌", "cancelled": "⏹️", "skipped": "⏭️", "pending": "▫️"}
        # While an approval waits, what the approver is asked to allow comes first: the plan
        # the runbook built from its own preflight (workflows/plan.py; query state, no command).
        lines = ["**Plan** (from this run's preflight):", "```", self.plan_text, "```", ""] \
            if self.awaiting_approval and self.plan_text else []
        lines += [f"**{self.runbook}** {self.service}: {self.source_region or '?'} → {self.target_region}"
                 + (f" (epoch {self.epoch})" if self.epoch is not None else ""), "", f"Now: {current}", ""]
        lines += [f"- {marks.get(s.status, '')} {s.name}" + (f": {s.detail}" if s.detail else "") for s in self.steps]
        workflow.set_current_details("\n".join(lines))

    @asynccontextmanager
    async def step(self, name: str):
        rec = StepRecord(name=name, status="running", started_at=workflow.now())
        self.steps.append(rec)
        self._details(name)
        workflow.logger.info("step started", extra={"step": name})
        self._announce()
        try:
            yield rec
        except BaseException as e:
            # A step a cancel ended did not fail: "failed" sent the reader looking for a fault.
            rec.status = "cancelled" if isinstance(e, (asyncio.CancelledError, CancelledError)) else "failed"
            rec.finished_at = workflow.now()
            self._details(f"{name} {rec.status}")
            if _fails_the_run(e):
                self._notify_step_failed(name, e)
            raise
        if rec.status == "running":
            rec.status = "done"
        rec.finished_at = workflow.now()
        self._details(f"{name} finished")

    def skip(self, name: str, why: str) -> None:
        now = workflow.now()
        self.steps.append(StepRecord(name=name, status="skipped", started_at=now, finished_at=now, detail=why))
        self._details(f"{name} skipped")

    def finish(self, outcome: str) -> None:
        self.outcome = outcome
        workflow.upsert_search_attributes([DR_OUTCOME.value_set(outcome)])
        self._details(f"finished: {outcome}")
        # The worker's meter (eagle_dr/metrics.py): no I/O, no command, nothing during replay.
        metrics.runbook_finished(workflow.metric_meter(), self.service, self.runbook, outcome)

    def routed(self) -> bool:
        """Whether the last "re-route traffic" step ended done (none ran: nothing says it
        failed). A move whose routing failed did not serve its clients by its end: its RTO's
        "serving" is not a time the service was restored."""
        last = next((s for s in reversed(self.steps) if s.name == "re-route traffic"), None)
        return last is None or last.status not in ("failed", "cancelled")

    def measured(self, rto, rpo) -> None:
        """Export a move's RTO and RPO (against their targets) on the worker's metrics endpoint."""
        metrics.move_measured(workflow.metric_meter(), self.service, self.runbook, rto, rpo)

    # -- notifications (workflows/notify.py) ----------------------------------------------------

    def _event(self, kind: str, action: str, severity: str, lines: list[str], dedup_key: str | None = None,
               **more) -> NotifyEvent:
        info = workflow.info()
        move = f": {self.source_region or '?'} -> {self.target_region}" if self.target_region else ""
        return NotifyEvent(kind=kind, service=self.service or "?", summary=f"{self.runbook} {self.service}{move}",
                           action=action, severity=severity,
                           dedup_key=dedup_key or incident_key(info.workflow_id, info.run_id),
                           at=workflow.now(), runbook=self.runbook, workflow_id=info.workflow_id, run_id=info.run_id,
                           namespace=info.namespace, region=self.target_region or None, lines=lines, **more)

    def _announce(self) -> None:
        """"Started", once, as soon as the topology (and so the channels) is known."""
        if self._announced or not self.notifier.active or self.notifies != "all":
            return
        self._announced = True
        lines = [f"trigger: {self._trigger}"] if self._trigger else []
        self.notifier.send(self._event("runbook-started", "info", "info", lines))

    def _notify_step_failed(self, name: str, e: BaseException) -> None:
        if not self.notifier.active or self.notifies == "none":
            return
        if isinstance(e, (asyncio.CancelledError, CancelledError)) or \
                (isinstance(e, ApplicationError) and e.type == "Aborted"):
            return  # a cancel or a rejection is a decision, not a failure; "finished" says it
        self._paged = True
        self.notifier.send(self._event("step-failed", "trigger", "error",
                                       [f"step: {name}", f"error: {_error_text(e)}"], outcome="failed"))

    async def _notify_end(self, result, error: BaseException | None = None, cancelled: bool = False) -> None:
        if not self.notifier.active or self.notifies == "none":
            return
        outcome = getattr(result, "outcome", None) or self.outcome or \
            ("cancelled" if cancelled else "failed" if error is not None else "succeeded")
        # A run that failed or left things degraded keeps its incident open (a human must act);
        # any other end (done, nothing to do, rejected or cancelled by a human) resolves it.
        bad = outcome in ("failed", "degraded") or \
            (bool(self.undo_failures) and workflow.patched("undo-incomplete-pages"))
        if bad or self.notifies == "all" or self._paged:
            self._announce()
            lines = [f"outcome: {outcome}"]
            if error is not None:
                lines.append(f"error: {_error_text(error)}")
            lines += measurement_lines(getattr(result, "rto", None), getattr(result, "rpo", None))
            lines += [f"degraded: {d}" for d in getattr(result, "degraded", None) or []]
            lines += [f"NOT undone: {u}" for u in self.undo_failures]
            self.notifier.send(self._event("runbook-finished", "trigger" if bad else "resolve",
                                           "error" if bad else "info", lines, outcome=outcome))
        await self.notifier.flush()
        if self.notifier.failures:
            line = "notifications failed: " + "; ".join(self.notifier.failures)
            workflow.logger.warning(line)
            notes = getattr(result, "notes", None)
            if isinstance(notes, list):
                notes.append(line)

    # -- activity calls ------------------------------------------------------------------------

    async def act(self, fn, arg=None, *, queue: str, timeout: float = 60, schedule_to_start: float | None = None,
                  heartbeat: float | None = None, attempts: int | None = None, summary: str | None = None,
                  local: bool = False):
        """One step. ``local``: run it as a local activity on this (the control) worker, with the
        same timeout and retries: for a short, idempotent control step on the critical path, it
        saves the task queue dispatch and a workflow task round trip (tens of ms on a busy server).
        Only for activities the control worker registers (``queue`` must be the control queue)."""
        retry = RETRY if attempts is None else RetryPolicy(
            initial_interval=RETRY.initial_interval, backoff_coefficient=2, maximum_interval=RETRY.maximum_interval,
            maximum_attempts=attempts, non_retryable_error_types=RETRY.non_retryable_error_types)
        args = [] if arg is None else [arg]
        if local or schedule_to_start is not None or queue == workflow.info().task_queue:
            return await self._act_once(fn, args, queue, timeout, schedule_to_start, heartbeat, retry, summary, local)
        # A step on a region's queue that no worker takes (the region's host is down, its worker
        # crashed and nobody restarted it) waited with no word in the UI but "pending". It still
        # waits (it can only run there, and runs the moment a worker polls), but the step says
        # so, and for how long, every few minutes.
        waited, wait, said = 0.0, NO_WORKER_FIRST_S, None
        budget = retry.maximum_attempts  # 0: unlimited
        try:
            while True:
                try:
                    return await self._act_once(fn, args, queue, timeout, wait, heartbeat, retry, summary, local)
                except ActivityError as e:
                    if not not_picked_up(e):
                        raise
                    if budget > 1 and e.cause is not None and e.cause.cause is not None:
                        # A retry nobody took: an attempt before it ran (part of) the step.
                        # Scheduled anew, the attempts would start again at one, and a step whose
                        # worker keeps dying would never run out of them: each such round spends
                        # one (so N attempts allow at most N+(N-1)+...+1 runs in all). A round of
                        # one attempt never retries, so its timeout always means nobody ran it.
                        budget -= 1
                        retry = RetryPolicy(initial_interval=retry.initial_interval,
                                            backoff_coefficient=retry.backoff_coefficient,
                                            maximum_interval=retry.maximum_interval, maximum_attempts=budget,
                                            non_retryable_error_types=retry.non_retryable_error_types)
                waited += wait
                # Each round is a few history events: after an hour, one round an hour.
                wait = min(wait * 2, NO_WORKER_MAX_S) if waited < 3600 else 3600.0
                new = self._no_worker(queue, waited)
                if new is not None:
                    # What the step said before the first round is what comes back.
                    said = (*new[:2], said[2] if said is not None and said[0] is new[0] else new[2])
        finally:
            if said is not None and said[0].detail == said[1]:
                # The wait is over, however the step ends: its own word again, not "waiting".
                said[0].detail = said[2]
                self._details(said[0].name)

    def _no_worker(self, queue: str, waited: float):
        """Say it on the step that waits (the newest running one); returns (step, what was said,
        what it said before) so the step's own detail comes back once the wait is over."""
        rec = next((s for s in reversed(self.steps) if s.status == "running"), None)
        text = (f"no worker has taken this step from task queue {queue} for {waited:.0f} s: that region's "
                "worker is down, or busy in every slot. The step runs as soon as one takes it")
        workflow.logger.warning("step not picked up", extra={"queue": queue, "waited_s": waited})
        if rec is None:
            return None
        before = rec.detail
        rec.detail = text
        self._details(rec.name)
        return rec, text, before

    async def _act_once(self, fn, args: list, queue: str, timeout: float, schedule_to_start: float | None,
                        heartbeat: float | None, retry: RetryPolicy, summary: str | None, local: bool):
        # A cancel request waits for the step in flight to finish (or to see the cancel, when it
        # heartbeats) before the runbook goes on to undo it: undoing a fence while the fence
        # still runs would leave it in place.
        if local:
            step = asyncio.ensure_future(workflow.execute_local_activity_method(
                fn, *args, start_to_close_timeout=timedelta(seconds=timeout), retry_policy=retry, summary=summary,
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED))
        else:
            step = asyncio.ensure_future(workflow.execute_activity_method(
                fn, *args, task_queue=queue, start_to_close_timeout=timedelta(seconds=timeout),
                schedule_to_start_timeout=timedelta(seconds=schedule_to_start) if schedule_to_start else None,
                heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None, retry_policy=retry,
                summary=summary, cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED))
        try:
            result = await asyncio.shield(step)
            if isinstance(result, Topology):
                # Whichever way a runbook reads the config (topology() or the activity itself),
                # its notification channels come with it.
                self.notifier.configure(result)
            return result
        except asyncio.CancelledError:
            # Asked to cancel while the step runs: pass the request on and wait for the step to
            # end, then cancel all the same. Left to the SDK, a step that completes anyway
            # returns its result and the cancel request is dropped (the move carries on).
            step.cancel()
            try:
                await step
            except BaseException:  # noqa: BLE001 - its outcome no longer matters: the run is cancelled
                pass
            raise
        except ActivityError as e:
            # A step that ended because the run was asked to cancel is the cancel, not a failed
            # step: as a CancelledError no "except ActivityError" (a dead region's probe, say)
            # can swallow it and carry on with the move.
            if isinstance(e.cause, CancelledError):
                raise asyncio.CancelledError() from e
            raise

    # -- the point of no return ---------------------------------------------------------------

    async def no_return(self, coro, what: str):
        """Run ``coro`` (the rest of the runbook, from its point of no return) to its end
        whatever is asked: a cancel request now would leave the service half-moved (two
        fenced regions, or a primary nobody routes to), so it is refused and the report says so."""
        self.past_no_return = True
        task = asyncio.ensure_future(coro)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done() and task.cancelled():
                    raise
                self.cancel_refused = (f"cancel requested at {workflow.now():%H:%M:%S} UTC was refused: past the "
                                       f"point of no return ({what}), the runbook finishes the move")
                if task.done():
                    # The move ended in the same instant the cancel arrived: it happened (or failed
                    # past the point of no return), and ending "cancelled" would report a move
                    # that was made as one that was not. Its own result or error stands.
                    workflow.logger.warning(self.cancel_refused)
                    result = task.result()
                    if hasattr(result, "cancel_refused"):
                        result.cancel_refused = self.cancel_refused
                    return result
                workflow.logger.warning(self.cancel_refused)
                self._details(self.cancel_refused)

    @staticmethod
    async def settled(coro) -> tuple:
        """Run ``coro`` to its end whatever is asked (an undo or a proof cut short leaves the
        service half-moved); returns (its result, whether a cancel was asked meanwhile)."""
        task = asyncio.ensure_future(coro)
        asked = False
        while True:
            try:
                return await asyncio.shield(task), asked
            except asyncio.CancelledError:
                if task.done() and task.cancelled():
                    raise
                asked = True

    def degrade(self, what: str, error, repair: str) -> None:
        """A part that failed after the point of no return: reported with how to repair it."""
        self.degraded.append(f"{what} failed ({described(error)}); repair: {repair}")

    def cancelled(self, undone: list[str], left: str = "", kept: list[str] | None = None,
                  stopped: list[str] | None = None) -> asyncio.CancelledError:
        """End as cancelled, before the point of no return, saying what was undone, what the
        cancel stopped half-way that needs no undoing (``stopped``: a backup's copy), what it
        changed and keeps on purpose (``kept``: a DR epoch, which only rises), and what danger
        the run found and leaves as it found it (``left``: a split brain still live)."""
        self.finish("cancelled")
        incomplete = "UNDO INCOMPLETE, a human must act: " + "; ".join(self.undo_failures) + ". " \
            if self.undo_failures else ""
        done = (["undone: " + "; ".join(undone)] if undone else []) + \
            (["stopped: " + "; ".join(stopped)] if stopped else []) + (["kept: " + "; ".join(kept)] if kept else [])
        self._details("CANCELLED before the point of no return; " + incomplete
                      + ("; ".join(done) or "nothing had been changed")
                      + (f". LEFT AS FOUND: {left}" if left else ""))
        workflow.logger.warning("runbook cancelled", extra={"undone": undone, "left": left, "kept": kept or [],
                                                            "stopped": stopped or []})
        return asyncio.CancelledError()

    def undo_failed(self, what: str) -> str:
        """Record what an undo could not put back (a fence still on, services still at 0); returns
        ``what``. The run's end then keeps the incident open: a cancel ends "cancelled", and
        with its undo incomplete the service may still be down."""
        self.undo_failures.append(what)
        return what

    # -- steps every move takes ---------------------------------------------------------------------

    async def topology(self) -> Topology:
        """The configured topology; the input's ``service`` (``self.service``) must be the one
        configured: a typo would otherwise take epochs and the ``dr-move-<service>`` lock under
        a name no other runbook uses, and so escape the single-flight rule."""
        topo = await self.act(TopologyActivities.describe_topology, queue=workflow.info().task_queue, timeout=30)
        if self.service and self.service != topo.service:
            raise invalid("service", f"unknown service {self.service!r} (configured: {topo.service!r})")
        return topo

    def refuse_self_approval(self, trigger: Trigger, **policies: ApprovalPolicy | None) -> None:
        """``auto_approve_as`` skips the human at the gate. It is for drills (which approve
        themselves and say so) and for a runbook's own children (failback's switch back, after
        failback itself was approved). From any other input, typed into the UI say, it would let
        anyone approve a failover in their own name: refused up front, naming the field."""
        if trigger == Trigger.drill or workflow.info().parent is not None:
            return
        for field, policy in policies.items():
            if policy is not None and policy.auto_approve_as:
                raise invalid(f"{field}.auto_approve_as", "honoured only for drills (trigger 'drill') and runs "
                                                          "started by another runbook; leave it unset")

    def known_region(self, topo: Topology, field: str, name: str) -> None:
        """A region named in the input must be configured: else a non-retryable error naming the field."""
        if topo.region(name) is None:
            raise invalid(field, f"unknown region {name!r} (known: {', '.join(r.name for r in topo.regions)})")

    def tag(self, service: str, source: str, target: str, trigger: str) -> None:
        """Search attributes an operator filters runbooks on in the UI."""
        self.source_region = source
        self._trigger = trigger
        workflow.upsert_search_attributes([
            DR_RUNBOOK.value_set(self.runbook), DR_SERVICE.value_set(service), DR_SOURCE_REGION.value_set(source),
            DR_TARGET_REGION.value_set(target), DR_TRIGGER.value_set(trigger)])

    async def place(self, inp: MoveInput) -> Placement:
        """Check the target against the configured regions and tag the run for the UI."""
        topo = await self.topology()
        self.known_region(topo, "target_region", inp.target_region)
        source = topo.other(inp.target_region).name
        self.tag(inp.service, source, inp.target_region, inp.trigger.value)
        return Placement(topo, source, inp.target_region, topo.region(source).task_queue,
                         topo.region(inp.target_region).task_queue)

    async def take_epoch(self, region: str, queue: str, others: list[str] = ()) -> EpochRecord:
        """The next DR epoch after the highest ``region`` or any of ``others`` (that answers
        within a second) records; returns that record."""
        async with self.step("take DR epoch") as st:
            # Histories recorded before them read PostgreSQL alone: ``region`` only, then the others.
            if workflow.patched("epoch-highest-with-redis"):
                current = await self.act(PostgresActivities.read_highest_epoch,
                                         EpochReadRequest(region=region, others=list(others), redis=True),
                                         queue=queue, timeout=30)
            elif others and workflow.patched("epoch-highest-of-regions"):
                current = await self.act(PostgresActivities.read_highest_epoch,
                                         EpochReadRequest(region=region, others=list(others)), queue=queue, timeout=30)
            else:
                current = await self.act(PostgresActivities.read_epoch, region, queue=queue, timeout=30)
            self.epoch = current.epoch + 1
            workflow.upsert_search_attributes([DR_EPOCH.value_set(self.epoch)])
            st.detail = f"epoch {current.epoch} -> {self.epoch}"
        return current

    async def approval(self, policy: ApprovalPolicy, what: str) -> ApprovalRecord:
        async with self.step("approval") as st:
            approval = await self.gate(policy, what)
            st.detail = approval.outcome + (f" by {approval.approver}" if approval.approver else "")
            self.stop_unless_approved(approval)
        return approval

    async def measure_clients(self, rto: Rto, rpo: Rpo, target: str, previous: EpochRecord, outage_since) -> list[str]:
        """Lab only: the sample app's own log turns RTO and RPO into counts. Writes judged by
        the previous move (acknowledged before its epoch was recorded) are not counted again."""
        control = workflow.info().task_queue
        acked = await self.act(LabHooks.count_missing_acked_writes,
                               AckedRequest(region=target, since=previous.updated_at), queue=control, timeout=60)
        rpo.acknowledged_writes_lost, rpo.acknowledged_writes_total = acked.missing, acked.acknowledged
        if acked.missing:
            # Two measurements of one loss (the app's log, the old primary's WAL): the worse stands.
            rpo.loss_window_s = max(acked.loss_window_s, rpo.loss_window_s or 0.0)
        outage = await self.act(LabHooks.client_outage, MarkRequest(since=outage_since, region=target),
                                queue=control, timeout=60)
        rto.client_outage_s = outage.outage_seconds
        return [f"{acked.missing} acknowledged writes missing in {target}: {acked.missing_sample}"] \
            if acked.missing else []

    async def verify(self, target: str, control: str):
        """A real write and read through the service in ``target``; a failure is reported, not raised."""
        async with self.step("verify") as st:
            verification = await self.act(TrafficActivities.verify_service, target, queue=control, timeout=60)
            st.detail = "write + read OK" if verification.ok else f"FAILED: {verification.error}"
            if not verification.ok:
                st.status = "failed"
            if verification.broken_sequences:
                st.detail += f"; {len(verification.broken_sequences)} unlogged sequence(s) UNREADABLE"
                self.degrade(f"reading unlogged sequence(s) on {target} after promotion ("
                             + "; ".join(verification.broken_sequences[:5]) + ")",
                             "PostgreSQL 15 promoted them from an init fork its replay had not written to disk, "
                             "so nextval() fails", f"restart {target}'s PostgreSQL through crash recovery (pg_ctl stop "
                             "-m immediate, then start: the init forks are on disk now; it empties every unlogged "
                             "table again) in a maintenance window, or recreate each sequence and re-attach the "
                             "column defaults that use it")
        return verification

    async def postgres_statuses(self, topo: Topology, control: str) -> dict[str, PgStatus]:
        """Each region's PostgreSQL as the control worker sees it: role, timeline, receiver."""
        status: dict[str, PgStatus] = {}
        for r in topo.regions:
            status[r.name] = await self.act(PostgresActivities.postgres_status, r.name, queue=control, timeout=30,
                                            attempts=2)
        return status

    def primaries(self, status: dict[str, PgStatus]) -> list[str]:
        """The writable primaries. A primary fenced read-only (a failover's old primary, left
        running until failback when its worker could not stop it) is none: counted, every
        backup, drill and check after such a failover failed "no single primary" for as long
        as failback waited, and a restore could name it the primary."""
        writable = workflow.patched("primaries-exclude-fenced")
        return [n for n, s in status.items() if s.reachable and s.role == "primary" and not (writable and s.read_only)]

    @staticmethod
    def no_single_primary(status: dict[str, PgStatus], primaries: list[str]) -> str:
        """Why ``primaries`` is not one region, for an error: the fenced ones named too."""
        fenced = [n for n, s in status.items() if s.reachable and s.role == "primary" and s.read_only]
        return ", ".join(primaries) or ("none writable: " + ", ".join(fenced) + " fenced read-only" if fenced
                                        else "none reachable")

    async def scratch_region(self, topo: Topology) -> str:
        """Whose host takes a scratch restore when none is named: a reachable region that is not
        the primary now, sparing the primary's disk and CPU. After a failover that is the
        configured primary's region, not the configured secondary's (which now serves). With no
        single primary known (region down, split brain), the configured secondary's, as before."""
        status = await self.postgres_statuses(topo, topo.control_task_queue)
        primaries = self.primaries(status)
        if len(primaries) == 1:
            off = next((n for n, s in status.items() if s.reachable and n != primaries[0]), None)
            if off is not None:
                return off
        return next((r.name for r in topo.regions if r.configured_role != "primary"), topo.regions[0].name)

    async def find_primary(self, topo: Topology) -> str | None:
        """Which region's PostgreSQL is primary now, as each region's own worker sees it."""
        for r in topo.regions:
            try:
                health = await self.act(HealthActivities.probe_region, r.name, queue=r.task_queue, timeout=30,
                                        schedule_to_start=30, attempts=2)
            except ActivityError:
                continue
            if health.postgres.role == "primary" and not (health.postgres.read_only and
                                                          workflow.patched("primaries-exclude-fenced")):
                return r.name
        return None

    # -- the approval gate ----------------------------------------------------------------------

    @workflow.update
    async def approve(self, decision: ApprovalDecision) -> str:
        self.decision = decision
        return f"{'approved' if decision.decision == 'approve' else 'rejected'} by {decision.approver}"

    @approve.validator
    def _validate_approve(self, decision: ApprovalDecision) -> None:
        if not self.awaiting_approval:
            raise ApplicationError("this runbook is not waiting for approval", type="InvalidInput")
        if self.decision is not None:
            raise ApplicationError(f"already decided by {self.decision.approver}", type="InvalidInput")

    @workflow.signal
    def approve_signal(self, decision: ApprovalDecision) -> None:
        """For senders that can only signal (the UI's signal dialog, webhooks)."""
        if self.awaiting_approval and self.decision is None:
            self.decision = decision

    def stop_unless_approved(self, approval: ApprovalRecord) -> None:
        if approval.outcome in ("rejected", "timed-out-abort"):
            self.finish("aborted")
            who = f" by {approval.approver}: {approval.comment}" if approval.approver else ""
            raise ApplicationError(f"{self.runbook} aborted: approval {approval.outcome}{who}", type="Aborted",
                                   non_retryable=True)

    async def gate(self, policy: ApprovalPolicy, what: str) -> ApprovalRecord:
        if not policy.required:
            return ApprovalRecord(required=False, outcome="not-required")
        if policy.auto_approve_as:
            return ApprovalRecord(required=True, outcome="auto-approved", approver=policy.auto_approve_as,
                                  comment="approved automatically (drill)", at=workflow.now())
        # One decision per gate: a runbook with two gates must not pass the second on the first's.
        self.decision = None
        self.awaiting_approval = True
        paged_as: str | None = None
        if self.notifier.active and self.notifies != "none":
            self._announce()
            self._paged = True
            default = policy.default_action.value
            if workflow.patched("approval-own-incident"):
                # Each gate its own incident, closed by its decision. Under the run's one key, a
                # second gate (failback's reconcile review after its go-ahead) paged nobody while
                # the first gate's incident was acknowledged: PagerDuty adds a trigger to an
                # acknowledged incident without notifying again.
                self._gates += 1
                info = workflow.info()
                paged_as = f"{incident_key(info.workflow_id, info.run_id)}/approval-{self._gates}"
            self.notifier.send(self._event(
                "approval-needed", "trigger", "critical",
                [f"waiting for approval to {what}",
                 f"default after {policy.timeout_seconds:.0f} s: {default}"], dedup_key=paged_as,
                approve_command=f"eagle-dr approve {workflow.info().workflow_id}"))
        # Whoever reads this in the UI's User Metadata tab can act on it there: the update's
        # name and a Data document to paste (the decision's schema, ApprovalDecision), and the
        # CLI form. Current details are query state, not a command: old histories replay.
        wid = workflow.info().workflow_id
        self._details(f"WAITING FOR APPROVAL to {what}; default after {policy.timeout_seconds:.0f}s: "
                      f"{policy.default_action.value}.\n\nIn this UI: More Actions → Update → `approve`, Data "
                      f'`{{"approver": "your name", "decision": "approve", "comment": "why"}}` (or `"reject"`). '
                      f"CLI: `eagle-dr approve {wid} --as NAME [--reject]`.")
        try:
            await workflow.wait_condition(lambda: self.decision is not None,
                                          timeout=timedelta(seconds=policy.timeout_seconds))
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if paged_as is not None:
                # Its incident is its own: nothing else would resolve it (the end resolves the run's).
                self.notifier.send(self._event("approval-decided", "resolve", "info",
                                               [f"cancelled while waiting for approval to {what}"],
                                               dedup_key=paged_as))
            raise
        finally:
            self.awaiting_approval = False
        d = self.decision
        if d is None:
            proceed = policy.default_action == DefaultAction.proceed
            record = ApprovalRecord(required=True, outcome="timed-out-proceed" if proceed else "timed-out-abort",
                                    at=workflow.now())
        else:
            record = ApprovalRecord(required=True, outcome="approved" if d.decision == "approve" else "rejected",
                                    approver=d.approver, comment=d.comment, at=workflow.now())
        if paged_as is not None:
            who = f" by {record.approver}" + (f": {record.comment}" if record.comment else "") if record.approver else ""
            self.notifier.send(self._event("approval-decided", "resolve", "info",
                                           [f"{record.outcome}{who}", f"was waiting for approval to {what}"],
                                           dedup_key=paged_as))
        return record
