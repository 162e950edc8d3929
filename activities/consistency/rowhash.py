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
- the previous column's hash, XORed with a constant of the column's position, is the next
  one's seed, so the digest depends on which value sits in which column and on every column
  before it: an exchange of values between two rows does not cancel in a range's XOR (an XOR
  of independent column hashes would), nor between two columns whose hash of some value is the
  seed itself (float zero, numeric NaN, an empty jsonb); past MAX_CHAIN columns the rest go
  into the record;
- the other columns (nullable ones, and types whose function is declared on another type:
  boolean, date, bytea, arrays of base types) go together into one
  ``hash_record_extended(row(...), seed)``, the chain's first seed: the record hash handles
  NULL (as 0, so its seed is neither 0 nor 1: see _RECORD_SEED), and the chain's seed is written
  once (a ``coalesce`` around a chained call would repeat it);
- a value is compared by its type's equality, as the hash function sees it: ``'1 day'`` and
  ``'24 hours'`` (interval), float ``-0`` and ``0`` are the same value here, and a
  case-insensitive type such as citext folds case (collations do not: below);
- timestamptz through ``at time zone 'UTC'`` (its function is declared on timestamp; a fixed
  zone with no DST converts one-to-one, whatever the session's TimeZone);
- by its text form, under the fixed session settings of ranges.SESSION so both sides print
  values alike (the kind is then "hash+text"): a type with no hash function (json, point, xml,
  money), OID-valued types (regclass and the other reg* types, aclitem), the types whose hash
  function leaves out part of the value: numeric (its sign: ``100`` and ``-100``, and NaN and
  the infinities, hash alike), jsonb (its shape: ``{}`` and ``[]``, ``"x"`` and ``["x"]``, and
  its numbers' signs), arrays (their dimensions: ``{1,2,3,4}`` and ``{{1,2},{3,4}}``), so
  numeric ``1.5`` and ``1.50`` differ here, as they print;
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
  bt.typtype = 'b' and coalesce(et.typtype, 'b') = 'b',
  bt.typnamespace = 'pg_catalog'::regnamespace and (bt.typname like 'reg%%' or bt.typname in ('aclitem', 'numeric', 'jsonb'))
  or bt.typcategory = 'A'
from pg_attribute a join pg_type ty on ty.oid = a.atttypid
join pg_type bt on bt.oid = coalesce(nullif(ty.typbasetype, 0), a.atttypid)
left join pg_type et on et.oid = nullif(bt.typelem, 0)
left join lateral (
  -- Schema-qualified: resolved the same on B whatever its search_path. The type by its own name
  -- (bpchar, not format_type's "character", which as a cast is char(1)).
  select format('%%I.%%I', pn.nspname, pr.proname) as fn, format('%%I.%%I', tn.nspname, it.typname) as argtype
  from pg_opclass oc join pg_am am on am.oid = oc.opcmethod
  join pg_amproc p on p.amprocfamily = oc.opcfamily and p.amproclefttype = oc.opcintype and p.amprocnum = 2
  join pg_proc pr on pr.oid = p.amproc join pg_namespace pn on pn.oid = pr.pronamespace
  join pg_type it on it.oid = oc.opcintype join pg_namespace tn on tn.oid = it.typnamespace
  where am.amname = 'hash' and oc.opcdefault and pr.proargtypes[0] = oc.opcintype
    and (oc.opcintype = bt.oid
         or exists (select 1 from pg_cast k where k.castsource = bt.oid and k.casttarget = oc.opcintype
                    and k.castmethod = 'b'))
  -- As PostgreSQL picks a type's default opclass: its own, else the preferred type's (varchar
  -- is binary-coercible to both text and bpchar, and uses text's).
  order by oc.opcintype = bt.oid desc, it.typispreferred desc limit 1) h on true
where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped
order by a.attnum"""

# Mixed into each chained column's seed (a multiple of the golden ratio's 64 bits per column):
# several hash functions return the seed itself for some values (float zero, numeric NaN,
# an empty jsonb), and without it such a column would add nothing that ties the next column's
# value to its position (0 and 100 exchanged between two float columns would hash alike).
_GOLDEN = 0x9E3779B97F4A7C15
# The record's seed, neither 0 nor 1: the record hashes a NULL field as 0, and with seed 0 a
# float zero, an empty jsonb (the seed) and a numeric zero (seed - 1 with seed 1) would too.
_RECORD_SEED = 0x243F6A8885A308D3
# Nested calls recurse in the server's parser and planner: past this many chained columns the
# rest go into the record (flat), far below max_stack_depth on a 1600-column table.
MAX_CHAIN = 100


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


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
    # Its value is an OID naming an object (regclass, regtype, ...; aclitem's roles): the same
    # object has another OID in a database that was not copied from this one. Or its type's hash
    # leaves part of the value out (numeric's sign, jsonb's and arrays' shape): values that
    # differ would hash alike.
    by_text: bool


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
        fn: str | None
        if c.by_text:
            fn, value = None, None
        elif c.type == "timestamp with time zone":
            fn, value = "pg_catalog.timestamp_hash_extended", sql.SQL("({} at time zone 'UTC')").format(col)
        elif c.fn is not None:
            fn = c.fn
            value = sql.SQL("({}::{}{})").format(col, sql.SQL(c.argtype),
                                                 sql.SQL(' collate "C"') if c.collatable else sql.SQL(""))
        elif c.plain and _hashable(a, c.type):
            # Through the record; collatable ones (arrays of text) under C there too, as the
            # record hash passes the column's collation down to its elements' hash.
            fn, value = None, sql.SQL('({} collate "C")').format(col) if c.collatable else col
        else:
            fn, value = None, None
        if value is None:  # by its text form
            text = True
            fn, value = "pg_catalog.hashtextextended", sql.SQL('({}::text collate "C")').format(col)
        if fn is not None and not_null and len(chain) < MAX_CHAIN:
            chain.append((sql.SQL(fn), value))
        else:
            record.append(value)
    expr: sql.Composable = (sql.SQL("pg_catalog.hash_record_extended(row({}), {}::bigint)").format(
        sql.SQL(", ").join(record), sql.Literal(_RECORD_SEED)) if record else sql.SQL("0::bigint"))
    for i, (fn_sql, value) in enumerate(chain):
        expr = sql.SQL("{}({}, {} # {}::bigint)").format(fn_sql, value, expr, sql.Literal(_signed((i + 1) * _GOLDEN)))
    return RowHash(kind="hash+text" if text else "hash", expr=expr)

