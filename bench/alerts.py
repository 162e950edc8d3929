"""Alert receiver latency: ``eagle-dr alerts serve`` beside a bare aiohttp handler, same run.

Both run as their own processes on 127.0.0.1 and get the same webhook v4 documents (one
alert each) from one keep-alive client, sequentially, after a warm-up. The bare handler
checks the bearer token and parses the JSON, nothing else; the receiver also validates the
payload, matches the rules and signals-with-start AlertIncidentWorkflow on a Temporal dev
server of its own (ports shifted by EAGLE_DR_BENCH_PORT_SHIFT, default 5200) with the control
worker running, i.e. it answers only once the alert is durable. Two workloads:

- new incident: every alert has its own group key, so every post starts a workflow;
- same incident: every alert joins one group (a storm), so every post signals one run.

Goal: receiver p99 < 20 ms per alert.

    python -m bench.alerts --alerts 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

PORT_SHIFT = int(os.environ.get("EAGLE_DR_BENCH_PORT_SHIFT", "5200"))
GOAL_P99_MS = 20.0


def _bare_server(port: int, token: str) -> None:
    """The floor: a bare aiohttp handler (token check, JSON parse, 200)."""
    import hmac

    from aiohttp import web

    expected = f"Bearer {token}".encode()

    async def alert(request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return web.json_response({"error": "unauthorized"}, status=401)
        doc = json.loads(await request.read())
        return web.json_response({"status": "ok", "alerts": len(doc.get("alerts", []))})

    async def ready(_request):
        return web.Response(text="ok")

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/alert", alert)
    app.router.add_get("/-/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _doc(i: int, same_group: bool, run: str) -> dict:
    region = f"bench-{run}" if same_group else f"bench-{run}-{i}"
    labels = {"alertname": "BenchAlert", "region": region, "instance": f"node-{i}"}
    return {"receiver": "eagle-dr", "status": "firing", "version": "4", "truncatedAlerts": 0,
            "groupKey": f'{{}}:{{alertname="BenchAlert", region="{region}"}}',
            "groupLabels": {"alertname": "BenchAlert", "region": region}, "commonLabels": labels,
            "commonAnnotations": {}, "externalURL": "http://bench",
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "bench"},
                        "startsAt": datetime.now(timezone.utc).isoformat(), "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://bench", "fingerprint": f"{i:016x}"}]}


async def _measure(url: str, token: str, n: int, warmup: int, same_group: bool) -> list[float]:
    import aiohttp

    run = uuid.uuid4().hex[:8]
    docs = [json.dumps(_doc(i, same_group, run)).encode() for i in range(warmup + n)]
    out = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for i, body in enumerate(docs):
            t0 = time.perf_counter()
            async with s.post(url, data=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1000)
    return out


async def _measure_temporal(cfg, address: str, n: int, warmup: int, same_group: bool) -> list[float]:
    """The receiver's Temporal part alone, in this process: parse, plan and signal-with-start of
    the same documents, no HTTP. What the receiver adds is the difference."""
    from alerts.dispatch import Dispatcher
    from alerts.payload import parse
    from alerts.plan import plan

    run = uuid.uuid4().hex[:8]
    docs = [json.dumps(_doc(i, same_group, run)).encode() for i in range(warmup + n)]
    d = Dispatcher(address, cfg.temporal.control_task_queue, cfg.alerts.temporal_timeout, config=cfg)
    await d.client()
    out = []
    for i, body in enumerate(docs):
        t0 = time.perf_counter()
        for inc in plan(cfg, parse(body))[0]:
            await d.deliver(inc)
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alerts", type=int, default=500, help="timed posts per workload and server")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        _bare_server(args.bare_server, os.environ["EAGLE_DR_ALERTS_TOKEN"])
        return

    from eagle_dr.config import load_config
    from eagle_dr.devserver import DevServer
    from lab.lab import Lab
    from lab.ports import write_shifted_config
    from lab.processes import kill_tree, spawn

    workdir = Path(tempfile.mkdtemp(prefix="eagle-dr-bench-alerts-"))
    workdir.chmod(0o755)
    cfg_path = write_shifted_config(workdir, PORT_SHIFT)
    cfg = load_config(cfg_path, env={})
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "EAGLE_DR_ALERTS_TOKEN": token, "EAGLE_DR_LOG_FORMAT": "json",
           "EAGLE_DR_LOG_LEVEL": "warning", "EAGLE_DR_STATE_DIR": cfg.lab.state_dir}
    ds, lab = DevServer(cfg), Lab(cfg, str(cfg_path))
    listen = cfg.alerts.listen
    bare_port = listen.port + 1
    pids: list[int] = []
    print(f"alert receiver latency: eagle-dr alerts serve beside a bare aiohttp handler; {args.alerts} alerts "
          f"per workload, dev server and control worker in {workdir}", flush=True)
    results: dict = {}
    try:
        ds.up()
        lab.ensure_secrets()  # the codec key the worker and the receiver encrypt with
        lab.start_worker(None)
        pids.append(spawn([sys.executable, "-m", "eagle_dr.cli", "--config", str(cfg_path), "alerts", "serve"],
                          pidfile=workdir / "receiver.pid", logfile=workdir / "receiver.log", env=env))
        pids.append(spawn([sys.executable, "-m", "bench.alerts", "--bare-server", str(bare_port)],
                          pidfile=workdir / "bare.pid", logfile=workdir / "bare.log", env=env))
        _wait_ready(f"http://{listen.host}:{listen.port}/-/ready")
        _wait_ready(f"http://127.0.0.1:{bare_port}/-/ready")
        for workload, same in (("new incident", False), ("same incident", True)):
            # Interleaved per workload: both servers see the same machine load.
            eagle = asyncio.run(_measure(f"http://{listen.host}:{listen.port}/alert", token, args.alerts,
                                         args.warmup, same))
            bare = asyncio.run(_measure(f"http://127.0.0.1:{bare_port}/alert", token, args.alerts, args.warmup,
                                        same))
            temporal = asyncio.run(_measure_temporal(cfg, ds.address, args.alerts, args.warmup, same))
            results[workload] = {name: {"p50_ms": _pct(xs, 50), "p99_ms": _pct(xs, 99), "mean_ms": statistics.mean(xs),
                                        "max_ms": max(xs)}
                                 for name, xs in (("eagle-dr", eagle), ("bare", bare), ("temporal", temporal))}
    finally:
        for pid in pids:
            kill_tree(pid, sig=15)
        lab.down()
        ds.down()
        shutil.rmtree(workdir, ignore_errors=True)
    ok = True
    print(f"{'workload':15} {'server':9} {'p50 ms':>8} {'p99 ms':>8} {'mean':>8} {'max':>8}")
    for workload, r in results.items():
        for name in ("eagle-dr", "bare", "temporal"):
            f = r[name]
            print(f"{workload:15} {name:9} {f['p50_ms']:8.2f} {f['p99_ms']:8.2f} {f['mean_ms']:8.2f} {f['max_ms']:8.2f}")
        e, b = r["eagle-dr"], r["bare"]
        met = e["p99_ms"] < GOAL_P99_MS
        ok = ok and met
        print(f"{workload:15} ratio     {e['p50_ms'] / b['p50_ms']:8.2f} {e['p99_ms'] / b['p99_ms']:8.2f}   "
              f"goal p99 < {GOAL_P99_MS:.0f} ms: {'met' if met else 'MISSED'}")
    print("eagle-dr answers after Temporal has recorded the alert (signal-with-start); 'temporal' is that call "
          "alone (parse, rules, signal-with-start, no HTTP), so eagle-dr minus temporal is the receiver's own cost; "
          "the bare handler records nothing.")
    results["measured_at"] = datetime.now(timezone.utc).isoformat()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
