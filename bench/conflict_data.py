"""The divergent rows the conflict benchmark resolves: a survivor table of N rows and N keys
sent by the loser, in a fixed mix.

Of the N keys the loser sends (ids are ranges, so every figure is reproducible):

* 40% conflicts: both sides changed the row after the fork; the survivor wrote later for even
  ids, the loser for odd ones, so last-write-wins goes both ways;
* 44% loser-only changes: the survivor's row is unchanged since before the fork;
* 1% deletes: the loser deleted a pre-fork row;
* 15% inserts: rows only the loser has.

The survivor also holds 15% of N rows the loser never sent (survivor size = N).

Loser rows are shaped the way the real caller hands them over (activities/failback.py reads
the old primary with ``row_to_json`` and ``json.loads``): timestamps as ISO strings, jsonb as
dicts. One exception: numeric travels as Decimal, not as the float ``json.loads`` makes of it,
because psycopg's numeric dumper refuses floats (the real caller trips on that today: see the
bench's report). Their memory is part of what the benchmark's RSS shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

# A failover: the old primary us-east-1 lost, us-west-2 was promoted and survives.
SURVIVOR, LOSER = "us-west-2", "us-east-1"
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
FORK = T0 + timedelta(hours=2)
NOW = FORK + timedelta(minutes=30)
LOSER_WROTE_AT = (FORK + timedelta(minutes=15)).isoformat()


@dataclass(frozen=True)
class Mix:
    n: int

    @property
    def conflicts(self) -> range:
        return range(1, int(self.n * 0.40) + 1)

    @property
    def loser_only(self) -> range:
        return range(self.conflicts.stop, int(self.n * 0.84) + 1)

    @property
    def deleted(self) -> range:
        return range(self.loser_only.stop, int(self.n * 0.85) + 1)

    @property
    def untouched(self) -> range:
        return range(self.deleted.stop, self.n + 1)

    @property
    def inserted(self) -> range:
        # As many as the survivor-only rows, so the loser sends exactly N keys.
        return range(self.n + 1, self.n + 1 + len(self.untouched))


# Per table: the survivor's non-key columns as SQL over g (the id) and the loser's version.
# The survivor's updated_at is computed the same way for every table (see _survivor_ts).
_SURVIVOR_COLUMNS = {
    "alerts": ("region, payload, created_at",
               "%(survivor)s, jsonb_build_object('severity', 'critical', 'source', 'sample-app', 'n', g), %(t0)s"),
    "alert_rules": ("name, threshold, enabled", "'rule-' || g, 80, true"),
}


def _loser_row(table: str, i: int, n: int) -> dict[str, Any]:
    if table == "alerts":
        # The loser's inserts (keys past the survivor's N) were created after the fork: with a
        # creation time before it, the engine rightly reads "the survivor deleted this row" and
        # counts a conflict.
        return {"id": i, "region": LOSER, "payload": {"severity": "warning", "source": "sample-app", "n": i},
                "created_at": (LOSER_WROTE_AT if i > n else T0.isoformat()), "updated_at": LOSER_WROTE_AT}
    if table == "alert_rules":
        return {"id": i, "name": f"rule-{i}-l", "threshold": Decimal("95.5"), "enabled": False,
                "updated_at": LOSER_WROTE_AT}
    raise ValueError(f"no bench data for table {table!r}")


TABLES = tuple(_SURVIVOR_COLUMNS)


def fill_survivor(conn: psycopg.Connection, table: str, mix: Mix) -> None:
    """Truncate the table, drop the audit, and write the survivor's N rows server-side (the
    fill is not what is measured). Vacuumed, analyzed and checkpointed, so the engine and the
    reference each start from the same table state with no dirty buffers to flush."""
    cols, values = _SURVIVOR_COLUMNS[table]
    conn.execute(sql.SQL("truncate {}").format(sql.Identifier(table)))
    conn.execute("drop table if exists eagle_dr.conflict_audit")
    # The touch trigger is BEFORE UPDATE only: an INSERT keeps the updated_at given here.
    survivor_ts = ("case when g < %(c_stop)s then %(fork)s::timestamptz + "
                   "(case when g %% 2 = 0 then interval '20 min' else interval '10 min' end) "
                   "else %(t0)s::timestamptz end")
    q = (f"insert into {table} (id, {cols}, updated_at) select g, {values}, {survivor_ts} "
         f"from generate_series(1, %(n)s) g")
    conn.execute(q, {"survivor": SURVIVOR, "t0": T0, "fork": FORK, "c_stop": mix.conflicts.stop, "n": mix.n})
    conn.execute(sql.SQL("vacuum analyze {}").format(sql.Identifier(table)))
    conn.execute("checkpoint")


def loser_changes(table: str, mix: Mix) -> tuple[list[dict[str, Any]], list[tuple[int]]]:
    """(loser rows, deleted keys): N keys in all."""
    rows = [_loser_row(table, i, mix.n) for r in (mix.conflicts, mix.loser_only, mix.inserted) for i in r]
    return rows, [(i,) for i in mix.deleted]


def expected_conflicts(mix: Mix) -> int:
    return len(mix.conflicts)


# The loser's rows as SQL over g (the id), the same values _loser_row gives in Python.
_LOSER_COLUMNS = {
    "alerts": ("id, region, payload, created_at, updated_at",
               "g, %(loser)s, jsonb_build_object('severity', 'warning', 'source', 'sample-app', 'n', g), "
               "case when g > %(n)s then %(wrote)s::timestamptz else %(t0)s end, %(wrote)s::timestamptz"),
    "alert_rules": ("id, name, threshold, enabled, updated_at",
                    "g, 'rule-' || g || '-l', 95.5, false, %(wrote)s::timestamptz"),
}


def fill_loser(conn: psycopg.Connection, table: str, mix: Mix) -> sql.Composable:
    """The loser's rows (the same as ``loser_changes``) in a table of their own, written
    server-side; returns the query a ``LoserCopy`` streams them from. The old primary is
    another server in real life: here it is another table, so both sides of the COPY relay
    run and the rows never exist in this process."""
    src = sql.Identifier(f"bench_loser_{table}")
    cols, values = _LOSER_COLUMNS[table]
    conn.execute(sql.SQL("drop table if exists {}").format(src))
    conn.execute(sql.SQL("create unlogged table {} (like {})").format(src, sql.Identifier(table)))
    for r in (mix.conflicts, mix.loser_only, mix.inserted):
        conn.execute(sql.SQL(f"insert into {{}} ({cols}) select {values} from generate_series(%(a)s::bigint, %(b)s::bigint) g")
                     .format(src), {"loser": LOSER, "t0": T0, "wrote": LOSER_WROTE_AT, "n": mix.n, "a": r.start,
                                 "b": r.stop - 1})
    conn.execute(sql.SQL("analyze {}").format(src))
    return sql.SQL("select * from {}").format(src)


def deleted_keys(mix: Mix) -> list[tuple[int]]:
    return [(i,) for i in mix.deleted]
