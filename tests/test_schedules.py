"""Temporal Schedules from the config, on the real dev server: apply is idempotent and
follows config changes; a paused schedule takes no action while trigger still runs it.

These need only the dev server (a schedule's action is a workflow start, which the server
records whether or not a worker runs it), and every schedule they make is created paused or
deleted at the end, so nothing fires into the session lab's other tests.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from temporalio.client import Client, ScheduleOverlapPolicy

from eagle_dr.monitor import monitor_id
from schedules.apply import apply, build
from schedules.control import pause, row, rows, trigger, unpause
from eagle_dr.temporal import DR_SOURCE_REGION, DR_TRIGGER
from schedules.specs import OWNER_MEMO, DesiredSchedule, desired, prefix
from tests.lab_helpers import _until

# asyncio_mode = auto, session loop (pyproject.toml): async tests need no mark.


async def _delete_owned(client: Client, cfg) -> None:
    for d in desired(cfg):
        try:
            await client.get_schedule_handle(d.id).delete()
        except Exception:  # noqa: BLE001 - not there
            pass
    # apply also starts the always-on monitor: not left watching the session lab.
    try:
        await client.get_workflow_handle(monitor_id(cfg.service)).terminate("schedules test over")
    except Exception:  # noqa: BLE001 - not running
        pass


def _with_backup(cfg, **changes):
    return cfg.model_copy(update={"backup": cfg.backup.model_copy(update=changes)})


async def test_apply_twice_gives_the_same_schedules_and_follows_config_changes(lab_cfg, client):
    cfg = lab_cfg
    ids = [d.id for d in desired(cfg)]
    assert ids == [f"dr-{cfg.service}-{s}" for s in ("backup-incr", "backup-full", "archive-guard", "redis-snapshot",
                                                      "expire", "restore-drill", "consistency-check")]
    foreign = f"{prefix(cfg.service)}hand-made"
    try:
        first = await apply(client, cfg, paused=True)
        assert first.created == ids and not first.updated and not first.deleted
        before = {i: await client.get_schedule_handle(i).describe() for i in ids}
        second = await apply(client, cfg, paused=True)
        assert second.unchanged == ids and not second.changed, second
        for i in ids:
            again = await client.get_schedule_handle(i).describe()
            assert again.raw_description.schedule == before[i].raw_description.schedule, i
            assert again.info.last_updated_at == before[i].info.last_updated_at, i

        incr = before[ids[0]].schedule
        assert incr.action.workflow == "BackupWorkflow" and incr.action.task_queue == cfg.temporal.control_task_queue
        assert (await client.data_converter.decode(list(incr.action.args)))[0] == {"type": "incr",
                                                                                   "trigger": "schedule"}
        assert [i.every for i in incr.spec.intervals] == [cfg.backup.every]
        assert incr.spec.jitter == timedelta(minutes=1)
        assert incr.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert incr.policy.catchup_window == cfg.backup.every
        assert incr.state.paused
        full = before[ids[1]].schedule
        assert (await client.data_converter.decode(list(full.action.args)))[0]["type"] == "full"
        assert [(i.every, i.offset) for i in full.spec.intervals] == [(cfg.backup.full_every, cfg.backup.every / 2)]
        drill = before[ids[-2]].schedule
        assert drill.action.workflow == "RestoreDrillWorkflow"
        assert (await client.data_converter.decode(list(drill.action.args)))[0] == {}
        check = before[ids[-1]].schedule
        assert check.action.workflow == "ConsistencyCheckWorkflow"
        assert [i.every for i in check.spec.intervals] == [cfg.consistency.every]
        assert check.policy.overlap == ScheduleOverlapPolicy.SKIP
        # The action names no node: only the control queue, and an input without a region.
        for d in before.values():
            assert not any(r in str(d.raw_description.schedule.action) for r in cfg.region_names)
            assert (await d.memo())[OWNER_MEMO]["service"] == cfg.service

        # An operator unpauses one; a schedule somebody made by hand under our prefix.
        await unpause(client, cfg, "expire", "test")
        await client.create_schedule(foreign, build(desired(cfg)[0], paused=True))

        changed = _with_backup(cfg, every=timedelta(minutes=10), redis_every=None)
        third = await apply(client, changed, paused=True)

        async def listed():
            # The list API is eventually consistent: a later apply sees what this one missed.
            r = await apply(client, changed, paused=True)
            return (third.deleted or r.deleted) and r

        fourth = await _until(listed, 30, "the redis schedule to be deleted", 0.5)
        assert third.updated == [ids[0], ids[1]], third  # the full's offset follows `every`
        assert set(third.deleted + fourth.deleted) == {f"{prefix(cfg.service)}redis-snapshot"}
        assert not fourth.created and not fourth.updated
        d = await client.get_schedule_handle(ids[0]).describe()
        assert [i.every for i in d.schedule.spec.intervals] == [timedelta(minutes=10)]
        assert d.schedule.state.paused, "apply must keep the paused state"
        assert not (await client.get_schedule_handle(ids[4]).describe()).schedule.state.paused
        # Not ours (no memo): left alone.
        await client.get_schedule_handle(foreign).describe()
    finally:
        await _delete_owned(client, cfg)
        try:
            await client.get_schedule_handle(foreign).delete()
        except Exception:  # noqa: BLE001
            pass


async def test_a_paused_schedule_takes_no_action_and_trigger_still_runs_it(lab_cfg, client):
    """A schedule firing every 2 s: running, it starts workflows; paused, none for several
    intervals; triggered while paused, exactly one; unpaused, it runs again."""
    cfg = lab_cfg
    every = timedelta(seconds=2)
    probe = DesiredSchedule(
        id=f"{prefix(cfg.service)}test-probe", workflow="ScheduleProbe", input={}, every=every, offset=timedelta(0),
        jitter=timedelta(0), catchup_window=timedelta(seconds=10), task_queue="eagle-dr-test-nobody",
        # No worker polls the queue: each run times out after 1 s, before the next slot, so
        # SKIP never hides a slot and every slot shows as an action.
        execution_timeout=timedelta(seconds=1), description="test probe",
        memo={OWNER_MEMO: {"service": cfg.service, "schedule": "test-probe"}})
    handle = await client.create_schedule(probe.id, build(probe), memo=probe.memo)
    try:
        async def actions(n):
            async def enough():
                d = await handle.describe()
                return d if d.info.num_actions >= n else None
            return enough

        await _until(await actions(2), 30, "two scheduled runs")
        await pause(client, cfg, "test-probe", "test: paused")
        paused_at = (await handle.describe()).info.num_actions
        # A negative needs a window: five intervals, polled, and no action in any of them.
        watch_until = time.monotonic() + 5 * every.total_seconds()
        while time.monotonic() < watch_until:
            d = await handle.describe()
            assert d.schedule.state.paused and d.info.num_actions == paused_at, "a paused schedule ran"
            await asyncio.sleep(0.5)
        r = await row(client, probe.id)
        assert r.paused and r.note == "test: paused" and r.actions == paused_at

        await trigger(client, cfg, "test-probe")
        d = await _until(await actions(paused_at + 1), 15, "the triggered run")
        assert d.schedule.state.paused and d.info.num_actions == paused_at + 1
        triggered = d.info.recent_actions[-1]
        assert triggered.action.workflow_id.startswith(probe.id)

        listed = await _until(lambda: _probe_row(client, cfg, probe.id), 30, "the probe in `schedules list`", 0.5)
        assert listed.paused and listed.last_workflow_id == triggered.action.workflow_id
        assert listed.last_outcome in ("RUNNING", "TIMED_OUT")

        await unpause(client, cfg, "test-probe", "test: unpaused")
        await _until(await actions(paused_at + 3), 30, "runs after unpausing")
    finally:
        await handle.delete()


async def _probe_row(client, cfg, sid):
    return next((r for r in await rows(client, cfg) if r.id == sid), None)


async def test_triggered_schedules_run_the_real_workflows_and_list_shows_the_outcome(lab, client):
    """The schedules' inputs are what the workflows accept: a triggered incremental backup
    and expire complete on the lab's workers, and `schedules list` reports it."""
    cfg = lab.cfg
    await apply(client, cfg, paused=True)
    try:
        for name in ("backup-incr", "expire"):
            sid = await trigger(client, cfg, name)
            h = client.get_schedule_handle(sid)

            async def started(h=h):
                d = await h.describe()
                return d.info.recent_actions[-1] if d.info.recent_actions else None

            action = await _until(started, 30, f"{name} to start", 0.2)
            result = await client.get_workflow_handle(action.action.workflow_id).result()
            assert result["outcome"] in ("succeeded", "degraded"), result
            r = await row(client, sid)
            assert r.paused and r.last_outcome == "COMPLETED" and r.last_workflow_id == action.action.workflow_id
        backup = await client.get_workflow_handle(
            (await row(client, f"dr-{cfg.service}-backup-incr")).last_workflow_id).describe()
        # Temporal tags scheduled runs; the workflow found the primary itself.
        assert backup.typed_search_attributes.get(DR_TRIGGER) == "schedule"
        assert backup.typed_search_attributes.get(DR_SOURCE_REGION) in cfg.region_names
    finally:
        await _delete_owned(client, cfg)


