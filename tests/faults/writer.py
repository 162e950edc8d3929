"""A client that keeps writing while a runbook runs, like the sample app (lab/app.py): each
insert goes to the region the lab's routing names, and an id counts as acknowledged only
once its COMMIT returned. The ids live in a range of their own, so a check can ask the
primary for exactly these."""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg

from activities.routing import LabRouter


class AckedWriter:
    def __init__(self, lab, per_second: float = 20):
        self.lab = lab
        self.router = LabRouter(lab.state)
        self.interval = 1.0 / per_second
        # 9.6e9 and up: clear of the sample app's ids and the other tests' fixed keys.
        self.next_id = 9_600_000_000 + (uuid.uuid4().int % 10**5) * 10**4
        self.acked: dict[int, float] = {}
        self.region_of: dict[int, str] = {}
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fault-writer", daemon=True)
        self._conns: dict[str, psycopg.Connection] = {}

    def __enter__(self) -> "AckedWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for c in self._conns.values():
            c.close()
        self._conns.clear()

    def acked_ids(self) -> list[int]:
        with self._lock:
            return sorted(self.acked)

    def _conn(self, region: str) -> psycopg.Connection:
        c = self._conns.get(region)
        if c is None or c.closed or c.broken:
            c = psycopg.connect(self.lab.cfg.region(region).postgres.dsn(), connect_timeout=1, autocommit=True,
                                options="-c statement_timeout=2000")
            self._conns[region] = c
        return c

    def _write(self, i: int) -> None:
        region = self.router.active_region()
        if region is None:
            self.failed += 1
            return
        try:
            self._conn(region).execute("insert into alerts (id, region, payload) values (%s, %s, %s)",
                                       (i, region, json.dumps({"source": "fault-writer"})))
        except psycopg.Error:
            self.failed += 1
            old = self._conns.pop(region, None)
            if old is not None:
                old.close()
            return
        with self._lock:
            self.acked[i] = time.time()
            self.region_of[i] = region

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._write(self.next_id)
            self.next_id += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
