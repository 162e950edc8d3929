"""Applying the loser's post-fork changes to the survivor, set-based, in one transaction.

The loser's changed rows and deleted keys are COPYed into a temp table, every key is decided
by one SELECT that re-implements ``engine.resolve`` in SQL (a test checks both agree key by
key), and the outcome is written with one DELETE ... USING, one INSERT ... ON CONFLICT DO
UPDATE and one INSERT ... SELECT into the audit table: no statement per row, so 100k keys take seconds.

Choices worth knowing:

* Every decision is audited, not only conflicts: one ``eagle_dr.conflict_audit`` row per key
  the loser sent, with ``conflict`` telling both-sides-changed keys from the rest. Re-applying
  a loser's write is as consequential as settling a conflict, and the audit then answers
  "what happened to each row the old primary wrote?" on its own. Both versions are kept in
  full only where one was thrown away or chosen between (see ``_audit``); the audit is
  written with one INSERT ... SELECT from the resolved temp table.
* The loser's deletions carry no time (the caller only knows the keys), so in a conflict any
  survivor update made after the fork beats them; see ``engine.order``.
* Rows are written with ``session_replication_role = replica`` so the tables' ``updated_at``
  trigger keeps the winning version's timestamp: restamping it with "now" would make an old
  version look like the newest write to every later comparison (and to a re-run). This needs
  the superuser the DR runbooks already connect as. It also skips foreign-key triggers, the
  way logical replication applies rows.
* Insert-insert key collisions (and, see ``engine``, rows the survivor deleted) can only be
  told with a creation-time column: the table's ``created_column``, else its ``created_at``
  when it has one as timestamptz. The summary names the column used; None means such keys
  were decided like any update (still audited, with both versions, as conflicts).
* The target table is locked against writes (SHARE ROW EXCLUSIVE, reads go on) for the few
  seconds of the run: a decision is only right for the survivor row it was made against.
* Idempotent: a re-run decides against the already-resolved rows, which the engine's
  idempotence law turns into keep_survivor (nothing is written), and the audit's unique
  (workflow_id, run_id, table_name, primary_key) with ON CONFLICT DO NOTHING keeps one row per
  decision. The run id is part of it because runbooks reuse their workflow id (dr-move-<service>)
  from one incident to the next: a key decided last month is decided, and audited, again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from pydantic import BaseModel

from activities.conflicts import engine
from activities.conflicts.loser_copy import LoserCopy
from activities.postgres.row_spool import RowSpool
from activities.postgres.table_locks import lock_tables
from activities.conflicts.resolve_sql import RESERVED_PREFIXES, Column, DecideQuery, same_key
from eagle_dr.config import TableConflictConfig, TableName

AUDIT_DDL = """
create schema if not exists eagle_dr;
create table if not exists eagle_dr.conflict_audit (
    id               bigserial primary key,
    "timestamp"      timestamptz not null default clock_timestamp(),
    workflow_id      text not null,
    run_id           text not null,
    table_name       text not null,
    primary_key      jsonb not null,
    strategy         text not null,
    conflict         boolean not null,
    survivor_version jsonb,
    loser_version    jsonb,
    result           jsonb,
    action           text not null,
    winner_region    text,
    approved_by      text,
    reason           text not null
);
-- True where survivor_version and loser_version were left out (see _audit); rows written
-- before the column existed hold both versions, hence the default.
alter table eagle_dr.conflict_audit add column if not exists versions_elided boolean not null default false;
drop index if exists eagle_dr.conflict_audit_decision;
create unique index if not exists conflict_audit_run_decision
    on eagle_dr.conflict_audit (workflow_id, run_id, table_name, primary_key);
