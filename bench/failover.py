"""Failover and switchover times: eagle-dr beside Patroni + etcd, measured in the same run.

eagle-dr: a lab on its own ports, the sample app writing every 50 ms, MonitorWorkflow
probing the primary region every ``--interval`` seconds (Patroni's loop_wait) from every
vantage point. First the false-positive check: the primary's PostgreSQL and Redis are
frozen (SIGSTOP) for ``--stall`` seconds, then continued; no failover may follow. Then each
run kills -9 the primary region and times kill -> first acknowledged write on the new
primary (from the app's own log), split into detection (kill -> region declared down) and
orchestration (decision -> writable); then failovers of a primary frozen for good (the
timeout path a network loss takes). Then planned switchovers: the write gap the app saw.

Patroni: bench/patroni_anchor.py with the fastest settings that pass the same stall check
(and obey loop_wait + 2 x retry_timeout <= ttl), same writer cadence, same machine, right after.

    python -m bench.failover --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from activities.postgres.status import pg_status
from bench import step_overhead
from bench.history_steps import breakdown
from eagle_dr.config import load_config
from eagle_dr.devserver import DevServer
from eagle_dr.launch import start_move
from eagle_dr.temporal import connect
from lab.app import write_log
from lab.lab import Lab
from lab.processes import children
from lab.ports import write_shifted_config
from workflows.models import SwitchoverInput
from workflows.monitor import MonitorInput, MonitorWorkflow

# A third lab beside `make lab` (shift 0) and the tests' (shift 2000); EAGLE_DR_BENCH_PORT_SHIFT moves it
# (as bench/backup.py and bench/alerts.py allow) when several checkouts share a host.
PORT_SHIFT = int(os.environ.get("EAGLE_DR_BENCH_PORT_SHIFT", "4000"))


def _primary(lab: Lab) -> str:
    return next(r.name for r in lab.cfg.regions if pg_status(r.postgres).role == "primary")


def _first_ok_after(lab: Lab, t: float, region: str) -> float | None:
    return next((w.t for w in write_log(lab.cfg).entries() if w.ok and w.t > t and w.region == region), None)


def _wait_traffic(lab: Lab, region: str, timeout: float = 30) -> None:
    start = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _first_ok_after(lab, start, region):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sample app not writing to {region}")


@dataclass
class Detection:
    """The monitor's settings under test: probe every ``interval`` s, a region whose probes
    time out is down after ``threshold`` rounds; one whose ports refuse connections after
    ``confirm_rounds`` rounds ``confirm_interval`` s apart (None: no fast confirmation)."""

    interval: float
    threshold: int
    confirm_interval: float | None
    confirm_rounds: int

    def monitor(self, lab: Lab, primary: str) -> MonitorInput:
        return MonitorInput(service=lab.cfg.service, interval_seconds=self.interval, failure_threshold=self.threshold,
                            confirm_interval_seconds=self.confirm_interval, confirm_rounds=self.confirm_rounds,
                            auto_failover=True, stop_after_failover=True, primary_region=primary,
                            watch_split_brain=False)

    def __str__(self) -> str:
        fast = (f", refused ports confirmed in {self.confirm_rounds} rounds {self.confirm_interval}s apart"
                if self.confirm_interval else "")
        return f"probe every {self.interval}s, down after {self.threshold} timed-out rounds{fast}"


def _freeze(lab: Lab, region: str, sig: int) -> list[int]:
    """The region's PostgreSQL (postmaster and every child) and Redis: what a frozen host stops."""
    pg, rd = lab.postgres(region).pid, lab.redis(region).pid
    pids = [p for p in (pg, rd) if p] + (children(pg) if pg else [])
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


