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
    from activities.backup.activities import RestoreActivities, RestoreRequest
    from activities.backup.archive import WalGap
    from workflows.runbook import described


async def with_gaps(runbook, topo, req: RestoreRequest) -> tuple[RestoreRequest, dict[str, str]]:
    """``req`` carrying every region's records for check_restore_target, and {region: why} for
    the regions whose worker could not give them. Runs from before the patch: as they were."""
    if not workflow.patched("restore-gaps-from-each-region"):
        return req, {}
    gaps, unread = await wal_gaps(runbook, topo)
    return req.model_copy(update={"gaps": gaps, "gaps_unread": list(unread)}), unread


async def wal_gaps(runbook, topo) -> tuple[list[WalGap], dict[str, str]]:
    """(every record read, {region: why} for those whose worker could not give them). The
    check reads those on its own host when it has them (TargetCheck.gaps_read_here). A region
    down is no reason to refuse a restore, which may be the way out of its loss: the run says
    what it could not check instead (``unread_note``)."""

    async def one(region) -> tuple[list[WalGap], str | None]:
        try:
            return await runbook.act(RestoreActivities.read_wal_gaps, region.name, queue=region.task_queue,
                                     timeout=30, schedule_to_start=30, attempts=2), None
        except ActivityError as e:
            return [], described(e)

    read = await asyncio.gather(*(one(r) for r in topo.regions))
    return ([g for gaps, _ in read for g in gaps],
            {r.name: why for r, (_, why) in zip(topo.regions, read) if why})


def unread_note(unread: dict[str, str], read_here: list[str]) -> str | None:
    """What the run must say about the regions whose gap records nobody could read."""
    missing = {r: why for r, why in unread.items() if r not in read_here}
    if not missing:
        return None
    return (f"the WAL-gap records of {', '.join(f'{r} ({why})' for r, why in missing.items())} could not be read: a "
            "gap in the archive that its guard recorded was not checked, and a restore across one stops at it "
            "(replay cannot go past missing WAL)")
