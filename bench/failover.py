"""Failover and switchover times: eagle-dr beside Patroni + etcd, measured in the same run.

eagle-dr: a lab on its own ports, the sample app writing every 50 ms, MonitorWorkflow
probing the primary region every ``--interval`` seconds (Patroni's loop_wait) and failing
over after ``--threshold`` failed probes. Each run kills -9 the primary region and times
kill -> first acknowledged write on the new primary (from the app's own log), split into
detection (kill -> region declared down) and orchestration (decision -> writable).
Then planned switchovers: the write gap the app saw.

Patroni: bench/patroni_anchor.py (ttl 10, loop_wait 2, retry_timeout 5), same writer
cadence, same machine, right after.

    python -m bench.failover --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from activities.postgres.status import pg_status
from eagle_dr.config import load_config
from eagle_dr.devserver import DevServer
from eagle_dr.launch import start_move
from eagle_dr.temporal import connect
from lab.app import write_log
from lab.lab import Lab
from lab.ports import write_shifted_config
from workflows.models import SwitchoverInput
from workflows.monitor import MonitorInput, MonitorWorkflow

# A third lab beside `make lab` (shift 0) and the tests' (shift 2000).
PORT_SHIFT = 4000


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


async def eagle_failovers(lab: Lab, client, runs: int, interval: float, threshold: int) -> list[dict]:
    out = []
    for i in range(runs):
        primary = _primary(lab)
        target = lab.cfg.other(primary).name
        _wait_traffic(lab, primary)
        handle = await client.start_workflow(
            MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=interval,
                                              failure_threshold=threshold, auto_failover=True,
                                              stop_after_failover=True, primary_region=primary),
            id=f"bench-monitor-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)
        # Let the monitor see the region healthy first, as it would in production.
        await asyncio.sleep(interval * 1.5)
        t_kill = time.time()
        lab.kill_region(primary)
        report = await handle.result()
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
        print(f"  eagle-dr failover {i + 1}/{runs} {primary} -> {target}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        lab.rebuild_standby(primary)
        lab.wait_replication()
    return out


async def eagle_switchovers(lab: Lab, client, runs: int) -> list[dict]:
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
    return out


def summary(rows: list[dict], key: str) -> dict | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": len(vals)}


def fmt(s: dict | None) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})" if s else "-"


async def measure(lab: Lab, address: str, runs: int, interval: float, threshold: int) -> dict:
    client = await connect(target_host=address)
    fo = await eagle_failovers(lab, client, runs, interval, threshold)
    so = await eagle_switchovers(lab, client, runs)
    return {"failover": {k: summary(fo, k) for k in fo[0]}, "switchover": {k: summary(so, k) for k in so[0]},
            "raw": {"failover": fo, "switchover": so}}


def run_eagle(runs: int, interval: float, threshold: int, workdir: Path) -> dict:
    cfg_path = write_shifted_config(workdir, PORT_SHIFT)
    cfg = load_config(cfg_path, env={})
    ds, lab = DevServer(cfg), Lab(cfg, str(cfg_path))
    try:
        ds.up()
        lab.up_servers()
        lab.wait_replication()
        lab.start_workers()
        lab.start_app()
        return asyncio.run(measure(lab, ds.address, runs, interval, threshold))
    finally:
        lab.down()
        ds.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--interval", type=float, default=2.0, help="eagle-dr probe interval (Patroni loop_wait: 2)")
    ap.add_argument("--threshold", type=int, default=3, help="failed probes that declare a region down")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--skip-patroni", action="store_true")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="eagle-dr-bench-"))
    workdir.chmod(0o755)
    print(f"eagle-dr: {args.runs} failovers (probe every {args.interval}s, {args.threshold} failures) "
          f"and {args.runs} switchovers", flush=True)
    try:
        eagle = run_eagle(args.runs, args.interval, args.threshold, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a lab's data: hundreds of MB per run
    patroni = None
    if not args.skip_patroni:
        from bench.patroni_anchor import run_anchor

        print(f"Patroni + etcd (ttl 10, loop_wait 2, retry_timeout 5): {args.runs} failovers and switchovers",
              flush=True)
        patroni = run_anchor(args.runs)

    rows = [
        ("failover: kill -> first acknowledged write", eagle["failover"]["kill_to_first_write_s"],
         patroni and patroni["failover"].get("kill_to_first_write_s")),
        ("  detection", eagle["failover"]["detection_s"], patroni and patroni["failover"].get("detection_s")),
        ("  orchestration (decision -> writable)", eagle["failover"]["orchestration_s"],
         patroni and patroni["failover"].get("promotion_s")),
        ("switchover: write gap seen by clients", eagle["switchover"]["write_gap_s"],
         patroni and patroni["switchover"].get("write_gap_s")),
        ("switchover: command wall time", eagle["switchover"]["command_s"],
         patroni and patroni["switchover"].get("command_s")),
    ]
    print()
    print(f"{'figure (seconds, median (min-max))':45} {'eagle-dr':>24} {'Patroni':>24} {'eagle-dr/Patroni':>17}")
    for name, e, p in rows:
        ratio = f"{e['median'] / p['median']:.2f}x" if e and p and p["median"] else "-"
        print(f"{name:45} {fmt(e):>24} {fmt(p):>24} {ratio:>17}")
    print()
    print("Patroni's 'orchestration' is its promotion + first write after it took the leader key; eagle-dr's is "
          "fence + pg_promote + epoch + Redis promotion, decided by a durable workflow.")
    if args.json:
        Path(args.json).write_text(json.dumps({"eagle_dr": eagle, "patroni": patroni}, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