async def _watching(handle, region: str, timeout: float = 60) -> None:
    """Until the monitor has seen the region up: detection is timed from a watched, healthy primary."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            st = last = await handle.query(MonitorWorkflow.monitor_state)
            if st.rounds >= 1 and st.watched_region == region and st.failures == 0 and st.votes.get("control") == "up":
                return
        except Exception as e:  # noqa: BLE001 - not started yet
            last = e
        await asyncio.sleep(0.1)
    seen = last if isinstance(last, Exception) else last and {
        "rounds": last.rounds, "watched": last.watched_region, "failures": last.failures, "votes": last.votes,
        "probes": last.probes, "findings": last.findings[-5:]}
    raise RuntimeError(f"the monitor never saw {region} up; last seen: {seen!r}")


async def eagle_stall_check(lab: Lab, client, det: Detection, stall: float, runs: int = 2) -> dict:
    """Freeze the primary's PostgreSQL and Redis for ``stall`` seconds (SIGSTOP, then SIGCONT)
    under an armed monitor: it must not fail over. Passed = no failover in any run."""
    failed_over = 0
    for i in range(runs):
        primary = _primary(lab)
        _wait_traffic(lab, primary)
        handle = await client.start_workflow(MonitorWorkflow.run, det.monitor(lab, primary),
                                             id=f"bench-stall-{uuid.uuid4()}",
                                             task_queue=lab.cfg.temporal.control_task_queue)
        await _watching(handle, primary)
        pids = _freeze(lab, primary, signal.SIGSTOP)
        try:
            await asyncio.sleep(stall)  # the injected stall itself, not a synchronisation
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        # A failover would start within a threshold's worth of rounds after the stall began.
        deadline = time.monotonic() + det.interval * (det.threshold + 2) + 5
        moved = False
        while time.monotonic() < deadline and not moved:
            st = await handle.query(MonitorWorkflow.monitor_state)
            moved = st.failovers_started > 0
            await asyncio.sleep(0.2)
        failed_over += moved
        print(f"  eagle-dr {stall:.0f}s SIGSTOP of {primary}'s PostgreSQL + Redis {i + 1}/{runs}: "
              + ("FAILED OVER (false positive)" if moved else "no failover"), flush=True)
        if moved:
            await handle.result()
            lab.rebuild_standby(primary)
            lab.wait_replication()
        else:
            await handle.terminate("stall check over")
    return {"stall_s": stall, "runs": runs, "false_failovers": failed_over, "passed": failed_over == 0}


async def eagle_failovers(lab: Lab, client, runs: int, det: Detection, freeze: bool = False,
                          profile: bool = True) -> list[dict]:
    """kill -9 of the primary region (or, ``freeze``, a SIGSTOP never continued: a host that
    stops answering, as a network loss looks), then the monitor's automatic failover."""
    out = []
    for i in range(runs):
        primary = _primary(lab)
        target = lab.cfg.other(primary).name
        _wait_traffic(lab, primary)
        handle = await client.start_workflow(
            MonitorWorkflow.run, det.monitor(lab, primary),
            id=f"bench-monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
        # Let the monitor see the region healthy first, as it would in production.
        await _watching(handle, primary)
        t_kill = time.time()
        frozen = _freeze(lab, primary, signal.SIGSTOP) if freeze else lab.kill_region(primary)
        report = await handle.result()
        if freeze:
            # SIGKILL ends stopped processes too: the frozen node must not wake as a second primary.
            _freeze(lab, primary, signal.SIGKILL)
        first = _first_ok_after(lab, t_kill, target)
        deadline = time.monotonic() + 30
        while first is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            first = _first_ok_after(lab, t_kill, target)
        f = report.failover
        row = {"kill_to_first_write_s": (first - t_kill) if first else None,
               "detection_s": report.detected_at.timestamp() - t_kill,
               "orchestration_s": f.rto.decision_to_writable_s,
               "writable_to_serving_s": f.rto.writable_to_serving_s,
               "acked_writes_lost": None}
        out.append(row)
        print(f"  eagle-dr failover{' (host frozen)' if freeze else ''} {i + 1}/{runs} {primary} -> {target}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        if profile and i == runs - 1:
            await _print_move_breakdown(lab, client)
        lab.rebuild_standby(primary)
        lab.wait_replication()
    return out


async def eagle_switchovers(lab: Lab, client, runs: int, profile: bool = True) -> list[dict]:
    out = []
    for i in range(runs):
        primary = _primary(lab)
        target = lab.cfg.other(primary).name
        _wait_traffic(lab, primary)
        t0 = time.monotonic()
        handle = await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=target,
                                                                   measure_client_impact=True))
        result = await handle.result()
        row = {"write_gap_s": result.rto.client_outage_s, "command_s": time.monotonic() - t0,
               "acked_writes_lost": result.rpo.acknowledged_writes_lost}
        out.append(row)
        print(f"  eagle-dr switchover {i + 1}/{runs} {primary} -> {target}: write gap {row['write_gap_s']:.3f}s, "
              f"runbook {row['command_s']:.2f}s, acked writes lost {row['acked_writes_lost']}", flush=True)
        if profile and i == runs - 1:
            print(_indent(breakdown(await handle.fetch_history())), flush=True)
            # Inside the stop fence (its phases): most of the write gap before the promotion.
            stop = next((s.detail for s in result.steps if s.name == "stop writes on old primary"), None)
            if stop:
                print(f"    stop fence: {stop}", flush=True)
            promote = next((s.detail for s in result.steps if s.name == "promote"), None)
            if promote:
                print(f"    promote: {promote}", flush=True)
    return out


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


