"""One fault, one runbook, one named point; then the invariants, on the real lab.

The first few (not ``slow``) run in ``make test``: a worker killed during failover's promote,
the dev server killed mid-switchover, a cancel before and after the point of no return, a
restart of fenced servers. ``make faults`` runs them all. Each leaves the lab in the
reference topology (us-east-1 primary, us-west-2 streaming), as the other tests expect.
"""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    AFTER,
    BEFORE,
    RUNNING,
    SCENARIOS,
    Fault,
    break_routing,
    cancel,
    crash_primary,
    dead_source_worker_then_restart_fenced,
    forced_failover_then_first_drill,
    freeze_promotion,
    kill_dev_server,
    kill_worker,
    mend_routing,
    pause_worker_then_cancel,
    thaw_source_redis,
    monitor_off,
    monitor_on,
    restart_dev_server,
    restart_fenced_servers,
    run_fault,
    thaw_promotion,
    _stop_redis,
)


def worker_kill(runbook: str, point: str, victim: str, slow: bool = True, **kw) -> Fault:
    inject, heal = kill_worker(victim)
    return Fault(f"kill -9 {victim} worker", runbook, point, inject, heal, slow=slow, **kw)


FAST = [
    worker_kill("failover", "promote", "target", slow=False),
    # Out of `make test` for now: it took 188 s in the last clean-clone run (about 15 s before),
    # which alone would push the suite past CI's budget. `make faults` still runs it; why it
    # slowed (a completion lost across the restart, waiting out the fence's 180 s timeout?) is open.
    Fault("kill -9 dev server, restart", "switchover", "stop writes on old primary", kill_dev_server,
          restart_dev_server, slow=True),
    Fault("cancel at the approval gate", "switchover", "approval", cancel,
          input_overrides={"approval": {"required": True, "timeout_seconds": 600}}),
    Fault("cancel", "failover", "promote", cancel),
    Fault("restart fenced PG + Redis", "failover", AFTER, restart_fenced_servers),
]

# Which worker runs a step's side effect: source = the old primary's region (us-east-1 at the
# start of every scenario), target = the other, control = the runbooks' own worker.
WORKER_KILLS = [
    ("failover", "fence old primary", "source"), ("failover", "promote", "control"),
    ("failover", "re-route traffic", "control"), ("failover", "measure RTO/RPO", "source"),
    ("switchover", "reserve WAL on the standby", "target"), ("switchover", "stop writes on old primary", "source"),
    # re-route traffic: the control worker dies while routing waits for the promotion.
    ("switchover", "promote", "target"), ("switchover", "re-route traffic", "control"),
    ("switchover", "move Redis", "control"),
    ("switchover", "old primary becomes standby", "source"),
    # failback: the old primary (source, us-east-1) is the region being brought back.
    ("failback", "measure what", "source"), ("failback", "reconcile diverged rows", "source"),
    ("failback", "rewind", "source"), ("failback", "preserve and re-attach Redis", "source"),
    ("failback", "switch over back", "control"),
    # split brain: the loser is the promoted standby's region (target, us-west-2).
    ("split-brain", "fence", "control"), ("split-brain", "preserve and re-attach Redis", "target"),
    ("split-brain", "measure what", "target"), ("split-brain", "reconcile diverged rows", "target"),
    ("split-brain", "rewind", "target"), ("split-brain", "verify", "control"),
]

redis_stop, redis_cont = _stop_redis("target")

SLOW = [
    Fault("cancel while a probe is in flight (source Redis frozen)", "failover", RUNNING,
          pause_worker_then_cancel, thaw_source_redis, slow=True),
    *[worker_kill(rb, pt, v) for rb, pt, v in WORKER_KILLS],
    Fault("kill -9 dev server, restart", "failover", "promote", kill_dev_server, restart_dev_server, slow=True),
    Fault("kill -9 dev server, restart", "failback", "rewind", kill_dev_server, restart_dev_server, slow=True),
    Fault("kill -9 dev server, restart", "split-brain", "fence", kill_dev_server, restart_dev_server, slow=True),
    Fault("slow promotion (startup SIGSTOP)", "failover", BEFORE, freeze_promotion, thaw_promotion, heal_at="end",
          slow=True, input_overrides={"promote_timeout_seconds": 5}),
    Fault("source worker dead; read-only fenced PG + Redis restart after", "failover", BEFORE,
          *dead_source_worker_then_restart_fenced(), heal_at="end", slow=True),
    Fault("primary crashed, worker alive", "failover", BEFORE, crash_primary, slow=True,
          input_overrides={"force": True}),
    Fault("target Redis SIGSTOP after promote began", "failover", "promote", redis_stop, redis_cont, heal_at="end",
          slow=True),
    Fault("target Redis SIGSTOP after promote began", "switchover", "promote", redis_stop, redis_cont,
          heal_at="end", slow=True),
    # Its worker alone can prove the standby did not promote (abort_promotion stops it), and
    # it stays dead: the run must not restart the old primary beside a standby that may
    # promote. It fails within the steps' schedule-to-start bounds (~2 min), the old primary
    # stopped, and says what to check and do; if the kill came after pg_promote, routing
    # follows the new primary.
    Fault("target worker dead through the promotion", "switchover", "promote", *kill_worker("target"),
          heal_at="end", slow=True, fails_safe_as="PromotionFailed"),
    Fault("routing cannot be written", "failover", "promote", break_routing, mend_routing, heal_at="end", slow=True),
    Fault("routing cannot be written", "switchover", "promote", break_routing, mend_routing, heal_at="end",
          slow=True),
    Fault("monitor running, auto failover on", "switchover", BEFORE, monitor_on, monitor_off, heal_at="end",
          slow=True),
    Fault("primary's worker kill -9, database healthy", "monitor", RUNNING, *kill_worker("source"), heal_at="end",
          slow=True),
    Fault("second drill in a row after a forced failover", "drill", BEFORE, forced_failover_then_first_drill,
          slow=True),
    *[Fault("cancel", rb, step, cancel, slow=True) for rb, scen in SCENARIOS.items() for step in scen.steps
      if rb in ("failover", "switchover", "failback", "split-brain")
      and (rb, step) not in (("switchover", "take DR epoch"), ("failover", "promote"))],
]


def _param(f: Fault):
    marks = [pytest.mark.faults] + ([pytest.mark.slow_fault] if f.slow else [])
    if f.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=f.xfail))
    return pytest.param(f, id=f.id, marks=marks)


@pytest.mark.parametrize("fault", [_param(f) for f in FAST + SLOW])
async def test_fault(lab, client, fault: Fault):
    row = await run_fault(lab, client, fault)
    assert not row.violated, row.explain()
