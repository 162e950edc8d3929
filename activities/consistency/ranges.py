"""Primary-key ranges of a table, hashed set-wise on each side.

A range is ``lo <= key < hi`` as a row comparison over the primary key's columns (composite keys
included), ``None`` meaning open: the first and last ranges of a table are open-ended, so a row
one side has beyond the other's last key still falls in a range. Bounds travel as text and are
cast back with the key's column types, so any key type with a text form works.

The digest of a range is ``count(*)`` and ``bit_xor`` of a 64-bit hash of each whole row:
- order-independent, so no sort and no ``string_agg`` buffer, one pass over the range in
  whatever order the scan returns (``md5(string_agg(... order by pk))`` sorts, and holds the
  whole range's text in memory);
- ``bit_xor`` of a bigint is a plain integer op per row (a ``sum`` over numeric, as the restore
  drill uses, allocates per row). XOR cancels only equal hashes, and under a primary key no two
  rows are equal (the key is part of what is hashed);
- the row hash (rowhash.py) chains each column's own extended hash function: no text
  conversion of the row (the expensive part of ``md5(t::text)`` on jsonb), no copy of the whole
  row, and stable across servers and major versions because hash partitioning depends on it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import psycopg
from psycopg import sql
from pydantic import BaseModel

from activities.consistency.rowhash import RowHash, SchemaDiffers, row_hash
from activities.consistency.tables import Table
from activities.postgres.lsn import int_to_lsn, lsn_to_int

# A column hashed by its text form (rowhash.py) prints by these: both sides use the same.
SESSION = ("set TimeZone = 'UTC'", "set DateStyle = 'ISO, YMD'", "set IntervalStyle = 'postgres'",
           "set extra_float_digits = 1", "set bytea_output = 'hex'", "set lc_monetary = 'C'")

Key = tuple[str, ...]


class Range(BaseModel):
    lo: list[str] | None = None  # inclusive
    hi: list[str] | None = None  # exclusive


class Digest(BaseModel):
    rows: int
    xor: int


def connect(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    for s in SESSION:
        conn.execute(s)
    return conn


def _keys(table: Table) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(k) for k in table.key))


def _bound(table: Table, values: list[str]) -> tuple[sql.Composable, list[str]]:
    casts = sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(ty)) for ty in table.key_types)
    return sql.SQL("({})").format(casts), list(values)


def where(table: Table, r: Range) -> tuple[sql.Composable, list]:
    parts: list[sql.Composable] = [sql.SQL("true")]
    params: list = []
    for op, b in ((">=", r.lo), ("<", r.hi)):
        if b is not None:
            expr, p = _bound(table, b)
            parts.append(sql.SQL("{} {} {}").format(_keys(table), sql.SQL(op), expr))
            params += p
    return sql.SQL(" and ").join(parts), params


def key_text(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in table.key)


def hash_range(conn: psycopg.Connection, table: Table, r: Range, rh: RowHash) -> Digest:
    cond, params = where(table, r)
    q = sql.SQL("select count(*), coalesce(bit_xor({}), 0) from {} as t where {}").format(
        rh.expr, table.ident, cond)
    n, x = conn.execute(q, params).fetchone()
    return Digest(rows=n, xor=x)


BIGINT_MIN, BIGINT_MAX = -(2 ** 63), 2 ** 63 - 1


def is_integer(table: Table) -> bool:
    return len(table.key) == 1 and table.key_types[0] in ("bigint", "integer", "smallint")


def key_span(conns: list[psycopg.Connection], table: Table, r: Range) -> tuple[int, int] | None:
    """The smallest and largest key either side has in ``r`` (an integer key: two index probes
    a side, no scan), or None when both are empty there."""
    cond, params = where(table, r)
    k = sql.Identifier(table.key[0])
    lo, hi = None, None
    for c in conns:
        a, b = c.execute(sql.SQL("select min({k}), max({k}) from {t} where {c}").format(
            k=k, t=table.ident, c=cond), params).fetchone()
        if a is not None:
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    return None if lo is None else (lo, hi)


def buckets(r: Range, span: tuple[int, int], parts: int) -> list[Range]:
    """``r`` (integer key) cut arithmetically into ``parts`` buckets over ``span``; the first
    and last keep ``r``'s own (maybe open) ends, so a row beyond the span still falls in one."""
    lo, hi = span
    step = max(1, math.ceil((hi - lo + 1) / parts))
    cuts = [[str(v)] for v in range(lo + step, hi + 1, step)]
    bounds = [r.lo, *cuts, r.hi]
    return [Range(lo=bounds[i], hi=bounds[i + 1]) for i in range(len(bounds) - 1)]


