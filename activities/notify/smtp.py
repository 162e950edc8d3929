"""A plain-text email over SMTP (stdlib smtplib; the activity runs in the worker's thread pool)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from activities.notify.event import NotifyEvent, body_lines, subject
from activities.notify.event import DeliveryFailed


def message(event: NotifyEvent, ui_url: str, sender: str, to: list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject(event)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = format_datetime(event.at)
    msg["Message-ID"] = make_msgid(domain="eagle-dr")
    # Mail clients thread on this: one conversation per incident.
    msg["X-Eagle-DR-Incident"] = event.dedup_key
    msg.set_content("\n".join(body_lines(event, ui_url)) + "\n")
    return msg


def send(ch, password: str | None, event: NotifyEvent, ui_url: str) -> None:
    """``ch`` is the channel's SmtpChannel config; ``password`` its resolved secret."""
    timeout = ch.timeout.total_seconds()
    where = f"smtp {ch.host}:{ch.port}"
    try:
        if ch.tls:
            conn = smtplib.SMTP_SSL(ch.host, ch.port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = smtplib.SMTP(ch.host, ch.port, timeout=timeout)
        with conn:
            if ch.starttls and not ch.tls:
                conn.starttls(context=ssl.create_default_context())
            if ch.username:
                conn.login(ch.username, password or "")
            conn.send_message(message(event, ui_url, ch.from_addr, list(ch.to)))
    except smtplib.SMTPAuthenticationError as e:
        raise DeliveryFailed(f"{where}: authentication refused ({e.smtp_code})") from None
    except smtplib.SMTPException as e:
        raise DeliveryFailed(f"{where}: {type(e).__name__}: {e}") from None
    except (OSError, TimeoutError) as e:
        raise DeliveryFailed(f"{where}: {type(e).__name__}: {e}") from None
