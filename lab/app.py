"""The Eagle Alert sample app: the lab's traffic, whose outage the runbooks measure.

It writes alerts to the active region's PostgreSQL (the routing file says which), caches
each one in that region's Redis, and appends every attempt to a durable log
(``<state>/app/writes.jsonl``, fsync'd per line): ``ok: true`` lines are the acknowledged
writes. After a failover, acknowledged ids missing from the new primary are exactly the
writes lost (RPO); the gap between the last failed and first succeeded attempt is the
outage seen by clients (RTO).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from activities.redis.status import client as redis_client
from activities.routing import LabRouter
from eagle_dr.config import EagleConfig, load_config


@dataclass
class Write:
    id: int
    t: float
    ok: bool
    region: str | None
    error: str | None = None


class WriteLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, w: Write) -> None:
        line = json.dumps({"id": w.id, "t": w.t, "ok": w.ok, "region": w.region, **({"error": w.error} if w.error else {})})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[Write]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            out.append(Write(d["id"], d["t"], d["ok"], d.get("region"), d.get("error")))
        return out

    def acknowledged(self) -> list[int]:
        return [w.id for w in self.entries() if w.ok]

    def next_id(self) -> int:
        entries = self.entries()
        return max((w.id for w in entries), default=0) + 1


def write_log(cfg: EagleConfig) -> WriteLog:
    return WriteLog(Path(cfg.lab.state_dir) / "app" / "writes.jsonl")


class SampleApp:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg
        self.router = LabRouter(cfg.lab.state_dir)
        self.log = write_log(cfg)
        self.conns: dict[str, psycopg.Connection] = {}
        self.stopping = False

    def _conn(self, region: str) -> psycopg.Connection:
        c = self.conns.get(region)
        if c is None or c.closed or c.broken:
            pg = self.cfg.region(region).postgres
            c = psycopg.connect(pg.dsn(), connect_timeout=1, autocommit=True,
                                options="-c statement_timeout=2000")
            self.conns[region] = c
        return c

    def write_one(self, alert_id: int) -> Write:
        region = self.router.active_region()
        t = time.time()
        if region is None:
            return Write(alert_id, t, False, None, "no active region")
        try:
            self._conn(region).execute(
                "insert into alerts (id, region, payload) values (%s, %s, %s)",
                (alert_id, region, json.dumps({"severity": "critical", "source": "sample-app"})))
        except psycopg.Error as e:
            old = self.conns.pop(region, None)
            if old is not None:
                old.close()
            return Write(alert_id, t, False, region, str(e).strip().splitlines()[0][:200] if str(e).strip() else "error")
        try:
            redis_client(self.cfg.region(region).redis, timeout=1).set(f"alert:{alert_id}", region, ex=3600)
        except (redis.RedisError, OSError):
            pass  # the cache is best effort; the database row is the acknowledged write
        return Write(alert_id, time.time(), True, region)

    def run(self) -> None:
        interval = 1.0 / self.cfg.lab.app_writes_per_second
        next_id = self.log.next_id()
        while not self.stopping:
            started = time.monotonic()
            self.log.append(self.write_one(next_id))
            next_id += 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


def main() -> None:
    ap = argparse.ArgumentParser(description="eagle-dr lab sample app")
    ap.add_argument("--config")
    args = ap.parse_args()
    app = SampleApp(load_config(args.config))

    def stop(*_):
        app.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    app.run()


if __name__ == "__main__":
    main()
