"""The one activity: deliver one event to one configured channel.

Secrets (webhook URL, routing key, SMTP password) are resolved here from the config and
never leave: the request names the channel, and an error says which channel and what went
wrong with the secret scrubbed out (the worker's ScrubSecrets interceptor checks again).
"""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.notify import pagerduty, slack, smtp
from activities.notify.event import NotifyRequest
from eagle_dr import logs
from eagle_dr.config import EagleConfig, PagerDutyChannel, SecretUnavailable, SlackChannel, scrub

log = logs.get("notify")


class NotifyActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @activity.defn
    def send_notification(self, req: NotifyRequest) -> str:
        ch = self.cfg.notifications.channels.get(req.channel)
        if ch is None:
            # The config the worker runs with lost the channel since the workflow read it.
            raise ApplicationError(f"notification channel {req.channel!r} is not configured on this worker",
                                   type="UnknownChannel", non_retryable=True)
        ui = self.cfg.temporal.ui_url
        ev = req.event
        try:
            if isinstance(ch, SlackChannel):
                slack.send(ch.webhook_url.resolve(), ev, ui, ch.timeout.total_seconds())
            elif isinstance(ch, PagerDutyChannel):
                pagerduty.send(ch.url, ch.routing_key.resolve(), ev, ui, ch.timeout.total_seconds())
            else:
                smtp.send(ch, ch.password.resolve() if ch.password else None, ev, ui)
        except SecretUnavailable as e:
            raise ApplicationError(f"{req.channel}: {e}", type="SecretUnavailable", non_retryable=True) from None
        except Exception as e:  # noqa: BLE001 - any delivery error is retried, its text scrubbed
            log.warning("notify.failed", channel=req.channel, kind=ev.kind, error=scrub(str(e)))
            raise ApplicationError(scrub(f"{req.channel}: {e}"), type="NotificationFailed") from None
        log.info("notify.sent", channel=req.channel, kind=ev.kind, dedup_key=ev.dedup_key)
        return f"{req.channel}: {ev.kind} sent"