async def test_cli_apply_is_idempotent_and_lists_the_schedules(lab_cfg, lab_config_path, client):
    import json
    import subprocess
    import sys

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(lab_config_path), "schedules", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + r.stdout
        return r.stdout

    ids = sorted(d.id for d in desired(lab_cfg))
    try:
        first = cli("apply", "--paused")
        assert "created: " in first and f"monitor: started {monitor_id(lab_cfg.service)}" in first, first
        again = cli("apply", "--paused")
        assert again.startswith("unchanged: ") and "created" not in again and "updated" not in again
        assert f"monitor: already running {monitor_id(lab_cfg.service)}" in again, again

        async def listed():
            # The list API is eventually consistent.
            rows_ = json.loads(cli("list", "--json"))
            return rows_ if sorted(r["id"] for r in rows_) == ids else None

        rows_ = await _until(listed, 30, "every schedule in `schedules list`", 0.5)
        assert all(r["paused"] and r["spec"].startswith("every ") for r in rows_)
        assert "paused dr-" in cli("pause", "backup-full", "--note", "test")
        assert "unpaused dr-" in cli("unpause", "backup-full")
        assert not (await client.get_schedule_handle(f"dr-{lab_cfg.service}-backup-full").describe()
                    ).schedule.state.paused
    finally:
        await _delete_owned(client, lab_cfg)


