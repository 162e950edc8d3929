"""Threads started inside a cancellable sync activity, started so that a cancel cannot wedge the worker.

The SDK cancels a sync activity by raising ``CancelledError`` asynchronously in the activity's
thread, by thread id (``PyThreadState_SetAsyncExc``). In CPython 3.11 a thread being started
has a thread state whose id is still its *creator's* until the new thread runs its bootstrap,
and the new state is found first. A cancel that lands in that window kills the new thread
before it signals it started; the activity thread waits for that signal forever in
``Thread.start``. Started through ``ThreadPoolExecutor.submit`` it waits holding the pool's
global shutdown lock, and the worker's event loop blocks on the same lock at its next
``run_in_executor``: the whole worker stops, alive and polling nothing (seen in CI as
ScheduleToStart timeouts on a region whose worker had cancelled a monitor probe; py-spy showed
``Thread.start`` waiting under ``HealthActivities._probe_all``).

``install()`` makes every ``Thread.start`` called from a sync activity's thread run under
``activity.shield_thread_cancel_exception()``: a cancel arriving meanwhile is raised once the
new thread has its own id, in the activity's thread, where it belongs. It covers the threads
our activities start (probe pools, heartbeat threads, consistency ranges) and those libraries
start for them (boto3's transfer pool).
"""

from __future__ import annotations

import threading

from temporalio import activity

_original_start = threading.Thread.start


def _start(self: threading.Thread) -> None:
    if activity.in_activity():
        with activity.shield_thread_cancel_exception():
            return _original_start(self)
    return _original_start(self)


def install() -> None:
    """Idempotent; process-wide (every worker in the process shares ``threading``)."""
    threading.Thread.start = _start  # type: ignore[method-assign]
