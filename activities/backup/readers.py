"""Which runs read the backup repos now, as Temporal's visibility lists them.

An expire deletes backup sets and the WAL between them. A restore reading one of them then
fails half-way, or replays less than it was asked and stops short of its target. pgBackRest
has no read lock, so the runbooks make one out of visibility: every restore is a running
RestoreWorkflow or RestoreDrillWorkflow of the service, and an expirer lists them, under the
expiry lock (workflows/repo_lock.py), before it deletes anything. A restore first waits until
it is itself listed, so that an expirer that takes the lock after it cannot miss it.

A listed restore is asked (query ``reads_backups``) whether it reads the buckets now: most of
a restore's life is an idle copy kept for hours, or an approval that may wait days, and
expiry must not stop for that. A restore that does not answer (no worker, a run from before
the query existed) counts as reading.

Both activities run on the control worker: they only talk to the Temporal service, through the
worker's own client (which is why they are ``async``: only those get one).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.api.workflowservice.v1 import GetClusterInfoRequest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.backup.left_copies import LeftCopy
from eagle_dr.temporal import DR_SERVICE

# Every workflow type that runs `pgbackrest restore` (RestoreWorkflow's modes, the restore
# drill). A rename here without the old name breaks the lock for runs started before it.
READER_TYPES = ("RestoreWorkflow", "RestoreDrillWorkflow")
READING_QUERY = "reads_backups"
# Once listed, a restore must stay listed this long before it goes on: with Elasticsearch each
# shard copy refreshes on its own (about every second), and a query served by a copy that has
# not refreshed yet would miss a run an earlier query found. An SQL visibility store is one
# database: what one query found, every later one finds, and the restore goes on at once.
LISTED_SETTLE_SECONDS = 2.0
SQL_VISIBILITY = ("sqlite", "postgres", "postgres12", "postgres12_pgx", "mysql", "mysql8")


class ReadersRequest(BaseModel):
    service: str
    # The caller itself, when it is one of the types (it never defers to itself).
    exclude: str | None = None


_CLOSED = {WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.FAILED, WorkflowExecutionStatus.CANCELED,
           WorkflowExecutionStatus.TERMINATED, WorkflowExecutionStatus.CONTINUED_AS_NEW,
           WorkflowExecutionStatus.TIMED_OUT}


class CopiesInUseRequest(BaseModel):
    copies: list[LeftCopy]


class ListedRequest(BaseModel):
    service: str
    workflow_id: str
    run_id: str
    timeout_seconds: float = Field(default=120, gt=0, le=3600)


def readers_query(service: str) -> str:
    if "'" in service or "\\" in service:
        # Config validation forbids these; a query built from one would match something else.
        raise ValueError(f"service name {service!r} cannot be quoted in a visibility query")
    types = ", ".join(f"'{t}'" for t in READER_TYPES)
    return f"WorkflowType IN ({types}) AND ExecutionStatus = 'Running' AND {DR_SERVICE.name} = '{service}'"


class RepoReaderActivities:
    @activity.defn
    async def list_repo_readers(self, req: ReadersRequest) -> list[str]:
        """The ids of the service's restores running now (at most 20 named: one is enough to
        defer an expiry)."""
        client = activity.client()
        listed = [wf async for wf in client.list_workflows(readers_query(req.service), limit=100)
                  if wf.id != req.exclude]
        activity.heartbeat({"asking": len(listed)})

        async def reading(wf) -> bool:
            try:
                return await client.get_workflow_handle(wf.id, run_id=wf.run_id).query(
                    READING_QUERY, rpc_timeout=timedelta(seconds=10)) is not False
            except Exception as e:  # noqa: BLE001 - no answer: it may be reading, and that is what counts
                activity.logger.info("restore did not say whether it reads the buckets", extra={
                    "restore": wf.id, "error": type(e).__name__})
                return True

        # All at once: one bound for all, however many do not answer.
        answers = await asyncio.gather(*(reading(wf) for wf in listed))
        return [wf.id for wf, yes in zip(listed, answers) if yes][:20]

    @activity.defn
    async def copies_in_use(self, req: CopiesInUseRequest) -> list[str]:
        """Of these scratch copies, the names of those still in use: another namespace's (not
        this worker's to judge), or owned by a workflow with a running execution, as Temporal
        says when asked for it (not visibility: a listing may lag minutes behind a run). Any
        doubt (an error, no answer) keeps the copy."""
        client = activity.client()
        here = activity.info().workflow_namespace

        async def in_use(c: LeftCopy) -> bool:
            if c.owner.namespace != here:
                return True
            try:
                desc = await client.get_workflow_handle(c.owner.workflow_id).describe(
                    rpc_timeout=timedelta(seconds=10))
            except RPCError as e:
                return e.status != RPCStatusCode.NOT_FOUND  # never started here, or its history is gone
            except Exception:  # noqa: BLE001 - no answer: kept
                return True
            # Closed, by name: any other status (running, or one a newer server adds, such as
            # paused) keeps the copy.
            return desc.status not in _CLOSED

        answers = await asyncio.gather(*(in_use(c) for c in req.copies))
        return [c.name for c, yes in zip(req.copies, answers) if yes]

    @activity.defn
    async def wait_listed_as_reader(self, req: ListedRequest) -> float | None:
        """Seconds until this run was listed by the query expirers use (and stayed listed for
        LISTED_SETTLE_SECONDS); None when it was not by ``timeout_seconds`` (visibility lagging
        far behind: the caller says so)."""
        client = activity.client()
        query = f"{readers_query(req.service)} AND RunId = '{req.run_id}'"
        settle = LISTED_SETTLE_SECONDS
        try:
            info = await client.workflow_service.get_cluster_info(GetClusterInfoRequest(),
                                                                  timeout=timedelta(seconds=10))
            if info.visibility_store.lower() in SQL_VISIBILITY:
                settle = 0.0
        except Exception as e:  # noqa: BLE001 - unknown store: the settle, the safe side
            activity.logger.info("visibility store unknown", extra={"error": type(e).__name__})
        started, seen = time.monotonic(), None
        while True:
            listed = False
            async for wf in client.list_workflows(query, limit=1):
                listed = wf.id == req.workflow_id
            if not listed:
                seen = None
            elif seen is None:
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= settle:
                return round(seen - started, 3)
            if time.monotonic() - started > req.timeout_seconds:
                return None
            activity.heartbeat({"waiting": "to be listed as a restore"})
            # Visibility usually lists a run within tens of milliseconds: look often at first.
            await asyncio.sleep(0.05 if time.monotonic() - started < 2 else 0.5)


__all__ = ["READER_TYPES", "READING_QUERY", "ListedRequest", "ReadersRequest", "RepoReaderActivities", "readers_query"]
