"""PagerDuty Events API v2: ``trigger`` opens an incident (or adds to the open one with the
same dedup key), ``resolve`` closes it. An "info" event is not paged at all."""

from __future__ import annotations

import json

from activities.notify.event import NotifyEvent, body_lines, subject, ui_link
from activities.notify.webhook import post_json


def payload(routing_key: str, event: NotifyEvent, ui_url: str) -> dict:
    body: dict = {"routing_key": routing_key, "event_action": event.action, "dedup_key": event.dedup_key}
    if event.action == "resolve":
        return body
    body["payload"] = {
        "summary": subject(event)[:1024],  # the API's limit
        "source": f"eagle-dr/{event.service}",
        "severity": event.severity,
        "timestamp": event.at.isoformat(),
        "component": event.region or event.service,
        "group": event.runbook or event.kind,
        "class": event.kind,
        "custom_details": {"details": "\n".join(body_lines(event, ui_url)), "outcome": event.outcome,
                           "approve_command": event.approve_command, "workflow_id": event.workflow_id},
    }
    if link := ui_link(ui_url, event):
        body["links"] = [{"href": link, "text": "Temporal UI"}]
    return body


def send(url: str, routing_key: str, event: NotifyEvent, ui_url: str, timeout: float) -> None:
    if event.action == "info":
        return
    post_json(url, json.dumps(payload(routing_key, event, ui_url)).encode(), timeout, what="pagerduty")