def hash_buckets(conn: psycopg.Connection, table: Table, parts: list[Range], rh: RowHash) -> list[Digest]:
    """The digest of each of ``parts`` (adjacent buckets of an integer key) in one statement.

    One index range scan per bucket through a LATERAL join, so a range is read once and the
    buckets that differ are already small enough to settle at the leaf: nothing is hashed a
    second time to find where a difference is (a hash of the whole range and then of its
    parts reads a differing range twice or more). A ``group by`` on the bucket number reads
    the same rows but sorts or hashes them all first: measured 1.4-3x slower than this here.
    Open ends are the type's extremes, so the bounds are plain bigints and the index is used."""
    los = [BIGINT_MIN if p.lo is None else int(p.lo[0]) for p in parts]
    his = [BIGINT_MAX if p.hi is None else int(p.hi[0]) - 1 for p in parts]  # inclusive
    k = sql.Identifier(table.key[0])
    q = sql.SQL("select s.n, s.x from unnest(%s::bigint[], %s::bigint[]) with ordinality as u(lo, hi, i), "
                "lateral (select count(*) as n, coalesce(bit_xor({h}), 0) as x from {t} as t "
                "where {k} >= u.lo and {k} <= u.hi) as s order by u.i").format(h=rh.expr, t=table.ident, k=k)
    return [Digest(rows=n, xor=x) for n, x in conn.execute(q, (los, his)).fetchall()]


def digests(conn: psycopg.Connection, table: Table, r: Range, rh: RowHash, only: list[Key] | None = None
            ) -> dict[Key, int]:
    """Each row's key and 64-bit digest in ``r`` (or just the keys ``only``): what a bisect
    leaf compares. The rows' contents never cross the network."""
    cond, params = where(table, r)
    if only is not None:
        arrays = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(sql.SQL(ty)) for ty in table.key_types)
        cond = sql.SQL("{} and {} in (select * from unnest({}))").format(cond, _keys(table), arrays)
        params += [[k[i] for k in only] for i in range(len(table.key))]
    q = sql.SQL("select {}, {} from {} as t where {}").format(key_text(table), rh.expr, table.ident, cond)
    return {tuple(row[:-1]): row[-1] for row in conn.execute(q, params).fetchall()}


def split(conns: list[psycopg.Connection], table: Table, r: Range, parts: int, rows: int) -> list[Range]:
    """``r`` cut into about ``parts`` ranges of similar size.

    An integer key is cut arithmetically between the smallest and largest key either side has
    in ``r`` (two index probes per side, no scan); any other key at every n-th key of the first
    of ``conns`` (the side with more rows in ``r``: an index-only walk over its keys)."""
    if parts < 2:
        return [r]
    if is_integer(table):
        span = key_span(conns, table, r)
        if span is None or span[1] - span[0] < 2:
            return [r]
        return buckets(r, span, parts)
    step = max(1, math.ceil(rows / parts))
    cond, params = where(table, r)
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)
    # The subquery's columns renamed by position: a key column named rn was two columns rn.
    own = [sql.Identifier(f"k{i}") for i in range(len(table.key))]
    q = sql.SQL("select {kt} from (select {k}, row_number() over (order by {k}) from {t} where {c}) "
                "as s ({own}, rn) where rn > 1 and (rn - 1) %% %s = 0 order by rn").format(
        kt=sql.SQL(", ").join(sql.SQL("{}::text").format(o) for o in own), k=cols, t=table.ident, c=cond,
        own=sql.SQL(", ").join(own))
    cuts = [list(row) for row in conns[0].execute(q, [*params, step]).fetchall()]
    if not cuts:
        return [r]
    bounds = [r.lo, *cuts, r.hi]
    return [Range(lo=bounds[i], hi=bounds[i + 1]) for i in range(len(bounds) - 1)]


# -- a standby at a consistent point -----------------------------------------------------------------


# WAL page headers (on 64-bit builds): the long one opens each segment, the short one each page.
_LONG_PAGE_HEADER, _SHORT_PAGE_HEADER = 40, 24


