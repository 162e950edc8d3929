"""Data-corruption recovery: rows from a point-in-time copy (a scratch instance restored to
just before the corruption) copied back into the live primary through the conflict engine.

How the engine is used, and why:

* The copy is the "loser" region, named ``BACKUP_REGION``, and the primary the survivor;
  every key is decided by ``activities.conflicts.apply.apply_resolutions`` (set-based, in one
  transaction, the table locked against writes while it runs) and audited, one
  ``eagle_dr.conflict_audit`` row per key, with both versions, like failback's.
* Strategy ``source-priority`` with the copy as the source, whatever ``conflicts:`` says for
  the table: the operator asked for the rows as they were before the corruption, and a
  corrupting UPDATE is by definition the newer write, which last-write-wins would keep. The
  table's key, timestamp and creation columns still come from ``conflicts:`` (or its primary
  key and ``updated_at``).
* The "fork" is set before every row (``EPOCH``): the engine then sees both sides as changed
  wherever they differ, so each differing key is a conflict decided by the source (the copy
  wins, audited as a conflict), an identical one is kept as is, and a row only the copy holds
  (deleted by the corruption) is inserted. A key the primary re-used for a different row
  since (a different creation time) is flagged for a human, never overwritten.
* Rows the primary holds (matching the WHERE) that the copy lacks were inserted after the
  restore point: kept unless the selection says ``delete_missing`` (then the copy wins and
  they are deleted, audited).
* The WHERE clause is the operator's own SQL predicate, as trusted as the approval that
  follows it; it runs in read-only transactions as one statement of the extended protocol
  (never a simple query, which would run a second statement in it), once on the copy and once
  on the primary, both writing values in ISO forms (postgres/output_styles.py).
* The copy's rows stream to a spool file on the worker (postgres/row_spool.py), and their
  keys to a temp table on the primary, from the one read of them: the worker holds one row
  at a time however large the selection (it once held every row and both sides' keys).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from pydantic import BaseModel, Field

from activities.conflicts.apply import ApplySummary, _columns, apply_resolutions
from activities.conflicts.foreign_keys import Holds, apply_in_bounded_waits
from activities.postgres.divergence import regclass_sql, row_json
from activities.postgres.missing_keys import OtherKeys
from activities.postgres.output_styles import pin_output_keeping_input
from activities.postgres.row_spool import RowSpool
from eagle_dr.config import TableConflictConfig, TableName

BACKUP_REGION = "backup"
# Before any row's timestamp: see the module docstring.
EPOCH = datetime(1, 1, 1, tzinfo=timezone.utc)


class RowSelection(BaseModel):
    table: str = Field(min_length=1, max_length=200)  # ``table`` or ``schema.table``, case as written
    # An SQL predicate over the table's columns (no WHERE keyword); None: every row.
    where: str | None = Field(default=None, min_length=1, max_length=4000)
    # Delete rows the primary has (matching ``where``) that the copy lacks: rows inserted after
    # the restore point. Off by default: those are usually legitimate new writes.
    delete_missing: bool = False


class TableRecovery(ApplySummary):
    rows_in_copy: int
    missing_in_copy: int  # rows the primary holds (matching where) that the copy lacks


class RowRecovery(BaseModel):
    preview: bool
    tables: list[TableRecovery]
    # Recovered rows that still break a foreign key after the holds' last round: committed and
    # reported (conflicts/foreign_keys.py); empty but for a pathological schema.
    foreign_keys_broken: list[str] = []

    def totals(self) -> tuple[int, int, int, int]:
        """(inserted, updated, deleted, flagged)."""
        return (sum(t.inserted for t in self.tables), sum(t.updated for t in self.tables),
                sum(t.deleted for t in self.tables), sum(t.flagged for t in self.tables))


class SelectionError(ValueError):
    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


def table_config(conn: psycopg.Connection, table: str, conflicts: dict[str, TableConflictConfig],
                 field: str) -> TableConflictConfig:
    """The table's key and columns for the engine, with the copy as the winning source."""
    try:
        TableName.parse(table, catalog=True)
    except ValueError as e:
        raise SelectionError(f"{table!r} is not a table name: {e}", field) from None
    oid = conn.execute(sql.SQL("select to_regclass({})::oid").format(
        sql.Literal(regclass_sql(table).as_string(conn)))).fetchone()[0]
    if oid is None:
        raise SelectionError(f"no table {table!r} on the primary (names are case-sensitive; use schema.table "
                             "outside the search path)", field)
    base = conflicts.get(table)
    if base is not None:
        return TableConflictConfig(strategy="source-priority", source_region=BACKUP_REGION, key=base.key,
                                   timestamp_column=base.timestamp_column, created_column=base.created_column)
    key = [r[0] for r in conn.execute(
        "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)"
        " where i.indrelid = %s and i.indisprimary order by array_position(i.indkey::int2[], a.attnum)",
        (oid,)).fetchall()]
    has_ts = conn.execute("select exists (select 1 from pg_attribute where attrelid = %s and attname = 'updated_at'"
                          " and not attisdropped)", (oid,)).fetchone()[0]
    if not key or not has_ts:
        raise SelectionError(f"{table!r} is not under conflicts: and lacks a primary key or an updated_at column: "
                             "the engine needs both to decide rows", field)
    return TableConflictConfig(strategy="source-priority", source_region=BACKUP_REGION, key=key,
                               timestamp_column="updated_at")


