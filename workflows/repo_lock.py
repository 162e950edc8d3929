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

The expiry lock is a second run of the same workflow under its own id. Expirers (an expire,
a backup's expire steps) hold it, inside the repo lock, while they expire, and under it list
the service's running restores that say they read the buckets (activities/backup/readers.py):
any found, the expiry is deferred. A restore (ReadsBackups) says so from its wait on, waits
until visibility lists it, then until no expirer holds the expiry lock and no expire runs on
any node (one left by a crashed or terminated expirer), and only then reads the buckets. An
expirer that took the lock before that deletes before the restore reads; one that takes it
after lists the restore and defers. The repo lock could not serve here: a restore at 3 a.m.
would wait behind a backup's hours.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from temporalio import workflow
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import BackupActivities, WritersGoneRequest
    from activities.backup.readers import READING_QUERY, ListedRequest, ReadersRequest, RepoReaderActivities
    from workflows.runbook import not_picked_up

# The first retry comes soon (a short expire ending), later ones at most five minutes apart:
# each costs about ten history events, so a waiter behind the longest backup allowed (7 days)
# stays near 20,000 events, within Temporal's 50,000.
FIRST_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 300.0
# An expire takes seconds to minutes: a restore waiting on one looks again at least this often,
# and goes on after RESTORE_GIVES_UP_SECONDS, saying so: an expire hung on a bucket that is down
# (when restores are most needed) must not hold a restore for the hours its retries may take.
EXPIRY_MAX_RETRY_SECONDS = 30.0
RESTORE_GIVES_UP_SECONDS = 600.0
UNCHECKED = "NOT checked"


def repo_lock_id(service: str) -> str:
    return f"dr-backup-repos-{service}"


def expiry_lock_id(service: str) -> str:
    return f"dr-backup-expiry-{service}"


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
    name = "Take the service's backup-repo lock"
    async with runbook.step(name) as rec:
        handle, waited = await _acquire(runbook, name, rec, lock_id, control_queue, f"backup-repo lock of {service}",
                                        "another backup or expire holds {lock} (its parent in the UI), and "
                                        "pgBackRest must not write the buckets from two nodes")
        rec.detail = f"held ({lock_id})" + (f" after waiting {waited:.0f} s" if waited else "")
        if nodes and workflow.patched("repo-lock-waits-for-writers"):
            rec.detail += "; " + await _writers_gone(runbook, nodes)
    try:
        yield
    finally:
        await _release(handle, "backup-repo lock")


@asynccontextmanager
async def expiry_lock(runbook, service: str, control_queue: str):
    """Hold the service's expiry lock for the block and yield the running restores (ids),
    listed under it: an expirer deletes nothing while that list is not empty."""
    lock_id = expiry_lock_id(service)
    name = "Take the expiry lock and look for restores"
    async with runbook.step(name) as rec:
        handle, waited = await _acquire(runbook, name, rec, lock_id, control_queue, f"expiry lock of {service}",
                                        "a restore is checking {lock} (its parent in the UI)",
                                        EXPIRY_MAX_RETRY_SECONDS)
        try:
            readers = await runbook.act(RepoReaderActivities.list_repo_readers,
                                        ReadersRequest(service=service, exclude=workflow.info().workflow_id),
                                        queue=control_queue, timeout=60, attempts=5)
        except BaseException:
            await _release(handle, "expiry lock")
            raise
        rec.detail = (f"held ({lock_id})" + (f" after waiting {waited:.0f} s" if waited else "") + "; " +
                      (f"restores reading the buckets: {', '.join(readers)}" if readers else "no restore running"))
    try:
        yield readers
    finally:
        await _release(handle, "expiry lock")


class ReadsBackups:
    """Mixed into the runbooks that run ``pgbackrest restore``: whether this run reads the
    buckets now, as expirers ask it (activities/backup/readers.py)."""

    # None in a run started before the wait existed: it never sets the flag, and may be
    # restoring right now, so None answers "reading".
    reading_backups: bool | None = None

    @workflow.query(name=READING_QUERY)
    def reads_backups(self) -> bool:
        return self.reading_backups is not False

    def not_reading_yet(self) -> None:
        """At a run's start (a run recorded before replays without the marker, and stays None)."""
        if workflow.patched("restore-not-reading-yet"):
            self.reading_backups = False

    def done_reading(self) -> None:
        """The copy is restored and replayed: an expire may go on."""
        self.reading_backups = False


async def visible_to_expiries(runbook, topo, give_up: float = RESTORE_GIVES_UP_SECONDS) -> str | None:
    """Before a restore reads the buckets: say so, be listed as a restore, then wait while an
    expirer holds the expiry lock (taking it proves nobody holds it) and, under it, while an
    expire still runs on a node. Returns a note for the run's degraded list when visibility did
    not list it in time, or an expire went on too long: the restore then goes on, and says
    what an expire may have removed under it."""
    service, control_queue = topo.service, topo.control_task_queue
    runbook.reading_backups = True
    lock_id = expiry_lock_id(service)
    info = workflow.info()
    name = "Wait until no expiry deletes backups"
    async with runbook.step(name) as rec:
        try:
            listed = await runbook.act(RepoReaderActivities.wait_listed_as_reader,
                                       ListedRequest(service=service, workflow_id=info.workflow_id,
                                                     run_id=info.run_id),
                                       queue=control_queue, timeout=180, heartbeat=30, attempts=3)
            unlisted = "was not listed by Temporal's visibility within 120 s"
        except ActivityError as e:
            # Visibility refusing the query (a search attribute not registered, say) must not
            # stop a restore at 3 a.m.: it goes on, and says what an expire could not see.
            listed, unlisted = None, f"could not be looked up in Temporal's visibility ({e.cause or e})"
        handle, waited = await _acquire(runbook, name, rec, lock_id, control_queue,
                                        f"expiry lock of {service}, checked by a restore",
                                        "an expire holds {lock} (its parent in the UI) and may delete the "
                                        "backup this restore needs", EXPIRY_MAX_RETRY_SECONDS,
                                        give_up_after=give_up)
        notes = []
        if listed is None:
            notes.append(f"this restore {unlisted}: an expire that ran during it could not see it, and may "
                         "have removed backups it read")
        if handle is None:
            notes.append(f"an expire still held {lock_id} after {waited:.0f} s: this restore went on beside it, "
                         "and a backup or WAL it reads may be removed under it")
        rec.detail = (f"listed after {listed:.1f} s" if listed is not None else "NOT listed") + (
            f"; an expire still holds the lock after {waited:.0f} s: going on beside it" if handle is None else
            f"; waited {waited:.0f} s for an expire to end" if waited else "; no expire running")
        if handle is not None:
            # The lock ends with its holder, but the pgBackRest expire a crashed worker or a
            # terminated expirer started goes on deleting until it ends.
            try:
                said = await _writers_gone(runbook, {r.name: r.task_queue for r in topo.regions},
                                           commands=["expire"], timeout=give_up,
                                           # A lost region's worker (why restores run) costs this
                                           # much of the restore's RTO: its node is said unchecked.
                                           pick_up=10)
                if UNCHECKED in said:
                    notes.append(f"a pgbackrest expire left running could not be looked for ({said}): if one "
                                 "runs there, it may remove a backup or WAL this restore reads")
            except ActivityError as e:
                said = f"an expire still runs: {e.cause or e}"
                notes.append(f"{said}; this restore went on beside it")
            finally:
                await _release(handle, "expiry lock")
            rec.detail += "; " + said
        return "; ".join(notes) or None


async def _acquire(runbook, step_name: str, rec, lock_id: str, control_queue: str, what: str, waiting: str,
                   max_wait: float = MAX_RETRY_SECONDS, give_up_after: float | None = None):
    """The lock's handle, and the seconds waited for it; no handle once ``give_up_after`` passed."""
    holder = workflow.info().workflow_id
    wait, waited = FIRST_RETRY_SECONDS, 0.0
    while True:
        try:
            handle = await workflow.start_child_workflow(
                RepoLockWorkflow.run, holder, id=lock_id, task_queue=control_queue,
                parent_close_policy=workflow.ParentClosePolicy.TERMINATE,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                static_summary=f"{what}, held by {holder}")
            return handle, waited
        except WorkflowAlreadyStartedError:
            if give_up_after is not None and waited >= give_up_after:
                return None, waited
            rec.detail = f"waiting {waited:.0f} s: " + waiting.format(lock=lock_id)
            runbook._details(step_name)
            await workflow.sleep(wait)
            waited += wait
            wait = min(wait * 2, max_wait)


async def _release(handle, what: str) -> None:
    try:
        await handle.signal(RepoLockWorkflow.release)
        await handle
    except Exception as e:  # noqa: BLE001 - the parent's end releases it anyway (TERMINATE)
        workflow.logger.warning(f"{what} not released by signal; it ends with this run", extra={"error": str(e)})


async def _writers_gone(runbook, nodes: dict[str, str], commands: list[str] | None = None,
                        timeout: float = 4 * 3600, pick_up: float = 60) -> str:
    req = {"commands": commands} if commands else {}

    async def one(region: str, queue: str) -> str:
        try:
            return await runbook.act(BackupActivities.wait_repo_writers_gone,
                                     WritersGoneRequest(region=region, timeout_seconds=timeout, **req),
                                     queue=queue, timeout=timeout + 60, heartbeat=30, schedule_to_start=pick_up,
                                     attempts=3 if not commands else 1)
        except ActivityError as e:
            if not_picked_up(e):
                return f"{region}: {UNCHECKED} (its worker did not answer) for a pgBackRest still running"
            raise

    said = await asyncio.gather(*(one(r, q) for r, q in nodes.items()))
    return "; ".join(said)


__all__ = ["RESTORE_GIVES_UP_SECONDS", "ReadsBackups", "RepoLockWorkflow", "expiry_lock", "expiry_lock_id", "repo_lock", "repo_lock_id", "visible_to_expiries"]
