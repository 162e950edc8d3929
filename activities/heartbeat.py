"""Heartbeats for activities whose work is one long blocking call (a SQL statement waiting
on a lock, a pg_waldump, a server start): a side thread beats while it runs, so a worker
that dies is noticed within the heartbeat timeout, not at start-to-close."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from temporalio import activity


@contextmanager
def heartbeating(every: float = 3.0, details: object = None) -> Iterator[None]:
    # A local activity has no heartbeat (its timeouts are the workflow worker's own).
    if not activity.in_activity() or activity.info().is_local:
        yield
        return
    # A copy of this thread's context carries the activity's heartbeat function.
    ctx = contextvars.copy_context()
    stop = threading.Event()

    # No details given: none sent (a None would replace the ones a resumable activity reads back).
    args = () if details is None else (details,)

    def beat() -> None:
        while not stop.wait(every):
            ctx.run(activity.heartbeat, *args)

    t = threading.Thread(target=beat, name="heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