def _select(table: str, names: list[str], where: str | None) -> sql.Composable:
    q = sql.SQL("select {} from {}").format(sql.SQL(", ").join(sql.Identifier(n) for n in names), regclass_sql(table))
    if where:
        # Parenthesised: an "a or b" predicate stays one predicate.
        q = q + sql.SQL(" where (") + sql.SQL(where) + sql.SQL(")")
    return q


# What the operator's WHERE can raise (the table is known to exist on both sides by then, so
# an undefined table is one its subquery names); DataError: a bad literal, a division by zero.
_WHERE_ERRORS = (psycopg.errors.SyntaxError, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction,
                 psycopg.errors.UndefinedTable, psycopg.errors.UndefinedObject, psycopg.errors.DatatypeMismatch,
                 psycopg.errors.AmbiguousColumn, psycopg.errors.ReadOnlySqlTransaction, psycopg.DataError)
# Types whose modifier rounds a value written into them rather than refusing it (and their
# arrays, whose modifier is their elements'): numeric's scale, the fractional seconds' digits.
_SECONDS = ("timestamp", "timestamptz", "time", "timetz")
_ROUNDING = frozenset(f"pg_catalog.{a}{t}" for t in ("numeric", "interval", *_SECONDS) for a in ("", "_"))


def _rounds(type_name: str, copy_mod: int, primary_mod: int) -> bool:
    """Whether a value of the copy's column would be rounded in the primary's: a scale or a
    seconds precision smaller than the copy's (an unconstrained copy column has any)."""
    if type_name not in _ROUNDING or primary_mod == -1 or primary_mod == copy_mod:
        return False
    base = type_name.removeprefix("pg_catalog.").removeprefix("_")
    if base == "numeric":  # typmod: (precision << 16 | scale) + 4
        return copy_mod == -1 or (primary_mod - 4) & 0xFFFF < (copy_mod - 4) & 0xFFFF
    if base in _SECONDS:  # typmod: the digits; unconstrained keeps 6
        return primary_mod < (6 if copy_mod == -1 else copy_mod)
    return True  # interval: its fields and precision share the modifier; any change may cut
_COLUMNS = """select a.attname, n.nspname || '.' || t.typname, a.atttypmod, format_type(a.atttypid, a.atttypmod)
              from pg_attribute a join pg_type t on t.oid = a.atttypid join pg_namespace n on n.oid = t.typnamespace
              where a.attrelid = to_regclass(%s) and a.attnum > 0 and not a.attisdropped"""


