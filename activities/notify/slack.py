"""Slack-compatible incoming webhooks (Slack, Mattermost, Rocket.Chat): a JSON POST with a
``text`` fallback and ``blocks`` for clients that render them."""

from __future__ import annotations

import json

from activities.notify.event import NotifyEvent, body_lines, subject, ui_link
from activities.notify.webhook import post_json

_ICONS = {"trigger": ":rotating_light:", "resolve": ":white_check_mark:", "info": ":information_source:"}
# Slack refuses (HTTP 400, invalid_blocks) a section whose text passes 3,000 characters, and
# cuts a message's text past 40,000: a long error (a step's stderr) made the page undeliverable.
SECTION_MAX, TEXT_MAX = 3000, 40000
_CUT = "\n… (cut: the whole text is in the run's history, Temporal UI)"


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - len(_CUT)] + _CUT


def message(event: NotifyEvent, ui_url: str) -> dict:
    head = f"{_ICONS.get(event.action, '')} *{subject(event)}*".strip()
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": _fit(head, SECTION_MAX)}}]
    detail = list(event.lines)
    if event.approve_command:
        detail += [f"Approve: `{event.approve_command}`"]
    if detail:
        # The approve command last, and kept whole: it is what the reader acts on.
        approve = detail.pop() if event.approve_command else None
        text = _fit("\n".join(detail), SECTION_MAX - (len(approve) + 1 if approve else 0))
        blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                   "text": "\n".join(x for x in (text, approve) if x)}})
    if link := ui_link(ui_url, event):
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Temporal UI>"}]})
    return {"text": _fit("\n".join(body_lines(event, ui_url)), TEXT_MAX), "blocks": blocks}


def send(webhook_url: str, event: NotifyEvent, ui_url: str, timeout: float) -> None:
    post_json(webhook_url, json.dumps(message(event, ui_url)).encode(), timeout, what="slack webhook")
