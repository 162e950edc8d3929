"""The reference for the conflict benchmark: the same loser rows COPYed into a temp table and
written with one plain ``INSERT ... ON CONFLICT DO UPDATE`` (plus one DELETE for the deleted
keys). No decision, no audit: the floor of any set-based upsert on this server. Given a
``LoserCopy``, it streams the rows COPY to COPY as the engine does.

It does what the engine does around that, so the difference is the deciding and the audit:
same COPY path (types set by column oid, rows in the same shape), one transaction, and
``session_replication_role = replica`` so the touch trigger does not run per row (the engine
skips it too, to keep the winning version's updated_at).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql

from activities.conflicts.loser_copy import LoserCopy

_TMP = sql.Identifier("_bench_upsert")


def _columns(conn: psycopg.Connection, table: str) -> list[tuple[str, int]]:
    return conn.execute(
        "select attname, atttypid::int from pg_attribute where attrelid = %s::regclass and attnum > 0"
        " and not attisdropped order by attnum", (table,)).fetchall()


def upsert(conn: psycopg.Connection, table: str, key: list[str], rows: Sequence[Mapping[str, Any]] | LoserCopy,
           deleted_keys: Sequence[Sequence[Any]]) -> None:
    columns = _columns(conn, table)
    names = [c for c, _ in columns]
    target, cols = sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, names))
    key_pos = [names.index(k) for k in key]
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        # CREATE TABLE AS drops NOT NULL, so a deleted key can travel with nulls, as in the engine.
        conn.execute(sql.SQL("create temp table {} on commit drop as select {}, false as _deleted from {} with no data")
                     .format(_TMP, cols, target))
        copy_in = sql.SQL("copy {} ({}, _deleted) from stdin").format(_TMP, cols)
        if isinstance(rows, LoserCopy):
            with conn.cursor().copy(copy_in) as copy:
                rows.stream_into(copy, names)
            rows = []
        with conn.cursor().copy(copy_in) as copy:
            copy.set_types([oid for _, oid in columns] + ["bool"])
            for row in rows:
                copy.write_row([row[n] for n in names] + [False])
            for k in deleted_keys:
                values: list[Any] = [None] * len(names)
                for pos, v in zip(key_pos, k):
                    values[pos] = v
                copy.write_row(values + [True])
        match = sql.SQL(" and ").join(sql.SQL("t.{0} = r.{0}").format(sql.Identifier(k)) for k in key)
        conn.execute(sql.SQL("delete from {} t using {} r where r._deleted and {}").format(target, _TMP, match))
        non_key = [n for n in names if n not in key]
        conn.execute(sql.SQL("insert into {t} ({cols}) select {cols} from {tmp} where not _deleted"
                             " on conflict ({key}) do update set {set}").format(
            t=target, cols=cols, tmp=_TMP, key=sql.SQL(", ").join(map(sql.Identifier, key)),
            set=sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(n)) for n in non_key)))
