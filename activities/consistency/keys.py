"""The keys one run reconciled, compared on the survivor and its rebuilt standby.

A failback's (or split-brain resolution's) verify that follows the divergence instead of the
database. What the run itself changed is the keys its reconcile audited
(``eagle_dr.conflict_audit``: one row per key it decided, kept, flagged or wrote, deletions
included): the old primary's post-fork rows, resolved and written on the survivor, and the
rows pg_rewind then copied back over the old primary's versions. Those keys are compared
here, on both sides, by key and 64-bit row digest (no row crosses the network), at a
consistent point with the A, B, A re-check of a bisect leaf (bisect.py): B is read once it
has replayed A's LSN taken after A's read, and a key A changed meanwhile is in flight, never a
difference.

What this does not read: every other row. That includes the other rows on the pages pg_rewind
copied (it copies whole blocks), indexes, TOAST and files, and rows the old primary changed
outside its WAL (a disk fault, a file edited by hand); after a pg_basebackup re-clone, the
whole node is a fresh copy, compared here only at those keys. A full check reads every row:
``verify: full``, ``eagle-dr check``, or the scheduled check; the step says so.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Callable

import psycopg
from psycopg import sql
from pydantic import BaseModel

from activities.consistency.ranges import Key, ReplayWaiter, connect, current_lsn, key_text, row_hash_when_replayed
from activities.consistency.rowhash import RowHash
from activities.consistency.results import KeyDiff
from activities.consistency.tables import Table
from activities.postgres.divergence import regclass_sql

# Keys per round trip: a batch's keys and digests are ~40 bytes each a side.
BATCH = 5000


class AuditedTable(BaseModel):
    table: str  # as the reconcile named it (the audit's table_name)
    keys: int = 0  # audited keys compared
    diff: KeyDiff = KeyDiff()
    in_flight: int = 0  # still changing on the survivor at the re-check: not differences
    missing: bool = False  # the survivor has no such table now (dropped after the reconcile)

    @property
    def differences(self) -> int:
        return self.diff.total


class AuditedKeysResult(BaseModel):
    survivor: str
    standby: str
    tables: list[AuditedTable] = []
    throttled_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def keys(self) -> int:
        return sum(t.keys for t in self.tables)

    @property
    def differences(self) -> int:
        return sum(t.differences for t in self.tables)


def _table(conn: psycopg.Connection, name: str, key_names: list[str]) -> Table | None:
    """``name`` with the audit's key columns (the reconcile's key: the config's, which need not
    be the primary key) and their types, as the survivor's catalog has them."""
    # Quoted as the reconcile quoted it (a mixed-case name in conflicts: is that case, not folded).
    ident = regclass_sql(name).as_string(conn)
    row = conn.execute("select n.nspname, c.relname, c.oid from pg_class c "
                       "join pg_namespace n on n.oid = c.relnamespace where c.oid = to_regclass(%s)",
                       (ident,)).fetchone()
    if row is None:
        return None
    cols = conn.execute("select attname, format_type(atttypid, atttypmod), "
                        "coalesce(array_position((select i.indkey::int2[] from pg_index i "
                        "where i.indrelid = a.attrelid and i.indisprimary), a.attnum), 1000 + a.attnum) "
                        "from pg_attribute a where attrelid = %s and attnum > 0 and not attisdropped",
                        (row[2],)).fetchall()
    types = {c: t for c, t, _ in cols}
    unknown = [k for k in key_names if k not in types]
    if unknown:
        raise ValueError(f"{name}: the audit's key columns {unknown} are not columns of the table now")
    # Keys are reported in key-column order (results.py): the primary key's, else the table's.
    order = {c: n for c, _, n in cols}
    key = sorted(key_names, key=order.__getitem__)
    return Table(schema_name=row[0], name=row[1], key=key, key_types=[types[k] for k in key])


