"""Which tables a check compares, and each one's primary key (the order ranges are cut in)."""

from __future__ import annotations

import psycopg
from pydantic import BaseModel
from psycopg import sql

from eagle_dr.config import TableName

# Every user table, partitions as leaves (a partitioned parent's rows are its partitions').
# Unlogged ones come back marked: they are never compared (not in WAL: a standby or a restore
# never has their rows), and the check says so rather than leaving them out unsaid.
_USER_TABLES = """
select n.nspname, c.relname, c.relpersistence = 'u' from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind = 'r' and c.relpersistence in ('p', 'u')
  and n.nspname not in ('pg_catalog', 'information_schema', 'eagle_dr') and n.nspname not like 'pg\\_%'
order by 1, 2"""

# The primary key's columns in key order, with their types (range bounds travel as text and
# are cast back with these).
_KEY = """
select a.attname, format_type(a.atttypid, a.atttypmod)
from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = %s::regclass and i.indisprimary
order by array_position(i.indkey::int2[], a.attnum)"""


class TableError(ValueError):
    """A configured or asked-for table that cannot be compared; ``field`` names the input."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class Table(BaseModel):
    schema_name: str
    name: str
    key: list[str]
    key_types: list[str]
    # Unlogged: listed, never compared (the other side cannot have its rows).
    unlogged: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema_name}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema_name, self.name)


def _resolve(conn: psycopg.Connection, text: str, field: str) -> tuple[str, str, bool]:
    try:
        t = TableName.parse(text, catalog=True)
    except ValueError as e:
        raise TableError(field, str(e)) from None
    row = conn.execute("select n.nspname, c.relname, c.relpersistence = 'u' from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                       "where c.relkind in ('r', 'p') and c.relname = %s and "
                       "(n.nspname = %s or (%s::text is null and n.oid = any(current_schemas(false)::regnamespace[])))",
                       (t.name, t.schema_name, t.schema_name)).fetchone()
    if row is None:
        raise TableError(field, f"unknown table {text!r}")
    if row[2]:
        raise TableError(field, f"table {row[0]}.{row[1]} is unlogged: PostgreSQL never writes it to WAL, so no "
                                "standby or restored copy has its rows and a comparison would report every row "
                                "(ALTER TABLE ... SET LOGGED to replicate it, or leave it out of consistency.tables)")
    return row[0], row[1], False


def list_tables(conn: psycopg.Connection, asked: list[str], field: str = "tables",
                skip_without_key: bool = False) -> list[Table]:
    """``asked`` (each must exist and have a primary key), or every user table when empty
    (one without a primary key is an error too: silently skipping it would report it consistent)."""
    if asked:
        names = [_resolve(conn, t, f"{field}.{i}") for i, t in enumerate(asked)]
        fields = [f"{field}.{i}" for i in range(len(asked))]
    else:
        names = [tuple(r) for r in conn.execute(_USER_TABLES).fetchall()]
        fields = [field] * len(names)
    out = []
    for (schema, name, unlogged), fld in zip(names, fields):
        if unlogged:  # only with none named: a named one was refused above
            out.append(Table(schema_name=schema, name=name, key=[], key_types=[], unlogged=True))
            continue
        key = conn.execute(_KEY, (sql.Identifier(schema, name).as_string(conn),)).fetchall()
        if not key and skip_without_key:
            out.append(Table(schema_name=schema, name=name, key=[], key_types=[]))  # said, not compared
            continue
        if not key:
            raise TableError(fld, f"table {schema}.{name} has no primary key: its rows cannot be matched "
                                  "across the sides (add one, or leave it out of consistency.tables)")
        out.append(Table(schema_name=schema, name=name, key=[k[0] for k in key], key_types=[k[1] for k in key]))
    return out


def one_sided(a: psycopg.Connection, b: psycopg.Connection, listed: list[Table],
              every: bool) -> tuple[list[str], list[str]]:
    """(``listed`` tables B lacks, user tables only B holds when ``every`` table is checked):
    two databases that are not one's physical standby can differ in their tables (a table
    created on one side of a split brain, a copy database made before a migration). A table
    missing on one side cannot be compared, and a check that listed A's tables alone never
    named B's extra ones."""
    on_b = {(r[0], r[1]) for r in b.execute(_USER_TABLES).fetchall()}
    only_a = [t.qualified for t in listed if (t.schema_name, t.name) not in on_b]
    only_b: list[str] = []
    if every:
        on_a = {(r[0], r[1]) for r in a.execute(_USER_TABLES).fetchall()}
        only_b = [f"{s}.{n}" for s, n in sorted(on_b - on_a)]
    return only_a, only_b