create index if not exists conflict_audit_timestamp on eagle_dr.conflict_audit ("timestamp");
"""

# Set for the apply and put back as found at its end (see apply_resolutions).
_LOCAL_SETTINGS = ("session_replication_role", "jit", "work_mem", "enable_hashjoin")
_LOSER_TMP = sql.Identifier("_eagle_dr_loser")
_RESOLVED_TMP = sql.Identifier("_eagle_dr_resolved")


class ApplySummary(BaseModel):
    """Keys by outcome (inserted + updated + deleted + kept + flagged = keys sent); ``conflicts``
    counts keys both sides changed, whatever their outcome. They are the run's: an attempt after
    one that committed takes them from the audit. ``audit_rows``: the rows this attempt added."""

    table: str
    strategy: str
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    kept: int = 0
    flagged: int = 0
    conflicts: int = 0
    audit_rows: int = 0
    # The creation-time column that told inserts from updates; None: the table has none.
    created_column: str | None = None
    # A dry run's few decisions to show an approver (keys and outcomes, never row contents:
    # this lands in workflow history). Conflicts and flags first.
    sample: list[dict] = []


def _audit_table_current(conn: psycopg.Connection) -> bool:
    return conn.cursor(row_factory=tuple_row).execute(
        "select to_regclass('eagle_dr.conflict_audit_run_decision') is not null"
        " and to_regclass('eagle_dr.conflict_audit_timestamp') is not null"
        " and to_regclass('eagle_dr.conflict_audit_decision') is null"
        " and exists (select 1 from pg_attribute where attrelid = to_regclass('eagle_dr.conflict_audit')"
        "             and attname = 'versions_elided' and not attisdropped)").fetchone()[0]


def ensure_audit_table(conn: psycopg.Connection, *, wait: bool = False) -> None:
    """``wait``: its locks are waited for unbounded (a caller that locked nothing yet, in a
    transaction whose other waits are bounded); the session's lock_timeout is put back."""
    # As it should be (every run after the first): no DDL at all. ALTER TABLE ... IF NOT
    # EXISTS still takes an ACCESS EXCLUSIVE lock, held to the end of the caller's transaction
    # (every table of a reconcile is applied in one): anyone reading the audit would wait.
    if _audit_table_current(conn):
        return
    cur = conn.cursor(row_factory=tuple_row)
    with conn.transaction():
        previous = cur.execute("select current_setting('lock_timeout')").fetchone()[0]
        if wait:
            cur.execute("select set_config('lock_timeout', '0', true)")
        # Two first runs at once would race on CREATE ... IF NOT EXISTS (a unique violation in pg_type).
        cur.execute("select pg_advisory_xact_lock(hashtext('eagle_dr.conflict_audit'))")
        cur.execute(AUDIT_DDL)
        # SET LOCAL outlives the savepoint in the caller's transaction.
        cur.execute("select set_config('lock_timeout', %s, true)", (previous,))


def _table_ident(table: str) -> sql.Identifier:
    """The ``conflicts:`` name (``table`` or ``schema.table``, case as written), quoted."""
    return TableName.parse(table, catalog=True).identifier


def _columns(conn: psycopg.Connection, table: str) -> list[Column]:
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a"
        " where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''"
        " order by a.attnum",
        (_table_ident(table).as_string(conn),),
    ).fetchall()
    return [Column(*r) for r in rows]


DEFAULT_CREATED_COLUMN = "created_at"
_TIMESTAMPTZ = "timestamp with time zone"


def created_column(cfg: TableConflictConfig, columns: list[Column]) -> str | None:
    """The column telling when each row was inserted: the configured one (it must be a
    timestamptz column of the table), else ``created_at`` when the table has it as timestamptz.
    A ``created_at`` of another type is left alone rather than guessed at: a date or a naive
    timestamp cannot be placed exactly against the fork."""
    types = {c.name: c.type_name for c in columns}
    if cfg.created_column is not None:
        if types.get(cfg.created_column, _TIMESTAMPTZ) != _TIMESTAMPTZ:
            raise ValueError(f"created_column {cfg.created_column!r} is {types[cfg.created_column]}, "
                             "it must be timestamp with time zone")
        return cfg.created_column
    return DEFAULT_CREATED_COLUMN if types.get(DEFAULT_CREATED_COLUMN) == _TIMESTAMPTZ else None


def with_created_column(cfg: TableConflictConfig, columns: list[Column]) -> TableConflictConfig:
    """``cfg`` as the engine must see it for this table: with the creation column it has."""
    return cfg.model_copy(update={"created_column": created_column(cfg, columns)})