def _batches(conn: psycopg.Connection, workflow_id: str, run_id: str, table: str):
    """The audited keys of ``table`` for the run, as jsonb objects, ``BATCH`` at a time (a
    server-side cursor: a million-key reconcile is never all in memory)."""
    with conn.transaction(), conn.cursor(name="audited_keys") as cur:
        cur.itersize = BATCH
        # As text, parsed here with exact decimals: psycopg's jsonb loader makes floats, and a
        # numeric key past ~16 digits would come back as another key, found on neither side.
        cur.execute("select primary_key::text from eagle_dr.conflict_audit where workflow_id = %s and run_id = %s "
                    "and table_name = %s order by id", (workflow_id, run_id, table))
        while True:
            rows = cur.fetchmany(BATCH)
            if not rows:
                return
            yield [json.loads(r[0], parse_float=Decimal) for r in rows]


def compare_audited_keys(dsn_survivor: str, dsn_standby: str, survivor: str, standby: str, workflow_id: str,
                         run_id: str, tables: list[str], *, max_lag: float, cap: int,
                         beat: Callable[[str], None], follower: bool = True) -> AuditedKeysResult:
    """``follower``: the standby side is the survivor's physical standby (a failback's rejoined
    node), compared at consistent points; else two independent databases, read as they are."""
    started = time.monotonic()
    out = AuditedKeysResult(survivor=survivor, standby=standby)
    waiter = ReplayWaiter(max_lag, lambda: beat("throttled: the standby's replay lags")) if follower else None
    with connect(dsn_survivor) as a, connect(dsn_standby) as b, connect(dsn_survivor) as audit:
        for name in tables:
            res = AuditedTable(table=name)
            out.tables.append(res)
            table = rh = None
            for batch in _batches(audit, workflow_id, run_id, name):
                if table is None:
                    table = _table(a, name, list(batch[0]))
                    if table is None:
                        res.missing = True
                        break
                    rh = row_hash_when_replayed(a, b, table, waiter)
                keys: list[Key] = [tuple(None if k.get(c) is None else _text(k[c]) for c in table.key) for k in batch]
                _compare(a, b, table, rh, keys, waiter, res, cap)
                res.keys += len(keys)
                beat(f"{name}: {res.keys} audited keys compared")
    out.throttled_seconds = round(waiter.throttled_seconds, 3) if waiter is not None else 0.0
    out.seconds = round(time.monotonic() - started, 3)
    return out


def _text(v) -> str:
    # The audit's jsonb holds the key as jsonb_build_object made it: numbers as numbers, the
    # rest as strings; ::text of the column gives the same text back for the cast in digests.
    return v if isinstance(v, str) else str(v)


def digests(conn: psycopg.Connection, table: Table, rh: RowHash, keys: list[Key]) -> dict[Key, int]:
    """Each of ``keys`` the side holds, with its row digest. One index probe per key (LATERAL):
    a semi-join on an array of thousands of keys may be planned as a scan of the whole table."""
    arrays = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(sql.SQL(ty)) for ty in table.key_types)
    cols = [sql.Identifier(f"k{i}") for i in range(len(table.key))]
    match = sql.SQL(" and ").join(sql.SQL("t.{} = k.{}").format(sql.Identifier(c), col)
                                  for c, col in zip(table.key, cols))
    q = sql.SQL("select s.* from unnest({arrays}) as k({cols}), "
                "lateral (select {kt}, {h} from {t} as t where {match}) as s").format(
        arrays=arrays, cols=sql.SQL(", ").join(cols), kt=key_text(table), h=rh.expr, t=table.ident,
        match=match)
    params = [[k[i] for k in keys] for i in range(len(table.key))]
    return {tuple(row[:-1]): row[-1] for row in conn.execute(q, params).fetchall()}


def _compare(a: psycopg.Connection, b: psycopg.Connection, table: Table, rh: RowHash, keys: list[Key],
             waiter: ReplayWaiter | None, res: AuditedTable, cap: int) -> None:
    if waiter is not None:
        waiter.throttle(b)
    ka = digests(a, table, rh, keys)
    if waiter is not None:
        waiter.replayed(b, current_lsn(a))
    kb = digests(b, table, rh, keys)
    differing = sorted(k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k))
    if differing and waiter is not None:
        ka, kb, unsettled = waiter.recheck(a, b, lambda c: digests(c, table, rh, differing), differing)
        res.in_flight += len(unsettled)
        differing = [k for k in differing if k not in unsettled and ka.get(k) != kb.get(k)]
    res.diff.add_differing(differing, ka, kb, cap)
