"""Foreign keys across a reconcile: the loser's writes must not break them on the survivor.

Rows are applied with ``session_replication_role = replica`` (see ``apply``), which also skips
PostgreSQL's foreign-key triggers, its checks and its cascades alike. Each side was consistent
on its own; the two merged need not be:

* the loser inserted (or updated) a child row whose parent the survivor deleted after the fork,
  or whose parent's loser version was itself not applied (flagged): the child would refer to
  nothing, or to another row under the same key;
* the loser deleted a parent (its children went with it, on the loser) while the survivor gave
  it new children: deleting it orphans them, and a cascade would delete the survivor's own new
  rows without a word.

So the caller applies every table in one transaction and ``apply_keeping_foreign_keys`` checks
it before it commits, for the keys the apply touched only (``apply.TOUCHED_TMP``): a referenced
column always has a unique index and the survivor's child rows are found by one join, so the
cost follows the divergence, never a validation of a whole table. Each
key whose write breaks a foreign key is held: decided again as a flag (the survivor's row
stays, the audit keeps both versions for a human), by rolling the apply back to its savepoint
and running it again with the holds. Holding a parent insert leaves the loser's children under
it with nothing to refer to, so the check first runs to a fixed point on what it held;
another round is rare (a held child whose survivor version refers to a deleted parent), and
bounded: what the last round still finds is committed and reported, never hidden.

A parent the loser updated is checked by the survivor's version as it stood before the write
(``apply._record_touched`` takes it from the table where the decision elided it), so a
referenced column that is not the key, renamed by the loser, is caught like a delete.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from activities.conflicts.apply import TOUCHED_TMP, ensure_audit_table
from activities.postgres.table_locks import LOCK_PATIENCE, LOCK_TRY, in_bounded_waits, lock_tables
from eagle_dr.config import TableName

# Table (the ``conflicts:`` name the audit uses) -> {primary key as jsonb text: why it is held}.
Holds = dict[str, dict[str, str]]
T = TypeVar("T")

ROUNDS = 5
# Fixed-point passes of the check within a round: one per level of a chain of held rows (a
# comment thread's replies, say), far more than a schema's depth.
PASSES = 100
_WRITTEN = ("insert_loser", "apply_loser", "merge")


@dataclass(frozen=True)
class ForeignKey:
    name: str
    child_oid: int
    child: sql.Identifier
    columns: tuple[str, ...]
    parent_oid: int
    parent: sql.Identifier
    referenced: tuple[str, ...]

    def describe(self, child: str, parent: str) -> str:
        return f"{self.name} ({child}.{', '.join(self.columns)} -> {parent}.{', '.join(self.referenced)})"


def foreign_keys(conn: psycopg.Connection, oids: list[int]) -> list[ForeignKey]:
    """Every foreign key from or to one of ``oids``, whatever the other table (listed or not)."""
    rows = conn.cursor(row_factory=tuple_row).execute("""
        select c.conname, c.conrelid::oid, cn.nspname, cr.relname,
               array(select a.attname::text from unnest(c.conkey) with ordinality k(n, i)
                     join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.n order by k.i),
               c.confrelid::oid, pn.nspname, pr.relname,
               array(select a.attname::text from unnest(c.confkey) with ordinality k(n, i)
                     join pg_attribute a on a.attrelid = c.confrelid and a.attnum = k.n order by k.i)
        from pg_constraint c
        join pg_class cr on cr.oid = c.conrelid join pg_namespace cn on cn.oid = cr.relnamespace
        join pg_class pr on pr.oid = c.confrelid join pg_namespace pn on pn.oid = pr.relnamespace
        where c.contype = 'f' and (c.conrelid = any(%(oids)s) or c.confrelid = any(%(oids)s))
          -- A key to a partitioned table has a hidden copy per partition it refers to: checked
          -- one by one, a row in one partition would be missing from every other. Copies on
          -- the referring side (a partition of a partitioned child) are kept: a partition may
          -- be the table listed.
          and (c.conparentid = 0 or c.confrelid = (select r.confrelid from pg_constraint r where r.oid = c.conparentid))
        order by c.conname, c.oid""", {"oids": oids}).fetchall()
    # A partition of a partitioned table that foreign keys refer to (a check lists partitions):
    # the key names the partitioned table, whose per-partition copies are left out above. Each
    # is checked from the partition listed, against the partitioned table it belongs to (a row
    # moved to another partition is still there).
    rows += conn.cursor(row_factory=tuple_row).execute("""
        with recursive up (oid, parent, listed) as (
            select c.oid, c.conparentid, c.confrelid from pg_constraint c
            where c.contype = 'f' and c.confrelid = any(%(oids)s) and c.conparentid <> 0
          union all
            select p.oid, p.conparentid, up.listed from up join pg_constraint p on p.oid = up.parent
        )
        select distinct c.conname, c.conrelid::oid, cn.nspname, cr.relname,
               array(select a.attname::text from unnest(c.conkey) with ordinality k(n, i)
                     join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.n order by k.i),
               up.listed::oid, pn.nspname, pr.relname,
               array(select a.attname::text from unnest(c.confkey) with ordinality k(n, i)
                     join pg_attribute a on a.attrelid = c.confrelid and a.attnum = k.n order by k.i)
        from up join pg_constraint c on c.oid = up.oid and c.conparentid = 0
        join pg_class cr on cr.oid = c.conrelid join pg_namespace cn on cn.oid = cr.relnamespace
        join pg_class pr on pr.oid = c.confrelid join pg_namespace pn on pn.oid = pr.relnamespace
        where c.confrelid <> up.listed
        order by 1, 2, 6""", {"oids": oids}).fetchall()
    return [ForeignKey(name, c_oid, sql.Identifier(c_ns, c_rel), tuple(cols), p_oid, sql.Identifier(p_ns, p_rel),
                       tuple(ref)) for name, c_oid, c_ns, c_rel, cols, p_oid, p_ns, p_rel, ref in rows]


def _eq(a: str, a_cols: tuple[str, ...], b: str, b_cols: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(" and ").join(sql.SQL("{}.{} = {}.{}").format(
        sql.Identifier(a), sql.Identifier(x), sql.Identifier(b), sql.Identifier(y)) for x, y in zip(a_cols, b_cols))


def _not_null(alias: str, cols: tuple[str, ...]) -> sql.Composable:
    # MATCH SIMPLE (the default) checks a row only when none of its columns is null; a MATCH
    # FULL row is all null or none, which each side's own checks kept so.
    return sql.SQL(" and ").join(sql.SQL("{}.{} is not null").format(sql.Identifier(alias), sql.Identifier(c))
                                 for c in cols)


_TOUCHED = sql.Identifier(TOUCHED_TMP)


def _settled_oids(cur: psycopg.Cursor, settled: Collection[str], oid: Callable[[str], int | None]) -> set[int]:
    """The tables of ``settled`` (names the catalog gives, as a check lists them), and each
    partitioned table all of whose partitions are among them: a foreign key is declared on the
    partitioned table, while a check lists its partitions."""
    found = set()
    for t in settled:
        try:
            o = oid(t)
        except ValueError:
            continue  # a name no identifier can spell (a dot, a quote): checked, never skipped
        if o is not None:
            found.add(o)
    if found:
        found |= {r[0] for r in cur.execute(
            "select distinct a.relid::oid from unnest(%s::oid[]) s (o), pg_partition_ancestors(s.o) a"
            " where a.relid <> s.o and not exists (select from pg_partition_tree(a.relid) p"
            "  where p.isleaf and p.relid::oid <> all(%s::oid[]))", (list(found), list(found)))}
    return found


class _Check:
    def __init__(self, conn: psycopg.Connection, keys: Mapping[str, list[str]], survivor_region: str,
                 settled: Collection[str] = (), lock: bool = True):
        # lock: the parents found are locked as PostgreSQL's own check locks them (a check
        # before a commit); a check that only reports takes no row lock on a live primary.
        self.conn, self.keys, self.survivor, self.lock = conn, keys, survivor_region, lock
        cur = conn.cursor(row_factory=tuple_row)

        def oid(t: str) -> int | None:
            return cur.execute("select to_regclass(%s)::oid",
                               (TableName.parse(t, catalog=True).identifier.as_string(conn),)).fetchone()[0]

        self.oid = {t: oid(t) for t in keys}
        self.name = {oid: t for t, oid in self.oid.items()}
        later = _settled_oids(cur, settled, oid) - set(self.name)
        self.fks = [fk for fk in foreign_keys(conn, list(self.oid.values()))
                    if fk.child_oid not in later and fk.parent_oid not in later]
        self.involved = frozenset(self.name[o] for fk in self.fks for o in (fk.child_oid, fk.parent_oid)
                                  if o in self.name)

    def _label(self, oid: int, ident: sql.Identifier) -> str:
        return self.name.get(oid) or ident.as_string(self.conn)

    def _run(self, q: sql.Composable, table: str, **params) -> list[str]:
        cur = self.conn.cursor(row_factory=tuple_row)
        return [r[0] for r in cur.execute(q, {"table": table, **params})]

    def _children_broken(self, fk: ForeignKey, held: Holds) -> tuple[str, list[str]]:
        """Keys of the child table the loser wrote that refer to no parent (its row locked as
        PostgreSQL's own check locks it: an app deleting it now waits for this transaction, or
        this check waits for its commit), or to a parent the loser inserted that will not be
        applied (held, or another row under its key: a collision)."""
        table, parent = self.name[fk.child_oid], self.name.get(fk.parent_oid)
        of_held = sql.SQL("")
        params: dict = {}
        if parent is not None and set(fk.referenced) == set(self.keys[parent]):
            by_ref = dict(zip(fk.referenced, fk.columns))
            parent_pk = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
                sql.SQL("{}, c.{}").format(sql.Literal(k), sql.Identifier(by_ref[k])) for k in self.keys[parent]))
            # Only a parent the loser inserted: one the survivor holds too (a flagged update, a
            # held change) is the same row to its children, still there.
            of_held = sql.SQL("""
                or {pk} in (select pa.pk from {touched} pa where pa.table_name = %(parent)s
                            and (pa.collided or (pa.action = 'insert_loser' and pa.pk = any(%(held)s::jsonb[]))))
                """).format(pk=parent_pk, touched=_TOUCHED)
            params = {"parent": parent, "held": list(held.get(parent, {}))}
        q = sql.SQL("""
            select distinct a.pk::text from {touched} a
            cross join lateral jsonb_populate_record(null::{child}, a.pk) k
            join {child} c on {c_is_k}
            where a.table_name = %(table)s and a.action = any(%(written)s) and {not_null}
              and (not exists (select 1 from {parent} p where {p_is_c} {lock}) {of_held})
        """).format(child=fk.child, parent=fk.parent, touched=_TOUCHED,
                    c_is_k=_eq("c", tuple(self.keys[table]), "k", tuple(self.keys[table])),
                    not_null=_not_null("c", fk.columns), p_is_c=_eq("p", fk.referenced, "c", fk.columns),
                    of_held=of_held, lock=sql.SQL("for key share of p" if self.lock else ""))
        why = (f"foreign key {fk.describe(table, self._label(fk.parent_oid, fk.parent))}: the row it refers to "
               f"is not on {self.survivor} as the loser had it (deleted there, or the loser's own not applied)")
        return why, self._run(q, table, written=list(_WRITTEN), **params)

    def _parents_still_referred(self, fk: ForeignKey, held: Holds) -> tuple[str, list[str]]:
        """Keys of the parent table the loser deleted (or whose referenced columns it changed)
        that the survivor's child rows still refer to, or will once the held ones stay as the
        survivor has them (a child delete held: the child stays)."""
        table, child = self.name[fk.parent_oid], self.name.get(fk.child_oid)
        # An update cannot change the conflict key: when that is what the key refers to, only
        # a delete can take the referenced row away.
        removing = ["delete"] if set(fk.referenced) == set(self.keys[table]) else ["delete", "apply_loser", "merge"]
        cur = self.conn.cursor(row_factory=tuple_row)
        if not cur.execute(sql.SQL("select exists (select 1 from {} where table_name = %s and action = any(%s)"
                                   " and survivor_version is not null)").format(_TOUCHED),
                           (table, removing)).fetchone()[0]:
            return "", []  # nothing removed from it: no child scan (its column may have no index)
        of_held = sql.SQL("")
        params: dict = {}
        if child is not None and held.get(child):
            of_held = sql.SQL("""
                or exists (select 1 from {touched} h cross join lateral jsonb_populate_record(null::{child}, h.survivor_version) c
                           where h.table_name = %(child)s and h.pk = any(%(held)s::jsonb[]) and {c_is_o})""").format(
                touched=_TOUCHED, child=fk.child, c_is_o=_eq("c", fk.columns, "o", fk.referenced))
            params = {"child": child, "held": list(held[child])}
        q = sql.SQL("""
            select distinct a.pk::text from {touched} a
            cross join lateral jsonb_populate_record(null::{parent}, a.survivor_version) o
            where a.table_name = %(table)s and a.action = any(%(removing)s)
              and a.survivor_version is not null and {not_null}
              and not exists (select 1 from {parent} p where {p_is_o})
              and (exists (select 1 from {child} c where {c_is_o}) {of_held})
        """).format(parent=fk.parent, child=fk.child, touched=_TOUCHED,
                    not_null=_not_null("o", fk.referenced), p_is_o=_eq("p", fk.referenced, "o", fk.referenced),
                    c_is_o=_eq("c", fk.columns, "o", fk.referenced), of_held=of_held)
        why = (f"foreign key {fk.describe(self._label(fk.child_oid, fk.child), table)}: rows on {self.survivor} "
               "still refer to the row the loser deleted (or changed)")
        return why, self._run(q, table, removing=removing, **params)

    def broken(self, holds: Holds, passes: int = PASSES) -> Holds:
        """New holds, run to a fixed point: keys whose write breaks a foreign key as the tables
        stand in this transaction, or would once ``holds`` and the new ones are held (``passes``
        1: only what breaks one as they stand)."""
        new: Holds = {}
        for _ in range(passes):
            found = False
            held = {t: {**holds.get(t, {}), **new.get(t, {})} for t in self.keys}
            for fk in self.fks:
                checks = []
                if fk.child_oid in self.name:
                    checks.append((self.name[fk.child_oid], *self._children_broken(fk, held)))
                if fk.parent_oid in self.name:
                    checks.append((self.name[fk.parent_oid], *self._parents_still_referred(fk, held)))
                for table, why, pks in checks:
                    for pk in pks:
                        if pk not in held[table] and pk not in new.get(table, {}):
                            new.setdefault(table, {})[pk] = why
                            found = True
            if not found:
                break
        return new


def apply_keeping_foreign_keys(
    conn: psycopg.Connection, keys: Mapping[str, list[str]], apply: Callable[[Holds, frozenset[str]], T], *,
    survivor_region: str, rounds: int = ROUNDS, lock_try: float = LOCK_TRY, lock_patience: float = LOCK_PATIENCE,
    settled: Collection[str] = (),
) -> tuple[T, list[str]]:
    """``apply(holds, checked)`` (every table of ``keys``, name -> key columns, applied with
    those holds) run in a savepoint of the caller's transaction until no write breaks a foreign
    key. ``checked``: the tables a foreign key involves, whose writes the check must see (a
    preview rehearses those and only decides the rest). Returns its result and what the last
    round still found broken (empty but for a pathological case; it is committed with the
    rest and must be reported). ``settled``: other tables the caller brings to the source's
    state in steps of their own (a data sync's other differing tables); a foreign key between
    one of them and a table of ``keys`` is not checked here (it holds once both steps ran)."""
    # Every table's lock at once, before any write, in one order (by name: every reconcile
    # sorts alike), in short tries that never queue the application's writes
    # (postgres/table_locks.py), and in the caller's transaction: held to its commit through
    # every round's rollback. A lock taken table by table midway could deadlock with an
    # application transaction writing two of them. (The apply's own per-table LOCK then finds
    # it held.) No table: a reconcile whose old primary changed no listed table after the fork.
    # First the audit table (a first run, or an upgrade of its columns): its DDL waits for
    # whoever reads the audit, for as long as it takes, before any table of the application is
    # locked; past the locks every wait is bounded (table_locks.in_bounded_waits).
    ensure_audit_table(conn, wait=True)
    lock_tables(conn, [TableName.parse(t, catalog=True).identifier for t in sorted(keys)],
                lock_try=lock_try, patience=lock_patience)
    # Only now the foreign keys: a migration the lock waited behind may have added one.
    check = _Check(conn, keys, survivor_region, settled)
    holds: Holds = {}
    for n in range(1, rounds + 1):
        with conn.transaction() as tx:
            if check.fks:
                conn.execute(sql.SQL("create temp table {} (table_name text not null, pk jsonb not null, action text"
                                     " not null, survivor_version jsonb, collided boolean not null) on commit drop")
                             .format(_TOUCHED))
            result = apply(holds, check.involved)
            if check.fks:
                conn.execute(sql.SQL("analyze {}").format(_TOUCHED))  # temp tables are never auto-analyzed
            new = check.broken(holds) if check.fks else {}
            if not new:
                return result, []
            if n == rounds:
                return result, [f"{table} {pk}: {why}; committed so, still found after {rounds} rounds"
                                for table, pks in new.items() for pk, why in pks.items()]
            for table, pks in new.items():
                holds.setdefault(table, {}).update({pk: f"{why}; not applied, for a human to settle"
                                                    for pk, why in pks.items()})
            raise psycopg.Rollback(tx)
    raise AssertionError("unreachable: the last round returns")


def apply_in_bounded_waits(
    conn: psycopg.Connection, keys: Mapping[str, list[str]], apply: Callable[[Holds, frozenset[str]], T], *,
    survivor_region: str, force_rollback: bool = False, settled: Collection[str] = (),
    patience: float = LOCK_PATIENCE,
) -> tuple[T, list[str]]:
    """``apply_keeping_foreign_keys`` in a transaction of its own, committed unless
    ``force_rollback`` (a preview), and run again from the start when a write waits for a
    lock (an application's row lock) past its bound (``table_locks.in_bounded_waits``): our
    table locks would queue the application's writers for as long as the row is held."""
    tables = [TableName.parse(t, catalog=True).identifier for t in sorted(keys)]
    return in_bounded_waits(conn, lambda left: apply_keeping_foreign_keys(
        conn, keys, apply, survivor_region=survivor_region, settled=settled, lock_patience=left),
        tables, force_rollback=force_rollback, patience=patience)


def broken_after_run(conn: psycopg.Connection, keys: Mapping[str, list[str]], survivor_region: str,
                     workflow_id: str, run_id: str, collision: str) -> list[str]:
    """Keys a run wrote in steps of their own (a data sync, table by table: its audit rows on
    ``conn``) that break a foreign key as the tables stand now: a step that skipped the run's
    other tables (``settled``) trusted them to reach the source's state, which a failed step,
    or a write on either side between the steps, can deny. Only reported: the run's writes are
    committed; read in a transaction rolled back at the end, taking no row lock. ``collision``:
    the reason a key collision was flagged with (the source's row under that key is another
    row than the survivor's: what the run wrote under it refers to one not there)."""
    found: list[str] = []
    with conn.transaction(force_rollback=True):
        conn.execute(sql.SQL("create temp table {} (table_name text not null, pk jsonb not null, action text"
                             " not null, survivor_version jsonb, collided boolean not null) on commit drop")
                     .format(_TOUCHED))
        if not conn.execute("select to_regclass('eagle_dr.conflict_audit') is not null").fetchone()[0]:
            return []
        conn.execute(sql.SQL("insert into {} select table_name, primary_key, action, survivor_version,"
                             " action = 'flag' and reason = %s"
                             " from eagle_dr.conflict_audit where workflow_id = %s and run_id = %s"
                             " and table_name = any(%s)").format(_TOUCHED),
                     (collision, workflow_id, run_id, list(keys)))
        conn.execute(sql.SQL("analyze {}").format(_TOUCHED))
        check = _Check(conn, keys, survivor_region, lock=False)
        if check.fks:
            found = [f"{table} {pk}: {why}" for table, pks in check.broken({}, passes=1).items()
                     for pk, why in pks.items()]
    return found