def _check_inputs(
    cfg: TableConflictConfig, columns: list[Column], loser_region: str, survivor_region: str,
    fork_time: datetime, now: datetime,
) -> None:
    """What can be refused before any row is read. The rows themselves are checked as they
    stream (their columns) and once loaded, in SQL (no key twice): a set of every key in
    Python would cost the memory streaming saves."""
    names = {c.name for c in columns}
    if loser_region == survivor_region:
        raise ValueError(f"loser and survivor are the same region ({loser_region!r})")
    for t in (fork_time, now):
        if t.tzinfo is None:
            raise ValueError("fork_time and now must be timezone-aware")
    needed = [*cfg.key, cfg.timestamp_column, *cfg.field_priority]
    if cfg.created_column:
        needed.append(cfg.created_column)
    if missing := [n for n in needed if n not in names]:
        raise ValueError(f"columns {missing} from the conflict config are not in the table")
    if reserved := [n for n in names if n.startswith(RESERVED_PREFIXES)]:
        raise ValueError(f"columns {reserved} use a prefix reserved for conflict resolution")


def _load_loser(
    conn: psycopg.Connection, target: sql.Identifier, columns: list[Column], cfg: TableConflictConfig,
    loser_rows: Iterable[Mapping[str, Any]] | LoserCopy, deleted_keys: Iterable[Sequence[Any]],
) -> None:
    names = [c.name for c in columns]
    cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    conn.execute(sql.SQL("drop table if exists {}").format(_LOSER_TMP))
    # CREATE TABLE AS copies the column types but not NOT NULL: a deleted key has only its key.
    conn.execute(sql.SQL("create temp table {} on commit drop as select {}, false as _e_deleted from {} with no data")
                 .format(_LOSER_TMP, cols, target))
    copy_in = sql.SQL("copy {} ({}, _e_deleted) from stdin").format(_LOSER_TMP, cols)
    cur = conn.cursor()
    if isinstance(loser_rows, LoserCopy):
        with cur.copy(copy_in) as copy:
            loser_rows.stream_into(copy, names)
        loser_rows = ()
    _load_as_json(conn, target, names, cfg.key, loser_rows, deleted_keys)
    # Temp tables are never auto-analyzed; without statistics the join below can go nested-loop.
    conn.execute(sql.SQL("analyze {}").format(_LOSER_TMP))
    _refuse_repeated_keys(conn, cfg.key)


_LOSER_JSON_TMP = sql.Identifier("_eagle_dr_loser_json")
# A Decimal goes into the JSON text as the number it is (1.50 stays 1.50): json.dumps has no way to
# write a raw number for an object, so it writes this marker, replaced after. A NUL can be in no
# PostgreSQL text or json value, so nothing a row holds can look like it.
_NUMBER = "\u0000eagle-dr-number:"
_NUMBER_RE = re.compile(re.escape(json.dumps(_NUMBER)[:-1]) + r'([-+0-9.eE]+)"')


def _json_value(v: Any) -> Any:
    if isinstance(v, Decimal):
        if not v.is_finite():
            return str(v)  # 'NaN', 'Infinity': numeric's input reads them from a string
        return _NUMBER + str(v)
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, timedelta):
        return f"{v.total_seconds()} seconds"
    return str(v)  # UUID, IP addresses and the like: their text is their input form


def _row_json(row: Mapping[str, Any]) -> str:
    return _NUMBER_RE.sub(r"\1", json.dumps(row, default=_json_value, allow_nan=False))


@contextmanager
def _settings(conn: psycopg.Connection, settings: Mapping[str, str]) -> Iterator[None]:
    """``settings`` for the block, in the caller's transaction, then back as they were."""
    cur = conn.cursor(row_factory=tuple_row)
    before = {n: cur.execute("select current_setting(%s)", (n,)).fetchone()[0] for n in settings}
    for n, v in settings.items():
        cur.execute("select set_config(%s, %s, true)", (n, v))
    yield
    for n, v in before.items():
        cur.execute("select set_config(%s, %s, true)", (n, v))


