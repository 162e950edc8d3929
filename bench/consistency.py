"""Consistency check speed: eagle-dr's table compare (activities/consistency/check.py
compare_table, the code the ConsistencyCheckWorkflow's compare_table activity runs) beside
reladiff (PyPI, its defaults) and a plain concurrent scan of both sides, on the same two servers,
in the same run.

The sides are two independent throwaway PostgreSQL 15 servers on this machine (not a primary and
its streaming standby): the differences are written on B, and a standby cannot be written;
reladiff compares two databases without any notion of replication either. Each is filled with
``alerts(id bigint pk, region text, payload ~100 B, updated_at timestamptz)``, ``--rows`` rows
made by the same generate_series on both (ids even, so an inserted key can fall between two).

Cases, in this order:
- identical: both sides the same;
- 120 differences: on B, 40 rows updated (payload only, not the timestamp), 40 deleted and 40
  inserted (odd ids), scattered over the whole key space; every one of the 120 keys must be
  reported exactly (and nothing else).

Each case measures: the scan floor (``count(*)`` and ``bit_xor`` of the check's own row digest,
activities/consistency/rowhash.py, over the whole table, one statement on each side at the
same time: the same per-row work as the check does, with no ranges and no bisect), eagle-dr's check (run in its own child process,
with the config's default chunk_rows / parallel, so its peak RSS is the check's alone), and
reladiff (its own venv, ``--bisection-factor`` / ``--bisection-threshold`` / ``--threads``
left at their defaults; ``-c`` names the non-key columns, since by default it compares the key
column only and would miss an update). Goals (issue 11): identical <= 8 s and within 3x of
the floor; 120 differences <= 12 s with all 120 keys exact; peak memory < 500 MB.

reladiff runs from a venv of its own (``--reladiff-venv``, created with pip when missing) so
its dependencies never enter the project's; when it cannot be installed its column says so.

    python -m bench.consistency --rows 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import psycopg.sql

from activities.consistency.tables import Table

# Away from the lab (15401+), the tests (shifted), bench.conflicts (22500) and the lab benches.
PORT_A, PORT_B = 22540, 22541
DIFFS = 120
SEED = 11
ALERTS = Table(schema_name="public", name="alerts", key=["id"], key_types=["bigint"])
GOAL_IDENTICAL_S, GOAL_FLOOR_RATIO, GOAL_DIFF_S, GOAL_RSS_MB = 8.0, 3.0, 12.0, 500.0
REGIONS = "array['eu-west-1', 'us-east-1', 'ap-south-1']"

_DDL = ("create table alerts (id bigint not null, region text not null, payload text not null, "
        "updated_at timestamptz not null)")
# ~100 B of payload: three md5s of the id (96 characters) and a short tag.
_FILL = (f"insert into alerts select 2 * g, ({REGIONS})[1 + g %% 3], repeat(md5(g::text), 3) || '-a', "
         "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 ms' from generate_series(%s, %s) g")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- data ------------------------------------------------------------------------------------------


def fill(dsn: str, rows: int) -> None:
    """The same rows on each side: generated, not copied, so both fill at once. The key is
    added after the load (one sort instead of 10M index inserts); VACUUM sets the visibility
    map (index-only paths) and ANALYZE the row estimate the check plans its ranges from."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop table if exists alerts")
        conn.execute(_DDL)
        conn.execute("set synchronous_commit = off")
        conn.execute("set maintenance_work_mem = '512MB'")
        step = 1_000_000
        for lo in range(1, rows + 1, step):
            conn.execute(_FILL, (lo, min(rows, lo + step - 1)))
        conn.execute("alter table alerts add primary key (id)")
        conn.execute("vacuum (analyze) alerts")


def diff_keys(rows: int) -> dict[str, list[int]]:
    g = random.Random(SEED).sample(range(1, rows + 1), DIFFS)
    third = DIFFS // 3
    return {"updated": [2 * x for x in g[:third]], "deleted": [2 * x for x in g[third:2 * third]],
            "inserted": [2 * x + 1 for x in g[2 * third:]]}


def make_differences(dsn_b: str, keys: dict[str, list[int]]) -> None:
    with psycopg.connect(dsn_b, autocommit=True) as conn:
        conn.execute("update alerts set payload = payload || '-changed' where id = any(%s)", (keys["updated"],))
        conn.execute("delete from alerts where id = any(%s)", (keys["deleted"],))
        conn.execute(f"insert into alerts select id, ({REGIONS})[1], 'inserted on b', now() "
                     "from unnest(%s::bigint[]) id", (keys["inserted"],))


# -- the three measurements ------------------------------------------------------------------------


