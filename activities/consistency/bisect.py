"""One top-level range compared: hashed on both sides, bisected while it differs, and at the
leaves the keys and row digests (not the rows) compared to give the exact keys.

Under live replication (``follower`` set: B is A's physical standby) every comparison is made
at a consistent point: A's ``pg_current_wal_lsn()`` is read right after A's statement (so it is
at or past every commit that statement saw), and B is read only once it has replayed that LSN.
B may then be ahead of what A's statement saw: a row written in between differs. So a key that
differs at a leaf is re-checked once, as A, B, A again: when A's two reads agree and B (read
after replaying past A's first) differs from them, no write was in flight for that key and the
difference is real; when A's reads disagree the row is still being written, and it is counted
as in flight, never reported.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg

from activities.consistency.ranges import Key, Range, ReplayWaiter, current_lsn, digests, hash_range, split
from activities.consistency.results import KeyDiff
from activities.consistency.tables import Table

# A range this small is settled at the leaf (keys and 64-bit digests: ~30 bytes a row).
LEAF_ROWS = 2000
# A differing range is cut into this many parts per round (reladiff's default is 32; fewer
# parts mean fewer statements for scattered single-row differences).
FANOUT = 16


class Outcome:
    def __init__(self) -> None:
        self.diff = KeyDiff()
        self.rows_a = 0
        self.rows_b = 0
        self.ranges_checked = 0
        self.in_flight = 0


class RangeChecker:
    """Compares ranges of one table with one connection to each side (one per thread)."""

    def __init__(self, table: Table, kind: str, a: psycopg.Connection, b: psycopg.Connection,
                 waiter: ReplayWaiter | None, cap: int, side_pool: ThreadPoolExecutor | None = None):
        self.table, self.kind, self.a, self.b = table, kind, a, b
        self.waiter, self.cap = waiter, cap
        # Two independent sides (no replication between them): both hashed at the same time.
        self.side_pool = side_pool

    def _both(self, fa, fb):
        if self.waiter is not None:
            va = fa(self.a)
            self.waiter.replayed(self.b, current_lsn(self.a))
            return va, fb(self.b)
        if self.side_pool is None:
            return fa(self.a), fb(self.b)
        fut = self.side_pool.submit(fb, self.b)
        return fa(self.a), fut.result()

    def check(self, r: Range, out: Outcome, top: bool = True) -> None:
        if self.waiter is not None:
            self.waiter.throttle(self.b)
        da, db = self._both(lambda c: hash_range(c, self.table, r, self.kind),
                            lambda c: hash_range(c, self.table, r, self.kind))
        out.ranges_checked += 1
        if top:
            out.rows_a += da.rows
            out.rows_b += db.rows
        if da == db:
            return
        rows = max(da.rows, db.rows)
        # Cut where the side with more rows has its keys (the other may have none there).
        sides = [self.a, self.b] if da.rows >= db.rows else [self.b, self.a]
        parts = [] if rows <= LEAF_ROWS else split(sides, self.table, r, FANOUT, rows)
        if len(parts) < 2:
            self.leaf(r, out)
            return
        for p in parts:
            self.check(p, out, top=False)

    def leaf(self, r: Range, out: Outcome) -> None:
        ka, kb = self._both(lambda c: digests(c, self.table, r, self.kind),
                            lambda c: digests(c, self.table, r, self.kind))
        differing = [k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k)]
        if differing and self.waiter is not None:
            ka, kb, unsettled = self.recheck(r, sorted(differing))
            out.in_flight += len(unsettled)
            differing = [k for k in differing if k not in unsettled and ka.get(k) != kb.get(k)]
        self.record(sorted(differing), ka, kb, out)

    def recheck(self, r: Range, keys: list[Key]) -> tuple[dict, dict, set]:
        ka = digests(self.a, self.table, r, self.kind, only=keys)
        self.waiter.replayed(self.b, current_lsn(self.a))
        kb = digests(self.b, self.table, r, self.kind, only=keys)
        again = digests(self.a, self.table, r, self.kind, only=keys)
        unsettled = {k for k in keys if ka.get(k) != again.get(k)}
        return ka, kb, unsettled

    def record(self, keys: list[Key], ka: dict, kb: dict, out: Outcome) -> None:
        inserted = [list(k) for k in keys if k not in ka]
        deleted = [list(k) for k in keys if k not in kb]
        updated = [list(k) for k in keys if k in ka and k in kb]
        for kind, ks in (("inserted", inserted), ("updated", updated), ("deleted", deleted)):
            if ks:
                out.diff.add(kind, ks, self.cap)