def _load_as_json(conn: psycopg.Connection, target: sql.Identifier, names: list[str], key: list[str],
                  loser_rows: Iterable[Mapping[str, Any]], deleted_keys: Iterable[Sequence[Any]]) -> None:
    """Rows as the loser's ``row_to_json`` gave them (a uuid, a bytea, a date: a string; an
    array: a list; a jsonb: a dict) go back through PostgreSQL's own JSON-to-row conversion,
    ``json_populate_record``, into the columns' types. A typed COPY took each string to the
    column type's Python dumper, which refused it: a uuid key failed the reconcile, after the
    point of no return. Errors name columns, never values (they reach the history and the pager)."""
    expected = set(names)
    # Read before the COPY: the connection can run nothing else until the COPY ends.
    generated = {r[0] for r in conn.cursor(row_factory=tuple_row).execute(
        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 and not attisdropped"
        " and attgenerated <> ''", (target.as_string(conn),))}
    def check(columns: Iterable[str]) -> None:
        # row_to_json also gives a stored generated column: the survivor computes its own.
        missing, extra = expected - set(columns), set(columns) - expected - generated
        if missing or extra:
            raise ValueError(f"a loser row does not have exactly the table's columns: missing "
                             f"{sorted(missing)}, not in the table {sorted(extra)}")

    # o: a JSON object set over the row (RowSpool: the commit time over a stale timestamp).
    conn.execute(sql.SQL("create temp table {} (j json, d bool, o json) on commit drop").format(_LOSER_JSON_TMP))
    cur = conn.cursor()
    spool_settings: dict[str, str] = {}
    with cur.copy(sql.SQL("copy {} (j, d, o) from stdin").format(_LOSER_JSON_TMP)) as copy:
        if isinstance(loser_rows, RowSpool):
            spool_settings = loser_rows.settings
            # Every row of the spool has the same keys (one table's row_to_json): checked once,
            # and the file goes to the COPY as it is, no row parsed in Python.
            if loser_rows.columns is not None:
                check(loser_rows.columns)
            loser_rows.copy_into(copy)
            loser_rows = ()
        copy.set_types(["text", "bool", "text"])
        for row in loser_rows:
            if row.keys() != expected:
                check(row.keys())
                row = {n: row[n] for n in names}
            copy.write_row([_row_json(row), False, None])
        for k in deleted_keys:
            if len(k) != len(key):
                raise ValueError(f"a deleted key has {len(k)} values; the key columns are {key}")
            copy.write_row([_row_json(dict(zip(key, k))), True, None])
    cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    insert = sql.SQL("insert into {tmp} ({cols}, _e_deleted) select {r_cols}, x.d from {js} x,"
                     # The second populate sets o's fields over the first's record, and only
                     # those: nothing of j is re-encoded (a json column keeps its text).
                     " json_populate_record(json_populate_record(null::{target}, x.j), coalesce(x.o, '{{}}')) r"
                     " where x.d = {deleted}")
    parts = dict(tmp=_LOSER_TMP, cols=cols, js=_LOSER_JSON_TMP, target=target,
                 r_cols=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(n)) for n in names))
    # The rows under the settings their text was written in; the deleted keys, written here
    # from this side's own values, under this side's.
    with _settings(conn, spool_settings):
        conn.execute(insert.format(deleted=sql.Literal(False), **parts))
    conn.execute(insert.format(deleted=sql.Literal(True), **parts))
    conn.execute(sql.SQL("drop table {}").format(_LOSER_JSON_TMP))


def _refuse_repeated_keys(conn: psycopg.Connection, key: list[str]) -> None:
    """One row per key, checked where the rows are: a repeated key would be decided twice."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    found = conn.cursor(row_factory=tuple_row).execute(sql.SQL(
        "select row({keys})::text, bool_or(_e_deleted), bool_and(_e_deleted) from {tmp}"
        " group by {keys} having count(*) > 1 limit 1").format(keys=keys, tmp=_LOSER_TMP)).fetchone()
    if found is None:
        return
    shown, some_deleted, all_deleted = found
    if some_deleted and not all_deleted:
        raise ValueError(f"key {shown} is both a loser row and a deleted key")
    raise ValueError(f"the {'deleted keys' if all_deleted else 'loser rows'} repeat a key: {shown}")


# The summary field each audited action counts under.
_COUNTED = {"insert_loser": "inserted", "apply_loser": "updated", "merge": "updated", "delete": "deleted",
            "flag": "flagged", "keep_survivor": "kept"}


def _tally(summary: ApplySummary, rows) -> None:
    """(action, keys, conflicts) rows into the summary's counts, which start from zero."""
    for name in (*_COUNTED.values(), "conflicts"):
        setattr(summary, name, 0)
    for action, n, conflicts in rows:
        setattr(summary, _COUNTED[action], getattr(summary, _COUNTED[action]) + n)
        summary.conflicts += conflicts


