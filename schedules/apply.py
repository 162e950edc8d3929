"""Make the namespace's Schedules match the config: create what is missing, update what
differs, leave equal ones alone, delete eagle-dr's own schedules the config no longer asks
for. Idempotent: a second run changes nothing.

"Equal" compares what the config decides (the action, the spec, the policies) as the server
stores them, so a schedule edited by hand in the UI is put back. The paused state is not
compared: pausing is an operator's act (a maintenance window), and a config sync must not undo it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
)
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from eagle_dr.codec import decode_in_place
from eagle_dr.config import EagleConfig
from eagle_dr.monitor import start_monitor
from eagle_dr.temporal import DR_SERVICE, DR_TRIGGER
from schedules.specs import OWNER_MEMO, DesiredSchedule, desired, prefix

log = structlog.get_logger(__name__)


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # The always-on monitor: "started <id>" or "already running <id>".
    monitor: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


def build(d: DesiredSchedule, paused: bool = False) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            d.workflow, d.input, id=d.id, task_queue=d.task_queue, execution_timeout=d.execution_timeout,
            # A failed run is not retried by the server: the next slot is the retry, and a
            # retry loop would only pile onto whatever made it fail.
            retry_policy=RetryPolicy(maximum_attempts=1),
            typed_search_attributes=TypedSearchAttributes([SearchAttributePair(DR_TRIGGER, "schedule")]),
            static_summary=d.description),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=d.every, offset=d.offset)], jitter=d.jitter),
        # SKIP: a backup still running when the next slot comes is not doubled (two backups of
        # one stanza only queue on pgBackRest's lock); the next slot after it ends runs.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=d.catchup_window,
                              pause_on_failure=False),
        state=ScheduleState(paused=paused, note="created paused by eagle-dr" if paused else None))


async def _stored(client: Client, schedule: Schedule):
    """The protobuf the server would store, without the state (see the module doc)."""
    from temporalio.api.enums.v1 import TaskQueueKind

    p = await schedule._to_proto(client)
    p.ClearField("state")
    # The server fills the one default we leave unset; the rest is stored as sent.
    tq = p.action.start_workflow.task_queue
    if not tq.kind:
        tq.kind = TaskQueueKind.TASK_QUEUE_KIND_NORMAL
    return p


async def apply(client: Client, cfg: EagleConfig, paused: bool | None = None) -> ApplyReport:
    """``paused``: create new schedules paused (default: the config's backup.schedules.paused)."""
    paused = cfg.backup.schedules.paused if paused is None else paused
    report = ApplyReport()
    wanted = desired(cfg)
    for d in wanted:
        sched = build(d, paused)
        handle = client.get_schedule_handle(d.id)
        try:
            current = await handle.describe()
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
            current = None
        if current is None:
            try:
                await client.create_schedule(
                    d.id, sched, memo=d.memo,
                    search_attributes=TypedSearchAttributes([SearchAttributePair(DR_SERVICE, cfg.service)]))
                report.created.append(d.id)
                log.info("schedule created", schedule=d.id, paused=paused)
                continue
            except ScheduleAlreadyRunningError:
                # Created by a concurrent apply between our describe and create.
                current = await handle.describe()
        have = current.raw_description.schedule
        have_cmp = type(have)()
        have_cmp.CopyFrom(have)
        have_cmp.ClearField("state")
        want = await _stored(client, sched)
        # Encrypted payloads (temporal.codec) differ on every encryption (a fresh nonce each
        # time): what they say is compared, not their ciphertext.
        codec = client.data_converter.payload_codec
        await decode_in_place(codec, [have_cmp])
        await decode_in_place(codec, [want])
        if have_cmp == want:
            report.unchanged.append(d.id)
            continue

        def keep_state(inp, sched=sched):
            sched.state = inp.description.schedule.state
            return ScheduleUpdate(schedule=sched)

        await handle.update(keep_state)
        report.updated.append(d.id)
        log.info("schedule updated", schedule=d.id)
    wanted_ids = {d.id for d in wanted}
    async for s in await client.list_schedules():
        if s.id in wanted_ids or not s.id.startswith(prefix(cfg.service)):
            continue
        memo = await s.memo()
        owner = memo.get(OWNER_MEMO)
        if not isinstance(owner, dict) or owner.get("service") != cfg.service:
            continue  # not ours: a schedule somebody made by hand under a similar id
        await client.get_schedule_handle(s.id).delete()
        report.deleted.append(s.id)
        log.info("schedule deleted (no longer in the config)", schedule=s.id)
    # The monitor is not a schedule (it never ends: a schedule would start it once and then
    # skip every slot), but it belongs to the same "what must always run" that apply syncs.
    handle, started = await start_monitor(client, cfg)
    report.monitor = f"{'started' if started else 'already running'} {handle.id}"
    if started:
        log.info("monitor started", workflow_id=handle.id)
    return report
