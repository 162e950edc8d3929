"""Inputs and results of the runbooks: one typed object in, one report out.

Inputs are what an operator types into the Temporal UI (one JSON object), so every field
has a default where one is sensible, and unknown fields are refused.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def _aware(v: datetime) -> datetime:
    # A naive time cannot be compared with the workflow's clock (aware UTC): accepted, it
    # would fail a workflow task on every retry after fence and promote, holding dr-move-*.
    # Guessing a zone would shift RTO by hours, so the operator must say which one.
    if v.tzinfo is None or v.utcoffset() is None:
        raise ValueError("must include a timezone, e.g. 2024-05-01T12:00:00Z or +02:00")
    return v


# A datetime typed into a runbook input: refused up front without a timezone.
AwareTime = Annotated[datetime, AfterValidator(_aware)]


class Trigger(str, Enum):
    manual = "manual"
    automatic = "automatic"
    alert = "alert"
    drill = "drill"
    schedule = "schedule"


class DefaultAction(str, Enum):
    abort = "abort"
    proceed = "proceed"


class ApprovalPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    required: bool = False
    timeout_seconds: float = Field(default=900, gt=0, le=7 * 24 * 3600)
    default_action: DefaultAction = DefaultAction.abort
    # Drills approve themselves and say so in the report.
    auto_approve_as: str | None = None


def _required_unless_said(v):
    """A policy given without ``required`` where approval is the default: still required. A
    partial one from the UI or the API ({"timeout_seconds": 3600}) was built with the model's
    own default, False, and turned the gate off."""
    if isinstance(v, dict) and "required" not in v:
        return {**v, "required": True}
    return v


# The approval of an input whose default asks for one (a restore or a sync writing to a live server).
RequiredApproval = Annotated[ApprovalPolicy, BeforeValidator(_required_unless_said)]


class ApprovalDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    approver: str = Field(min_length=1, max_length=200)
    decision: str
    comment: str = Field(default="", max_length=2000)

    @field_validator("decision")
    @classmethod
    def _decision(cls, v: str) -> str:
        if v not in ("approve", "reject"):
            raise ValueError("must be 'approve' or 'reject'")
        return v


class ApprovalRecord(BaseModel):
    required: bool
    outcome: str  # approved | rejected | timed-out-proceed | timed-out-abort | auto-approved | not-required
    approver: str | None = None
    comment: str | None = None
    at: datetime | None = None


class MoveInput(BaseModel):
    """What failover and switchover both take."""

    model_config = ConfigDict(extra="forbid")
    service: str = Field(default="eagle-alert", min_length=1)
    target_region: str = Field(min_length=1)
    reason: str = Field(default="", max_length=2000)
    trigger: Trigger = Trigger.manual
    approval: ApprovalPolicy = ApprovalPolicy()
    # When the problem was first seen (alert startsAt); RTO counts from here. Default: start.
    detected_at: AwareTime | None = None
    # Lab only: read the sample app's log to count lost acknowledged writes exactly.
    measure_client_impact: bool = False


class FailoverInput(MoveInput):
    max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    force: bool = False
    # Set by the monitor (and the drill) after failed probes: don't spend the preflight's
    # few seconds asking the dead region's worker again; fencing still tries the network.
    source_known_down: bool = False
    # How long the promote step waits for the standby to accept writes before it gives up
    # (then the standby is stopped before the old primary's fence is lifted).
    promote_timeout_seconds: float = Field(default=120, ge=5, le=3600)


class SwitchoverInput(MoveInput):
    max_lag_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    catch_up_timeout_seconds: float = Field(default=300, gt=0)
    # How long the stop of the old primary, and its undo, wait for the source region's worker
    # to take them. Past it the switchover fails before its point of no return, nothing
    # stopped, and the move's id is free for a failover.
    stop_pickup_seconds: float = Field(default=60, gt=0)


class StepRecord(BaseModel):
    name: str
    status: str = "pending"  # pending | running | done | skipped | failed | cancelled
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class Rto(BaseModel):
    detected_at: datetime
    decided_at: datetime | None = None
    promotion_started_at: datetime | None = None
    writable_at: datetime | None = None
    serving_at: datetime | None = None
    detection_to_decision_s: float | None = None
    decision_to_writable_s: float | None = None
    writable_to_serving_s: float | None = None
    total_s: float | None = None
    # The outage as the lab's clients saw it (last good write -> first good write).
    client_outage_s: float | None = None
    target_s: float | None = None
    met: bool | None = None
    # Set when the run's end is no time the service was restored (its routing failed): the
    # figures above time the steps, and ``met`` is unknown.
    serving_basis: str | None = None


class Rpo(BaseModel):
    # None: unknown (never 0 unless proven: a clean shutdown checkpoint replayed, or the old
    # primary's own WAL read to its end).
    lost_wal_bytes: int | None = None
    wal_basis: str = ""
    # Transactions the old primary committed that the new primary lacks (from its WAL).
    lost_commits: int | None = None
    redis_offset_gap: int | None = None
    acknowledged_writes_lost: int | None = None
    acknowledged_writes_total: int | None = None
    # How far back the lost writes reach: newest acknowledged write - oldest lost one.
    loss_window_s: float | None = None
    target_s: float | None = None
    met: bool | None = None
    # Unlogged tables and sequences (schema.name): PostgreSQL never writes them to WAL, so the
    # new primary has none of their rows and restarts their sequences. Lost by design of the
    # relation, outside the WAL figures above; named so that the loss is never silent.
    not_replicated: list[str] = []
    # Their tables' size on the old primary at preflight; None when it could not be read.
    not_replicated_bytes: int | None = None


class Progress(BaseModel):
    runbook: str
    service: str
    source_region: str | None
    target_region: str
    epoch: int | None
    steps: list[StepRecord]
    awaiting_approval: bool = False
    outcome: str | None = None


class RunbookResult(BaseModel):
    runbook: str
    workflow_id: str
    run_id: str
    service: str
    source_region: str
    target_region: str
    epoch: int
    outcome: str  # succeeded | degraded | aborted | failed
    trigger: Trigger
    reason: str
    approval: ApprovalRecord
    steps: list[StepRecord]
    rto: Rto
    rpo: Rpo
    source_fenced: str | None = None
    notes: list[str] = []
    # What failed after the point of no return, each with the command that repairs it.
    degraded: list[str] = []
    # A cancel request that came after the point of no return, refused.
    cancel_refused: str | None = None


class MonitorHold(BaseModel):
    """A runbook's hold on the monitor's automatic moves (the ``hold`` signal): a drill that
    kills a region itself must not race the always-on monitor to the same failover. Held,
    the monitor still probes and reports; it starts no runbook. A hold lapses at ``until``
    even if its holder never releases it (a terminated drill must not disarm the monitor)."""

    holder: str
    until: datetime
    reason: str = ""


class AlertNotice(BaseModel):
    """What an alert incident tells the monitor (its ``alert`` signal): which rule matched, the
    group's labels, and how many of its alerts fire or resolved. Labels only: never a secret."""

    rule: str
    incident_id: str
    group_labels: dict[str, str] = {}
    firing: int = 0
    resolved: int = 0
    # Each changed alert's labels (at most a few: the incident workflow has all of them).
    sample: list[dict[str, str]] = []
