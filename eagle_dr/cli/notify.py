"""``eagle-dr notify test``: send a test message to each configured notification channel from
this host, with the secrets resolved here, to check a channel's config before an incident
needs it. Runs the same delivery code as the workflows' activity, without Temporal."""

from __future__ import annotations

from datetime import datetime, timezone

import typer
from rich.markup import escape

from eagle_dr.cli import _fail, app, cfg, out

notify_app = typer.Typer(no_args_is_help=True, help="Notification channels (the config's notifications section).")
app.add_typer(notify_app, name="notify")


@notify_app.command("test")
def notify_test(channel: list[str] = typer.Option([], "--channel", help="Only this channel (repeatable).")):
    """Send a test message to every channel (PagerDuty: a trigger, resolved at once)."""
    from activities.notify.activities import NotifyActivities
    from activities.notify.event import NotifyEvent, NotifyRequest

    c = cfg()
    names = channel or list(c.notifications.channels)
    if not names:
        _fail("no notification channels configured (notifications.channels)", 1)
    unknown = [n for n in names if n not in c.notifications.channels]
    if unknown:
        _fail(f"unknown channel(s): {', '.join(unknown)} (configured: {', '.join(c.notifications.channels)})", 2)
    acts = NotifyActivities(c)
    failed = 0
    for name in names:
        for action in ("trigger", "resolve") if c.notifications.channels[name].type == "pagerduty" else ("trigger",):
            ev = NotifyEvent(kind="runbook-started", service=c.service, summary="test notification (eagle-dr notify "
                             "test): no action needed", action=action, severity="info",
                             dedup_key=f"eagle-dr/{c.service}/notify-test", at=datetime.now(timezone.utc),
                             lines=["This is a test of the notification channel; nothing happened to the service."])
            try:
                acts.send_notification(NotifyRequest(channel=name, event=ev))
            except Exception as e:  # noqa: BLE001 - one line per channel
                out.print(f"[red]{name}: FAILED[/] {escape(str(getattr(e, 'message', None) or e))}")
                failed += 1
                break
        else:
            out.print(f"[green]{name}: sent[/]")
    if failed:
        raise typer.Exit(1)
