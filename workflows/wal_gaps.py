"""Every region's WAL-gap records, each read by that region's own worker.

The archive guard (activities/backup/archive.py) records a gap in a bucket's archive in a file
beside the pgBackRest files of the node it runs on: the primary's. A restore runs on another
node (the standby's, by default), and on separate hosts that node's files hold none of those
records: it would restore across the gap, stop there, promote the copy and report it as the
target reached. So the restore asks each region's worker for its own records first.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.backup.activities import RestoreActivities
    from activities.backup.archive import WalGap
    from workflows.runbook import described


async def wal_gaps(runbook, topo) -> tuple[list[WalGap], list[str]]:
    """(every record read, the regions whose records could not be read and why). A region down
    is no reason to refuse a restore, which may be the way out of its loss: the run says what
    it could not check instead."""

    async def one(region) -> tuple[list[WalGap], str | None]:
        try:
            return await runbook.act(RestoreActivities.read_wal_gaps, region.name, queue=region.task_queue,
                                     timeout=30, schedule_to_start=30, attempts=2), None
        except ActivityError as e:
            return [], f"{region.name} ({described(e)})"

    read = await asyncio.gather(*(one(r) for r in topo.regions))
    return [g for gaps, _ in read for g in gaps], [why for _, why in read if why]


def unread_note(unread: list[str]) -> str:
    return (f"the WAL-gap records of {', '.join(unread)} could not be read: a gap in the archive that its archive "
            "guard recorded would not have stopped this restore, which then ends at the gap as if that were "
            "the target")
