"""Repairing a writable B (a copy database, or a region that is a separate primary): the
source's (A's) version of each key a check found differing, re-copied to B through the
conflict engine, one audit row per key in B's ``eagle_dr.conflict_audit``.

How the engine is used, and why (as activities/backup/recover.py does for a restored copy):

* A is the "loser" (it sends its rows), B the survivor (it is written), strategy
  ``source-priority`` with A as the source whatever ``conflicts:`` says for the table: the
  point of a sync is that B ends with A's data. The table's timestamp and creation columns
  still come from ``conflicts:`` (else ``updated_at``, which the engine needs).
* The "fork" is set before every row (``EPOCH``): every differing key is then a conflict
  decided by the source, and a row only A holds is inserted. A key whose row B re-used for a
  different row (a different creation time) is flagged for a human, never overwritten: the
  follow-up check then still sees it and the run is not green, which is the honest outcome.
* Only the differing keys travel: A's rows for those keys (the loser rows), and the keys B
  holds that A does not (the loser's deletions). Never a table copy.
* The keys are read from both sides just before the write, not taken from the check's kinds:
  a key A deleted since the check is then deleted on B, not resurrected from stale knowledge.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timezone

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row

from activities.conflicts.apply import ApplySummary, _columns, apply_resolutions
from activities.conflicts.foreign_keys import Holds, apply_in_bounded_waits
from activities.conflicts.resolve_sql import RESERVED_PREFIXES
from activities.consistency.tables import Table
from eagle_dr.config import TableConflictConfig

# Before any row's timestamp: see the module docstring.
EPOCH = datetime(1, 1, 1, tzinfo=timezone.utc)


class SyncError(ValueError):
    """A table the engine cannot decide (no timestamp column): not retried."""


def sync_config(table: Table, columns: Sequence[str], conflicts: dict[str, TableConflictConfig],
                source_region: str) -> TableConflictConfig:
    base = conflicts.get(table.qualified) or conflicts.get(table.name)
    ts = base.timestamp_column if base is not None else "updated_at"
    # The engine refuses these too, but as a plain error a retry would repeat three times.
    if reserved := [c for c in columns if c.startswith(RESERVED_PREFIXES)]:
        raise SyncError(f"{table.qualified} has columns {reserved} whose prefix the conflict engine reserves for "
                        "its own: it cannot re-copy the table; repair it by a restore")
    if ts not in columns:
        raise SyncError(f"{table.qualified} has no {ts} column (and is not under conflicts: with another "
                        "timestamp_column): the conflict engine needs one to decide rows; repair it by a restore")
    return TableConflictConfig(strategy="source-priority", source_region=source_region, key=table.key,
                               timestamp_column=ts, created_column=base.created_column if base else None)


def _in_keys(table: Table) -> sql.Composable:
    """``(k1, k2) in (unnest of the keys as text, cast to the key's types)``: index lookups."""
    arrays = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(sql.SQL(ty)) for ty in table.key_types)
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)
    return sql.SQL("({}) in (select * from unnest({}))").format(cols, arrays)


def _params(table: Table, keys: Sequence[Sequence[str]]) -> list[list[str]]:
    return [[k[i] for k in keys] for i in range(len(table.key))]


def read_source_rows(conn: psycopg.Connection, table: Table, names: list[str],
                     keys: Sequence[Sequence[str]]) -> list[dict]:
    q = sql.SQL("select {} from {} where {}").format(sql.SQL(", ").join(sql.Identifier(n) for n in names),
                                                    table.ident, _in_keys(table))
    with conn.transaction():
        conn.execute("set transaction read only")
        return conn.cursor(row_factory=dict_row).execute(q, _params(table, keys)).fetchall()


def read_target_keys(conn: psycopg.Connection, table: Table, keys: Sequence[Sequence[str]]) -> list[tuple]:
    q = sql.SQL("select {} from {} where {}").format(sql.SQL(", ").join(sql.Identifier(k) for k in table.key),
                                                    table.ident, _in_keys(table))
    return conn.cursor(row_factory=tuple_row).execute(q, _params(table, keys)).fetchall()


def recopy_keys(source: psycopg.Connection, target: psycopg.Connection, table: Table, keys: list[list[str]],
                conflicts: dict[str, TableConflictConfig], source_region: str, target_region: str, now: datetime,
                workflow_id: str, run_id: str, approved_by: str | None, dry_run: bool = False,
                settled: Collection[str] = ()) -> tuple[ApplySummary, list[str]]:
    """A's version of each of ``keys`` (text, in key-column order) written to B, deletions
    included, decided and audited by the engine in one transaction on B; and what still breaks
    a foreign key after the holds' last round (conflicts/foreign_keys.py), committed and to be
    reported.

    The engine writes with the foreign-key triggers off, so the keys are checked against every
    foreign key from or to the table, tables nobody listed included: a parent only B holds,
    that B's rows in another table still refer to, is flagged and kept rather than deleted
    under them; a row of A's whose parent B lacks is flagged rather than written under
    nothing. ``settled``: the run's other tables, which their own steps bring to A's state
    (each consistent on A): keys between them and this table are left to those steps."""
    names = [c.name for c in _columns(target, table.qualified)]
    tcfg = sync_config(table, names, conflicts, source_region)
    rows = read_source_rows(source, table, names, keys)
    on_a = {tuple(r[k] for k in table.key) for r in rows}
    deleted = [k for k in read_target_keys(target, table, keys) if k not in on_a]

    def apply(holds: Holds, checked: frozenset[str]) -> ApplySummary:
        return apply_resolutions(target, table.qualified, tcfg, rows, deleted, loser_region=source_region,
                                 survivor_region=target_region, region_priority={source_region: 0, target_region: 1},
                                 fork_time=EPOCH, now=now, workflow_id=workflow_id, run_id=run_id,
                                 approved_by=approved_by, sample=5, hold=holds.get(table.qualified),
                                 rehearse=dry_run and table.qualified in checked,
                                 dry_run=dry_run and table.qualified not in checked)

    return apply_in_bounded_waits(target, {table.qualified: table.key}, apply, survivor_region=target_region,
                                  force_rollback=dry_run, settled=settled)