def _count(cur: psycopg.Cursor, summary: ApplySummary) -> None:
    q = sql.SQL("select _e_action, count(*), count(*) filter (where _e_conflict) from {} group by 1")
    _tally(summary, cur.execute(q.format(_RESOLVED_TMP)).fetchall())


def _count_audited(cur: psycopg.Cursor, summary: ApplySummary, table: str, workflow_id: str, run_id: str) -> None:
    _tally(summary, cur.execute(
        "select action, count(*), count(*) filter (where conflict) from eagle_dr.conflict_audit"
        " where workflow_id = %s and run_id = %s and table_name = %s group by 1",
        (workflow_id, run_id, table)).fetchall())


def _sample(cur: psycopg.Cursor, limit: int) -> list[dict]:
    q = sql.SQL("select _e_pk, _e_action, _e_conflict, _e_winner, _e_reason from {}"
                " order by (_e_action = 'flag') desc, _e_conflict desc, _e_pk::text limit {}")
    return [{"key": pk, "action": action, "conflict": conflict, "winner": winner, "reason": reason}
            for pk, action, conflict, winner, reason in cur.execute(q.format(_RESOLVED_TMP, sql.Literal(limit)))]


def _write(cur: psycopg.Cursor, target: sql.Identifier, names: list[str], key: list[str]) -> None:
    cur.execute(sql.SQL("delete from {} t using {} r where r._e_action = 'delete' and {}")
                .format(target, _RESOLVED_TMP, same_key("t", "r", key)))
    non_key = [n for n in names if n not in key]
    on_conflict = sql.SQL("do nothing")
    if non_key:
        on_conflict = sql.SQL("do update set {}").format(sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(n)) for n in non_key))
    cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    # OVERRIDING SYSTEM VALUE: a GENERATED ALWAYS identity key (the usual modern key) refuses an
    # INSERT that names it otherwise, and the loser's row must keep the key it has.
    cur.execute(sql.SQL(
        "insert into {target} ({cols}) overriding system value select {cols} from {resolved}"
        " where _e_action in ('insert_loser', 'apply_loser', 'merge')"
        " on conflict ({key}) {on_conflict}"
    ).format(target=target, cols=cols, resolved=_RESOLVED_TMP,
             key=sql.SQL(", ").join(sql.Identifier(k) for k in key), on_conflict=on_conflict))


_HOLD_TMP = sql.Identifier("_eagle_dr_hold")


def _hold(conn: psycopg.Connection, target: sql.Identifier, columns: list[Column], key: list[str],
          hold: Mapping[str, str], survivor_region: str) -> None:
    """The decisions for ``hold``'s keys turned into flags: the survivor's row stays as it is
    (the result), and the audit keeps both versions, whatever the decision elided."""
    conn.execute(sql.SQL("drop table if exists {}").format(_HOLD_TMP))
    conn.execute(sql.SQL("create temp table {} (pk jsonb primary key, reason text not null) on commit drop")
                 .format(_HOLD_TMP))
    with conn.cursor().copy(sql.SQL("copy {} (pk, reason) from stdin").format(_HOLD_TMP)) as copy:
        for pk, reason in hold.items():
            copy.write_row([pk, reason])
    k0 = sql.Identifier(key[0])
    names = [c.name for c in columns]
    conn.execute(sql.SQL("""
        update {resolved} r set _e_action = 'flag', _e_reason = h._e_h_reason, _e_elided = false, _e_winner = {s_region},
               _e_r_present = h._e_h_s_present, _e_s_json = h._e_h_s_json,
               _e_l_json = coalesce(r._e_l_json, h._e_h_l_json), {set_cols}
        from (select x.pk as _e_h_pk, x.reason as _e_h_reason, s.{k0} is not null as _e_h_s_present,
                     case when s.{k0} is null then null else to_jsonb(s.*) end as _e_h_s_json,
                     case when l.{k0} is null or l._e_deleted then null else to_jsonb(l.*) - '_e_deleted' end as _e_h_l_json,
                     {s_cols}
              from {hold} x cross join lateral jsonb_populate_record(null::{target}, x.pk) k
              left join {target} s on {s_match}
              left join {loser} l on {l_match}) h
        where r._e_pk = h._e_h_pk
    """).format(resolved=_RESOLVED_TMP, s_region=sql.Literal(survivor_region), k0=k0, hold=_HOLD_TMP,
                target=target, loser=_LOSER_TMP, s_match=same_key("s", "k", key), l_match=same_key("l", "k", key),
                set_cols=sql.SQL(", ").join(sql.SQL("{0} = h.{0}").format(sql.Identifier(n)) for n in names),
                s_cols=sql.SQL(", ").join(sql.SQL("s.{0}").format(sql.Identifier(n)) for n in names)))


