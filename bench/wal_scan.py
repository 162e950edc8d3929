"""Reading a long divergence's WAL: ``activities.postgres.wal.scan`` (what failback's measure
and reconcile run on the old primary) beside bare ``pg_waldump`` of the same WAL to /dev/null,
same run, same throwaway PostgreSQL 15.

For each size, a table takes committed inserts until that much WAL was written after a
recorded LSN; the server is stopped (as a fenced old primary is) and both read from that LSN
to the end. Peak RSS: this process's high-water mark after the scan (sizes run smallest first),
and pg_waldump's own (RUSAGE_CHILDREN, the largest child so far).

    python -m bench.wal_scan --mb 100,400
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import time

from activities.postgres.wal import _segments, scan, segment_name, segment_size
from activities.postgres.lsn import lsn_to_int
from lab.scratch_postgres import scratch_postgres

# Away from the lab, the tests and the other benches' scratch servers.
PORT = 22700


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def measure(port: int, mb: int) -> dict:
    with scratch_postgres(port, "wal-scan") as pg:
        with pg.connect() as conn:
            # Keep every segment written after the start: the read needs all of them.
            conn.execute("alter system set max_wal_size = '16GB'")
            conn.execute("alter system set wal_keep_size = '16GB'")
            conn.execute("select pg_reload_conf()")
            conn.execute("create table t (id bigint primary key, pad text, updated_at timestamptz default now())")
            conn.execute("checkpoint")
            start = conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]
            n = 0
            while conn.execute("select pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (start,)
                               ).fetchone()[0] < mb * 2 ** 20:
                with conn.transaction():
                    for _ in range(20):
                        conn.execute("insert into t (id, pad) select g, repeat('x', 80) "
                                     "from generate_series(%s::bigint, %s::bigint) g", (n, n + 4999))
                        n += 5000
        pg.ctl.stop("fast")
        wal = str(pg.data_dir / "pg_wal")
        t = time.perf_counter()
        found = scan(pg.ctl, wal, 1, start)
        scan_s = time.perf_counter() - t
        rss = _rss_mb(resource.RUSAGE_SELF)
        seg = segment_size(pg.ctl)
        first = segment_name(1, lsn_to_int(start), seg)
        argv, kw = pg.ctl._as_server_user([pg.ctl.tool("pg_waldump"), "-p", wal, "-s", start, first,
                                           max(_segments(wal, 1))], None)
        t = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        bare_s = time.perf_counter() - t
        return {"mb": mb, "rows": n, "commits": len(found.commits), "scan_s": scan_s, "bare_s": bare_s,
                "rss_mb": rss, "bare_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", default="100,400", help="comma-separated MB of WAL after the start")
    ap.add_argument("--port", type=int, default=PORT)
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.mb.split(",") if s.strip())
    print(f"WAL scan: {sizes} MB of WAL after the start, throwaway PostgreSQL on port {args.port}", flush=True)
    rows = [measure(args.port, mb) for mb in sizes]
    print()
    print(f"{'WAL MB':>7} {'commits':>8} {'scan s':>8} {'pg_waldump s':>13} {'ratio':>7} {'scan peak RSS MB':>17} "
          f"{'pg_waldump RSS MB':>18}")
    for r in rows:
        print(f"{r['mb']:>7} {r['commits']:>8} {r['scan_s']:>8.2f} {r['bare_s']:>13.2f} "
              f"{r['scan_s'] / r['bare_s']:>6.2f}x {r['rss_mb']:>17.0f} {r['bare_rss_mb']:>18.0f}")
    print()
    print("scan: pg_waldump streamed and parsed (commits, changed relation files and blocks), as failback runs it.")
    print("pg_waldump: the same WAL to /dev/null, no parsing.")


if __name__ == "__main__":
    main()
