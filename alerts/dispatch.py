"""Handing incidents to Temporal: signal-with-start of AlertIncidentWorkflow.

Signal-with-start is atomic on the server: two posts of the same group racing each other
(Alertmanager retrying while the first attempt is still in flight, two Alertmanagers of an
HA pair) both land in one run. A notification larger than one signal is split; every part
is signalled-with-start too, so a part that arrives after the incident closed opens it
again rather than being dropped, and a retry of the whole notification is idempotent (the
workflow dedupes by fingerprint and startsAt).

Any failure to reach Temporal is ``TemporalUnavailable``: the receiver answers 503 and
Alertmanager retries, so nothing is lost while Temporal is down. The client connects lazily
and again after a failed connect, so the receiver starts (and answers 503) before Temporal is up.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy, \
    WorkflowIDReusePolicy
from temporalio.service import RPCError

from eagle_dr import logs
from eagle_dr.temporal import DR_RUNBOOK, DR_SERVICE, DR_TRIGGER, connect
from alerts.plan import Incident
from workflows.alert_incident import AlertIncidentWorkflow

log = logs.get("alerts.dispatch")


class TemporalUnavailable(RuntimeError):
    pass


class Dispatcher:
    def __init__(self, address: str | None, task_queue: str, timeout: timedelta, client: Client | None = None,
                 runtime=None, config=None):
        self.address = address
        # The config whose temporal.codec the client encrypts with (None: EAGLE_DR_CONFIG's).
        self.config = config
        # A runtime with a Prometheus exporter (the receiver's metrics endpoint), or the default.
        self.runtime = runtime
        self.task_queue = task_queue
        self.timeout = timeout
        self._client = client
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    # TEMPORAL_ADDRESS (envconfig) wins over the configured default, as for the workers.
                    self._client = await asyncio.wait_for(
                        connect(self.address, config=self.config,
                                **({"runtime": self.runtime} if self.runtime else {})),
                        self.timeout.total_seconds())
                except Exception as e:  # noqa: BLE001 - refused, timed out, TLS: all "unreachable"
                    raise TemporalUnavailable(f"cannot connect to Temporal: {e or type(e).__name__}") from e
        return self._client

    async def deliver(self, inc: Incident) -> None:
        client = await self.client()
        attrs = TypedSearchAttributes([SearchAttributePair(DR_RUNBOOK, "alert"),
                                       SearchAttributePair(DR_SERVICE, inc.input.service),
                                       SearchAttributePair(DR_TRIGGER, "alert")])
        for batch in inc.batches():
            try:
                await client.start_workflow(
                    AlertIncidentWorkflow.run, inc.input, id=inc.workflow_id, task_queue=self.task_queue,
                    start_signal="alerts", start_signal_args=[batch],
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    # A closed incident (all resolved) and the same group firing again: a new run.
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    search_attributes=attrs, rpc_timeout=self.timeout,
                    static_summary=f"alert incident {inc.input.service}: rule {inc.rule} ({inc.input.action.kind})")
            except RPCError as e:
                raise TemporalUnavailable(f"Temporal: {e.status.name if e.status else ''} {e.message}") from e
            except asyncio.TimeoutError as e:
                raise TemporalUnavailable("Temporal did not answer in time") from e
