"""Run one runbook with ONE fault injected at a named point, then check the invariants.

A fault is (name, runbook, injection point, how to inject, how to heal). The point is a step
as the runbook's ``progress`` query names it ("promote", "fence old primary", "rewind" ...):
the fault goes in while that step runs, found by polling with a deadline. A step that is
over before a poll sees it is caught at the next one: the row records the step that was
really running. ``BEFORE`` injects before the run starts, ``AFTER`` once it has ended.

After the run (succeeded, degraded, failed or cancelled: recorded as such) the fault is
healed, the invariants are checked on the state the run left, the lab is put back to the
reference topology (tests/faults/restore.py), and the invariants are checked again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psycopg
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError
from temporalio.service import RPCError

from activities.postgres.status import pg_status
from activities.routing import LabRouter
from eagle_dr.devserver import DevServer
from eagle_dr.launch import start_move
from lab.processes import kill_tree, read_pid, wait_gone
from tests.faults.invariants import INVARIANTS, Check, check_acked_writes, check_audit, check_cancel_answered, check_one_redis_master, \
    check_one_writable_pg, check_routing, redis_takes_writes, writable_postgres
from tests.faults.restore import restore_reference
from tests.faults.writer import AckedWriter
from tests.lab_helpers import _async, _fork, _lag_bytes, _progress, _until
from workflows.failback import FailbackInput, FailbackWorkflow
from workflows.models import FailoverInput, SwitchoverInput
from workflows.runbook import move_id
from workflows.split_brain import SplitBrainInput, SplitBrainWorkflow

BEFORE, AFTER = "(before the run)", "(after the run)"
# Right after the run started (a monitor has no steps: it watches in rounds).
RUNNING = "(while it runs)"
RUN_TIMEOUT_S = 600


@dataclass
class Ctx:
    lab: object
    client: object
    writer: AckedWriter | None = None
    handle: WorkflowHandle | None = None
    # Fault state kept between inject and heal (pids to SIGCONT, a monitor's handle, ...).
    state: dict = field(default_factory=dict)
    extra_acked: list[int] = field(default_factory=list)
    extra_checks: dict[str, Check] = field(default_factory=dict)

    @property
    def home(self) -> str:
        return self.lab.cfg.primary.name

    @property
    def away(self) -> str:
        return self.lab.cfg.secondary.name


Action = Callable[[Ctx], Awaitable[None]]


async def _nothing(ctx: Ctx) -> None:
    return None


@dataclass(frozen=True)
class Fault:
    name: str
    runbook: str
    point: str
    inject: Action
    heal: Action = _nothing
    heal_at: str = "now"  # now: right after injecting | end: once the run has ended
    slow: bool = False
    xfail: str | None = None
    # The run may end failed with this error type, provided it failed safe: its message says
    # what it left stopped and how to repair it (a fault past what any runbook can settle,
    # such as the worker that alone can prove a promotion did not happen staying dead). Until
    # that repair nothing may take writes, so the acknowledged writes are checked after it.
    fails_safe_as: str | None = None
    # Before the run: set up what the scenario needs beyond the reference topology.
    input_overrides: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.runbook}|{self.point}|{self.name}".replace(" ", "_")


# -- the runbooks, as scenarios that start from the reference topology ----------------------


@dataclass(frozen=True)
class Scenario:
    runbook: str
    steps: tuple[str, ...]
    prepare: Action
    start: Callable[[Ctx, dict], Awaitable[WorkflowHandle]]
    # Failback and split brain keep the loser's rows only once it is resolved: their acked
    # writes are judged after the lab is back (a cancelled failback leaves them, fenced, on the
    # old primary, and the restoring failback keeps them).
    acked_after_restore: bool = False
    audited: bool = False
    # A run that never ends by itself (the monitor): how to end it, returning the outcome.
    until_end: Callable[[Ctx], Awaitable[str]] | None = None


async def _start_failover(ctx: Ctx, kw: dict) -> WorkflowHandle:
    return await start_move(ctx.client, ctx.lab.cfg, FailoverInput(**{
        "service": ctx.lab.cfg.service, "target_region": ctx.away, "reason": "fault injection", **kw}))


async def _start_switchover(ctx: Ctx, kw: dict) -> WorkflowHandle:
    return await start_move(ctx.client, ctx.lab.cfg, SwitchoverInput(**{
        "service": ctx.lab.cfg.service, "target_region": ctx.away, "reason": "fault injection", **kw}))


async def _prepare_fork(ctx: Ctx) -> None:
    """The home region dies with writes the standby never got, failover to the other, and the
    old primary comes back writable and diverged (tests/lab_helpers._fork)."""
    key = 9_700_000_000 + (uuid.uuid4().int % 10**5) * 10
    ctx.extra_acked += [key, key + 1]
    await _fork(ctx.lab, ctx.client, [(
        "insert into alerts (id, region, payload) values (%s, 'old', '{}'), (%s, 'old', '{}')", (key, key + 1))])


async def _start_failback(ctx: Ctx, kw: dict) -> WorkflowHandle:
    return await ctx.client.start_workflow(
        FailbackWorkflow.run, FailbackInput(**{"service": ctx.lab.cfg.service, "region": ctx.home, **kw}),
        id=f"failback-fault-{uuid.uuid4()}", task_queue=ctx.lab.cfg.temporal.control_task_queue)


def _sql(lab, region: str, *statements) -> None:
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        for s in statements:
            conn.execute(*s) if isinstance(s, tuple) else conn.execute(s)


async def _prepare_split(ctx: Ctx) -> None:
    """A real split brain: the standby promoted by hand while the primary takes writes, a row
    changed on both sides (a conflict to audit), a row only on each, a second Redis master."""
    from tests.test_split_brain import _rogue_master

    lab, a, b = ctx.lab, ctx.home, ctx.away
    n = 9_800_000_000 + (uuid.uuid4().int % 10**5) * 10
    _sql(lab, a, ("insert into alerts (id, region, payload) values (%s, 'seed', '{}')", (n,)),
         "select pg_switch_wal()")
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    _sql(lab, b, "select pg_promote()")
    await _until(_async(lambda: pg_status(lab.cfg.region(b).postgres).role == "primary"), 30, "the rogue promotion")
    _sql(lab, a, ("update alerts set payload = '{\"side\": \"a\"}' where id = %s", (n,)),
         ("insert into alerts (id, region, payload) values (%s, 'a', '{}')", (n + 1,)))
    _sql(lab, b, ("update alerts set payload = '{\"side\": \"b\"}' where id = %s", (n,)),
         ("insert into alerts (id, region, payload) values (%s, 'b', '{}')", (n + 2,)))
    ctx.extra_acked += [n, n + 1, n + 2]
    _rogue_master(lab, b).set(f"fault:{n}:only-b", "b")


async def _start_split(ctx: Ctx, kw: dict) -> WorkflowHandle:
    return await ctx.client.start_workflow(
        SplitBrainWorkflow.run, SplitBrainInput(**{"service": ctx.lab.cfg.service, "reason": "fault injection", **kw}),
        id=move_id(ctx.lab.cfg.service), task_queue=ctx.lab.cfg.temporal.control_task_queue)


async def _monitor_state(handle):
    from workflows.monitor import MonitorState

    try:
        return await handle.query("monitor_state", result_type=MonitorState)
    except Exception:  # noqa: BLE001 - not started yet, or the server is restarting
        return None


async def _start_monitor(ctx: Ctx, kw: dict) -> WorkflowHandle:
    """The monitor with automatic failover on, once it has seen the primary up from everywhere."""
    from workflows.monitor import MonitorInput, MonitorWorkflow

    h = await ctx.client.start_workflow(MonitorWorkflow.run, MonitorInput(**{
        "service": ctx.lab.cfg.service, "interval_seconds": 1, "failure_threshold": 2, "auto_failover": True, **kw}),
        id=f"monitor-fault-{uuid.uuid4()}", task_queue=ctx.lab.cfg.temporal.control_task_queue)
    ctx.state["t0"] = time.time()

    async def healthy():
        st = await _monitor_state(h)
        return st if st and st.rounds >= 1 and st.votes and set(st.votes.values()) == {"up"} else None

    ctx.state["rounds0"] = (await _until(healthy, 60, "the monitor's first healthy round")).rounds
    return h


async def _watch_then_stop(ctx: Ctx) -> str:
    """More rounds than the failure threshold with the fault in place; the monitor must still
    run and must not have started a failover. Then it is ended (terminate: a test's end)."""
    from temporalio.client import WorkflowExecutionStatus

    h = ctx.handle

    async def enough():
        st = await _monitor_state(h)
        return st if st and st.rounds >= ctx.state["rounds0"] + st.failure_threshold + 3 else None

    st = await _until(enough, 120, "more monitor rounds than its failure threshold")
    status = (await h.describe()).status
    moved = await _moves_since(ctx, ctx.state["t0"])
    ctx.extra_checks["monitor: no false failover"] = Check(
        st.failovers_started == 0 and not moved and status == WorkflowExecutionStatus.RUNNING,
        f"monitor {status.name} after {st.rounds} rounds; failovers started {st.failovers_started}; moves since: "
        f"{moved or 'none'}; findings {st.findings[-3:]}")
    await h.terminate("fault test over")
    return f"watched {st.rounds} rounds"


async def _moves_since(ctx: Ctx, t0: float) -> list[str]:
    try:
        desc = await ctx.client.get_workflow_handle(move_id(ctx.lab.cfg.service)).describe()
    except RPCError:
        return []
    return [desc.workflow_type] if desc.start_time.timestamp() >= t0 else []


async def _start_drill(ctx: Ctx, kw: dict) -> WorkflowHandle:
    from eagle_dr.launch import start_drill
    from workflows.drill import DrillInput

    return await start_drill(ctx.client, ctx.lab.cfg, DrillInput(**{
        # The restore drill at a drill's end is no move: faults are injected into the moves, and
        # it would add a backup and a restore to every run of the suite.
        "service": ctx.lab.cfg.service, "probe_interval_seconds": 0.5, "failure_threshold": 2,
        "restore_drill": False, **kw}))


SCENARIOS = {
    "failover": Scenario("failover", ("preflight", "take DR epoch", "fence old primary", "promote",
                                      "re-route traffic", "verify", "measure RTO/RPO"), _nothing, _start_failover),
    # Routing's step starts with the promote step (it waits for the target to take writes);
    # Redis moves once PostgreSQL is promoted. The replay wait is inside "promote" since
    # switchover-promote-when-replayed.
    "switchover": Scenario("switchover", ("preflight", "take DR epoch", "reserve WAL on the standby",
                                          "stop writes on old primary", "promote", "re-route traffic", "move Redis",
                                          "verify", "old primary becomes standby", "measure RTO/RPO"),
                           _nothing, _start_switchover),
    "failback": Scenario("failback", ("preflight", "measure what", "reconcile diverged rows", "rewind",
                                      "preserve and re-attach Redis", "switch over back"),
                         _prepare_fork, _start_failback, acked_after_restore=True, audited=True),
    "split-brain": Scenario("split-brain", ("detect", "decide the survivor", "fence", "preserve and re-attach Redis",
                                            "measure what", "reconcile diverged rows", "rewind", "verify"),
                            _prepare_split, _start_split, acked_after_restore=True, audited=True),
    "monitor": Scenario("monitor", (), _nothing, _start_monitor, until_end=_watch_then_stop),
    # The drill kills the region it switched to and fails over, then fails back: its loser's
    # rows come back through failback, so acked writes are judged once it is all over.
    "drill": Scenario("drill", ("switchover", "outage", "detect", "failover", "failback"), _nothing, _start_drill,
                      acked_after_restore=True),
}


# -- running one fault ------------------------------------------------------------------------


@dataclass
class Row:
    fault: Fault
    injected_at: str = ""
    outcome: str = ""
    checks: dict[str, Check] = field(default_factory=dict)
    restored: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: str = ""

    @property
    def violated(self) -> list[str]:
        return [k for k, c in self.checks.items() if c.held is False and not c.reported]

    def explain(self) -> str:
        lines = [f"{self.fault.name} in {self.fault.runbook} at {self.injected_at}: run {self.outcome}"]
        lines += [f"  {k}: {c.cell}: {c.evidence}" for k, c in self.checks.items()]
        if self.report:
            lines.append(f"  report: {self.report}")
        return "\n".join(lines)


ROWS: list[Row] = []


async def _reached(handle: WorkflowHandle, point: str, order: tuple[str, ...]) -> str:
    """Until ``point`` runs (or a later step has started: the point was too quick to see)."""
    idx = next((i for i, s in enumerate(order) if s == point), None)

    async def seen():
        p = await _progress(handle)
        if p is None:
            return None
        for s in p.steps:
            if s.name.startswith(point) and s.status == "running":
                return s.name
        if idx is not None:
            later = [s.name for s in p.steps if any(s.name.startswith(o) for o in order[idx + 1:])]
            if later or any(s.name.startswith(point) for s in p.steps):
                return f"{point} (too quick to see: at {p.steps[-1].name})"
        if p.outcome:
            raise AssertionError(f"the run ended ({p.outcome}) before {point!r}: "
                                 f"{[(s.name, s.status) for s in p.steps]}")
        return None

    return await _until(seen, 300, f"step {point!r}", interval=0.02)


async def _wait_end(handle: WorkflowHandle) -> tuple[str, object]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        try:
            res = await asyncio.wait_for(handle.result(), max(1, deadline - time.monotonic()))
        except WorkflowFailureError as e:
            if isinstance(e.cause, CancelledError):
                return "cancelled", None
            return f"failed: {_short(e.cause)}", None
        except RPCError:
            # The dev server is down or restarting: the history is still there.
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        except asyncio.TimeoutError:
            await handle.terminate("fault suite: the run did not end in time")
            return f"NEVER ENDED in {RUN_TIMEOUT_S}s (terminated)", None
        outcome = getattr(res, "outcome", None) or "ended"
        if getattr(res, "cancel_refused", None):
            outcome += " (cancel refused)"
        return outcome, res


async def _failure_message(handle: WorkflowHandle) -> str:
    """The whole message a failed run ended with (the outcome column holds its first 160 characters)."""
    try:
        await handle.result()
    except WorkflowFailureError as e:
        return str(getattr(e.cause, "message", None) or e.cause or e)
    return ""


def _short(e) -> str:
    text = str(getattr(e, "cause", None) or e)
    return (getattr(e, "type", None) or type(e).__name__) + ": " + text.splitlines()[0][:160] if text else type(e).__name__


def _rpo(result):
    rpo = getattr(result, "rpo", None)
    if rpo is None and getattr(result, "failover", None) is not None:
        rpo = result.failover.rpo  # the drill's
    if rpo is None and getattr(result, "switchover", None) is not None:
        rpo = result.switchover.rpo
    return rpo


def _summary(result) -> str:
    """What the run reported that bears on the invariants: RPO, degraded parts, what failback kept."""
    if result is None:
        return ""
    out = []
    for name in ("failover", "switchover", "failback"):
        part = getattr(result, name, None)
        if part is not None and part is not result:
            out.append(f"{name}: {_summary(part)}")
    if (rpo := getattr(result, "rpo", None)) is not None:
        out.append(f"rpo lost_commits={rpo.lost_commits} lost_wal_bytes={rpo.lost_wal_bytes} met={rpo.met} "
                   f"acked_lost={rpo.acknowledged_writes_lost}")
    if (rec := getattr(result, "reconciliation", None)) is not None:
        out.append(f"reconciled (written, conflicts, flagged)={rec.totals()}")
    if (div := getattr(result, "divergence", None)) is not None:
        out.append(f"lost commits after the fork={div.lost.lost_commits}")
    if degraded := getattr(result, "degraded", None):
        out.append(f"degraded: {degraded}")
    return "{" + "; ".join(out) + "}"


class _Acked:
    """The writer's acked ids plus the rows a scenario wrote itself."""

    def __init__(self, writer: AckedWriter, extra: list[int]):
        self.writer, self.extra = writer, extra

    def acked_ids(self) -> list[int]:
        return sorted(set(self.writer.acked_ids()) | set(self.extra))

    def where(self, ids: list[int]) -> str:
        """Where and when the missing writes were acknowledged (seconds after the first)."""
        w = self.writer
        t0 = min(w.acked.values(), default=0)
        regions = sorted({w.region_of.get(i, "scenario") for i in ids})
        times = [w.acked[i] - t0 for i in ids if i in w.acked]
        span = f", acked {min(times):.1f}-{max(times):.1f}s after the first" if times else ""
        return f"; acked on {', '.join(regions)}{span}"


def _phase(checks: dict[str, Check], phase: str, new: dict[str, Check]) -> None:
    """Merge one phase's checks in: violated in any phase is violated; evidence from each."""
    for k, c in new.items():
        old = checks.get(k)
        evidence = f"[{phase}] {c.evidence}"
        if old is None:
            checks[k] = Check(c.held, evidence, c.reported)
            continue
        held = False if False in (old.held, c.held) else None if old.held is None and c.held is None else True
        reported = held is False and all(x.reported for x in (old, c) if x.held is False)
        checks[k] = Check(held, f"{old.evidence} | {evidence}", reported)


async def _steps_after_cancel(handle: WorkflowHandle) -> int | None:
    """Activities scheduled after the cancel request's event in the run's history (None: no
    such event, the request never landed)."""
    seen, after = False, 0
    async for e in handle.fetch_history_events():
        if e.HasField("workflow_execution_cancel_requested_event_attributes"):
            seen = True
        elif seen and e.HasField("activity_task_scheduled_event_attributes"):
            after += 1
    return after if seen else None


def _dangers(lab) -> dict[str, object]:
    """Who takes PostgreSQL and Redis writes, and where routing points: the state a cancelled
    run must leave as it found it."""
    return {"one writable pg": writable_postgres(lab)[0],
            "one unfenced redis master": [r.name for r in lab.cfg.regions if redis_takes_writes(lab, r.name)[0]],
            "routing = primary": LabRouter(lab.state).active_region()}


async def _left_as_found(handle: WorkflowHandle, checks: dict[str, Check], before: dict, after: dict) -> None:
    """A run cancelled before its point of no return changes nothing, by contract: a split brain
    the scenario made before the run (failback's revived old primary, split brain's two
    writers) is still there. That is held, if the state is exactly as found and the run's own
    report says what it left (runbook.Runbook.cancelled's "LEFT AS FOUND")."""
    try:
        meta = await handle.query("__temporal_workflow_metadata")
        details = (meta.get("currentDetails") if isinstance(meta, dict) else getattr(meta, "current_details", "")) \
            or ""
    except Exception as e:  # noqa: BLE001 - the evidence says why it was not read
        details = f"(details unreadable: {e})"
    for k, c in checks.items():
        if k in before and c.held is False and before[k] == after[k]:
            said = "LEFT AS FOUND" in details
            checks[k] = Check(said, f"as found before the run ({before[k]}), cancelled before the point of no "
                                    f"return; " + ("the report says so" if said else
                                                   f"but the report does not say it: {details[-200:]!r}") +
                              f" | {c.evidence}")


async def run_fault(lab, client, fault: Fault) -> Row:
    scen = SCENARIOS[fault.runbook]
    row = Row(fault)
    t0 = time.monotonic()
    ROWS.append(row)
    await restore_reference(lab, client)  # a previous failure may have left anything
    ctx = Ctx(lab, client)
    workflow_ids: list[str] = []
    result = None
    with AckedWriter(lab) as writer:
        ctx.writer = writer
        await scen.prepare(ctx)
        found = _dangers(lab)
        try:
            if fault.point == BEFORE:
                await fault.inject(ctx)
                row.injected_at = BEFORE
            ctx.handle = await scen.start(ctx, dict(fault.input_overrides))
            workflow_ids.append(ctx.handle.result_run_id or ctx.handle.first_execution_run_id)
            if fault.point == RUNNING:
                row.injected_at = RUNNING
                await fault.inject(ctx)
                if ctx.state.get("in flight"):
                    row.injected_at = f"{RUNNING}: {', '.join(ctx.state['in flight'])} in flight"
            elif fault.point not in (BEFORE, AFTER):
                row.injected_at = await _reached(ctx.handle, fault.point, scen.steps)
                await fault.inject(ctx)
            if fault.heal_at == "now":
                await fault.heal(ctx)
            if scen.until_end is not None:
                row.outcome = await scen.until_end(ctx)
            else:
                row.outcome, result = await _wait_end(ctx.handle)
            if fault.point == AFTER:
                await fault.inject(ctx)
                row.injected_at = AFTER
        finally:
            # Healed however the run went: a fault left in place (a frozen worker, a broken
            # routing file) would break every test after this one. Each heal is idempotent.
            if fault.heal_at == "end" or sys.exc_info()[0] is not None:
                await fault.heal(ctx)
    acked = _Acked(writer, ctx.extra_acked)

    pg, writable = check_one_writable_pg(lab)
    primary = writable[0] if len(writable) == 1 else None
    after_run = {"one writable pg": pg, "one unfenced redis master": check_one_redis_master(lab),
                 "routing = primary": check_routing(lab, writable)}
    if not scen.acked_after_restore:
        after_run["acked writes kept"] = check_acked_writes(lab, acked, primary, _rpo(result))
    if scen.audited:
        after_run["one audit row per key"] = check_audit(lab, primary, workflow_ids) if primary else \
            Check(None, "no single primary to read the audit from after the run")
    degraded = " ".join(getattr(result, "degraded", None) or [])
    r = after_run["routing = primary"]
    if r.held is False and "re-routing failed" in degraded:
        after_run["routing = primary"] = Check(False, r.evidence + "; the run reports re-routing degraded, with its "
                                                                  "repair", reported=True)
    failed_safe = False
    if fault.fails_safe_as is not None and row.outcome.startswith("failed"):
        said = await _failure_message(ctx.handle)
        failed_safe = row.outcome.startswith(f"failed: {fault.fails_safe_as}") and "stays STOPPED" in said
        after_run["failed safe"] = Check(failed_safe, f"expected {fault.fails_safe_as} naming what stays stopped "
                                                      f"and its repair: {said[:600]!r}")
        if failed_safe and not writable:
            # Nothing takes writes, as the message says: routing and the writes are checked
            # once the lab is repaired (by the message's steps: restore_reference).
            for k in ("routing = primary", "acked writes kept"):
                if after_run.get(k) is not None and after_run[k].held is False:
                    after_run[k] = Check(False, after_run[k].evidence + "; the run failed safe and says so, with "
                                                                        "its repair", reported=True)
    if fault.inject in (cancel, pause_worker_then_cancel):
        after_run["cancel answered"] = check_cancel_answered(row.outcome, await _steps_after_cancel(ctx.handle))
        if row.outcome == "cancelled":
            await _left_as_found(ctx.handle, after_run, found, _dangers(lab))
    _phase(row.checks, "after the run", after_run)
    _phase(row.checks, "after the run", ctx.extra_checks)
    row.report = _summary(result)

    row.restored = await restore_reference(lab, client)
    pg, writable = check_one_writable_pg(lab)
    primary = writable[0] if len(writable) == 1 else None
    after_restore = {"one writable pg": pg, "one unfenced redis master": check_one_redis_master(lab),
                     "routing = primary": check_routing(lab, writable)}
    if scen.acked_after_restore or failed_safe:
        after_restore["acked writes kept"] = check_acked_writes(lab, acked, primary, None)
    if scen.audited and primary:
        after_restore["one audit row per key"] = check_audit(lab, primary, workflow_ids)
    _phase(row.checks, "after restore", after_restore)
    for k in INVARIANTS:
        row.checks.setdefault(k, Check(None, "not applicable"))
    row.seconds = time.monotonic() - t0
    return row


# -- faults -----------------------------------------------------------------------------------------


def kill_worker(victim: str | None) -> tuple[Action, Action]:
    """kill -9 a region's worker (None: the control worker), then start it again."""

    def region(ctx: Ctx) -> str | None:
        return {"source": ctx.home, "target": ctx.away, "control": None}[victim] if victim else None

    async def inject(ctx: Ctx) -> None:
        pid = read_pid(ctx.lab.worker_pidfile(region(ctx)))
        assert kill_tree(pid), f"no worker {victim} to kill"
        ctx.state["killed"] = pid

    async def heal(ctx: Ctx) -> None:
        ctx.lab.start_worker(region(ctx))

    return inject, heal


async def kill_dev_server(ctx: Ctx) -> None:
    ds = DevServer(ctx.lab.cfg)
    assert kill_tree(read_pid(ds.pidfile)), "no dev server to kill"
    # Its listening socket outlives the pid by a moment: up() would take it for a stranger's.
    await _until(_async(lambda: not ds._port_open()), 30, "the dev server's port to close")


async def restart_dev_server(ctx: Ctx) -> None:
    await asyncio.to_thread(DevServer(ctx.lab.cfg).up)


async def cancel(ctx: Ctx) -> None:
    await ctx.handle.cancel()


def _stop_redis(which: str) -> tuple[Action, Action]:
    async def inject(ctx: Ctx) -> None:
        rd = ctx.lab.redis(ctx.away if which == "target" else ctx.home)
        os.kill(rd.pid, signal.SIGSTOP)
        ctx.state["stopped"] = rd.pid

    async def heal(ctx: Ctx) -> None:
        if pid := ctx.state.get("stopped"):
            os.kill(pid, signal.SIGCONT)

    return inject, heal


async def break_routing(ctx: Ctx) -> None:
    """The lab's routing file cannot be replaced: its temporary file's name is a directory."""
    (ctx.lab.state / "routing.tmp").mkdir()


async def mend_routing(ctx: Ctx) -> None:
    d = ctx.lab.state / "routing.tmp"
    if d.is_dir():
        d.rmdir()


async def crash_primary(ctx: Ctx) -> None:
    """kill -9 of the primary's PostgreSQL only (its worker, Redis and Sentinel live on), after
    the standby stopped receiving while the client kept being acknowledged: issue 8 item 11.
    Those writes are lost; the failover's report must count them (from the old WAL) or say
    unknown, never 0."""
    from tests.lab_helpers import _aux_pid, _startup_pid

    lab, a, b = ctx.lab, ctx.home, ctx.away
    await _until(_async(lambda: _lag_bytes(lab, a) == 0), 30, "the standby to catch up")
    receiver = _aux_pid(lab, b, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    n = len(ctx.writer.acked_ids())
    await _until(_async(lambda: len(ctx.writer.acked_ids()) >= n + 20), 30, "20 writes the standby never gets")
    assert lab.postgres(a).kill()
    startup = _startup_pid(lab, b)
    os.kill(receiver, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return _startup_pid(lab, b) != startup and pg_status(lab.cfg.region(b).postgres).role == "standby"
        except AssertionError:
            return False

    await _until(_async(restarted), 60, "the standby to restart")


async def restart_fenced_servers(ctx: Ctx) -> None:
    """The old primary's PostgreSQL and Redis restart (a reboot): they must come back fenced."""
    pg = ctx.lab.postgres(ctx.home)
    if pg.running():
        pg.kill()
    pg.start()
    rd = ctx.lab.redis(ctx.home)
    rd.kill()
    wait_gone([p for p in [rd.pid] if p])
    rd.start()


def _freeze_startup(ctx: Ctx) -> None:
    from tests.lab_helpers import _startup_pid

    pid = _startup_pid(ctx.lab, ctx.away)
    os.kill(pid, signal.SIGSTOP)
    ctx.state["frozen"] = pid


async def freeze_promotion(ctx: Ctx) -> None:
    _freeze_startup(ctx)


async def thaw_promotion(ctx: Ctx) -> None:
    try:
        os.kill(ctx.state["frozen"], signal.SIGCONT)
    except (KeyError, ProcessLookupError):
        pass


async def monitor_on(ctx: Ctx) -> None:
    """The monitor watches with automatic failover on, and has seen the primary up."""
    from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow

    h = await ctx.client.start_workflow(MonitorWorkflow.run, MonitorInput(
        service=ctx.lab.cfg.service, interval_seconds=1, failure_threshold=2, auto_failover=True),
        id=f"monitor-fault-{uuid.uuid4()}", task_queue=ctx.lab.cfg.temporal.control_task_queue)
    ctx.state["monitor"] = h
    ctx.state["t0"] = time.time()

    async def watching():
        try:
            st = await h.query("monitor_state", result_type=MonitorState)
        except Exception:  # noqa: BLE001 - not started yet
            return None
        return st if st.rounds >= 1 and st.votes.get("control") == "up" else None

    await _until(watching, 60, "the monitor's first healthy round")


async def monitor_off(ctx: Ctx) -> None:
    """Record whether the monitor started a failover or stopped, then end it."""
    from temporalio.client import WorkflowExecutionStatus

    from workflows.monitor import MonitorState

    h = ctx.state.get("monitor")
    if h is None:
        return
    try:
        st = await h.query("monitor_state", result_type=MonitorState)
        status = (await h.describe()).status
        ok = st.failovers_started == 0 and status == WorkflowExecutionStatus.RUNNING
        ctx.extra_checks["monitor: no false failover"] = Check(
            ok, f"monitor {status.name}, failovers started {st.failovers_started}, findings {st.findings[-3:]}")
    finally:
        try:
            await h.terminate("fault test over")
        except RPCError:
            pass


async def forced_failover_then_first_drill(ctx: Ctx) -> None:
    """Issue 8 item 19's path: a forced failover and its failback, then a first drill; the
    run under test is the second drill in a row."""
    from eagle_dr.launch import start_drill
    from workflows.drill import DrillInput

    await _prepare_fork(ctx)
    ctx.state["restored"] = await restore_reference(ctx.lab, ctx.client)  # failback keeps the fork's rows
    first = await (await start_drill(ctx.client, ctx.lab.cfg, DrillInput(
        service=ctx.lab.cfg.service, probe_interval_seconds=0.5, failure_threshold=2, restore_drill=False))).result()
    ctx.state["first drill"] = first
    await restore_reference(ctx.lab, ctx.client)


def dead_source_worker_then_restart_fenced() -> tuple[Action, Action]:
    """The old primary's worker is dead, so failover can only fence it read-only over the
    network; once the run is over its PostgreSQL and Redis restart (a reboot) and the worker
    comes back. The read-only fence lives in postgresql.auto.conf: it must hold after that."""
    inject, start_worker = kill_worker("source")

    async def heal(ctx: Ctx) -> None:
        await restart_fenced_servers(ctx)
        await start_worker(ctx)

    return inject, heal


async def pause_worker_then_cancel(ctx: Ctx) -> None:
    """A cancel request while a short, non-heartbeating activity of the run is in flight: the
    source region's Redis is frozen (SIGSTOP), so the preflight's probe of that region takes
    its socket timeout (about 3 s) and then succeeds (Redis unreachable is a finding, not an
    error, for a failover). The cancel arrives inside that window, then Redis resumes."""
    from temporalio.api.enums.v1 import PendingActivityState

    rd = ctx.lab.redis(ctx.home)
    os.kill(rd.pid, signal.SIGSTOP)
    ctx.state["frozen redis"] = rd.pid
    pid = read_pid(ctx.lab.worker_pidfile(ctx.home))

    async def in_flight():
        try:
            desc = await ctx.handle.describe()
        except RPCError:
            return None
        return [a.activity_type.name for a in desc.raw_description.pending_activities
                if a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                and a.last_worker_identity.endswith(f"/{pid}")] or None

    ctx.state["in flight"] = await _until(in_flight, 60, "an activity started on the source region's worker",
                                          interval=0.02)
    await ctx.handle.cancel()


async def thaw_source_redis(ctx: Ctx) -> None:
    if pid := ctx.state.get("frozen redis"):
        os.kill(pid, signal.SIGCONT)