async def _print_move_breakdown(lab: Lab, client) -> None:
    """The newest move's per-activity timings (the monitor starts it as dr-move-<service>)."""
    handle = client.get_workflow_handle(f"dr-move-{lab.cfg.service}")
    print(_indent(breakdown(await handle.fetch_history())), flush=True)


def summary(rows: list[dict], key: str) -> dict | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": len(vals)}


def fmt(s: dict | None) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})" if s else "-"


async def measure(lab: Lab, address: str, runs: int, det: Detection, stall: float, freeze_runs: int,
                  overhead_n: int = 50, failovers: bool = True, frozen_only: bool = False) -> dict:
    client = await connect(target_host=address, config=lab.cfg)
    # The per-step overhead first, on a quiet lab: every runbook step pays it on top of its work.
    overhead = await step_overhead.measure(client, overhead_n) if overhead_n else None
    if overhead:
        print("\n".join(step_overhead.fmt(overhead)), flush=True)
    stall_check = await eagle_stall_check(lab, client, det, stall) if stall else None
    fo = await eagle_failovers(lab, client, runs, det) if failovers and not frozen_only else []
    fz = await eagle_failovers(lab, client, freeze_runs, det, freeze=True) if freeze_runs and failovers else []
    so = await eagle_switchovers(lab, client, runs) if not frozen_only else []
    return {"settings": str(det), "stall_check": stall_check, "step_overhead": overhead,
            "failover": {k: summary(fo, k) for k in fo[0]} if fo else None,
            "frozen": {k: summary(fz, k) for k in fz[0]} if fz else None,
            "switchover": {k: summary(so, k) for k in so[0]} if so else None, "raw": {"failover": fo, "frozen": fz, "switchover": so}}