def _copy_lacks(copy: psycopg.Connection, primary: psycopg.Connection, table: str, names: list[str],
                field: str) -> None:
    """The copy has the table and every column the primary has, of the same type, or the
    selection is refused naming the table: a schema change after the restore point is not a
    mistake in the WHERE (its UndefinedColumn once blamed the WHERE)."""
    ident = regclass_sql(table).as_string(copy)
    if copy.cursor(row_factory=tuple_row).execute("select to_regclass(%s)", (ident,)).fetchone()[0] is None:
        raise SelectionError(f"the copy has no table {table!r} (created after the restore point?)", field)
    there = {n: (ty, mod, shown) for n, ty, mod, shown in copy.cursor(row_factory=tuple_row).execute(_COLUMNS, (ident,))}
    here = {n: (ty, mod, shown) for n, ty, mod, shown in primary.cursor(row_factory=tuple_row).execute(_COLUMNS, (ident,))}
    lacking = [n for n in names if n not in there]
    if lacking:
        raise SelectionError(f"the copy's {table!r} lacks the primary's column(s) {lacking} (added after the restore "
                             "point?): its rows cannot be recovered whole", field)
    # By the type's schema and name, not as format_type shows it (qualified or not by each
    # session's search_path). A length or precision changed since is no change (a value too
    # long fails the write, naming the table); a scale a value would be rounded to is.
    changed = [f"{n} ({there[n][2]} on the copy, {here[n][2]} on the primary)" for n in names
               if there[n][0] != here[n][0] or _rounds(here[n][0], there[n][1], here[n][1])]
    if changed:
        raise SelectionError(f"{table!r} changed type since the restore point: {'; '.join(changed)}: its rows cannot "
                             "be recovered as they are", field)


def _read(copy: psycopg.Connection, primary: psycopg.Connection, table: str, names: list[str], read: list[str],
          tcfg, where: str | None, spool: RowSpool, keys_file: Path, field: str, where_field: str) -> list[tuple]:
    """The copy's selected rows into ``spool`` and the primary's keys under the same WHERE that
    the copy lacks (rows inserted after the restore point). One read of the copy gives both
    each row and its key; the keys wait in ``keys_file``, then go to a temp table on the
    primary in one short transaction, and the anti-join runs there."""
    relation = regclass_sql(table)
    # As the primary's table has them (json_populate_record there reads them back).
    query = sql.SQL("select {}::text, {}::text from ({}) x").format(
        row_json(primary, relation, names), row_json(primary, relation, tcfg.key), _select(table, read, where))
    try:
        with copy.transaction(), OtherKeys.writer(keys_file) as add_key:
            copy.execute("set transaction read only")
            # Rows and keys cross as Python strings: a key the copy's client encoding cannot
            # hold would fail the read. The WHERE's characters stay the same in UTF-8.
            copy.execute("set local client_encoding = 'UTF8'")
            spool.settings = pin_output_keeping_input(copy)
            # stream(): the extended protocol, so one statement only. As a simple query, a
            # WHERE of "true); commit; delete from t where (true" ended the read-only
            # transaction and deleted, on the copy and on the primary, before any approval.
            # Without parameters, no % in it is read as a placeholder (a LIKE pattern).
            for row, key in copy.cursor(row_factory=tuple_row).stream(query):
                spool.add(row, None, None)
                add_key(key)
        spool.close()
    except _WHERE_ERRORS as e:
        raise SelectionError(f"the WHERE clause does not work on the copy: {e.diag.message_primary}",
                             where_field) from None
    except psycopg.errors.QueryCanceled as e:
        raise SelectionError(f"the copy's read was cancelled ({e.diag.message_primary}): select fewer rows",
                             where_field) from None
    with OtherKeys(primary, relation, tcfg.key) as in_copy:
        try:
            in_copy.load_json(keys_file, spool.settings)
        except (psycopg.DataError, psycopg.IntegrityError) as e:
            # An enum label renamed since, a domain's check tightened: the key, not the WHERE.
            raise SelectionError(f"the copy's keys of {table!r} do not read as the primary's key types: "
                                 f"{e.diag.message_primary}", field) from None
        try:
            # The same output forms as on the copy: a WHERE on a value's text selects alike.
            return in_copy.missing(_select(table, tcfg.key, where), pin_output=True)
        except _WHERE_ERRORS as e:
            raise SelectionError(f"the WHERE clause does not work on the primary: {e.diag.message_primary}",
                                 where_field) from None
        except psycopg.errors.QueryCanceled as e:
            raise SelectionError(f"the primary's read of the keys was cancelled ({e.diag.message_primary}): select "
                                 "fewer rows", where_field) from None


