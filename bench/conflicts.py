"""Conflict-resolution throughput: rows/s of activities.conflicts.apply.apply_resolutions (decide
every key in SQL, write the outcome, one audit row per key) beside a plain set-based upsert of
the same rows on the same throwaway PostgreSQL 15, measured in the same run.

For each table and size N: the survivor table is filled with N rows, the loser sends N keys
(bench/conflict_data.py: 40% conflicts, 44% loser-only changes, 15% inserts, 1% deletes), and
the timer covers the whole call, its input checks, COPY and audit insert included. The loser's
rows sit in a table of their own on the same server and both sides stream them COPY to COPY
(``LoserCopy``: COPY TO STDOUT there, COPY FROM STDIN into the temp table), as a failback
reading the old primary does; the 1% deleted keys travel from Python. The table is then
refilled the same way and the reference (bench/upsert_floor.py) writes the same rows through
the same stream.
A failback reads the old primary while it runs isolated and applies after stopping it, so its
rows wait on the worker's disk in between (activities/postgres/row_spool.py), as the lines of a
COPY into a JSON table: that path is timed too, from the loser's COPY into the spool to the end
of the apply.
``alerts`` runs last-write-wins, ``alert_rules`` merge-with-priority (the shipped config).

Peak RSS is this process's high-water mark (VmHWM), reset before each timed call
(/proc/self/clear_refs), so each figure is that call's own peak.

    python -m bench.conflicts --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from activities.conflicts.apply import ApplySummary, apply_resolutions
from activities.conflicts.loser_copy import LoserCopy
from activities.postgres.divergence import spool_rows
from activities.postgres.row_spool import RowSpool
from bench.conflict_data import FORK, LOSER, NOW, SURVIVOR, TABLES, Mix, deleted_keys, expected_conflicts, \
    fill_loser, fill_survivor
from lab.postgres import PostgresNode
from lab.scratch_postgres import scratch_postgres
from bench.upsert_floor import upsert
from eagle_dr.config import DEFAULT_CONFIG, TableConflictConfig, load_config

# Away from the lab (15401+), the tests (17850, shift 2000) and the failover bench (shift 4000).
PORT = 22500


def reset_peak() -> None:
    """Start this process's RSS high-water mark again from its current RSS (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(pg: PostgresNode, conn: psycopg.Connection, table: str, cfg: TableConflictConfig,
            priority: dict[str, int], n: int) -> dict:
    mix = Mix(n)
    t = time.perf_counter()
    query = fill_loser(conn, table, mix)
    deleted = deleted_keys(mix)
    build_s = time.perf_counter() - t
    rss_inputs = peak_rss_mb()

    with pg.connect() as loser:
        fill_survivor(conn, table, mix)
        reset_peak()
        t = time.perf_counter()
        summary = apply_resolutions(conn, table, cfg, LoserCopy(loser, query), deleted, LOSER, SURVIVOR, priority,
                                    FORK, NOW, workflow_id=f"bench-{uuid.uuid4()}", run_id="run-1",
                                    approved_by="bench")
        eagle_s = time.perf_counter() - t
        rss_apply = peak_rss_mb()

        # The failback's path: COPY on the loser into the spool, then the apply reads it back.
        fill_survivor(conn, table, mix)
        with tempfile.TemporaryDirectory(prefix="bench-spool-") as d:
            reset_peak()
            t = time.perf_counter()
            spool = RowSpool(Path(d) / "rows", cfg.timestamp_column)
            # Every row's commit known, as in a failback's block read: its stamp is compared with it
            # (the loser wrote after the fork, so none is replaced).
            spool_rows(loser, spool, sql.SQL("select 0::bigint, row_to_json(q.*) from ({}) q").format(query), None,
                       {0: FORK})
            spooled_s = time.perf_counter() - t
            via_spool = apply_resolutions(conn, table, cfg, spool, deleted, LOSER, SURVIVOR, priority, FORK, NOW,
                                          workflow_id=f"bench-{uuid.uuid4()}", run_id="run-1", approved_by="bench")
            spool_s = time.perf_counter() - t
            rss_spool = peak_rss_mb()
            spool_mb = Path(d, "rows").stat().st_size / 1024**2

        # Same starting table for the reference; the audit the engine wrote is dropped with it.
        fill_survivor(conn, table, mix)
        reset_peak()
        t = time.perf_counter()
        upsert(conn, table, cfg.key, LoserCopy(loser, query), deleted)
        ref_s = time.perf_counter() - t
        rss_ref = peak_rss_mb()
    keys = n
    del deleted
    gc.collect()
    return {"table": table, "strategy": cfg.strategy, "keys": keys, "build_inputs_s": build_s,
            "eagle_s": eagle_s, "reference_s": ref_s, "peak_rss_inputs_mb": rss_inputs,
            "peak_rss_apply_mb": rss_apply, "peak_rss_reference_mb": rss_ref, "summary": summary.model_dump(),
            "spool_s": spool_s, "spool_write_s": spooled_s, "spool_mb": spool_mb, "peak_rss_spool_mb": rss_spool,
            "spool_summary": via_spool.model_dump(), "expected_conflicts": expected_conflicts(mix)}


