"""One table compared: cut into top-level ranges on A, the ranges checked ``parallel`` at a time
(each thread with its own connection to each side), the position heartbeated so that a
retry after a killed worker goes on from the last finished range."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

import psycopg
from pydantic import BaseModel

from activities.consistency.bisect import Outcome, RangeChecker
from activities.consistency.ranges import Range, ReplayWaiter, connect, row_hash_when_replayed, split
from activities.consistency.results import TableResult
from activities.consistency.tables import Table
from activities.heartbeat import heartbeating

# A huge table still has at most this many top-level ranges: the list is in every heartbeat.
MAX_RANGES = 512


class Position(BaseModel):
    """What a heartbeat carries: enough to resume without re-hashing finished ranges."""

    table: str
    ranges: list[Range]
    done: list[int] = []
    partial: TableResult


def plan(a: psycopg.Connection, b: psycopg.Connection, table: Table, chunk_rows: int) -> list[Range]:
    est = a.execute("select greatest(reltuples, 0)::bigint from pg_class where oid = %s::regclass",
                    (table.ident.as_string(a),)).fetchone()[0]
    if est == 0:
        # Never analysed (reltuples -1, or 0): count, once.
        est = a.execute(f"select count(*) from {table.ident.as_string(a)}").fetchone()[0]
    parts = min(MAX_RANGES, max(1, math.ceil(est / chunk_rows)))
    return split([a, b], table, Range(), parts, est)


def compare_table(dsn_a: str, dsn_b: str, table: Table, *, follower: bool, chunk_rows: int, parallel: int,
                  max_lag: float, cap: int, resume: Position | None, beat: Callable[[Position], None]
                  ) -> TableResult:
    started = time.monotonic()
    local = threading.local()
    conns: list[psycopg.Connection] = []
    lock = threading.Lock()
    pos_lock = threading.Lock()

    def beat_now() -> None:
        with pos_lock:
            if waiter is not None:
                # Said in the heartbeat while it happens (the UI's pending activity), not only at the end.
                pos.partial.throttling = waiter.throttling
                pos.partial.throttled_seconds = base_throttled + waiter.throttled_seconds
            beat(pos)

    waiter = ReplayWaiter(max_lag, lambda: None) if follower else None

    def pair() -> tuple[psycopg.Connection, psycopg.Connection]:
        if not hasattr(local, "a"):
            local.a, local.b = connect(dsn_a), connect(dsn_b)
            with lock:
                conns.extend([local.a, local.b])
        return local.a, local.b

    side_pool = None if follower else ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="side-b")
    try:
        a, b = pair()
        # Waiting for the standby to replay, and planning the ranges (a count(*), or a
        # row_number() over every key of a non-integer key), can outlast the heartbeat timeout
        # on a large table: every attempt then timed out the same way and the check failed.
        # Beat meanwhile, carrying the position this attempt resumed from (or none).
        with heartbeating(details=resume.model_dump(mode="json") if resume is not None else None):
            # From both catalogs each time, also on a resume: the expression is code, not position.
            rh = row_hash_when_replayed(a, b, table, waiter)
            if resume is not None and resume.table == table.qualified:
                pos = resume
                pos.partial.resumed_ranges = len(pos.done)
            else:
                ranges = plan(a, b, table, chunk_rows)
                pos = Position(table=table.qualified, ranges=ranges,
                               partial=TableResult(table=table.qualified, key=table.key, row_hash=rh.kind,
                                                   ranges=len(ranges)))
        result = pos.partial
        base_throttled = result.throttled_seconds
        todo = [i for i in range(len(pos.ranges)) if i not in set(pos.done)]

        def one(i: int) -> Outcome:
            ca, cb = pair()
            out = Outcome()
            RangeChecker(table, rh, ca, cb, waiter, cap, side_pool, chunk_rows).check(pos.ranges[i], out)
            return out

        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="range") as pool:
            futures = {pool.submit(one, i): i for i in todo}
            while futures:
                finished, _ = wait(futures, timeout=3, return_when=FIRST_COMPLETED)
                for f in finished:
                    i = futures.pop(f)
                    out = f.result()
                    with pos_lock:
                        result.rows_a += out.rows_a
                        result.rows_b += out.rows_b
                        result.ranges_checked += out.ranges_checked
                        result.in_flight += out.in_flight
                        result.diff.merge(out.diff, cap)
                        pos.done.append(i)
                beat_now()
        if waiter is not None:
            result.throttled_seconds = base_throttled + waiter.throttled_seconds
            result.throttling = False
        result.seconds += time.monotonic() - started
        return result
    finally:
        if side_pool is not None:
            side_pool.shutdown(wait=False)
        for c in conns:
            c.close()