def scan_floor(dsn_a: str, dsn_b: str) -> float:
    """One whole-table hash on each side at the same time (the server's defaults, parallel
    workers included), with the check's own row digest (rowhash.py): what reading and hashing
    every row once on both sides costs here, without ranges."""
    from activities.consistency.ranges import connect
    from activities.consistency.rowhash import row_hash

    conns = [connect(d) for d in (dsn_a, dsn_b)]
    out: list = [None, None]
    q = psycopg.sql.SQL("select count(*), bit_xor({}) from alerts t").format(row_hash(*conns, ALERTS).expr)

    def one(i: int) -> None:
        out[i] = conns[i].execute(q).fetchone()

    try:
        t = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t
    finally:
        for c in conns:
            c.close()


# A process's own peak RSS, read by itself as it exits. Not getrusage()/wait4(): on Linux a
# child's ru_maxrss starts from its parent's high-water mark (kept across fork and exec), so
# every child of this bench would read at least the bench's own size.
_HWM = ("import atexit, sys\n"
        "def _hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            sys.stderr.write('\\nbench-peak-rss-kb ' + line.split()[1] + '\\n')\n"
        "atexit.register(_hwm)\n")


def _peak_mb(stderr: str) -> float:
    lines = [x for x in stderr.splitlines() if x.startswith("bench-peak-rss-kb ")]
    return int(lines[-1].split()[1]) / 1024 if lines else float("nan")


def eagle_check(dsn_a: str, dsn_b: str) -> dict:
    """The check in a child process (``--child``): its RSS is the check's, not the bench's."""
    code = _HWM + "import sys; from bench.consistency import child; child(sys.argv[1], sys.argv[2])"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, dsn_a, dsn_b], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"the check failed (exit {p.returncode}): {p.stderr[-2000:]}")
    rss = _peak_mb(p.stderr)
    res = json.loads(p.stdout)
    # The figure is the call's own time: a worker is already running when a check starts, so
    # the child's interpreter start-up and imports (wall_s) are not part of it.
    return {"s": res["timed_s"], "wall_s": wall, "rss_mb": rss, "result": res}


def child(dsn_a: str, dsn_b: str) -> None:
    from activities.consistency.check import compare_table
    from eagle_dr.config import DEFAULT_CONFIG, load_config

    c = load_config(DEFAULT_CONFIG, env={}).consistency
    t = time.perf_counter()
    res = compare_table(dsn_a, dsn_b, ALERTS, follower=False, chunk_rows=c.chunk_rows, parallel=c.parallel,
                        max_lag=c.max_lag_seconds, cap=10_000, resume=None, beat=lambda pos: None)
    print(json.dumps({**res.model_dump(mode="json"), "timed_s": time.perf_counter() - t}))


def reladiff_bin(venv: Path) -> tuple[Path | None, str]:
    exe = venv / "bin" / "reladiff"
    if exe.exists():
        return exe, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "reladiff", "psycopg2-binary"],
                           capture_output=True, text=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"could not install reladiff: {e}"
    if r.returncode != 0 or not exe.exists():
        return None, f"could not install reladiff: {r.stderr.strip()[-300:]}"
    return exe, ""


