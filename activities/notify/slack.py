"""Slack-compatible incoming webhooks (Slack, Mattermost, Rocket.Chat): a JSON POST with a
``text`` fallback and ``blocks`` for clients that render them."""

from __future__ import annotations

import json

from activities.notify.event import NotifyEvent, body_lines, subject, ui_link
from activities.notify.webhook import post_json

_ICONS = {"trigger": ":rotating_light:", "resolve": ":white_check_mark:", "info": ":information_source:"}


def message(event: NotifyEvent, ui_url: str) -> dict:
    head = f"{_ICONS.get(event.action, '')} *{subject(event)}*".strip()
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": head}}]
    detail = list(event.lines)
    if event.approve_command:
        detail += [f"Approve: `{event.approve_command}`"]
    if detail:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(detail)}})
    if link := ui_link(ui_url, event):
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Temporal UI>"}]})
    return {"text": "\n".join(body_lines(event, ui_url)), "blocks": blocks}


def send(webhook_url: str, event: NotifyEvent, ui_url: str, timeout: float) -> None:
    post_json(webhook_url, json.dumps(message(event, ui_url)).encode(), timeout, what="slack webhook")
