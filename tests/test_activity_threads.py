"""A thread an activity starts beside its own work still sees the activity's cancel.

The restore lists the repo (which timeline to follow) in a pool thread beside ``pgbackrest
restore``; ``Stanza.run`` notices a cancel through the activity's context, which the SDK keeps
in a contextvar that a pool thread does not inherit. Without it the listing ran on after a
cancel, and the restore's undo waited for it."""

from __future__ import annotations

import concurrent.futures
import threading
import time

from temporalio import activity
from temporalio.testing import ActivityEnvironment

from activities.backup.pgbackrest import submit_in_activity


def _until_cancelled(deadline_s: float, saw: list[str]) -> None:
    """What Stanza.run checks between its half-second waits on pgBackRest."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if activity.in_activity() and activity.is_cancelled():
            saw.append("cancelled")
            return
        time.sleep(0.01)
    saw.append("ran on")


def test_a_pool_thread_started_by_an_activity_sees_its_cancel():
    env = ActivityEnvironment()
    started = threading.Event()
    saw: list[str] = []

    def act() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            f = submit_in_activity(pool, _until_cancelled, 20, saw)
            started.set()
            f.result()

    def run() -> None:
        try:
            env.run(act)
        except BaseException:  # noqa: BLE001 - the cancel itself, raised in the activity's thread
            pass

    runner = threading.Thread(target=run)
    runner.start()
    assert started.wait(10)
    env.cancel()
    runner.join(30)
    # Without the activity's context the thread never saw the cancel and ran its 20 s out.
    assert saw == ["cancelled"]