def current_lsn(conn: psycopg.Connection) -> str:
    """Where the primary's WAL ends, everything committed so far included: the *insert*
    position. ``pg_current_wal_lsn()`` is the *write* position, which an asynchronous commit
    (synchronous_commit = off) is already visible before: the standby passed it without the row,
    and the check reported a difference that was only in flight. An insert position just past a
    page header is the end of the record before the header, which is what the standby's replay
    position says once it has replayed that record (else an idle primary would never be reached)."""
    lsn, segment, block = conn.execute(
        "select pg_current_wal_insert_lsn()::text, (select setting::bigint from pg_settings"
        " where name = 'wal_segment_size'), current_setting('wal_block_size')::int").fetchone()
    return int_to_lsn(record_end(lsn_to_int(lsn), segment, block))


def record_end(insert: int, segment: int, block: int) -> int:
    """An insert position as the end of the last record: before the page header it points past."""
    if insert % segment == _LONG_PAGE_HEADER:
        return insert - _LONG_PAGE_HEADER
    if insert % block == _SHORT_PAGE_HEADER:
        return insert - _SHORT_PAGE_HEADER
    return insert


def lag_seconds(standby: psycopg.Connection) -> float:
    """How far the standby's replay trails: the age of the last transaction it replayed while
    it holds WAL it has not replayed yet (0 when it has replayed all it received). Measured on
    the standby itself: the primary's replay_lag keeps its last value while replay is stuck."""
    v = standby.execute("select case when pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() "
                        "then extract(epoch from now() - pg_last_xact_replay_timestamp()) else 0 end").fetchone()[0]
    return float(v or 0)


class ReplayWaiter:
    """Waits (bounded) until the standby has replayed a primary LSN, and throttles: while the
    standby's replay lag passes ``max_lag``, no new range is read on the primary (the check
    adds read load to the standby that is already behind). Both waits are counted, so the
    result can say the check was throttled and for how long."""

    def __init__(self, max_lag: float, beat: Callable[[], None]):
        self.max_lag = max_lag
        # Past this a standby that does not replay is a fault to report, not lag to wait out.
        self.bound = max(60.0, 4 * max_lag)
        self.beat = beat
        self.throttled_seconds = 0.0
        self.throttling = False  # now: shown in the heartbeat

    def replayed(self, standby: psycopg.Connection, lsn: str) -> None:
        start = time.monotonic()
        deadline = start + self.bound
        while True:
            ok = standby.execute("select pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]
            waited = time.monotonic() - start
            if waited > self.max_lag:
                # Waiting on a standby that trails by more than the bound is the same pause as
                # throttle()'s, and is reported as one.
                self.throttling = not ok
                if ok:
                    self.throttled_seconds += waited
            if ok:
                return
            if ok is None:
                raise RuntimeError("the standby side is not in recovery (no replay LSN): it is not a standby")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay the primary's {lsn} within {self.bound:.0f} s")
            time.sleep(0.02)

    def recheck(self, primary: psycopg.Connection, standby: psycopg.Connection,
                read: Callable[[psycopg.Connection], dict], keys: list) -> tuple[dict, dict, set]:
        """A, B, A for ``keys`` that differed (``read``: a side's key -> digest). B is read once
        it has replayed A's LSN after A's first read; a key whose two A reads disagree is still
        being written (in flight, returned as unsettled), any other difference is real."""
        ka = read(primary)
        self.replayed(standby, current_lsn(primary))
        kb = read(standby)
        again = read(primary)
        return ka, kb, {k for k in keys if ka.get(k) != again.get(k)}

    def throttle(self, standby: psycopg.Connection) -> None:
        start = time.monotonic()
        paused = False
        while lag_seconds(standby) > self.max_lag:
            paused = True
            if time.monotonic() - start > self.bound:
                raise TimeoutError(f"the standby's replay lag stayed above {self.max_lag:.0f} s for "
                                   f"{self.bound:.0f} s")
            self.throttling = True
            self.beat()
            time.sleep(0.5)
        self.throttling = False
        if paused:
            self.throttled_seconds += time.monotonic() - start


def row_hash_when_replayed(a: psycopg.Connection, b: psycopg.Connection, table: Table,
                           waiter: ReplayWaiter | None) -> RowHash:
    """``rowhash.row_hash``; when B is A's standby (``waiter``) and the columns differ, read
    again once B has replayed A's present LSN: a DDL it has not replayed yet is lag, not a
    schema difference."""
    try:
        return row_hash(a, b, table)
    except SchemaDiffers:
        if waiter is None:
            raise
    waiter.replayed(b, current_lsn(a))
    return row_hash(a, b, table)