def recover_rows(copy: psycopg.Connection, primary: psycopg.Connection, selections: list[RowSelection],
                 conflicts: dict[str, TableConflictConfig], primary_region: str, restored_to: datetime,
                 workflow_id: str, run_id: str, approved_by: str | None, preview: bool,
                 spool_dir: Path) -> RowRecovery:
    """Decide (``preview``: and roll back) or apply every selected row of the copy to the
    primary. The rows wait in ``spool_dir`` (the caller's, removed by it) between the read and
    the apply."""
    plans = []
    # Everything is read and checked before the first table is written: a typo in the third
    # table must not leave the first two recovered and the rest not. The primary's keys are
    # read here too, outside the write transaction (a read-only transaction cannot turn
    # read-write again): a row inserted after this is never deleted, the safe side.
    for i, s in enumerate(selections):
        field = f"tables[{i}]"
        tcfg = table_config(primary, s.table, conflicts, f"{field}.table")
        names = [c.name for c in _columns(primary, s.table)]
        # A stored generated column is no column of the row (the primary computes its own)
        # but can be part of the key, which the read takes from the copy too.
        read = names + [k for k in tcfg.key if k not in names]
        _copy_lacks(copy, primary, s.table, read, f"{field}.table")
        rows = RowSpool(spool_dir / f"{i}.rows", tcfg.timestamp_column)
        try:
            missing = _read(copy, primary, s.table, names, read, tcfg, s.where, rows, spool_dir / f"{i}.keys",
                            f"{field}.table", f"{field}.where")
        finally:
            try:
                rows.close()
            except OSError:
                pass  # the read's own error (a full disk) is the one to report
        plans.append((s, tcfg, rows, missing))
    def apply_all(holds: Holds, checked: frozenset[str]) -> list[TableRecovery]:
        out = []
        for i, (s, tcfg, rows, missing) in enumerate(plans):
            try:
                summary = apply_resolutions(
                    primary, s.table, tcfg, rows, missing if s.delete_missing else [], loser_region=BACKUP_REGION,
                    survivor_region=primary_region, region_priority={BACKUP_REGION: 0, primary_region: 1},
                    fork_time=EPOCH, now=restored_to, workflow_id=workflow_id, run_id=run_id,
                    approved_by=approved_by, rehearse=preview and s.table in checked,
                    dry_run=preview and s.table not in checked, sample=5, hold=holds.get(s.table))
            except (psycopg.DataError, psycopg.IntegrityError) as e:
                # A value the primary's table no longer takes (an enum label renamed, a length
                # narrowed, a check added since): the whole transaction rolls back.
                raise SelectionError(f"the copy's rows of {s.table!r} cannot be written to the primary: "
                                     f"{e.diag.message_primary}", f"tables[{i}].table") from None
            out.append(TableRecovery(**summary.model_dump(), rows_in_copy=len(rows), missing_in_copy=len(missing)))
        return out

    # One transaction for every table (each table's apply is a savepoint in it): all tables
    # recovered, or none, and checked for foreign keys before it commits: a recovered row whose
    # parent is gone, or a deletion the primary's newer rows still refer to, is flagged instead
    # (conflicts/foreign_keys.py). A preview runs the same and rolls all of it back, the audit
    # table's creation included.
    out, broken = apply_in_bounded_waits(primary, {s.table: tcfg.key for s, tcfg, _, _ in plans}, apply_all,
                                         survivor_region=primary_region, force_rollback=preview)
    return RowRecovery(preview=preview, tables=out, foreign_keys_broken=broken)
