"""What a notification says: one event, built by a workflow, rendered by each channel.

The event carries no secret (it is an activity input, in history): the channel's URL, key
or password is resolved by the activity from the config. Rendering is pure, so a workflow
may use the same functions to build an event's lines.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

TITLES = {
    "runbook-started": "started",
    "approval-needed": "APPROVAL NEEDED",
    "approval-decided": "approval decided",
    "step-failed": "STEP FAILED",
    "runbook-finished": "finished",
    "outage": "OUTAGE",
    "outage-resolved": "outage resolved",
    "readiness-degraded": "READINESS DEGRADED",
    "readiness-restored": "readiness restored",
}


class DeliveryFailed(RuntimeError):
    """A channel did not take the message; the text names the channel, never its secret."""


class NotifyEvent(BaseModel):
    kind: str
    service: str
    # One line: what happened ("switchover eagle-alert us-east-1 -> us-west-2").
    summary: str
    # PagerDuty: "trigger" opens (or updates) the incident under dedup_key, "resolve" closes it;
    # other channels show it as the message's state.
    action: str = "trigger"  # trigger | resolve | info
    severity: str = "info"  # critical | error | warning | info (PagerDuty's levels)
    dedup_key: str
    at: datetime
    runbook: str | None = None
    workflow_id: str | None = None
    run_id: str | None = None
    namespace: str = "default"
    region: str | None = None
    outcome: str | None = None
    # Detail lines (the failed step's error, RTO and RPO against targets, the approve command).
    lines: list[str] = []
    approve_command: str | None = None


class NotifyRequest(BaseModel):
    """One event for one channel: each channel is its own activity, retried on its own, so a
    retry never sends a second copy to a channel that already took the first."""

    channel: str
    event: NotifyEvent


def ui_link(ui_url: str, event: NotifyEvent) -> str | None:
    if not event.workflow_id:
        return None
    path = f"{ui_url.rstrip('/')}/namespaces/{event.namespace}/workflows/{event.workflow_id}"
    return f"{path}/{event.run_id}/history" if event.run_id else path


def subject(event: NotifyEvent) -> str:
    return f"[eagle-dr] {event.service}: {TITLES.get(event.kind, event.kind)}: {event.summary}"


def body_lines(event: NotifyEvent, ui_url: str) -> list[str]:
    """The message as plain lines: what, details, how to act, where to look."""
    out = [subject(event), ""]
    out += event.lines
    if event.approve_command:
        out += ["", f"Approve: {event.approve_command}",
                f"Reject:  {event.approve_command} --reject --comment '<why>'"]
    if link := ui_link(ui_url, event):
        out += ["", f"Temporal UI: {link}"]
    out += ["", f"at {event.at.isoformat(timespec='seconds')}" + (f", workflow {event.workflow_id}"
                                                                    if event.workflow_id else "")]
    return out
