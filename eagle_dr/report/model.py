"""What a run report holds, whatever the runbook: every part optional, because a part a run
does not have is left out of the report rather than shown as zero."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class Bar(BaseModel):
    """One row of the timeline: a step of the run (depth 0) or of a runbook it ran (depth 1)."""

    label: str
    start: datetime
    # None while the step still runs: drawn up to the report's "now".
    end: datetime | None = None
    status: str = "done"  # done | running | failed | cancelled | skipped | pending | timed-out
    detail: str = ""
    depth: int = 0
    # Which run the step belongs to (the child runbook's title for depth 1).
    owner: str = ""


class RtoView(BaseModel):
    """A move's recovery time, phase by phase (workflows/models.py Rto)."""

    title: str
    detected_at: datetime | None = None
    decided_at: datetime | None = None
    writable_at: datetime | None = None
    serving_at: datetime | None = None
    detection_to_decision_s: float | None = None
    decision_to_writable_s: float | None = None
    writable_to_serving_s: float | None = None
    total_s: float | None = None
    target_s: float | None = None
    met: bool | None = None
    # Set when the run ended without serving (its routing failed): the RTO is unknown.
    serving_basis: str | None = None
    # The write gap as the clients saw it: duration always when measured, times when the
    # run's own history holds the measurement (the client_outage activity's result).
    client_outage_s: float | None = None
    client_gap_start: datetime | None = None
    client_gap_end: datetime | None = None


class RpoView(BaseModel):
    """A move's data loss (workflows/models.py Rpo); None is "unknown", never 0."""

    title: str
    lost_wal_bytes: int | None = None
    wal_basis: str = ""
    lost_commits: int | None = None
    redis_offset_gap: int | None = None
    acknowledged_writes_lost: int | None = None
    acknowledged_writes_total: int | None = None
    loss_window_s: float | None = None
    target_s: float | None = None
    met: bool | None = None


class ApprovalView(BaseModel):
    runbook: str
    outcome: str
    required: bool | None = None
    approver: str | None = None
    at: datetime | None = None
    comment: str | None = None
    # result (the runbook's own record) or history (an approve update/signal it received).
    source: str = "result"


class ConflictRow(BaseModel):
    runbook: str
    table: str
    strategy: str
    loser_rows: int | None = None
    inserted: int | None = None
    updated: int | None = None
    deleted: int | None = None
    conflicts: int | None = None
    flagged: int | None = None
    audit_rows: int | None = None


class AuditQuery(BaseModel):
    """Where the per-key decisions are: eagle_dr.conflict_audit rows of the run that applied them."""

    runbook: str
    workflow_id: str
    run_id: str | None
    sql: str


class Fact(BaseModel):
    section: str
    name: str
    value: str


class Link(BaseModel):
    label: str
    url: str


class RunReport(BaseModel):
    workflow_id: str
    run_id: str
    workflow_type: str
    # running | completed | failed | cancelled | terminated | timed-out | continued-as-new
    status: str
    outcome: str | None = None
    started_at: datetime
    closed_at: datetime | None = None
    # The time the report stops at: the close, or the newest event of a running run.
    now: datetime
    failure: str | None = None
    title: str = ""
    bars: list[Bar] = []
    rtos: list[RtoView] = []
    rpos: list[RpoView] = []
    approvals: list[ApprovalView] = []
    conflicts: list[ConflictRow] = []
    audit_queries: list[AuditQuery] = []
    facts: list[Fact] = []
    notes: list[str] = []
    links: list[Link] = []