def check(r: dict) -> list[str]:
    """What makes a figure meaningless: the engine did not decide and audit every key."""
    out = []
    for path, summary in (("COPY relay", r["summary"]), ("spool", r["spool_summary"])):
        s = ApplySummary(**summary)
        if s.audit_rows != r["keys"]:
            out.append(f"{path}: audit rows {s.audit_rows} != keys {r['keys']}")
        if s.conflicts != r["expected_conflicts"]:
            out.append(f"{path}: conflicts {s.conflicts} != expected {r['expected_conflicts']}")
        if s.inserted + s.updated + s.deleted + s.kept + s.flagged != r["keys"]:
            out.append(f"{path}: outcomes do not add up to the keys sent")
    if r["summary"] != r["spool_summary"]:
        out.append("the spool path decided otherwise than the COPY relay")
    return out


def report(results: list[dict]) -> None:
    print()
    print(f"{'table (strategy)':36} {'keys':>9} {'path':>10} {'eagle-dr s':>11} {'rows/s':>10} {'reference s':>12} "
          f"{'rows/s':>10} {'eagle-dr/reference':>19} {'peak RSS MB':>12} {'ref RSS MB':>11}")
    for r in results:
        ref = r["keys"] / r["reference_s"]
        for path, secs, rss in (("COPY", r["eagle_s"], r["peak_rss_apply_mb"]),
                                ("spool", r["spool_s"], r["peak_rss_spool_mb"])):
            e = r["keys"] / secs
            print(f"{r['table'] + ' (' + r['strategy'] + ')':36} {r['keys']:>9} {path:>10} {secs:>11.2f} {e:>10,.0f} "
                  f"{r['reference_s']:>12.2f} {ref:>10,.0f} {e / ref:>18.2f}x {rss:>12.0f} "
                  f"{r['peak_rss_reference_mb']:>11.0f}")
    print()
    print("eagle-dr COPY: apply_resolutions (input checks, COPY relay, decide in SQL, write, one audit row per key).")
    print("eagle-dr spool: the same from the failback's spool (loser COPY -> worker disk -> COPY as JSON -> apply).")
    print("reference: COPY relay + DELETE + INSERT ... ON CONFLICT DO UPDATE of the same rows, no decision, no audit.")
    print("eagle-dr/reference < 1 means eagle-dr is that fraction of the floor's throughput.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated N (divergent keys per run)")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"some of {','.join(TABLES)}")
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if unknown := [t for t in tables if t not in TABLES]:
        ap.error(f"no bench data for {unknown}; choose from {', '.join(TABLES)}")

    cfg = load_config(DEFAULT_CONFIG, env={})
    priority = {r.name: r.priority for r in cfg.regions}
    results = []
    print(f"conflict resolution: sizes {sizes}, tables {tables}, throwaway PostgreSQL on port {args.port}",
          flush=True)
    with scratch_postgres(args.port, "conflicts") as pg, pg.connect() as conn:
        print(f"  {conn.execute('select version()').fetchone()[0].split(' on ')[0]}", flush=True)
        for n in sizes:
            for table in tables:
                r = measure(pg, conn, table, cfg.conflicts[table], priority, n)
                results.append(r)
                s = r["summary"]
                print(f"  {table} N={n}: eagle-dr {r['eagle_s']:.2f}s, reference {r['reference_s']:.2f}s; "
                      f"inserted {s['inserted']} updated {s['updated']} deleted {s['deleted']} kept {s['kept']} "
                      f"conflicts {s['conflicts']} audit {s['audit_rows']}; inputs built in "
                      f"{r['build_inputs_s']:.2f}s, peak RSS {r['peak_rss_inputs_mb']:.0f} MB after building "
                      f"them, {r['peak_rss_apply_mb']:.0f} MB in apply; via the spool {r['spool_s']:.2f}s "
                      f"({r['spool_write_s']:.2f}s to write {r['spool_mb']:.0f} MB), peak RSS "
                      f"{r['peak_rss_spool_mb']:.0f} MB", flush=True)
                for problem in check(r):
                    print(f"  WARNING {table} N={n}: {problem}", flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
