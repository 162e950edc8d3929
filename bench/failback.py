"""Failback time for a ~1 GB database: eagle-dr's FailbackWorkflow (measure the fork, reconcile,
pg_rewind, Redis, catch up, switch over back) beside a bare pg_rewind and a bare pg_basebackup
of the same data, measured in the same run on the same lab.

A lab on its own ports (PORT_SHIFT 4000, as bench/failover.py, not both at once; or
EAGLE_DR_BENCH_PORT_SHIFT), the Temporal
dev server and the workers. The primary's alerts table is filled to ``--gb`` GiB (day-old,
frozen rows, as a steady-state database holds; see bench/fork.py settle), then
bench/fork.py forks it like an outage (``--mb`` MB written on each side after the fork, with
conflicting updates and a few deletes), and FailbackWorkflow brings the old primary back. The
fork is then made again the same way, and the references run on it (bench/bare_copy.py).

The reconcile part (reading the divergence on the old primary and the survivor, resolving,
applying) is printed on its own: it should follow the divergence, not the database size, so
the same --mb at 10x --gb should cost about the same (issue 13: within 1.5x). The 10 GiB case
needs ~25 GB free and runs only when asked (FAILBACK_GB=10 make bench).

    python -m bench.failback --gb 1.0
    FAILBACK_GB=10 python -m bench.failback
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from bench.bare_copy import bare_basebackup, bare_rewind
from bench.fork import db_bytes, fill, fork
from eagle_dr.config import load_config
from eagle_dr.devserver import DevServer
from eagle_dr.temporal import connect
from lab.lab import Lab
from lab.ports import write_shifted_config
from workflows.failback import FailbackInput, FailbackWorkflow

PORT_SHIFT = int(os.environ.get("EAGLE_DR_BENCH_PORT_SHIFT", "4000"))


def _field(obj, name: str):
    # The report's ``steps`` is an untyped list: dicts after the data converter, not StepRecords.
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name)


def _seconds(step) -> float | None:
    a, b = _field(step, "started_at"), _field(step, "finished_at")
    if a is None or b is None:
        return None
    a, b = (datetime.fromisoformat(x) if isinstance(x, str) else x for x in (a, b))
    return (b - a).total_seconds()


async def run_failback(lab: Lab, client, old: str) -> dict:
    t = time.perf_counter()
    handle = await client.start_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=old),
                                         id=f"bench-failback-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    report = await handle.result()
    wall = time.perf_counter() - t
    steps = [(_field(s, "name"), _seconds(s), _field(s, "detail")) for s in report.steps]
    # The old region back in service: a streaming standby of the primary, its writes kept (the
    # end of the rewind step, which waits until it streams), from the first step's start.
    rewind_end = next((_field(s, "finished_at") for s in report.steps
                       if _field(s, "name").startswith("rewind ")), None)
    first = _field(report.steps[0], "started_at") if report.steps else None
    in_service = None
    if rewind_end is not None and first is not None:
        a, b = (datetime.fromisoformat(x) if isinstance(x, str) else x for x in (first, rewind_end))
        in_service = (b - a).total_seconds()
    sub = [(s.name, _seconds(s), s.detail) for s in report.switchover.steps] if report.switchover else []
    vk = report.verify_keys
    return {"workflow_id": handle.id, "wall_s": wall, "steps": steps, "switchover_steps": sub,
            "in_service_s": in_service,
            "verify_keys": None if vk is None else {"keys": vk.keys, "differences": vk.differences,
                                                    "seconds": vk.seconds},
            "verify_full": report.verify is not None,
            "rewind_s": report.rewind.seconds, "rewind_method": report.rewind.method,
            "rewind_phases": report.rewind.phases,
            "measure_phases": report.divergence.phases,
            "rewind_fallback": report.rewind.fallback_reason,
            "lost_commits": report.divergence.lost.lost_commits, "lost_bytes": report.divergence.lost.lost_bytes,
            "reconciled": [t.model_dump() for t in report.reconciliation.tables],
            "reconcile_s": next((s for name, s, _ in steps if name == "reconcile diverged rows"), None),
            "loser_read_wal_bytes": report.reconciliation.loser_read_wal_bytes,
            "reconcile_parts": report.reconciliation.seconds,
            "switchover_outcome": report.switchover.outcome if report.switchover else None}


async def measure(lab: Lab, address: str, gb: float, mb: float, scratch: Path) -> dict:
    client = await connect(target_host=address, config=lab.cfg)
    old = lab.cfg.primary.name
    t = time.perf_counter()
    seed_rows = fill(lab, old, gb)
    size = db_bytes(lab, old)
    print(f"  filled {old}: {seed_rows} alert rows, database {size / 1024**3:.2f} GiB in "
          f"{time.perf_counter() - t:.0f}s", flush=True)
    new = await fork(lab, client, old, mb, seed_rows)
    print(f"  forked: {old} killed, failed over to {new}, {mb} MB written on each side, {old} back", flush=True)
    wf = await run_failback(lab, client, old)
    print(f"  FailbackWorkflow {wf['workflow_id']}: {wf['wall_s']:.2f}s, rewind {wf['rewind_method']} "
          f"{wf['rewind_s']:.2f}s, switch back {wf['switchover_outcome']}", flush=True)
    if wf["rewind_fallback"]:
        print(f"  NOTE pg_rewind fell back: {wf['rewind_fallback']}", flush=True)

    # The same situation again for the references: old is primary again after the failback.
    new = await fork(lab, client, old, mb, seed_rows)
    print(f"  forked again for the references ({old} -> {new})", flush=True)
    rw = bare_rewind(lab, old, new)
    print(f"  bare pg_rewind {rw['pg_rewind_s']:.2f}s (source pg_wal {rw['source_pg_wal_bytes'] / 1024**2:.0f} MB), "
          f"to streaming {rw['pg_rewind_to_streaming_s']:.2f}s", flush=True)
    bb = bare_basebackup(lab, new, scratch)
    print(f"  bare pg_basebackup {bb['pg_basebackup_s']:.2f}s ({bb['basebackup_bytes'] / 1024**2:.0f} MB)",
          flush=True)
    return {"db_bytes": size, "seed_rows": seed_rows, "workflow": wf, "pg_rewind": rw, "pg_basebackup": bb}


def report(r: dict) -> None:
    wf, rw, bb = r["workflow"], r["pg_rewind"], r["pg_basebackup"]
    ref_rw, ref_bb = rw["pg_rewind_s"], bb["pg_basebackup_s"]

    def line(name: str, s: float | None) -> None:
        if s is None:
            print(f"{name:58} {'-':>9}")
            return
        print(f"{name:58} {s:>9.2f} {s / ref_rw:>12.2f}x {s / ref_bb:>16.2f}x")

    print()
    print(f"database {r['db_bytes'] / 1024**3:.2f} GiB; post-fork: {wf['lost_commits']} commits "
          f"({(wf['lost_bytes'] or 0) / 1024**2:.1f} MB of WAL) on the old primary")
    print(f"{'figure':58} {'seconds':>9} {'/ pg_rewind':>13} {'/ pg_basebackup':>17}")
    line("eagle-dr FailbackWorkflow, start -> result", wf["wall_s"])
    line("  first step -> the region streams, its writes kept", wf.get("in_service_s"))
    for name, s, _detail in wf["steps"]:
        line(f"  {name}", s)
    for name, s, _detail in wf["switchover_steps"]:
        line(f"    {name}", s)
    if wf.get("measure_phases"):
        line("  measure, as the activity timed it", sum(wf["measure_phases"].values()))
        for name, s in wf["measure_phases"].items():
            line(f"    {name}", s)
    line(f"  rewind.seconds ({wf['rewind_method']}, as the activity timed it)", wf["rewind_s"])
    for name, s in wf.get("rewind_phases", {}).items():
        line(f"    {name}", s)
    line("bare pg_rewind", ref_rw)
    line("bare pg_rewind + standby config + start -> streaming", rw["pg_rewind_to_streaming_s"])
    line(f"bare pg_basebackup -X stream -c fast ({bb['basebackup_bytes'] / 1024**2:.0f} MB)", ref_bb)
    print()
    for t in (t for t in wf["reconciled"] if t["loser_rows"] or t["deleted_keys"]):
        print(f"reconciled {t['table']}: {t['loser_rows']} rows + {t['deleted_keys']} deleted keys from the old "
              f"primary; inserted {t['inserted']} updated {t['updated']} deleted {t['deleted']} kept {t['kept']} "
              f"conflicts {t['conflicts']}")
    modes = ", ".join(f"{t['table']} {t.get('read_mode')}" + (f" ({t['blocks_read']} blocks)" if t.get("blocks_read")
                                                                else "") for t in wf["reconciled"])
    print(f"reconcile part: {wf['reconcile_s'] if wf['reconcile_s'] is not None else float('nan'):.2f}s at "
          f"{r['db_bytes'] / 1024**3:.2f} GiB; read: {modes}; WAL the reads added on the old primary: "
          f"{wf['loser_read_wal_bytes']} bytes (0: nothing more for pg_rewind to copy)")
    print("  of which (s): " + ", ".join(f"{k} {v:.2f}" for k, v in wf["reconcile_parts"].items()))
    vk = wf.get("verify_keys")
    if vk:
        print(f"verify: {vk['keys']} reconciled keys compared on both sides in {vk['seconds']:.2f}s, "
              f"{vk['differences']} differ" + ("; then every table (a difference)" if wf.get("verify_full") else ""))
    elif wf.get("verify_full"):
        print("verify: every row of every table (DataSyncWorkflow)")
    goal = rw["pg_rewind_to_streaming_s"] + 2
    for what, s in (("start -> result", wf["wall_s"]), ("first step -> streaming", wf.get("in_service_s"))):
        if s is not None:
            print(f"goal (bare pg_rewind to streaming + 2 s = {goal:.2f}s), {what}: {s:.2f}s, "
                  f"{'met' if s <= goal else 'NOT met'}")
    print("The workflow also reconciles, snapshots Redis to S3 and switches back; the references only copy data.")


def dump_logs(lab: Lab, lines: int = 25) -> None:
    """On failure, before the teardown deletes them: the tails of what says why."""
    logs = [lab.postgres(r.name).ctl.log for r in lab.cfg.regions]
    logs += sorted((lab.state / "workers").glob("*.log"))
    for log in logs:
        if log.exists():
            print(f"--- {log} (last {lines} lines)", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]), file=sys.stderr)


def kill_strays(workdir: Path) -> list[int]:
    """SIGKILL what still runs from this bench's own temp dir after Lab.down. Lab.down finds
    servers by their pid files; a postmaster whose data directory was deleted under it (seen:
    the rewind activity's re-clone fallback) has none, and would hold its port for the next run."""
    mine = (str(workdir) + "/").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mine in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=float(os.environ.get("FAILBACK_GB", "1.0")),
                    help="database size to fill, GiB (default: FAILBACK_GB, else 1)")
    # The lab keeps wal_keep_size = 64MB and failback creates the old primary's slot only at
    # rewind time (without reserving WAL): past ~64 MB of WAL on the new primary since the fork,
    # the rewound node cannot find the fork's WAL and never becomes consistent. A limit of
    # today's failback, not of the bench; keep this well below it.
    ap.add_argument("--mb", type=float, default=4.0, help="MB written on each side after the fork")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="eagle-dr-bench-failback-"))
    workdir.chmod(0o755)  # the lab's servers run as the unprivileged lab user
    cfg_path = write_shifted_config(workdir, PORT_SHIFT)
    cfg = load_config(cfg_path, env={})
    ds, lab = DevServer(cfg), Lab(cfg, str(cfg_path))
    print(f"failback of a {args.gb} GiB database, {args.mb} MB written on each side of the fork; lab in {workdir}",
          flush=True)
    try:
        ds.up()
        lab.up_servers()
        lab.wait_replication()
        lab.start_workers()
        result = asyncio.run(measure(lab, ds.address, args.gb, args.mb, workdir / "scratch" / "basebackup"))
    except BaseException:
        try:
            dump_logs(lab)
        except Exception as e:  # noqa: BLE001 - never hide the failure itself
            print(f"(could not read the logs: {e})", file=sys.stderr)
        raise
    finally:
        try:
            lab.down()
        finally:
            ds.down()
            if strays := kill_strays(workdir):
                print(f"killed {len(strays)} processes Lab.down missed: {strays}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
