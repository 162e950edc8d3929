"""A wait's deadline that holds across the activity's attempts.

A wait inside a retried activity (the switchover's replay wait, routing's wait for the new
primary) would otherwise start its clock again on every attempt: five attempts, each cut short
by a worker restart, would hold a write outage open five times as long as the runbook asked.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from temporalio import activity


def deadline_across_attempts(timeout_s: float) -> float:
    """The ``time.monotonic()`` at which a wait of ``timeout_s`` that began when the runbook
    first scheduled this activity ends.

    A first attempt (or a call outside an activity) gets the whole ``timeout_s`` on this
    host's monotonic clock, so a normal run never depends on clocks agreeing. A later attempt
    gets what is left since the server scheduled the first one, read on the wall clock (the
    server's stamp against this host's: off by their skew, which NTP keeps far below any
    catch-up timeout); never less than zero."""
    now = time.monotonic()
    if not activity.in_activity():
        return now + timeout_s
    info = activity.info()
    if info.attempt <= 1 or info.scheduled_time is None:
        return now + timeout_s
    scheduled = info.scheduled_time
    if scheduled.tzinfo is None:
        scheduled = scheduled.replace(tzinfo=timezone.utc)
    spent = (datetime.now(timezone.utc) - scheduled).total_seconds()
    return now + min(timeout_s, max(0.0, timeout_s - spent))