async def _trigger_and_wait(client, cfg, name: str) -> dict:
    h = client.get_schedule_handle(f"{prefix(cfg.service)}{name}")
    before = (await h.describe()).info.num_actions
    await trigger(client, cfg, name)

    async def started():
        d = await h.describe()
        return d.info.recent_actions[-1] if d.info.num_actions > before and d.info.recent_actions else None

    action = await _until(started, 30, f"{name} to start", 0.2)
    return await client.get_workflow_handle(action.action.workflow_id).result()


async def test_the_same_schedules_follow_a_switchover(lab, client):
    """No schedule names a node: after a switchover the same schedules back up the new
    primary (from the old one, now its streaming standby, on the new timeline) and snapshot
    the new Redis master."""
    from eagle_dr.launch import start_move
    from tests.lab_helpers import _primary
    from workflows.models import SwitchoverInput

    cfg = lab.cfg
    a = _primary(lab)
    b = cfg.other(a).name
    await apply(client, cfg, paused=True)
    specs_before = {d.id: (await client.get_schedule_handle(d.id).describe()).raw_description.schedule
                    for d in desired(cfg)}
    try:
        first = await _trigger_and_wait(client, cfg, "backup-incr")
        assert first["outcome"] == "succeeded" and first["primary_region"] == a, first
        moved = await (await start_move(client, cfg, SwitchoverInput(service=cfg.service, target_region=b))).result()
        assert moved.outcome == "succeeded" and _primary(lab) == b

        async def streaming():
            from activities.postgres.status import pg_status
            return pg_status(cfg.region(a).postgres).receiver_status == "streaming"

        await _until(streaming, 60, f"{a} to stream from {b}", 0.5)
        second = await _trigger_and_wait(client, cfg, "backup-incr")
        assert second["outcome"] == "succeeded", second
        assert second["primary_region"] == b and second["source_region"] == a and second["from_standby"]
        # The new primary's timeline: WAL file names start with the timeline id.
        tl = lambda r: int(r["backups"][0]["wal_start"][:8], 16)  # noqa: E731
        assert tl(second) > tl(first)
        snap = await _trigger_and_wait(client, cfg, "redis-snapshot")
        assert snap["master_region"] == b and snap["outcome"] == "succeeded", snap
        for sid, spec in specs_before.items():
            assert (await client.get_schedule_handle(sid).describe()).raw_description.schedule == spec, sid
    finally:
        try:
            if _primary(lab) != a:
                back = await (await start_move(client, cfg, SwitchoverInput(service=cfg.service, target_region=a))
                              ).result()
                assert back.outcome == "succeeded"
        finally:
            await _delete_owned(client, cfg)


def test_the_config_switches_schedules_off_and_bounds_jitter_and_catch_up(lab_cfg):
    off = _with_backup(lab_cfg, redis_every=None, expire_every=None, restore_drill_every=None,
                       archive_guard_every=None)
    off = off.model_copy(update={"consistency": off.consistency.model_copy(update={"every": None})})
    assert [d.id.removeprefix(prefix(lab_cfg.service)) for d in desired(off)] == ["backup-incr", "backup-full"]
    fast = _with_backup(lab_cfg, every=timedelta(minutes=5))
    incr = desired(fast)[0]
    # Jitter at most a tenth of the interval; a miss older than one interval is not made up.
    assert incr.jitter == timedelta(seconds=30) and incr.catchup_window == timedelta(minutes=5)
    full = desired(fast)[1]
    assert full.catchup_window == timedelta(days=1) and full.offset == timedelta(minutes=2, seconds=30)



@pytest.mark.parametrize("backup, field", [({"schedules": {"catchup_window": "5s"}}, "catchup_window"),
                                           ({"restore_drill_every": "0s"}, "restore_drill_every"),
                                           ({"schedules": {"jitter": "1m", "colour": 1}}, "colour")])
def test_bad_schedule_config_names_the_field(tmp_path, backup, field):
    import yaml

    from eagle_dr.config import ConfigError, DEFAULT_CONFIG, load_config

    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    doc["backup"].update(backup)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert field in str(e.value)