# Set up by foreign_keys.apply_keeping_foreign_keys (only where a foreign key is at stake): the
# keys this transaction writes, deletes or flags, for its check. The audit cannot tell them: a
# retry after an attempt that committed writes no audit row, yet may decide a key again.
TOUCHED_TMP = "_eagle_dr_touched"


def _record_touched(cur: psycopg.Cursor, table: str, target: sql.Identifier, key: list[str], collision: str) -> None:
    """Before the write: the survivor's version is still in ``target``, and taken from there
    where the decision elided it (an update only the loser made, which may change a column a
    foreign key refers to). ``collision``: the reason an insert-insert key collision is flagged
    with (the loser's row under that key is another row than the survivor's: its children
    refer to one not there)."""
    if cur.execute("select to_regclass(%s) is not null", (f"pg_temp.{TOUCHED_TMP}",)).fetchone()[0]:
        k0 = sql.Identifier(key[0])
        cur.execute(sql.SQL(
            "insert into {touched} (table_name, pk, action, survivor_version, collided)"
            " select {table}, r._e_pk, r._e_action,"
            "  coalesce(r._e_s_json, case when s.{k0} is null then null else to_jsonb(s.*) end),"
            "  r._e_action = 'flag' and r._e_reason = {collision}"
            " from {resolved} r left join {target} s on r._e_action in ('apply_loser', 'merge') and r._e_s_json is null"
            "  and {match}"
            " where r._e_action <> 'keep_survivor'").format(
            touched=sql.Identifier(TOUCHED_TMP), table=sql.Literal(table), k0=k0, collision=sql.Literal(collision),
            resolved=_RESOLVED_TMP, target=target,
            match=same_key("s", "r", key)))


def _advance_sequences(cur: psycopg.Cursor, target: sql.Identifier) -> None:
    """Each sequence the table's columns own (serial, identity), moved past the highest value
    now in its column. Both sides drew from the sequence after the fork: the loser's inserts
    kept beyond the survivor's last value would make the survivor's next inserts fail on a
    duplicate key. Only forward; setval is not transactional, so a rolled-back apply leaves a
    gap, which a sequence allows."""
    owned = cur.execute(
        "select a.attname, s.seqrelid::regclass::text, s.seqstart from pg_attribute a"
        " join pg_depend d on d.refobjid = a.attrelid and d.refobjsubid = a.attnum"
        "  and d.classid = 'pg_class'::regclass and d.deptype in ('a', 'i')"
        " join pg_sequence s on s.seqrelid = d.objid"
        # Integer columns only: a max() of anything else (an owned sequence left on a text
        # column) would fail the apply here, after its point of no return, over a default.
        " where a.attrelid = %s::regclass and s.seqincrement > 0 and a.atttypid in ('int2'::regtype,"
        " 'int4'::regtype, 'int8'::regtype)", (target.as_string(cur),)).fetchall()
    for column, seq, start in owned:
        # The value it would give next: after its last one, or its start if it never gave one.
        cur.execute(sql.SQL("select setval(%s::regclass, m) from (select max({col})::bigint m from {target}) x"
                            " where m >= coalesce(pg_sequence_last_value(%s::regclass) + 1, %s)").format(
            col=sql.Identifier(column), target=target), (seq, seq, start))


def _audited_before(cur: psycopg.Cursor, table: str, workflow_id: str, run_id: str) -> bool:
    return cur.execute("select exists (select 1 from eagle_dr.conflict_audit where workflow_id = %s and run_id = %s"
                       " and table_name = %s)", (workflow_id, run_id, table)).fetchone()[0]