def run_eagle(runs: int, det: Detection, stall: float, freeze_runs: int, workdir: Path, overhead_n: int = 50,
              failovers: bool = True, frozen_only: bool = False) -> dict:
    cfg_path = write_shifted_config(workdir, PORT_SHIFT)
    # Patroni's leader key lives ttl (5 s here): the old primary's self-fence bound is the same.
    doc = yaml.safe_load(cfg_path.read_text())
    doc["health"]["self_fence_after"] = "5s"
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_config(cfg_path, env={})
    ds, lab = DevServer(cfg), Lab(cfg, str(cfg_path))
    try:
        ds.up()
        lab.up_servers()
        lab.wait_replication()
        lab.start_workers()
        lab.start_app()
        return asyncio.run(measure(lab, ds.address, runs, det, stall, freeze_runs, overhead_n, failovers,
                                   frozen_only))
    finally:
        lab.down()
        ds.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--freeze-runs", type=int, default=2,
                    help="failovers of a frozen (SIGSTOPped, never continued) primary: the timeout path")
    ap.add_argument("--interval", type=float, default=1.0, help="eagle-dr probe interval (Patroni's loop_wait: 1)")
    ap.add_argument("--threshold", type=int, default=4, help="timed-out rounds that declare a region down")
    ap.add_argument("--confirm-interval", type=float, default=0.25,
                    help="seconds between rounds confirming refused ports (0: no fast confirmation)")
    ap.add_argument("--confirm-rounds", type=int, default=3)
    ap.add_argument("--stall", type=float, default=3.0, help="SIGSTOP this long: neither system may fail over")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--skip-patroni", action="store_true")
    ap.add_argument("--switchovers-only", action="store_true",
                    help="skip the stall check and the failovers (for working on the switchover)")
    ap.add_argument("--frozen-only", action="store_true",
                    help="only the frozen-host failovers (for working on them)")
    ap.add_argument("--overhead-n", type=int, default=50,
                    help="empty activities (and local activities) timed for the per-step overhead (0: skip)")
    args = ap.parse_args()
    det = Detection(args.interval, args.threshold, args.confirm_interval or None, args.confirm_rounds)

    workdir = Path(tempfile.mkdtemp(prefix="eagle-dr-bench-"))
    workdir.chmod(0o755)
    print(f"eagle-dr ({det}): a {args.stall:.0f}s stall check, {args.runs} failovers, {args.freeze_runs} of a "
          f"frozen host, {args.runs} switchovers", flush=True)
    try:
        quick = args.switchovers_only or args.frozen_only
        eagle = run_eagle(args.runs, det, 0 if quick else args.stall, args.freeze_runs, workdir,
                          args.overhead_n, failovers=not args.switchovers_only, frozen_only=args.frozen_only)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a lab's data: hundreds of MB per run
    patroni = None
    if not args.skip_patroni:
        from bench.patroni_anchor import run_anchor

        print(f"Patroni + etcd: the fastest settings that ride out a {args.stall:.0f}s SIGSTOP, then {args.runs} "
              "failovers and switchovers", flush=True)
        patroni = run_anchor(args.runs, stall_seconds=args.stall, freeze_runs=args.freeze_runs)

    def fig(side: dict | None, part: str, key: str):
        return (side.get(part) or {}).get(key) if side else None

    rows = [
        ("failover: kill -9 -> first acknowledged write", fig(eagle, "failover", "kill_to_first_write_s"),
         fig(patroni, "failover", "kill_to_first_write_s")),
        ("  detection", fig(eagle, "failover", "detection_s"), fig(patroni, "failover", "detection_s")),
        ("  orchestration (decision -> writable)", fig(eagle, "failover", "orchestration_s"),
         fig(patroni, "failover", "promotion_s")),
        ("frozen host -> first acknowledged write", fig(eagle, "frozen", "kill_to_first_write_s"),
         fig(patroni, "freeze", "kill_to_first_write_s")),
        ("  detection", fig(eagle, "frozen", "detection_s"), fig(patroni, "freeze", "detection_s")),
        ("switchover: write gap seen by clients", fig(eagle, "switchover", "write_gap_s"),
         fig(patroni, "switchover", "write_gap_s")),
        ("switchover: command wall time", fig(eagle, "switchover", "command_s"), fig(patroni, "switchover", "command_s")),
    ]
    print()
    print(f"eagle-dr: {eagle['settings']}")
    sc = eagle.get("stall_check")
    print(f"  {args.stall:.0f}s SIGSTOP check: " + ("not run" if not sc else "passed" if sc["passed"] else
                                                  f"FAILED ({sc['false_failovers']} of {sc['runs']} failed over)"))
    if patroni:
        print(patroni.get("label") or f"Patroni: {patroni.get('settings')}")
        passed = patroni.get("stall_checks_passed")
        print(f"  {args.stall:.0f}s SIGSTOP check: " + ("unknown" if passed is None else "passed" if passed else "FAILED"))
    print()
    print(f"{'figure (seconds, median (min-max))':45} {'eagle-dr':>24} {'Patroni':>24} {'eagle-dr/Patroni':>17}")
    for name, e, p in rows:
        ratio = f"{e['median'] / p['median']:.2f}x" if e and p and p["median"] else "-"
        print(f"{name:45} {fmt(e):>24} {fmt(p):>24} {ratio:>17}")
    for line in step_overhead.fmt(eagle.get("step_overhead") or {}):
        print(f"per-step overhead (Temporal dev server):{line}")
    print()
    print("Detection: eagle-dr from the kill to the monitor's decision; Patroni from the kill to the replica "
          "taking the leader key. Patroni's 'orchestration' is its promotion + first write after it took the "
          "leader key; eagle-dr's is the fences + pg_promote until the node takes a write, decided by a durable workflow (the epoch's record, Redis and routing come after it). "
          "A kill leaves ports that refuse connections (eagle-dr confirms that fast); a frozen host leaves "
          "timeouts, which both systems must ride out for the stall they tolerate.")
    if args.json:
        Path(args.json).write_text(json.dumps({"eagle_dr": eagle, "patroni": patroni}, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