def reladiff(exe: Path, url_a: str, url_b: str) -> dict:
    # Its CLI entry point, run by its venv's python so that the process can report its own peak.
    code = _HWM + "from reladiff.__main__ import main; main()"
    argv = [url_a, "alerts", url_b, "alerts", "-k", "id", "-c", "region", "-c", "payload", "-c", "updated_at",
            "--json"]
    # rich wraps its output at the terminal's width, a JSON line included, unless told a wide one.
    env = {**os.environ, "COLUMNS": "100000"}
    t = time.perf_counter()
    p = subprocess.run([str(exe.parent / "python"), "-c", code, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"reladiff failed (exit {p.returncode}): {p.stderr[-2000:]}")
    # One JSON line per differing row version, ["-", values] on A only, ["+", values] on B only
    # (an updated key is both), the key first among the values.
    keys = {int(json.loads(line)[1][0]) for line in p.stdout.splitlines() if line.strip()}
    return {"s": wall, "rss_mb": _peak_mb(p.stderr), "keys": sorted(keys)}


# -- report ----------------------------------------------------------------------------------------


def found_keys(res: dict) -> dict[str, set[int]]:
    d = res["diff"]
    return {k: {int(x[0]) for x in d[f"{k}_keys"]} for k in ("updated", "deleted", "inserted")}


def verdicts(case: str, r: dict, expected: dict[str, list[int]] | None) -> list[str]:
    e, res = r["eagle"], r["eagle"]["result"]
    out = []
    if case == "identical":
        out.append(f"identical <= {GOAL_IDENTICAL_S:.0f} s: {'met' if e['s'] <= GOAL_IDENTICAL_S else 'MISSED'}")
        ratio = e["s"] / r["floor_s"]
        out.append(f"identical within {GOAL_FLOOR_RATIO:.0f}x of the floor: "
                   f"{'met' if ratio <= GOAL_FLOOR_RATIO else 'MISSED'} ({ratio:.2f}x)")
        if res["diff"]["inserted"] + res["diff"]["updated"] + res["diff"]["deleted"]:
            out.append("WRONG: differences reported on identical sides")
    else:
        out.append(f"{DIFFS} differences <= {GOAL_DIFF_S:.0f} s: {'met' if e['s'] <= GOAL_DIFF_S else 'MISSED'}")
        got = found_keys(res)
        exact = all(got[k] == set(v) for k, v in expected.items())
        total = res["diff"]["inserted"] + res["diff"]["updated"] + res["diff"]["deleted"]
        out.append(f"all {DIFFS} keys exact (updated/deleted/inserted as made): "
                   f"{'yes' if exact and total == DIFFS else 'NO'} ({total} reported)")
    out.append(f"peak check RSS < {GOAL_RSS_MB:.0f} MB: {'met' if e['rss_mb'] < GOAL_RSS_MB else 'MISSED'} "
               f"({e['rss_mb']:.0f} MB)")
    return out


def report(rows: int, cases: list[dict]) -> None:
    print()
    print(f"consistency check, {rows:,} rows a side")
    print(f"{'case':16} {'scan floor s':>12} {'eagle-dr s':>11} {'/floor':>7} {'reladiff s':>11} "
          f"{'reladiff/eagle':>15} {'eagle RSS MB':>13} {'reladiff RSS MB':>16}")
    for r in cases:
        e, rd = r["eagle"], r.get("reladiff")
        rd_s = f"{rd['s']:>11.2f}" if rd else f"{'n/a':>11}"
        ratio = f"{rd['s'] / e['s']:>14.1f}x" if rd else f"{'n/a':>15}"
        rd_rss = f"{rd['rss_mb']:>16.0f}" if rd else f"{'n/a':>16}"
        print(f"{r['case']:16} {r['floor_s']:>12.2f} {e['s']:>11.2f} {e['s'] / r['floor_s']:>6.2f}x {rd_s} "
              f"{ratio} {e['rss_mb']:>13.0f} {rd_rss}")
    print()
    print("scan floor: count(*) + bit_xor(the check's row digest) of the whole table, both sides at once.")
    print("eagle-dr: compare_table (activities/consistency/check.py) in a child process, the call's time (no start-up).")
    print("reladiff: its CLI with default bisection and threads, -c naming the non-key columns.")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--port", type=int, default=PORT_A, help="side A's port; B's is the next one")
    ap.add_argument("--reladiff-venv", type=Path, default=Path(".eagle-dr") / "reladiff-venv")
    ap.add_argument("--no-reladiff", action="store_true")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()

    from lab.scratch_postgres import scratch_postgres

    rd_exe, rd_why = (None, "skipped (--no-reladiff)") if args.no_reladiff else reladiff_bin(args.reladiff_venv)
    if rd_exe is None:
        print(f"reladiff: {rd_why}", flush=True)
    print(f"consistency check: {args.rows:,} rows, two throwaway PostgreSQL on ports {args.port} and "
          f"{args.port + 1}", flush=True)
    with scratch_postgres(args.port, "consistency-a") as pa, scratch_postgres(args.port + 1, "consistency-b") as pb:
        dsn_a, dsn_b = pa.cfg.dsn(), pb.cfg.dsn()
        urls = [f"postgresql://{n.cfg.user}@{n.cfg.host}:{n.cfg.port}/{n.cfg.database}" for n in (pa, pb)]
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(fill, d, args.rows) for d in (dsn_a, dsn_b)]:
                f.result()
        print(f"  filled both sides in {time.perf_counter() - t:.1f} s", flush=True)
        scan_floor(dsn_a, dsn_b)  # warm the caches: every measurement reads from memory alike

        expected = diff_keys(args.rows)
        cases = []
        for case in ("identical", f"{DIFFS} differences"):
            if case != "identical":
                make_differences(dsn_b, expected)
            r: dict = {"case": case, "floor_s": scan_floor(dsn_a, dsn_b)}
            r["eagle"] = eagle_check(dsn_a, dsn_b)
            print(f"  {case}: floor {r['floor_s']:.2f} s, eagle-dr {r['eagle']['s']:.2f} s "
                  f"(child wall {r['eagle']['wall_s']:.2f} s, {r['eagle']['result']['ranges_checked']} ranges, "
                  f"RSS {r['eagle']['rss_mb']:.0f} MB)", flush=True)
            if rd_exe is not None:
                try:
                    r["reladiff"] = reladiff(rd_exe, *urls)
                    want = set() if case == "identical" else {k for ks in expected.values() for k in ks}
                    exact = "exact" if set(r["reladiff"]["keys"]) == want else "NOT the keys made"
                    print(f"  {case}: reladiff {r['reladiff']['s']:.2f} s, {len(r['reladiff']['keys'])} keys "
                          f"({exact}), RSS {r['reladiff']['rss_mb']:.0f} MB", flush=True)
                except RuntimeError as e:
                    print(f"  {case}: {e}", flush=True)
            r["verdicts"] = verdicts("identical" if case == "identical" else "diff", r, expected)
            for v in r["verdicts"]:
                print(f"    {v}", flush=True)
            cases.append(r)
    report(args.rows, cases)
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=2, default=str))


if __name__ == "__main__":
    main()
