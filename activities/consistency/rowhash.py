"""A row's 64-bit digest: one SQL expression built from the table's columns, the same on both
sides of a comparison.

Not ``hash_record_extended(t, 0)`` of the whole row: the whole-row reference copies each row
into a composite datum before the record hash takes it apart again, and that was most of the
check's per-row cost (bench table, 3M rows, one backend: 1.17 s against 0.66 s for this
expression; the scan alone is 0.27 s).

How each column is hashed:
- with its type's own extended hash function (the default hash opclass's, the one hash
  partitioning uses: stable across servers and major versions), called directly when the
  column is NOT NULL on both sides and the function takes the column's type (or a type it is
  binary-coercible to, as varchar is to text);
- the previous column's hash is the next one's seed, so the digest depends on which value sits
  in which column and on every column before it: an exchange of values between two rows does
  not cancel in a range's XOR (an XOR of independent column hashes would);
- the other columns (nullable ones, and types whose function is declared on another type:
  boolean, date, bytea, enums, arrays, ranges) go together into one
  ``hash_record_extended(row(...), 0)``, the chain's first seed: the record hash handles NULL,
  and the seed is written once (a ``coalesce`` around a chained call would repeat it);
- a value is compared by its type's equality, as the hash function sees it: ``1.5`` and
  ``1.50`` (numeric), ``'1 day'`` and ``'24 hours'`` (interval) are the same value here, and a
  case-insensitive type such as citext folds case (collations do not: below);
- timestamptz through ``at time zone 'UTC'`` (its function is declared on timestamp; a fixed
  zone with no DST converts one-to-one, whatever the session's TimeZone);
- by its text form, under the fixed session settings of ranges.SESSION so both sides print
  values alike (the kind is then "hash+text"): a type with no hash function (json, point, xml),
  and enums and anything holding one (arrays of enums, ranges, composite types): an enum's
  hash is its label's OID, which differs between two databases that were not copied from one
  another (hash partitioning on an enum breaks dump and restore for the same reason);
- collatable columns under ``collate "C"``: a nondeterministic collation's hash folds values it
  calls equal (case, accents), and such a change is a difference to a DR check.

The columns are named, in A's order, so the two sides may hold them in different physical
orders. When their columns differ (a name or a type) there is no row comparison to make:
SchemaDiffers says which columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import errors, sql

from activities.consistency.tables import Table

_COLUMNS = """
select a.attname, format_type(a.atttypid, null), a.attnotnull, ty.typcollation <> 0, h.fn, h.argtype,
  bt.typtype = 'b' and coalesce(et.typtype, 'b') = 'b'
from pg_attribute a join pg_type ty on ty.oid = a.atttypid
join pg_type bt on bt.oid = coalesce(nullif(ty.typbasetype, 0), a.atttypid)
left join pg_type et on et.oid = nullif(bt.typelem, 0)
left join lateral (
  -- -1, not NULL: format_type names bpchar "character" otherwise, and ::character is char(1).
  select p.amproc::regproc::text as fn, format_type(oc.opcintype, -1) as argtype
  from pg_opclass oc join pg_am am on am.oid = oc.opcmethod
  join pg_amproc p on p.amprocfamily = oc.opcfamily and p.amproclefttype = oc.opcintype and p.amprocnum = 2
  join pg_proc pr on pr.oid = p.amproc
  join pg_type it on it.oid = oc.opcintype
  where am.amname = 'hash' and oc.opcdefault and pr.proargtypes[0] = oc.opcintype
    and (oc.opcintype = bt.oid
         or exists (select 1 from pg_cast k where k.castsource = bt.oid and k.casttarget = oc.opcintype
                    and k.castmethod = 'b'))
  -- As PostgreSQL picks a type's default opclass: its own, else the preferred type's (varchar
  -- is binary-coercible to both text and bpchar, and uses text's).
  order by oc.opcintype = bt.oid desc, it.typispreferred desc limit 1) h on true
where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped
order by a.attnum"""


class SchemaDiffers(ValueError):
    pass


@dataclass(frozen=True)
class RowHash:
    kind: str  # "hash", or "hash+text" when some column is hashed by its text form
    expr: sql.Composable  # over the table aliased as t


@dataclass(frozen=True)
class _Column:
    name: str
    type: str
    not_null: bool
    collatable: bool
    fn: str | None  # the type's extended hash function, when it takes the column (as argtype)
    argtype: str | None
    # A plain base type (or an array of one): the record hash reads its value, never an OID.
    plain: bool


def _columns(conn: psycopg.Connection, table: Table) -> list[_Column]:
    rows = conn.execute(_COLUMNS, (table.ident.as_string(conn),)).fetchall()
    return [_Column(*r) for r in rows]


def _hashable(conn: psycopg.Connection, type_name: str) -> bool:
    """Whether the record hash can hash a value of this type (the lookup happens with NULL too)."""
    try:
        conn.execute(sql.SQL("select hash_record_extended(row(null::{}), 0)").format(sql.SQL(type_name)))
        return True
    except errors.UndefinedFunction:
        return False


def schema_difference(table: Table, a: list[_Column], b: list[_Column]) -> str | None:
    ta, tb = {c.name: c.type for c in a}, {c.name: c.type for c in b}
    parts = []
    if only := [f"{n} ({t})" for n, t in ta.items() if n not in tb]:
        parts.append("only on A: " + ", ".join(only))
    if only := [f"{n} ({t})" for n, t in tb.items() if n not in ta]:
        parts.append("only on B: " + ", ".join(only))
    if other := [f"{n} ({ta[n]} on A, {tb[n]} on B)" for n in ta if n in tb and ta[n] != tb[n]]:
        parts.append("other type: " + ", ".join(other))
    if not parts:
        return None
    return (f"table {table.qualified} has other columns on the two sides ({'; '.join(parts)}): its rows cannot "
            "be compared until the schema is the same on both")


def row_hash(a: psycopg.Connection, b: psycopg.Connection, table: Table) -> RowHash:
    cols_a, cols_b = _columns(a, table), _columns(b, table)
    if (why := schema_difference(table, cols_a, cols_b)) is not None:
        raise SchemaDiffers(why)
    not_null_b = {c.name for c in cols_b if c.not_null}
    chain: list[sql.Composable] = []
    record: list[sql.Composable] = []
    text = False
    for c in cols_a:
        col = sql.SQL("t.{}").format(sql.Identifier(c.name))
        not_null = c.not_null and c.name in not_null_b
        if c.type == "timestamp with time zone":
            fn, value = "timestamp_hash_extended", sql.SQL("({} at time zone 'UTC')").format(col)
        elif c.fn is not None:
            fn = c.fn
            value = sql.SQL("({}::{}{})").format(col, sql.SQL(c.argtype),
                                                 sql.SQL(' collate "C"') if c.collatable else sql.SQL(""))
        elif c.plain and _hashable(a, c.type):
            fn, value = None, col
        else:
            text = True
            fn, value = "hashtextextended", sql.SQL('({}::text collate "C")').format(col)
        if fn is not None and not_null:
            chain.append((sql.SQL(fn), value))
        else:
            record.append(value)
    expr: sql.Composable = (sql.SQL("hash_record_extended(row({}), 0)").format(sql.SQL(", ").join(record))
                            if record else sql.SQL("0::bigint"))
    for fn_sql, value in chain:
        expr = sql.SQL("{}({}, {})").format(fn_sql, value, expr)
    return RowHash(kind="hash+text" if text else "hash", expr=expr)
