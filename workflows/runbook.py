"""What every runbook workflow shares: steps an operator can watch, the approval gate, and
activity calls with explicit timeouts and retries.

The step list is the runbook as the operator sees it: the ``progress`` query returns it,
``set_current_details`` shows the step in the UI, and the report lists each step with its
duration.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from eagle_dr.temporal import DR_OUTCOME
    from workflows.models import (
        ApprovalDecision,
        ApprovalPolicy,
        ApprovalRecord,
        DefaultAction,
        Progress,
        StepRecord,
    )

# Retries for steps that talk to a live system: quick at first, capped, then give up and
# let the runbook decide (compensate, or report) instead of hammering a dead region.
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2,
                    maximum_interval=timedelta(seconds=10), maximum_attempts=5,
                    non_retryable_error_types=["StaleEpoch", "InvalidInput"])


class Runbook:
    """Base for runbook workflows (failover, switchover, ...)."""

    runbook = "runbook"

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.source_region: str | None = None
        self.target_region: str = ""
        self.service = ""
        self.epoch: int | None = None
        self.outcome: str | None = None
        self.awaiting_approval = False
        self.decision: ApprovalDecision | None = None

    # -- what the operator sees ----------------------------------------------------------------

    @workflow.query
    def progress(self) -> Progress:
        return Progress(runbook=self.runbook, service=self.service, source_region=self.source_region,
                        target_region=self.target_region, epoch=self.epoch, steps=self.steps,
                        awaiting_approval=self.awaiting_approval, outcome=self.outcome)

    def _details(self, current: str) -> None:
        marks = {"done": "✅", "running": "⏳", "failed": "❌", "skipped": "⏭️", "pending": "▫️"}
        lines = [f"**{self.runbook}** {self.service}: {self.source_region or '?'} → {self.target_region}"
                 + (f" (epoch {self.epoch})" if self.epoch is not None else ""), "", f"Now: {current}", ""]
        lines += [f"- {marks.get(s.status, '')} {s.name}" + (f": {s.detail}" if s.detail else "") for s in self.steps]
        workflow.set_current_details("\n".join(lines))

    @asynccontextmanager
    async def step(self, name: str):
        rec = StepRecord(name=name, status="running", started_at=workflow.now())
        self.steps.append(rec)
        self._details(name)
        workflow.logger.info("step started", extra={"step": name})
        try:
            yield rec
        except BaseException:
            rec.status = "failed"
            rec.finished_at = workflow.now()
            self._details(f"{name} failed")
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

    # -- activity calls ------------------------------------------------------------------------

    async def act(self, fn, arg=None, *, queue: str, timeout: float = 60, schedule_to_start: float | None = None,
                  heartbeat: float | None = None, attempts: int | None = None, summary: str | None = None):
        retry = RETRY if attempts is None else RetryPolicy(
            initial_interval=RETRY.initial_interval, backoff_coefficient=2, maximum_interval=RETRY.maximum_interval,
            maximum_attempts=attempts, non_retryable_error_types=RETRY.non_retryable_error_types)
        args = [] if arg is None else [arg]
        return await workflow.execute_activity_method(
            fn, *args, task_queue=queue, start_to_close_timeout=timedelta(seconds=timeout),
            schedule_to_start_timeout=timedelta(seconds=schedule_to_start) if schedule_to_start else None,
            heartbeat_timeout=timedelta(seconds=heartbeat) if heartbeat else None, retry_policy=retry,
            summary=summary)

    # -- the approval gate ----------------------------------------------------------------------

    @workflow.update
    async def approve(self, decision: ApprovalDecision) -> str:
        self.decision = decision
        return f"{decision.decision}d by {decision.approver}"

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
        self.awaiting_approval = True
        self._details(f"WAITING FOR APPROVAL to {what}: send the `approve` update "
                      f"(approver, decision approve|reject, comment); default after "
                      f"{policy.timeout_seconds:.0f}s: {policy.default_action.value}")
        try:
            await workflow.wait_condition(lambda: self.decision is not None,
                                          timeout=timedelta(seconds=policy.timeout_seconds))
        except TimeoutError:
            pass
        finally:
            self.awaiting_approval = False
        d = self.decision
        if d is None:
            proceed = policy.default_action == DefaultAction.proceed
            return ApprovalRecord(required=True, outcome="timed-out-proceed" if proceed else "timed-out-abort",
                                  at=workflow.now())
        return ApprovalRecord(required=True, outcome="approved" if d.decision == "approve" else "rejected",
                              approver=d.approver, comment=d.comment, at=workflow.now())
