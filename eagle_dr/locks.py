"""The per-directory lock a long activity holds so that its own retry cannot run beside it.

A retry is started when an attempt's heartbeat is lost, not only when its worker died: a slow
first attempt may still be running (a long pause, a partitioned worker). Both would then work
on one data directory. The retry waits for the lock instead; the kernel releases a dead
attempt's lock with its process, so a dead attempt never holds it. Used by the rewind
(activities/postgres/rewind.py), the standby rebuild and the scratch restores
(activities/backup/orphans.py).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold ``lock`` (created, with its folder, if missing) for the block; wait while another
    process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