def _audit(cur: psycopg.Cursor, table: str, strategy: str, workflow_id: str, run_id: str,
           approved_by: str | None, result_json: sql.Composable, audited_before: bool) -> int:
    """One row per key, INSERT ... SELECT from the resolved temp table in the apply's transaction.

    ``result`` (the row as it now stands, null when absent) is always written. Both versions
    are written in full where a version was thrown away or the strategy chose: conflicts
    (the losing side's post-fork write exists nowhere else once the old primary is rewound),
    flags (a human re-keys them from both), merges (the result is neither version) and
    deletions (the removed row). For the rest, a change made on one side only (most keys of a
    failback), the changed side's version *is* ``result``, and the other side's is the row as
    it stood at the fork, which every backup from before the fork holds (PITR): those keys
    leave both version columns null and say so with ``versions_elided``. That is what keeps
    an audit row about a third of its old size at the bulk of the keys.

    A first run for this (workflow, run, table) (not ``audited_before``), the usual case,
    inserts plainly: the anti-join and ON CONFLICT's speculative insertion per row (about half
    of the audit's time at 200k keys) only matter when some keys are audited already, and none
    can be audited meanwhile: every audit row of ``table`` is written under its SHARE ROW
    EXCLUSIVE lock, held here."""
    insert = """
        insert into eagle_dr.conflict_audit (workflow_id, run_id, table_name, primary_key, strategy, conflict,
            survivor_version, loser_version, result, versions_elided, action, winner_region, approved_by, reason)
        select {wf}, {run}, {table}, _e_pk, {strategy}, _e_conflict,
               _e_s_json, _e_l_json, case when _e_r_present then {result} end, _e_elided,
               _e_action, _e_winner, {approved_by}, _e_reason
        from {resolved} r
    """
    if audited_before:
        insert += """
        -- An anti-join first: a re-run finds every key audited, and a speculative insert
        -- per row is far slower than one hash join. ON CONFLICT still guards concurrent runs.
        where not exists (select 1 from eagle_dr.conflict_audit a
                          where a.workflow_id = {wf} and a.run_id = {run} and a.table_name = {table}
                            and a.primary_key = r._e_pk)
        on conflict (workflow_id, run_id, table_name, primary_key) do nothing
    """
    cur.execute(sql.SQL(insert).format(wf=sql.Literal(workflow_id), run=sql.Literal(run_id), table=sql.Literal(table),
                              strategy=sql.Literal(strategy), result=result_json,
                              approved_by=sql.Literal(approved_by), resolved=_RESOLVED_TMP))
    return cur.rowcount


