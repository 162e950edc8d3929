"""An operator's view of eagle-dr's schedules, and the levers: pause, unpause, trigger.

Pause and trigger are different things: a paused schedule takes no action at its slots (nor
catches them up once unpaused beyond the catch-up window), while ``trigger`` starts one run
now whatever the paused state (the overlap policy still applies: SKIP while one runs).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio.client import Client, ScheduleActionStartWorkflow, ScheduleOverlapPolicy
from temporalio.service import RPCError, RPCStatusCode

from eagle_dr.config import EagleConfig
from schedules.specs import OWNER_MEMO, human, prefix


class ScheduleRow(BaseModel):
    id: str
    action: str  # the workflow type and its input
    spec: str
    paused: bool
    note: str | None = None
    last_run: datetime | None = None
    last_workflow_id: str | None = None
    last_outcome: str | None = None  # the last run's workflow status: RUNNING, COMPLETED, FAILED, ...
    next_run: datetime | None = None
    actions: int = 0
    skipped_overlap: int = 0
    missed_catchup: int = 0


class UnknownSchedule(KeyError):
    pass


async def owned_ids(client: Client, cfg: EagleConfig) -> list[str]:
    """The ids of eagle-dr's schedules for this service (memo-marked), from the list API
    (eventually consistent: a schedule created a moment ago may be missing)."""
    ids = []
    async for s in await client.list_schedules():
        if not s.id.startswith(prefix(cfg.service)):
            continue
        owner = (await s.memo()).get(OWNER_MEMO)
        if isinstance(owner, dict) and owner.get("service") == cfg.service:
            ids.append(s.id)
    return sorted(ids)


async def row(client: Client, schedule_id: str) -> ScheduleRow:
    try:
        d = await client.get_schedule_handle(schedule_id).describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise UnknownSchedule(schedule_id) from None
        raise
    a = d.schedule.action
    action = a.workflow if isinstance(a, ScheduleActionStartWorkflow) else type(a).__name__
    if isinstance(a, ScheduleActionStartWorkflow) and a.args:
        arg = (await client.data_converter.decode(list(a.args)))[0] if a.args else None
        action += f" {arg}" if arg not in (None, {}) else ""
    spec = ", ".join(f"every {human(i.every)}" + (f" +{human(i.offset)}" if i.offset else "")
                     for i in d.schedule.spec.intervals) or "calendar"
    if d.schedule.spec.jitter:
        spec += f", jitter {human(d.schedule.spec.jitter)}"
    info = d.info
    last = info.recent_actions[-1] if info.recent_actions else None
    r = ScheduleRow(id=d.id, action=action, spec=spec, paused=d.schedule.state.paused, note=d.schedule.state.note,
                    next_run=info.next_action_times[0] if info.next_action_times else None,
                    actions=info.num_actions, skipped_overlap=info.num_actions_skipped_overlap,
                    missed_catchup=info.num_actions_missed_catchup_window)
    if last is not None:
        r.last_run, r.last_workflow_id = last.started_at, last.action.workflow_id
        try:
            wf = await client.get_workflow_handle(last.action.workflow_id,
                                                  run_id=last.action.first_execution_run_id).describe()
            r.last_outcome = wf.status.name if wf.status else None
        except RPCError:
            r.last_outcome = "unknown"
    return r


async def rows(client: Client, cfg: EagleConfig) -> list[ScheduleRow]:
    out = []
    for sid in await owned_ids(client, cfg):
        try:
            out.append(await row(client, sid))
        except UnknownSchedule:
            continue  # deleted since the list
    return out


def full_id(cfg: EagleConfig, name: str) -> str:
    """Accept either the id or its short name (``backup-incr`` for ``dr-<service>-backup-incr``)."""
    return name if name.startswith(prefix(cfg.service)) else prefix(cfg.service) + name


async def _handle(client: Client, cfg: EagleConfig, name: str):
    h = client.get_schedule_handle(full_id(cfg, name))
    try:
        await h.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise UnknownSchedule(h.id) from None
        raise
    return h


async def pause(client: Client, cfg: EagleConfig, name: str, note: str) -> str:
    h = await _handle(client, cfg, name)
    await h.pause(note=note)
    return h.id


async def unpause(client: Client, cfg: EagleConfig, name: str, note: str) -> str:
    h = await _handle(client, cfg, name)
    await h.unpause(note=note)
    return h.id


async def trigger(client: Client, cfg: EagleConfig, name: str, allow_overlap: bool = False) -> str:
    """One run now, paused or not. With SKIP (the default) nothing starts while a run is in flight."""
    h = await _handle(client, cfg, name)
    await h.trigger(overlap=ScheduleOverlapPolicy.ALLOW_ALL if allow_overlap else None)
    return h.id
