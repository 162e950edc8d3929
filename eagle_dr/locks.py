"""The per-directory lock a long activity holds so that its own retry cannot run beside it.

A retry is started when an attempt's heartbeat is lost, not only when its worker died: a slow
first attempt may still be running (a long pause, a partitioned worker). Both would then work
on one data directory. The retry waits for the lock instead; the kernel releases a dead
attempt's lock with its process, so a dead attempt never holds it. Used by the rewind
(activities/postgres/rewind.py), the standby rebuild and the scratch restores
(activities/backup/rebuild.py, restore.py; orphans.py says why they need it).
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class LockBusy(Exception):
    """Another process still held the lock when the wait ran out."""


@contextmanager
def exclusive(lock: Path, meanwhile: Callable[[], None] | None = None, timeout: float | None = None,
              every: float = 0.5) -> Iterator[None]:
    """Hold ``lock`` (created, with its folder, if missing) for the block; wait while another
    process holds it. With ``meanwhile``, the wait calls it every ``every`` seconds (to make the
    holder let go: stop what it runs), and gives up with LockBusy after ``timeout`` seconds."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        if meanwhile is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise LockBusy(f"{lock} is still held by another process after {timeout:.0f} s") from None
                    meanwhile()
                    time.sleep(every)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
