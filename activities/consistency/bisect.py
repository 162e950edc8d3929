"""One top-level range compared: hashed on both sides, bisected while it differs, and at the
leaves the keys and row digests (not the rows) compared to give the exact keys. An integer key
is not bisected: its range is hashed as ~1000-row buckets in the same single pass
(ranges.hash_buckets), and a differing bucket is already a leaf.

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

from activities.consistency.ranges import Range, ReplayWaiter, buckets, current_lsn, digests, hash_buckets, \
    hash_range, is_integer, key_span, split
from activities.consistency.results import KeyDiff
from activities.consistency.rowhash import RowHash
from activities.consistency.tables import Table

# A range this small is settled at the leaf (keys and 64-bit digests: ~30 bytes a row).
LEAF_ROWS = 2000
# A differing range is cut into this many parts per round (reladiff's default is 32; fewer
# parts mean fewer statements for scattered single-row differences).
FANOUT = 16
# An integer key's range is hashed as buckets of about this many rows in one statement (see
# ranges.hash_buckets): a differing bucket goes straight to the leaf, no range is read twice.
# Small enough that a leaf is cheap (~1000 keys and digests a side), large enough that the
# per-bucket index descent stays small beside the rows it hashes (measured here, 1M rows, best of
# 3: 500- to 4000-row buckets cost 0-15% over one plain hash of the range, within this shared
# machine's noise).
BUCKET_ROWS = 1000
MAX_BUCKETS = 1024


class Outcome:
    def __init__(self) -> None:
        self.diff = KeyDiff()
        self.rows_a = 0
        self.rows_b = 0
        self.ranges_checked = 0
        self.in_flight = 0


class RangeChecker:
    """Compares ranges of one table with one connection to each side (one per thread)."""

    def __init__(self, table: Table, rh: RowHash, a: psycopg.Connection, b: psycopg.Connection,
                 waiter: ReplayWaiter | None, cap: int, side_pool: ThreadPoolExecutor | None = None,
                 chunk_rows: int = 100_000):
        self.table, self.rh, self.a, self.b = table, rh, a, b
        self.chunk_rows = chunk_rows  # about the rows of a top-level range (check.plan cuts them so)
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

    def check(self, r: Range, out: Outcome, top: bool = True, rows: int | None = None) -> None:
        if self.waiter is not None:
            self.waiter.throttle(self.b)
        if is_integer(self.table):
            self.check_buckets(r, out, top, rows or self.chunk_rows)
            return
        da, db = self._both(lambda c: hash_range(c, self.table, r, self.rh),
                            lambda c: hash_range(c, self.table, r, self.rh))
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

    def check_buckets(self, r: Range, out: Outcome, top: bool, rows: int) -> None:
        """An integer key: ``r`` hashed as buckets in one statement a side; the differing ones
        settled at the leaf (or, when larger than a leaf, bucketed again)."""
        span = key_span([self.a, self.b], self.table, r)
        n = min(MAX_BUCKETS, max(1, -(-rows // BUCKET_ROWS)))
        parts = [r] if span is None else buckets(r, span, n)
        da, db = self._both(lambda c: hash_buckets(c, self.table, parts, self.rh),
                            lambda c: hash_buckets(c, self.table, parts, self.rh))
        # One range hashed (its buckets with it): an identical table checks each range once.
        out.ranges_checked += 1
        if top:
            out.rows_a += sum(d.rows for d in da)
            out.rows_b += sum(d.rows for d in db)
        for p, x, y in zip(parts, da, db):
            if x == y:
                continue
            size = max(x.rows, y.rows)
            # One bucket holding more than a leaf should (rows was an underestimate: keys
            # clustered in a range cut by key value) is bucketed again, finer, not fetched whole.
            if size <= LEAF_ROWS or (len(parts) < 2 and size <= rows):
                self.leaf(p, out)
            else:
                self.check(p, out, top=False, rows=size)

    def leaf(self, r: Range, out: Outcome) -> None:
        ka, kb = self._both(lambda c: digests(c, self.table, r, self.rh),
                            lambda c: digests(c, self.table, r, self.rh))
        differing = [k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k)]
        if differing and self.waiter is not None:
            keys = sorted(differing)
            ka, kb, unsettled = self.waiter.recheck(
                self.a, self.b, lambda c: digests(c, self.table, r, self.rh, only=keys), keys)
            out.in_flight += len(unsettled)
            differing = [k for k in differing if k not in unsettled and ka.get(k) != kb.get(k)]
        out.diff.add_differing(sorted(differing), ka, kb, self.cap)