def apply_resolutions(
    conn: psycopg.Connection,
    table: str,
    cfg: TableConflictConfig,
    loser_rows: Iterable[Mapping[str, Any]] | LoserCopy,
    deleted_keys: Iterable[Sequence[Any]],
    loser_region: str,
    survivor_region: str,
    region_priority: Mapping[str, int],
    fork_time: datetime,
    now: datetime,
    workflow_id: str,
    run_id: str,
    approved_by: str | None = None,
    dry_run: bool = False,
    sample: int = 5,
    survivor_xid_from: int | None = None,
    hold: Mapping[str, str] | None = None,
    rehearse: bool = False,
) -> ApplySummary:
    """Resolve the loser's changed rows and deleted keys against ``table`` on the survivor
    (``conn``) and apply the outcome, all in one transaction (a savepoint if one is open).
    ``dry_run`` decides every key the same way and rolls everything back: what an approver
    is shown (counts and a sample) before the real run.

    ``loser_rows`` is either the rows (dicts with exactly the table's columns; any iterable,
    consumed once, so a generator streams) or a ``LoserCopy``: a query on the loser streamed
    COPY to COPY without the rows ever being held here. ``deleted_keys`` is consumed once too.

    ``survivor_xid_from`` (wal.WalScan.xid_horizon): a survivor row whose xmin is from it on
    was changed after the fork even when its timestamp says otherwise (an UPDATE that left
    ``updated_at`` alone, a loser clock running ahead). Without it only the timestamp tells,
    and such a row counts as unchanged: the loser's version replaces it and it is kept nowhere.

    ``hold``: keys (the audit's ``primary_key`` as jsonb text) flagged whatever they decide,
    with the reason; ``foreign_keys.apply_keeping_foreign_keys`` holds the ones whose write
    would break a foreign key. ``rehearse``: write the rows, for a caller that rolls it all
    back (a preview of tables a foreign key involves, checked across tables): the sample is
    taken, and neither the audit nor the sequences are written (setval is not rolled back)."""
    columns = _columns(conn, table)
    _check_inputs(cfg, columns, loser_region, survivor_region, fork_time, now)
    cfg = with_created_column(cfg, columns)
    target = _table_ident(table)
    summary = ApplySummary(table=table, strategy=cfg.strategy, created_column=cfg.created_column)
    cur = conn.cursor(row_factory=tuple_row)
    ensure_audit_table(conn)
    with conn.transaction(force_rollback=dry_run):
        # Restored at the end: SET LOCAL in a savepoint would outlive it in the caller's transaction.
        previous = dict(zip(_LOCAL_SETTINGS, cur.execute(
            "select " + ", ".join(f"current_setting('{n}')" for n in _LOCAL_SETTINGS)).fetchone()))
        cur.execute("set local session_replication_role = replica")
        # The deciding SELECT is one long generated expression list run once: JIT-compiling
        # it (its cost passes jit_above_cost from ~50k keys) took longer than running it.
        cur.execute("set local jit = off")
        # The decision joins the loser's rows to the survivor's and the audit reads them back:
        # at the default 4 MB those hashes spill to temp files in batches (8 at 200k keys).
        # One session's few hash tables, for the seconds of the run.
        cur.execute("set local work_mem = '64MB'")
        lock_tables(conn, [target])  # held already when foreign_keys took every table's
        _load_loser(conn, target, columns, cfg, loser_rows, deleted_keys)
        decide = DecideQuery(columns, cfg, survivor_region, loser_region, region_priority, fork_time, now,
                             survivor_xid_from)
        query = decide.select(target, _LOSER_TMP)
        cur.execute(sql.SQL("drop table if exists {}").format(_RESOLVED_TMP))
        # Without a hash join the decision comes out in key order (a merge join; index lookups
        # for a small loser set keep the loser's own order, as small sets can), so the writes and the audit that follow it insert into
        # their btrees in order instead of at random: at 1M keys that took the audit from 17 s
        # to 12 s and the upsert from 6.5 s to 5.7 s (bench.conflicts' data).
        cur.execute("set local enable_hashjoin = off")
        cur.execute(sql.SQL("create temp table {} on commit drop as {}").format(_RESOLVED_TMP, query))
        cur.execute(sql.SQL("set local enable_hashjoin = {}").format(sql.Literal(previous["enable_hashjoin"])))
        # Read once: nothing else writes this table's audit rows while its lock is held here.
        audited = _audited_before(cur, table, workflow_id, run_id)
        if audited:
            # An earlier attempt of this run committed: a key it flagged stays flagged (its audit
            # row, one per key, says so), though what held it may have changed since (a foreign
            # key's parent written meanwhile).
            hold = {**dict(cur.execute(
                "select primary_key::text, reason from eagle_dr.conflict_audit where workflow_id = %s and run_id = %s"
                " and table_name = %s and action = 'flag'", (workflow_id, run_id, table)).fetchall()), **(hold or {})}
        if hold:
            _hold(conn, target, columns, cfg.key, hold, survivor_region)
        _count(cur, summary)
        if dry_run or rehearse:
            summary.sample = _sample(cur, sample)
        if dry_run:
            return summary
        _record_touched(cur, table, target, cfg.key, engine.collision(survivor_region, loser_region))
        _write(cur, target, [c.name for c in columns], cfg.key)
        # A rehearsal is rolled back by its caller: the audit would be written for nothing (the
        # check reads the touched keys), and setval is not rolled back.
        if not rehearse:
            _advance_sequences(cur, target)
        retried = audited and not rehearse
        if not rehearse:
            summary.audit_rows = _audit(cur, table, cfg.strategy, workflow_id, run_id, approved_by,
                                        decide.result_json(), audited)
        if retried:
            # An earlier attempt of this run committed (its result was lost: a timeout, a worker
            # killed). This one decided against rows already holding that result, where every
            # key looks unchanged: its own counts would report nothing written. The audit has
            # one row per key as first decided: the run's figures.
            _count_audited(cur, summary, table, workflow_id, run_id)
        for name, value in previous.items():
            cur.execute(sql.SQL("set local {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    return summary
