"""The SQL twin of ``engine.resolve``: one SELECT that decides every key of the loser's
temp table against the survivor's table, column for column the same rules.

The loser's rows sit in a table with the target's columns plus ``_e_deleted``. The SELECT
returns the resolved row under the target's column names (values only meaningful when
``_e_r_present``) and the meta columns in ``META``. Constants (fork time, region names,
which region wins a timestamp tie, every reason text) are computed in Python, most by the
engine's own functions, and inlined as literals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from psycopg import sql

from activities.conflicts import engine
from activities.postgres.wal import xmin_from
from eagle_dr.config import TableConflictConfig

# Names this module gives its own columns; a table using them would be misread.
RESERVED_PREFIXES = ("_e_", "_s_", "_l_")
META = ["_e_pk", "_e_s_json", "_e_l_json", "_e_conflict", "_e_winner", "_e_reason", "_e_r_present", "_e_elided",
        "_e_action"]
# jsonb_build_object takes at most 100 arguments: 50 columns per call, joined with ||.
_JSON_CHUNK = 50


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str


def same_key(a: str, b: str, key: list[str]) -> sql.Composable:
    """``a`` and ``b`` (aliases) hold the same key: a join on the key columns."""
    return sql.SQL(" and ").join(sql.SQL("{}.{} = {}.{}").format(
        sql.Identifier(a), sql.Identifier(k), sql.Identifier(b), sql.Identifier(k)) for k in key)


class DecideQuery:
    """Builds the deciding SELECT. Columns of the joined pair are positional (_s_3, _l_3) so
    that long or odd column names never collide with each other or with the meta columns."""

    def __init__(self, columns: list[Column], cfg: TableConflictConfig, survivor: str, loser: str,
                 region_priority: Mapping[str, int], fork_time: datetime, now: datetime,
                 survivor_xid_from: int | None = None):
        self.columns, self.cfg, self.S, self.L = columns, cfg, survivor, loser
        self.names = [c.name for c in columns]
        self.region_priority, self.fork_time, self.now = region_priority, fork_time, now
        self.survivor_xid_from = survivor_xid_from

    def s_written_after(self) -> sql.Composable:
        """engine.Version.written_after_fork for the survivor's row: its xmin is a transaction the
        survivor ran after the fork (wal.WalScan.xid_horizon), whatever its timestamp says."""
        if self.survivor_xid_from is None:
            return sql.SQL("false")
        return sql.SQL("coalesce({}, false)").format(xmin_from(sql.SQL("_e_s_xmin"), self.survivor_xid_from,
                                                                sql.SQL("pg_snapshot_xmax(pg_current_snapshot())")))

    def s_col(self, name: str) -> sql.Identifier:
        return sql.Identifier(f"_s_{self.names.index(name)}")

    def l_col(self, name: str) -> sql.Identifier:
        return sql.Identifier(f"_l_{self.names.index(name)}")

    def _comparable(self, ident: sql.Composable, c: Column) -> sql.Composable:
        # json has no equality operator; compare it as jsonb, which is also how Python compares dicts.
        return sql.SQL("{}::jsonb").format(ident) if c.type_name == "json" else ident

    def row_of(self, ident: Callable[[str], sql.Identifier], columns: list[Column] | None = None) -> sql.Composable:
        return sql.SQL("row({})").format(sql.SQL(", ").join(
            self._comparable(ident(c.name), c) for c in (self.columns if columns is None else columns)))

    def existed_at_fork(self, ident: Callable[[str], sql.Identifier]) -> sql.Composable:
        """engine._existed_at_fork: inserted at or before the fork (false when unknown). Only the
        survivor can lack a row here: the loser sends rows and deletions, never an absence."""
        cc = self.cfg.created_column
        if cc is None:
            return sql.SQL("false")
        return sql.SQL("coalesce({} <= {}, false)").format(ident(cc), sql.Literal(self.fork_time))

    def collision(self) -> sql.Composable:
        """engine.insert_collision: both present, both inserted after the fork at different
        times, and different contents apart from the two stamps."""
        cc = self.cfg.created_column
        if cc is None:
            return sql.SQL("false")
        stamps = (self.cfg.timestamp_column, cc)
        content = [c for c in self.columns if c.name not in stamps]
        return sql.SQL(
            "_e_s_present and _e_l_present and coalesce({s} > {fork} and {l} > {fork} and {s} <> {l}, false)"
            " and {s_row} is distinct from {l_row}"
        ).format(s=self.s_col(cc), l=self.l_col(cc), fork=sql.Literal(self.fork_time),
                 s_row=self.row_of(self.s_col, content), l_row=self.row_of(self.l_col, content))

    def lww_case(self, wrap: Callable[[str], str] = str) -> sql.Composable:
        ts = self.cfg.timestamp_column
        return sql.SQL(
            "case when _e_s_newer and _e_tie then {} when _e_s_newer then {} when _e_tie then {} else {} end"
        ).format(*(sql.Literal(wrap(engine.lww_rule(r, tie, ts)))
                   for r, tie in ((self.S, True), (self.S, False), (self.L, True), (self.L, False))))

    def strategy(self) -> tuple[sql.Composable, sql.Composable]:
        """(survivor wins, rule text) for keys the strategy has to decide."""
        cfg = self.cfg
        if cfg.strategy == "freshness-priority":
            assert cfg.ttl is not None
            wins = sql.SQL("case when _e_s_fresh <> _e_l_fresh then _e_s_fresh else _e_s_newer end")
            rule = sql.SQL("case when _e_s_fresh and not _e_l_fresh then {} when _e_l_fresh and not _e_s_fresh"
                           " then {} else {} end").format(
                sql.Literal(engine.stale_rule(self.L, cfg.ttl)), sql.Literal(engine.stale_rule(self.S, cfg.ttl)),
                self.lww_case())
            return wins, rule
        if cfg.strategy == "source-priority" and cfg.source_region in (self.S, self.L):
            return sql.Literal(cfg.source_region == self.S), sql.Literal(engine.source_rule(cfg.source_region))
        if cfg.strategy == "merge-with-priority":
            rule = sql.SQL("case when (case when _e_s_newer then _e_s_present else _e_l_present end) then {}"
                           " else {} end").format(self.lww_case(engine.merge_rule), self.lww_case())
            return sql.SQL("_e_s_newer"), rule
        return sql.SQL("_e_s_newer"), self.lww_case()

    def decision(self) -> sql.Composable:
        """The _e_take_s, _e_flag, _e_merge and _e_reason columns."""
        only = sql.SQL("case when _e_s_changed then {} else {} end").format(
            sql.Literal(engine.only_changed(self.S)), sql.Literal(engine.only_changed(self.L)))
        collision = sql.Literal(engine.collision(self.S, self.L))
        if self.cfg.strategy == "immutable-append-only":
            return sql.SQL("""
                _e_collision or not (_e_l_changed and not _e_s_changed and not _e_s_present) as _e_take_s,
                case when _e_collision then true
                     when _e_s_changed and _e_l_changed then not _e_same
                     when _e_l_changed then _e_s_present else false end as _e_flag,
                false as _e_merge,
                case when _e_collision then {collision}
                     when _e_s_changed and _e_l_changed then (case when _e_same then {same}
                                                                   when not _e_s_present then {deleted}
                                                                   else {both} end)
                     when _e_l_changed then (case when _e_s_present then {existing} else {only_l} end)
                     when _e_s_changed then {only_s}
                     when _e_same then {same} else {diverged} end as _e_reason
            """).format(same=sql.Literal(engine.SAME_VERSION), both=sql.Literal(engine.APPEND_BOTH),
                        existing=sql.Literal(engine.append_existing(self.L)),
                        only_l=sql.Literal(engine.only_changed(self.L)),
                        only_s=sql.Literal(engine.only_changed(self.S)),
                        diverged=sql.Literal(engine.APPEND_DIVERGED), collision=collision,
                        deleted=sql.Literal(engine.deleted_and_updated(self.S, self.L, engine.APPEND_DELETED)))
        wins, rule = self.strategy()
        merge = self.cfg.strategy == "merge-with-priority"
        return sql.SQL("""
            case when _e_collision then true when _e_s_changed <> _e_l_changed then _e_s_changed
                 when _e_same then _e_s_newer else {wins} end as _e_take_s,
            _e_collision as _e_flag,
            {merge} and not _e_collision and _e_s_changed = _e_l_changed and not _e_same as _e_merge,
            case when _e_collision then {collision} when _e_s_changed <> _e_l_changed then {only}
                 when _e_same then {same}
                 when _e_s_changed and _e_l_changed and not _e_s_present then {deleted} || {rule}
                 when _e_s_changed and _e_l_changed then {conflict} || {rule}
                 else {diverged} || {rule} end as _e_reason
        """).format(wins=wins, merge=sql.Literal(merge), only=only, same=sql.Literal(engine.SAME_VERSION),
                    conflict=sql.Literal(engine.situation(True, "")), diverged=sql.Literal(engine.situation(False, "")),
                    rule=rule, collision=collision,
                    deleted=sql.Literal(engine.deleted_and_updated(self.S, self.L, "")))

    def result_column(self, c: Column) -> sql.Composable:
        plain = sql.SQL("case when _e_take_s then {} else {} end").format(self.s_col(c.name), self.l_col(c.name))
        regions = self.cfg.field_priority.get(c.name) if self.cfg.strategy == "merge-with-priority" else None
        if not regions:
            return sql.SQL("{} as {}").format(plain, sql.Identifier(c.name))
        # The first listed region that holds a row gives the field; unlisted: the newer version's.
        whens = []
        for region in dict.fromkeys(regions):
            if region == self.S:
                whens.append(sql.SQL("when _e_s_present then {}").format(self.s_col(c.name)))
            elif region == self.L:
                whens.append(sql.SQL("when _e_l_present then {}").format(self.l_col(c.name)))
        if not whens:
            return sql.SQL("{} as {}").format(plain, sql.Identifier(c.name))
        return sql.SQL("case when _e_merge then (case {} else {} end) else {} end as {}").format(
            sql.SQL(" ").join(whens), plain, plain, sql.Identifier(c.name))

    def result_json(self) -> sql.Composable:
        """The resolved row (its columns under the table's names) as jsonb, built from those
        columns: cheaper than to_jsonb of the whole working row minus the meta keys."""
        names = self.names
        parts = [sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(n), sql.Identifier(n)) for n in names[i:i + _JSON_CHUNK]))
            for i in range(0, len(names), _JSON_CHUNK)]
        return sql.SQL(" || ").join(parts)

    def select(self, target: sql.Identifier, loser: sql.Identifier) -> sql.Composable:
        cfg, ts = self.cfg, self.cfg.timestamp_column
        k0 = sql.Identifier(cfg.key[0])
        idents = [sql.Identifier(n) for n in self.names]
        pair_cols = sql.SQL(", ").join(
            [sql.SQL("s.{} as {}").format(i, self.s_col(n)) for i, n in zip(idents, self.names)]
            + [sql.SQL("l.{} as {}").format(i, self.l_col(n)) for i, n in zip(idents, self.names)])
        join_on = same_key("s", "l", cfg.key)
        pk = sql.SQL(", ").join(sql.SQL("{}, l.{}").format(sql.Literal(k), sql.Identifier(k)) for k in cfg.key)
        fork, fresh_after = sql.Literal(self.fork_time), sql.Literal(self.now - cfg.ttl if cfg.ttl else self.now)
        s_ts, l_ts = self.s_col(ts), self.l_col(ts)
        tie_s = engine.region_preference(self.S, self.L, self.region_priority)
        result_cols = sql.SQL(", ").join(self.result_column(c) for c in self.columns)
        result_row = sql.SQL("row({})").format(sql.SQL(", ").join(
            self._comparable(sql.Identifier(c.name), c) for c in self.columns))
        return sql.SQL("""
            with j as (
                select {pair_cols},
                       s.{k0} is not null as _e_s_present,
                       s.xmin as _e_s_xmin,
                       not l._e_deleted as _e_l_present,
                       -- The rows themselves (both sides' every column, generated ones too) for the
                       -- versions the audit keeps; only those are turned into jsonb, at the end.
                       -- s.*, never a bare s: a column named s (or l) would be read before the row.
                       case when s.{k0} is null then null else s.* end as _e_s_rec,
                       case when l._e_deleted then null else l.* end as _e_l_rec,
                       jsonb_build_object({pk}) as _e_pk
                from {loser} l left join {target} s on {join_on}
                offset 0
            ), f as (
                select j.*,
                       case when _e_s_present then coalesce({s_ts} > {fork}, false) or {s_written}
                            else _e_l_present and (not coalesce({l_ts} > {fork}, false) or {l_existed})
                       end as _e_s_changed,
                       not _e_l_present or coalesce({l_ts} > {fork}, false) as _e_l_changed,
                       _e_s_present = _e_l_present
                           and (not _e_s_present or {s_row} is not distinct from {l_row}) as _e_same,
                       coalesce({s_ts}, '-infinity') = coalesce({l_ts}, '-infinity') as _e_tie,
                       coalesce({s_ts}, '-infinity') > coalesce({l_ts}, '-infinity')
                           or (coalesce({s_ts}, '-infinity') = coalesce({l_ts}, '-infinity') and {tie_s})
                           as _e_s_newer,
                       coalesce({s_ts} >= {fresh_after}, false) as _e_s_fresh,
                       coalesce({l_ts} >= {fresh_after}, false) as _e_l_fresh
                from j
                offset 0
            ), c as (
                select f.*, {collision} as _e_collision from f
                offset 0
            ), d as (
                select c.*, _e_collision or (_e_s_changed and _e_l_changed and not _e_same) as _e_conflict, {decision}
                from c
                offset 0
            ), r as (
                select d.*, {result_cols},
                       case when _e_take_s then _e_s_present else _e_l_present end as _e_r_present,
                       case when _e_take_s then {S} else {L} end as _e_winner
                from d
                offset 0
            ), a as (
                select r.*,
                       case when _e_flag then 'flag'
                            when _e_r_present = _e_s_present
                                 and (not _e_r_present or {result_row} is not distinct from {s_row}) then 'keep_survivor'
                            when not _e_r_present then 'delete'
                            when not _e_s_present then 'insert_loser'
                            when _e_l_present and {result_row} is not distinct from {l_row} then 'apply_loser'
                            else 'merge' end as _e_action
                from r
                offset 0
            ), e as (
                -- At most one side changed the row since the fork (or both to the same row) and
                -- nothing was thrown away or chosen between: apply._audit keeps only the result.
                select a.*, (_e_same or _e_s_changed <> _e_l_changed)
                            and not (_e_conflict or _e_action in ('flag', 'merge', 'delete')) as _e_elided
                from a
                offset 0
            )
            -- The versions only where the audit keeps them (most of a failback's keys are elided).
            select {names}, _e_pk, case when not _e_elided then to_jsonb(_e_s_rec) end as _e_s_json,
                   case when not _e_elided then to_jsonb(_e_l_rec) - '_e_deleted' end as _e_l_json,
                   _e_conflict, _e_winner, _e_reason, _e_r_present, _e_elided, _e_action
            from e
        """).format(
            pair_cols=pair_cols, k0=k0, pk=pk, loser=loser, target=target, join_on=join_on,
            s_ts=s_ts, l_ts=l_ts, fork=fork, s_row=self.row_of(self.s_col), l_row=self.row_of(self.l_col),
            tie_s=sql.Literal(bool(tie_s)), fresh_after=fresh_after, decision=self.decision(),
            collision=self.collision(), l_existed=self.existed_at_fork(self.l_col), s_written=self.s_written_after(),
            result_cols=result_cols, S=sql.Literal(self.S), L=sql.Literal(self.L),
            names=sql.SQL(", ").join(sql.Identifier(n) for n in self.names), result_row=result_row,
        )
