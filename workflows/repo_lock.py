"""The service's backup-repo lock: one backup or expire at a time, whichever node runs it.

pgBackRest's own lock is a file on the node that runs the command. A backup runs on the
standby's node, an expire on the primary's, a fallback backup on the primary's: two nodes
writing the same buckets at once each rewrite backup.info from what they read, and one of
them loses the other's entry (CI saw backups on disk that backup.info no longer listed, and
the next expire deleted them as leftovers). So BackupWorkflow and ExpireWorkflow take this
lock before they touch a repo.

The lock is a child workflow with one fixed id per service. Temporal runs at most one
workflow per id, so starting it is the acquire, and a start refused as "already started"
means someone else holds it. Its end is the release: a signal from the holder when done,
or, if the holder ends any other way (failed, cancelled, terminated), the parent close
policy TERMINATE. Nothing outlives its holder, and no lease has to be guessed. The waiter
retries with a capped backoff and says what it waits for in its step; in the UI, the lock's
parent is the holder.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from temporalio import workflow
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import BackupActivities, WritersGoneRequest
    from workflows.runbook import not_picked_up

# The first retry comes soon (a short expire ending), later ones at most five minutes apart:
# each costs about ten history events, so a waiter behind the longest backup allowed (7 days)
# stays near 20,000 events, within Temporal's 50,000.
FIRST_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 300.0


def repo_lock_id(service: str) -> str:
    return f"dr-backup-repos-{service}"


@workflow.defn
class RepoLockWorkflow:
    """Held while it runs. Its only input is the holder's workflow id, shown in the UI."""

    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self, holder: str) -> str:
        workflow.set_current_details(f"held by {holder}; released when it ends")
        while True:
            try:
                await workflow.wait_condition(lambda: self.released)
                return holder
            except asyncio.CancelledError:
                # A cancel request (the UI's button) must not hand the buckets to a second
                # writer while the holder's pgBackRest still runs: only the holder releases it
                # (or its end, through the parent close policy).
                workflow.logger.warning("cancel request ignored: the holder releases this lock")

    @workflow.signal
    def release(self) -> None:
        self.released = True


@asynccontextmanager
async def repo_lock(runbook, service: str, control_queue: str, nodes: dict[str, str] | None = None):
    """Hold the service's backup-repo lock for the block, as one step of ``runbook``.

    ``nodes`` (region -> its worker's task queue): once the lock is taken, wait until no
    pgBackRest writer runs on any of them. A holder that was terminated, or reached its
    execution timeout, ended the lock at once (parent close policy), while the pgBackRest it
    had started kept writing until it ended: a second writer then rewrote backup.info beside
    it. A node whose worker does not take the check within a minute is said, not waited for."""
    lock_id = repo_lock_id(service)
    holder = workflow.info().workflow_id
    wait, waited = FIRST_RETRY_SECONDS, 0.0
    async with runbook.step("Take the service's backup-repo lock") as rec:
        while True:
            try:
                handle = await workflow.start_child_workflow(
                    RepoLockWorkflow.run, holder, id=lock_id, task_queue=control_queue,
                    parent_close_policy=workflow.ParentClosePolicy.TERMINATE,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    static_summary=f"backup-repo lock of {service}, held by {holder}")
                break
            except WorkflowAlreadyStartedError:
                rec.detail = (f"waiting {waited:.0f} s: another backup or expire holds {lock_id} "
                              "(its parent in the UI), and pgBackRest must not write the buckets from two nodes")
                runbook._details("Take the service's backup-repo lock")
                await workflow.sleep(wait)
                waited += wait
                wait = min(wait * 2, MAX_RETRY_SECONDS)
        rec.detail = f"held ({lock_id})" + (f" after waiting {waited:.0f} s" if waited else "")
        if nodes and workflow.patched("repo-lock-waits-for-writers"):
            rec.detail += "; " + await _writers_gone(runbook, nodes)
    try:
        yield
    finally:
        try:
            await handle.signal(RepoLockWorkflow.release)
            await handle
        except Exception as e:  # noqa: BLE001 - the parent's end releases it anyway (TERMINATE)
            workflow.logger.warning("backup-repo lock not released by signal; it ends with this run",
                                    extra={"error": str(e)})


async def _writers_gone(runbook, nodes: dict[str, str]) -> str:
    async def one(region: str, queue: str) -> str:
        try:
            return await runbook.act(BackupActivities.wait_repo_writers_gone, WritersGoneRequest(region=region),
                                     queue=queue, timeout=4 * 3600 + 60, heartbeat=30, schedule_to_start=60,
                                     attempts=3)
        except ActivityError as e:
            if not_picked_up(e):
                return f"{region}: NOT checked (its worker did not answer) for a pgBackRest still writing"
            raise

    said = await asyncio.gather(*(one(r, q) for r, q in nodes.items()))
    return "; ".join(said)


__all__ = ["RepoLockWorkflow", "repo_lock", "repo_lock_id"]
