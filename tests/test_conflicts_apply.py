"""Applying resolutions to a real PostgreSQL 15 (port 17850, or EAGLE_DR_TEST_SCRATCH_PORT; run as
the lab's OS user).

The SQL decides every key itself; these tests hold it to the pure engine: same final rows,
same action, winner, conflict flag and reason for every key, for every strategy.
"""

from __future__ import annotations

import os
import random
import tempfile
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from activities.conflicts.apply import ApplySummary, apply_resolutions
from activities.conflicts.loser_copy import LoserCopy
from activities.conflicts.engine import Resolution, apply_to, resolve_changes
from activities.postgres.divergence import spool_rows
from activities.postgres.row_spool import RowSpool
from eagle_dr.config import DEFAULT_CONFIG, TableConflictConfig, load_config, parse_config
from lab.postgres import PostgresNode
from lab.scratch_postgres import scratch_postgres

# Moved with EAGLE_DR_TEST_PORT_SHIFT (default 2000: 17850), like the test lab, so two
# checkouts can run this file at once; the directory too, or one would delete the other's.
_SHIFT = int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000
PORT = 17850 + _SHIFT
# Fixed, so a run killed before its teardown is cleaned up by the next one.
BASE = Path(tempfile.gettempdir()) / ("eagle-dr-test-conflicts" + (f"-{_SHIFT}" if _SHIFT else ""))

CFG = load_config(DEFAULT_CONFIG, env={})
TABLES: dict[str, TableConflictConfig] = dict(CFG.conflicts)
PRIORITY = {r.name: r.priority for r in CFG.regions}
# A failover: the old primary (us-east-1) lost, the promoted us-west-2 survives.
SURVIVOR, LOSER = "us-west-2", "us-east-1"

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
FORK = T0 + timedelta(hours=2)
NOW = FORK + timedelta(minutes=30)  # metrics_snapshots' 5m ttl: fresh from FORK+25m


def at(minute: float) -> datetime:
    return FORK + timedelta(minutes=minute)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresNode]:
    with scratch_postgres(PORT, "conflicts", BASE) as node:
        yield node


@pytest.fixture
def db(pg: PostgresNode) -> Iterator[psycopg.Connection]:
    with pg.connect(row_factory=dict_row) as conn:
        conn.execute("truncate alerts, alert_rules, subscriptions, audit_log, metrics_snapshots")
        conn.execute("drop table if exists eagle_dr.conflict_audit")
        yield conn


# -- helpers ---------------------------------------------------------------------------------

# Two contents per table that differ in every non-key column.
# alerts also has a created_at (timestamptz): the creation column that tells inserts from updates.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "alerts": ({"region": SURVIVOR, "payload": {"side": "s"}},
               {"region": LOSER, "payload": {"side": "l", "n": [1, 2]}}),
    "alert_rules": ({"name": "s", "threshold": Decimal("10"), "enabled": True},
                    {"name": "l", "threshold": Decimal("20.5"), "enabled": False}),
    "subscriptions": ({"user_id": "u-s", "channel": "sms"}, {"user_id": "u-l", "channel": "email"}),
    "audit_log": ({"actor": "s", "action": "login"}, {"actor": "l", "action": "logout"}),
    "metrics_snapshots": ({"metric": "cpu", "value": 1.0}, {"metric": "mem", "value": 2.5}),
}


def row(table: str, key: int, ts: datetime, variant: int | dict[str, Any],
        created: datetime | None = None) -> dict[str, Any]:
    """``created``: when the row was inserted (tables with a created_at only); default T0, before the fork."""
    fields = VARIANTS[table][variant] if isinstance(variant, int) else variant
    out = {"id": key, **fields, "updated_at": ts}
    if table == "alerts" and "created_at" not in out:
        out["created_at"] = created or T0
    return out


def seed(conn: psycopg.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    q = sql.SQL("insert into {} ({}) values ({})").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)))
    with conn.cursor() as cur:
        cur.executemany(q, [[Jsonb(r[c]) if isinstance(r[c], (dict, list)) else r[c] for c in cols] for r in rows])


def table_rows(conn: psycopg.Connection, table: str) -> dict[tuple, dict[str, Any]]:
    rows = conn.execute(sql.SQL("select * from {} order by id").format(sql.Identifier(table)))
    return {(r["id"],): r for r in rows}


def audit(conn: psycopg.Connection, table: str | None = None) -> dict[tuple, dict[str, Any]]:
    rows = conn.execute("select * from eagle_dr.conflict_audit where %s::text is null or table_name = %s"
                        " order by id", (table, table)).fetchall()
    out = {}
    for r in rows:
        key = (r["primary_key"]["id"],)
        assert key not in out, f"two audit rows for {key}"
        out[key] = r
    return out


def run_both(conn, table: str, loser_rows, deleted, cfg: TableConflictConfig | None = None,
             workflow_id: str = "wf-1", run_id: str = "run-1") -> tuple[ApplySummary, list[Resolution], dict]:
    """Apply in SQL; resolve the same inputs in the engine; return both and the table before."""
    cfg = cfg or TABLES[table]
    before = table_rows(conn, table)
    summary = apply_resolutions(conn, table, cfg, loser_rows, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                                workflow_id, run_id, approved_by="oncall@example")
    # The engine sees the table as apply did: with the creation column the table has.
    assert summary.created_column == (cfg.created_column or ("created_at" if table == "alerts" else None))
    seen = cfg.model_copy(update={"created_column": summary.created_column})
    expected = resolve_changes(seen, before, loser_rows, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW)
    return summary, expected, before


def assert_agrees(conn, table: str, summary: ApplySummary, expected: list[Resolution], before: dict) -> None:
    assert table_rows(conn, table) == apply_to(before, expected)
    got = audit(conn, table)
    assert sorted(got) == [r.key for r in expected]
    for r in expected:
        a = got[r.key]
        assert (a["action"], a["conflict"], a["winner_region"], a["reason"]) == \
               (r.action, r.conflict, r.winner_region, r.reason), r
        assert (a["result"] is None) == (r.result is None)
    counts = {a: sum(1 for r in expected if r.action == a) for a in
              ("insert_loser", "apply_loser", "merge", "delete", "keep_survivor", "flag")}
    assert (summary.inserted, summary.updated, summary.deleted, summary.kept, summary.flagged) == (
        counts["insert_loser"], counts["apply_loser"] + counts["merge"], counts["delete"],
        counts["keep_survivor"], counts["flag"])
    assert summary.conflicts == sum(r.conflict for r in expected)
    assert summary.audit_rows == len(expected)


# -- one scenario per strategy, with the outcome written out ---------------------------------

# key: (survivor (minute, variant) or None, loser (minute, variant) / "deleted" / None)
SCENARIO: dict[int, tuple[tuple[float, int] | None, tuple[float, int] | str | None]] = {
    1: ((-60, 0), (10, 1)),     # only the loser updated a pre-fork row
    2: ((20, 0), (10, 1)),      # both updated, survivor later
    3: ((10, 0), (20, 1)),      # both updated, loser later
    4: ((15, 0), (15, 1)),      # both updated at the same instant
    5: (None, (5, 1)),          # inserted on the loser
    6: ((5, 0), None),          # inserted on the survivor (the loser never sent it)
    7: ((-60, 0), "deleted"),   # the loser deleted a pre-fork row
    8: ((5, 0), "deleted"),     # the loser deleted what the survivor updated
    9: ((12, 0), (8, 1)),       # both inserted the same key, different rows
    10: ((-60, 0), None),       # nobody touched it
    11: ((10, 0), (28, 1)),     # survivor stale, loser fresh (ttl 5m)
    12: ((7, 1), (7, 1)),       # same version on both sides
    13: (None, (10, 1)),        # the survivor deleted a pre-fork row, the loser updated it
}
# Inserted after the fork (the others existed before it): alerts stamps these in created_at.
INSERTED_AFTER_FORK = {5, 6, 9}
CONFLICTS = {2, 3, 4, 8, 9, 11}
# Only a creation column shows that key 13 existed at the fork, so that the survivor deleted it.
CONFLICTS_SEEN_BY_CREATED_AT = CONFLICTS | {13}
# us-east-1 (the loser) has priority 1: it wins the tie of key 4 under last-write-wins.
EXPECTED_ACTIONS = {
    # Its created_at shows key 9 is two different inserts: a collision, flagged (the other tables
    # have no creation column and see two updates of one row). And that key 13 existed at the
    # fork: the loser's update beats the survivor's undated delete, as a conflict (the other
    # tables see an insert on the loser).
    "alerts": {1: "apply_loser", 2: "keep_survivor", 3: "apply_loser", 4: "apply_loser", 5: "insert_loser",
               7: "delete", 8: "keep_survivor", 9: "flag", 11: "apply_loser", 12: "keep_survivor",
               13: "insert_loser"},
    "alert_rules": {1: "apply_loser", 2: "merge", 3: "merge", 4: "merge", 5: "insert_loser", 7: "delete",
                    8: "keep_survivor", 9: "merge", 11: "merge", 12: "keep_survivor", 13: "insert_loser"},
    "subscriptions": {1: "apply_loser", 2: "apply_loser", 3: "apply_loser", 4: "apply_loser", 5: "insert_loser",
                      7: "delete", 8: "delete", 9: "apply_loser", 11: "apply_loser", 12: "keep_survivor",
                      13: "insert_loser"},
    "audit_log": {1: "flag", 2: "flag", 3: "flag", 4: "flag", 5: "insert_loser", 7: "flag", 8: "flag",
                  9: "flag", 11: "flag", 12: "keep_survivor", 13: "insert_loser"},
    "metrics_snapshots": {1: "apply_loser", 2: "keep_survivor", 3: "apply_loser", 4: "apply_loser",
                          5: "insert_loser", 7: "delete", 8: "keep_survivor", 9: "keep_survivor",
                          11: "apply_loser", 12: "keep_survivor", 13: "insert_loser"},
}


def scenario_inputs(table: str) -> tuple[list[dict], list[dict], list[tuple]]:
    survivor, loser, deleted = [], [], []
    for key, (s, l) in SCENARIO.items():
        def created(minute: float) -> datetime | None:
            return at(minute) if key in INSERTED_AFTER_FORK else None
        if s is not None:
            survivor.append(row(table, key, at(s[0]), s[1], created(s[0])))
        if l == "deleted":
            deleted.append((key,))
        elif l is not None:
            loser.append(row(table, key, at(l[0]), l[1], created(l[0])))
    return survivor, loser, deleted


@pytest.mark.parametrize("table", list(EXPECTED_ACTIONS))
def test_scenario(db, table):
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    summary, expected, before = run_both(db, table, loser, deleted)

    got = audit(db, table)
    assert {k[0]: a["action"] for k, a in got.items()} == EXPECTED_ACTIONS[table]
    assert_agrees(db, table, summary, expected, before)
    after = table_rows(db, table)
    # Untouched and survivor-only rows are not even looked at.
    for key in (6, 10):
        assert after[(key,)] == before[(key,)] and (key,) not in got

    # Exactly one audit row per conflicting key, carrying both versions and the result.
    conflicted = {k[0] for k, a in got.items() if a["conflict"]}
    assert conflicted == (CONFLICTS_SEEN_BY_CREATED_AT if table == "alerts" else CONFLICTS)
    for key in conflicted:
        a = got[(key,)]
        assert a["survivor_version"] == (None if key == 13 else {**a["survivor_version"], "id": key})
        assert a["loser_version"] == (None if key == 8 else {**a["loser_version"], "id": key})
        assert (a["result"] is None) == ((key,) not in after)
        if a["result"] is not None:
            assert datetime.fromisoformat(a["result"]["updated_at"]) == after[(key,)]["updated_at"]
        assert (a["workflow_id"], a["run_id"], a["strategy"], a["approved_by"]) == (
            "wf-1", "run-1", TABLES[table].strategy, "oncall@example")


def test_scenario_merged_rows(db):
    survivor, loser, deleted = scenario_inputs("alert_rules")
    seed(db, "alert_rules", survivor)
    run_both(db, "alert_rules", loser, deleted)
    after = table_rows(db, "alert_rules")
    # threshold from us-east-1 (the loser), enabled from us-west-2, the rest from the later row.
    assert after[(2,)] == {"id": 2, "name": "s", "threshold": Decimal("20.5"), "enabled": True, "updated_at": at(20)}
    assert after[(3,)] == {"id": 3, "name": "l", "threshold": Decimal("20.5"), "enabled": True, "updated_at": at(20)}


def test_timestamps_of_the_winning_version_are_kept_and_the_trigger_still_works(db):
    seed(db, "alerts", [row("alerts", 1, at(-60), 0)])
    run_both(db, "alerts", [row("alerts", 1, at(10), 1)], [])
    assert table_rows(db, "alerts")[(1,)]["updated_at"] == at(10)
    db.execute("update alerts set payload = '{}' where id = 1")
    assert table_rows(db, "alerts")[(1,)]["updated_at"] > at(10)


# -- SQL == engine on random inputs, every strategy ------------------------------------------

CHOICES: dict[str, dict[str, list[Any]]] = {
    "alerts": {"region": [LOSER, SURVIVOR], "payload": [{"v": 1}, {"v": 2}, {"v": 1, "w": [1, None]}],
               "created_at": [T0, FORK, at(0.001), at(10), at(20)]},
    "alert_rules": {"name": ["cpu", "mem"], "threshold": [Decimal("80"), Decimal("95.5"), None],
                    "enabled": [True, False]},
    "subscriptions": {"user_id": ["u1", "u2"], "channel": ["email", "sms"]},
    "audit_log": {"actor": ["alice", "bob"], "action": ["login", "logout"]},
    "metrics_snapshots": {"metric": ["cpu", "mem"], "value": [0.5, 1.25, None]},
}
OLD = [-120, -1, 0]                # at or before the fork: unchanged since
NEW = [0.001, 10, 20, 25, 26, 29]  # after it; 25 (the edge), 26, 29 are fresh for the 5m ttl


def random_inputs(rng: random.Random, table: str, n: int) -> tuple[list[dict], list[dict], list[tuple]]:
    def content() -> dict[str, Any]:
        return {c: rng.choice(vals) for c, vals in CHOICES[table].items()}

    survivor, loser, deleted = [], [], []
    for key in range(1, n + 1):
        s = rng.choice(["absent", "old", "new", "new"])
        srow = None if s == "absent" else row(table, key, at(rng.choice(OLD if s == "old" else NEW)), content())
        if srow:
            survivor.append(srow)
        l = rng.choice(["none", "new", "new", "new", "same", "deleted", "old"])
        if l == "deleted":
            deleted.append((key,))
        elif l == "same" and srow:
            loser.append(dict(srow))
        elif l in ("new", "old", "same"):
            lrow = row(table, key, at(rng.choice(NEW if l != "old" else OLD)), content())
            if srow and rng.random() < 0.3:
                # Same instant on both sides, so the region priority has to break the tie.
                lrow["updated_at"] = srow["updated_at"]
            loser.append(lrow)
    return survivor, loser, deleted


@pytest.mark.parametrize("table", list(CHOICES))
def test_sql_agrees_with_the_engine_on_random_inputs(db, table):
    rng = random.Random(f"conflicts-{table}")
    for strategy_cfg in _configs_for(table):
        db.execute(sql.SQL("truncate {}").format(sql.Identifier(table)))
        db.execute("drop table if exists eagle_dr.conflict_audit")
        survivor, loser, deleted = random_inputs(rng, table, 400)
        seed(db, table, survivor)
        summary, expected, before = run_both(db, table, loser, deleted, strategy_cfg)
        assert_agrees(db, table, summary, expected, before)
        assert {r.action for r in expected} >= {"keep_survivor", "insert_loser"}
        if table == "alerts":
            # The creation column's cases came up too.
            assert any("insert-insert" in r.reason for r in expected)
            assert any(f"{SURVIVOR} deleted it after the fork" in r.reason for r in expected)


def _configs_for(table: str) -> list[TableConflictConfig]:
    """The shipped config for the table, plus every other strategy that fits its columns."""
    fields = [c for c in CHOICES[table] if c != "created_at"][:2]
    return [
        TABLES[table],
        TableConflictConfig(strategy="last-write-wins"),
        TableConflictConfig(strategy="merge-with-priority",
                            field_priority={fields[0]: [LOSER, SURVIVOR], fields[1]: [SURVIVOR, LOSER]}),
        TableConflictConfig(strategy="source-priority", source_region=SURVIVOR),
        TableConflictConfig(strategy="source-priority", source_region=LOSER),
        TableConflictConfig(strategy="immutable-append-only"),
        TableConflictConfig(strategy="freshness-priority", ttl=timedelta(minutes=5)),
    ]


# -- idempotence -----------------------------------------------------------------------------


def _xmins(conn, table: str) -> dict[int, str]:
    q = sql.SQL("select id, xmin::text as x from {}").format(sql.Identifier(table))
    return {r["id"]: r["x"] for r in conn.execute(q)}


@pytest.mark.parametrize("table", list(EXPECTED_ACTIONS))
def test_applying_twice_changes_nothing(db, table):
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    first, _, _ = run_both(db, table, loser, deleted)
    rows, xmins, audit_rows = table_rows(db, table), _xmins(db, table), audit(db, table)

    # A retry after the first attempt committed (its result lost to a timeout, say) reports what
    # the run did, from the audit, not "nothing written": it re-decides against rows that already
    # hold the result, where every key looks unchanged.
    again, _, _ = run_both(db, table, loser, deleted)
    counts = lambda s: (s.inserted, s.updated, s.deleted, s.kept, s.flagged, s.conflicts)  # noqa: E731
    assert counts(again) == counts(first) and first.inserted + first.updated + first.deleted > 0, (again, first)
    assert again.audit_rows == 0
    assert table_rows(db, table) == rows
    assert _xmins(db, table) == xmins  # not even rewritten with the same values
    assert audit(db, table) == audit_rows


def test_two_attempts_of_one_run_at_once_audit_each_key_once(db, pg):
    """An activity retried while its first attempt still runs (a missed heartbeat): the second
    waits on the table lock, then finds every key audited and writes nothing. A first run
    inserts its audit plainly, which is only safe because nothing else can audit that table
    meanwhile."""
    import threading

    table = "alerts"
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    with pg.connect(row_factory=dict_row) as first, pg.connect(row_factory=dict_row) as second:
        with first.transaction():
            one = apply_resolutions(first, table, TABLES[table], loser, deleted, LOSER, SURVIVOR, PRIORITY, FORK,
                                    NOW, "wf-retry", "run-1")
            out: dict = {}
            t = threading.Thread(target=lambda: out.update(two=apply_resolutions(
                second, table, TABLES[table], loser, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                "wf-retry", "run-1")))
            t.start()
            # Until the first commits, the second waits for it (on its locks), then sees its rows.
            pid = second.info.backend_pid
            with pg.connect() as watch:
                deadline = 100
                while not watch.execute("select count(*) from pg_locks where not granted and pid = %s",
                                        (pid,)).fetchone()[0]:
                    deadline -= 1
                    assert deadline, "the second attempt never waited for the table lock"
                    threading.Event().wait(0.05)
        t.join(60)
        assert not t.is_alive()
    assert one.audit_rows == len(loser) + len(deleted)
    # It wrote nothing, and reports the run's figures (the first attempt's), not its own zeros.
    assert out["two"].audit_rows == 0
    assert out["two"].model_dump(exclude={"audit_rows"}) == one.model_dump(exclude={"audit_rows"})
    n = db.execute("select count(*) as n, count(distinct primary_key) as keys from eagle_dr.conflict_audit "
                   "where workflow_id = 'wf-retry'").fetchone()
    assert n["n"] == n["keys"] == one.audit_rows


def test_runs_inside_the_callers_transaction_and_restores_triggers(db):
    seed(db, "alerts", [row("alerts", 1, at(-60), 0)])
    with db.transaction():
        apply_resolutions(db, "alerts", TABLES["alerts"], [row("alerts", 1, at(10), 1)], [], LOSER, SURVIVOR,
                          PRIORITY, FORK, NOW, "wf-tx", "run-1")
        assert db.execute("show session_replication_role").fetchone()["session_replication_role"] == "origin"
    assert len(audit(db)) == 1


def test_refuses_inputs_it_cannot_decide(db):
    cfg = TABLES["alerts"]

    def go(loser, deleted, **kw):
        args = dict(loser_region=LOSER, survivor_region=SURVIVOR)
        args.update(kw)
        apply_resolutions(db, "alerts", cfg, loser, deleted, args["loser_region"], args["survivor_region"],
                          PRIORITY, FORK, NOW, "wf-bad", "run-1")

    good = row("alerts", 1, at(10), 1)
    with pytest.raises(ValueError, match="repeat"):
        go([good, dict(good)], [])
    with pytest.raises(ValueError, match="both"):
        go([good], [(1,)])
    with pytest.raises(ValueError, match="exactly the table's columns"):
        go([{"id": 2, "updated_at": at(1)}], [])
    with pytest.raises(ValueError, match="same region"):
        go([good], [], survivor_region=LOSER)


def test_a_later_incident_under_the_same_workflow_id_is_audited_again(db):
    """Runbooks reuse their workflow id (dr-move-<service>); each run keeps its own audit trail."""
    table = "alerts"
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    first, _, _ = run_both(db, table, loser, deleted, run_id="incident-1")
    again, _, _ = run_both(db, table, loser, deleted, run_id="incident-2")
    assert first.audit_rows == again.audit_rows == len(loser) + len(deleted)
    n = db.execute("select count(distinct run_id) as n from eagle_dr.conflict_audit where workflow_id = 'wf-1'")
    assert n.fetchone()["n"] == 2


def test_a_dry_run_decides_the_same_and_writes_nothing(db):
    table = "alerts"
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    before = table_rows(db, table)
    cfg = TABLES[table]
    preview = apply_resolutions(db, table, cfg, loser, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-1",
                                dry_run=True)
    assert table_rows(db, table) == before
    assert db.execute("select count(*) as n from eagle_dr.conflict_audit").fetchone()["n"] == 0
    assert preview.audit_rows == 0 and 0 < len(preview.sample) <= 5
    real = apply_resolutions(db, table, cfg, loser, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-1")
    counts = ("inserted", "updated", "deleted", "kept", "flagged", "conflicts")
    assert [getattr(preview, c) for c in counts] == [getattr(real, c) for c in counts]


def test_columns_named_like_the_engines_aliases_are_reconciled(db):
    """The engine's queries name the survivor's row s and the loser's l. A bare s there meant
    the row; in a table with a column named s it meant that column, and every reconcile of the
    table failed ("column reference s is ambiguous"), a failback's after its point of no
    return. Decided, held and audited with both versions, the columns named s, l and x too."""
    db.execute("drop table if exists aliased")
    db.execute("create table aliased (id int primary key, s text, l text, x text, updated_at timestamptz not null)")
    db.execute("insert into aliased values (1, 'S1', 'L1', 'X1', %s), (2, 'S2', 'L2', 'X2', %s)", (T0, T0))
    db.execute("update aliased set s = 'survivor', updated_at = %s where id = 1", (at(5),))
    cfg = TableConflictConfig(strategy="last-write-wins", key=["id"])
    loser = [{"id": 1, "s": "loser", "l": "L1", "x": "X1", "updated_at": at(9)},
             {"id": 2, "s": "S2", "l": "loser", "x": "X2", "updated_at": at(3)}]
    got = apply_resolutions(db, "aliased", cfg, loser, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-a", "run-1",
                            hold={'{"id": 2}': "held for a test"})
    assert (got.updated, got.flagged, got.conflicts) == (1, 1, 1), got
    assert db.execute("select s, l from aliased order by id").fetchall() == [
        {"s": "loser", "l": "L1"}, {"s": "S2", "l": "L2"}]
    versions = db.execute("select primary_key->>'id' as id, survivor_version->>'s' as s, loser_version->>'l' as l"
                          " from eagle_dr.conflict_audit where workflow_id = 'wf-a' order by 1").fetchall()
    assert versions == [{"id": "1", "s": "survivor", "l": "L1"}, {"id": "2", "s": "S2", "l": "loser"}]


@pytest.mark.parametrize("schema, table", [("Billing", "Invoices"), ("billing-eu", "line items")])
def test_mixed_case_and_schema_qualified_tables_are_reconciled(db, schema, table):
    """Names are used exactly as written and quoted everywhere: a table in a mixed-case schema,
    with mixed-case and reserved-word columns, is reconciled like any other. So is one whose
    name is no identifier (a dash, a space): a consistency check lists it from the catalog and
    its data sync re-copies it through this same apply (``conflicts:`` itself keeps to
    identifiers, so that one comes without a config)."""
    ident = sql.Identifier(schema, table).as_string(db)
    db.execute(f"drop schema if exists {sql.Identifier(schema).as_string(db)} cascade")
    db.execute(f"create schema {sql.Identifier(schema).as_string(db)}")
    db.execute(f'create table {ident} ("InvoiceId" bigint primary key, "select" text, "UpdatedAt" timestamptz not null)')
    name = f"{schema}.{table}"
    tcfg = TableConflictConfig(strategy="last-write-wins", key=["InvoiceId"], timestamp_column="UpdatedAt")
    if schema == "Billing":
        doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
        doc["conflicts"] = {name: {"strategy": "last-write-wins", "key": ["InvoiceId"], "timestamp_column": "UpdatedAt"}}
        cfg = parse_config(doc, env={})
        assert cfg.conflict_table(name).identifier.as_string(db) == '"Billing"."Invoices"'
        tcfg = cfg.conflicts[name]
    db.execute(f"insert into {ident} values (1, %s, %s), (2, %s, %s)", ("old-1", at(-60), "survivor-2", at(20)))

    summary = apply_resolutions(
        db, name, tcfg,
        [{"InvoiceId": 1, "select": "loser-1", "UpdatedAt": at(10)},   # only the loser changed it
         {"InvoiceId": 2, "select": "loser-2", "UpdatedAt": at(10)},   # both did; the survivor later
         {"InvoiceId": 3, "select": "loser-3", "UpdatedAt": at(5)}],   # inserted on the loser
        [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-quoted", "run-1")

    rows = db.execute(f'select "InvoiceId", "select" from {ident} order by 1').fetchall()
    assert [(r["InvoiceId"], r["select"]) for r in rows] == [(1, "loser-1"), (2, "survivor-2"), (3, "loser-3")]
    assert (summary.inserted, summary.updated, summary.kept, summary.conflicts) == (1, 1, 1, 1)
    audited = db.execute("select table_name, primary_key from eagle_dr.conflict_audit where workflow_id = 'wf-quoted'"
                         " order by 2").fetchall()
    assert [(a["table_name"], a["primary_key"]) for a in audited] == [(name, {"InvoiceId": k}) for k in (1, 2, 3)]


# -- insert-insert key collisions (the creation column) --------------------------------------


def _alerts_strategies() -> list[TableConflictConfig]:
    return [TableConflictConfig(strategy="last-write-wins"),
            TableConflictConfig(strategy="merge-with-priority", field_priority={"payload": [LOSER, SURVIVOR]}),
            TableConflictConfig(strategy="source-priority", source_region=SURVIVOR),
            TableConflictConfig(strategy="source-priority", source_region=LOSER),
            TableConflictConfig(strategy="immutable-append-only"),
            TableConflictConfig(strategy="freshness-priority", ttl=timedelta(minutes=5))]


@pytest.mark.parametrize("cfg", _alerts_strategies(), ids=lambda c: f"{c.strategy}-{c.source_region}")
def test_both_sides_inserting_id_1001_is_flagged_never_merged(db, cfg):
    """Both regions handed out id 1001 after the fork to two different alerts. Whatever the
    strategy, neither row may overwrite or merge into the other: the survivor's stays, the
    loser's is flagged with both versions in the audit for a human to re-key."""
    ours = row("alerts", 1001, at(12), 0, created=at(12))
    theirs = row("alerts", 1001, at(28), 1, created=at(28))  # later, fresher, the tie-winning region
    seed(db, "alerts", [ours])
    summary, expected, before = run_both(db, "alerts", [theirs], [], cfg)
    assert_agrees(db, "alerts", summary, expected, before)

    assert table_rows(db, "alerts")[(1001,)] == before[(1001,)]
    a = audit(db, "alerts")[(1001,)]
    assert (a["action"], a["conflict"], a["winner_region"]) == ("flag", True, SURVIVOR)
    assert a["reason"].startswith("conflict: insert-insert key collision") and "re-key" in a["reason"]
    assert a["survivor_version"]["payload"] == ours["payload"]
    assert a["loser_version"]["payload"] == theirs["payload"]
    assert (summary.flagged, summary.conflicts, summary.created_column) == (1, 1, "created_at")


def test_a_row_inserted_before_the_fork_and_updated_on_both_sides_is_no_collision(db):
    # The fork time errs early: a row inserted just before the real fork looks "inserted after"
    # it on both sides, but with the same creation time: one insert, replicated.
    created = at(0.5)
    seed(db, "alerts", [row("alerts", 1, at(12), 0, created=created)])
    summary, expected, before = run_both(db, "alerts", [row("alerts", 1, at(20), 1, created=created)], [])
    assert_agrees(db, "alerts", summary, expected, before)
    a = audit(db, "alerts")[(1,)]
    assert (a["action"], a["conflict"], a["reason"]) == ("apply_loser", True, f"conflict: {LOSER} wrote last")


def test_without_a_creation_column_a_collision_is_still_audited_as_a_conflict(db):
    """subscriptions has no created_at: two inserts of id 1001 look like two updates of one row.
    Last-write-wins keeps one, but the key is a conflict and the audit holds both versions."""
    seed(db, "subscriptions", [row("subscriptions", 1001, at(12), 0)])
    cfg = TableConflictConfig(strategy="last-write-wins")
    summary, expected, before = run_both(db, "subscriptions", [row("subscriptions", 1001, at(20), 1)], [], cfg)
    assert_agrees(db, "subscriptions", summary, expected, before)
    a = audit(db, "subscriptions")[(1001,)]
    assert (a["action"], a["conflict"], summary.created_column) == ("apply_loser", True, None)
    assert (a["survivor_version"]["user_id"], a["loser_version"]["user_id"]) == ("u-s", "u-l")


@pytest.fixture
def orders(db) -> Iterator[psycopg.Connection]:
    """A table whose creation column has another name, and a created_at that is not one."""
    db.execute("drop table if exists orders")
    db.execute("create table orders (id bigint primary key, body text not null, inserted_at timestamptz,"
               " created_at date, updated_at timestamptz not null)")
    yield db
    db.execute("drop table orders")


def _order(key: int, minute: float, body: str, inserted: float) -> dict[str, Any]:
    return {"id": key, "body": body, "inserted_at": at(inserted), "created_at": T0.date(), "updated_at": at(minute)}


def test_a_configured_created_column_is_used_and_checked(orders):
    seed(orders, "orders", [_order(1001, 12, "ours", 12)])
    theirs = [_order(1001, 20, "theirs", 20)]
    # A created_at that is a date is not a creation time it can place against the fork: unused.
    lww = TableConflictConfig(strategy="last-write-wins")
    preview = apply_resolutions(orders, "orders", lww, theirs, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                                "wf-1", "run-1", dry_run=True)
    assert (preview.created_column, preview.flagged, preview.updated) == (None, 0, 1)

    cfg = TableConflictConfig(strategy="last-write-wins", created_column="inserted_at")
    before = table_rows(orders, "orders")
    summary = apply_resolutions(orders, "orders", cfg, theirs, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                                "wf-1", "run-1")
    expected = resolve_changes(cfg, before, theirs, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW)
    assert_agrees(orders, "orders", summary, expected, before)
    assert (summary.created_column, summary.flagged) == ("inserted_at", 1)

    for bad, match in (("placed_at", "not in the table"), ("created_at", "timestamp with time zone")):
        with pytest.raises(ValueError, match=match):
            apply_resolutions(orders, "orders", TableConflictConfig(strategy="last-write-wins", created_column=bad),
                              theirs, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-2")


def test_the_creation_column_cannot_be_the_update_stamp_or_a_key():
    for bad in ("updated_at", "id"):
        with pytest.raises(ValueError, match="created_column"):
            TableConflictConfig(strategy="last-write-wins", created_column=bad)


# -- a row the survivor deleted after the fork (the creation column) --------------------------

# (strategy config, action, the row is on the survivor at the end)
_DELETED_ON_SURVIVOR = [
    # The survivor is the source: its deletion stands.
    (TableConflictConfig(strategy="source-priority", source_region=SURVIVOR), "keep_survivor", False),
    # The deletion's time is unknown, so it is older than the update: the row comes back, as a conflict.
    (TableConflictConfig(strategy="last-write-wins"), "insert_loser", True),
    (TableConflictConfig(strategy="source-priority", source_region=LOSER), "insert_loser", True),
    (TableConflictConfig(strategy="immutable-append-only"), "flag", False),
]


@pytest.mark.parametrize("cfg,action,present", _DELETED_ON_SURVIVOR, ids=lambda x: getattr(x, "strategy", x))
def test_a_loser_update_does_not_silently_resurrect_a_row_the_survivor_deleted(db, cfg, action, present):
    """Alert 7 existed before the fork; after it, the survivor deleted it and the loser updated
    it. Today that looks like an insert on the loser: re-inserted, not a conflict, even when the
    survivor is the source region."""
    seed(db, "alerts", [row("alerts", 1, at(-60), 0)])  # an unrelated row, left alone
    updated = row("alerts", 7, at(10), 1, created=at(-90))
    summary, expected, before = run_both(db, "alerts", [updated], [], cfg)
    assert_agrees(db, "alerts", summary, expected, before)

    assert ((7,) in table_rows(db, "alerts")) == present
    a = audit(db, "alerts")[(7,)]
    assert (a["action"], a["conflict"]) == (action, True)
    assert a["reason"].startswith(f"conflict: {SURVIVOR} deleted it after the fork")
    assert a["survivor_version"] is None and a["loser_version"]["payload"] == updated["payload"]
    assert summary.conflicts == 1


def test_a_row_inserted_on_the_loser_after_the_fork_is_still_a_plain_insert(db):
    cfg = TableConflictConfig(strategy="source-priority", source_region=SURVIVOR)
    summary, expected, before = run_both(db, "alerts", [row("alerts", 7, at(10), 1, created=at(9))], [], cfg)
    assert_agrees(db, "alerts", summary, expected, before)
    a = audit(db, "alerts")[(7,)]
    assert (a["action"], a["conflict"], a["reason"]) == ("insert_loser", False, f"only {LOSER} changed it after the fork")


# -- streaming from the loser ----------------------------------------------------------------

def _loser_table(conn: psycopg.Connection, table: str, rows: list[dict[str, Any]]) -> sql.Composable:
    """The loser's rows in a table of their own (the old primary, as far as a query can tell);
    the query apply streams from it."""
    src = sql.Identifier(f"loser_{table}")
    conn.execute(sql.SQL("drop table if exists {}").format(src))
    conn.execute(sql.SQL("create table {} (like {})").format(src, sql.Identifier(table)))
    seed(conn, f"loser_{table}", rows)
    return sql.SQL("select * from {}").format(src)


@pytest.mark.parametrize("table", list(EXPECTED_ACTIONS))
def test_rows_streamed_from_the_loser_are_decided_and_audited_like_rows_in_hand(db, pg, table):
    """The same scenario through a LoserCopy (COPY on the loser -> COPY on the survivor): the
    same data and the same audit as the engine, every type (jsonb, numeric, timestamptz, float)
    surviving the text round trip."""
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    before = table_rows(db, table)
    with pg.connect() as loser_conn:
        query = _loser_table(loser_conn, table, loser)
        summary = apply_resolutions(db, table, TABLES[table], LoserCopy(loser_conn, query), deleted, LOSER,
                                    SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-1", approved_by="oncall@example")
    seen = TABLES[table].model_copy(update={"created_column": summary.created_column})
    expected = resolve_changes(seen, before, loser, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW)
    assert {k[0]: a["action"] for k, a in audit(db, table).items()} == EXPECTED_ACTIONS[table]
    assert_agrees(db, table, summary, expected, before)


def test_a_streamed_loser_that_repeats_a_key_is_refused(db, pg):
    good = row("alerts", 1, at(10), 1)
    with pg.connect() as loser_conn:
        query = _loser_table(loser_conn, "alerts", [good, dict(good)])
        with pytest.raises(ValueError, match="loser rows repeat a key"):
            apply_resolutions(db, "alerts", TABLES["alerts"], LoserCopy(loser_conn, query), [], LOSER, SURVIVOR,
                              PRIORITY, FORK, NOW, "wf-bad", "run-1")
    assert not audit(db) and not table_rows(db, "alerts")


def _streamed_apply_peak(db: psycopg.Connection, loser_conn: psycopg.Connection, n: int) -> int:
    """Python's peak allocation (bytes) while applying n loser rows streamed from the loser."""
    db.execute("truncate alerts")
    db.execute("drop table if exists eagle_dr.conflict_audit")
    # Every other key also on the survivor, changed there after the fork: conflicts and inserts.
    db.execute("insert into alerts (id, region, payload, created_at, updated_at) select g, %s, "
               "jsonb_build_object('side', 's', 'pad', repeat('s', 200)), %s, %s "
               "from generate_series(1, %s, 2) g", (SURVIVOR, T0, at(5), n))
    loser_conn.execute("drop table if exists loser_alerts")
    loser_conn.execute("create table loser_alerts (like alerts)")
    # The rest the loser inserted after the fork.
    loser_conn.execute("insert into loser_alerts (id, region, payload, created_at, updated_at) select g, %(l)s, "
                       "jsonb_build_object('side', 'l', 'pad', repeat('l', 200)), "
                       "case when g %% 2 = 1 then %(t0)s else %(at)s end, %(at)s "
                       "from generate_series(1, %(n)s) g", {"l": LOSER, "t0": T0, "at": at(10), "n": n})
    source = LoserCopy(loser_conn, sql.SQL("select * from loser_alerts"))
    tracemalloc.start()
    try:
        summary = apply_resolutions(db, "alerts", TABLES["alerts"], source, [], LOSER, SURVIVOR, PRIORITY, FORK,
                                    NOW, f"wf-mem-{n}", "run-1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.audit_rows == n and summary.conflicts == (n + 1) // 2
    return peak


def test_a_streamed_apply_holds_blocks_not_rows(db, pg):
    """Peak Python memory while applying 5,000 and 50,000 streamed rows (~300 bytes of text each,
    15 MB in all at the larger size, several times that as Python dicts): flat, and far below
    what holding the rows would take."""
    with pg.connect() as loser_conn:
        small = _streamed_apply_peak(db, loser_conn, 5_000)
        large = _streamed_apply_peak(db, loser_conn, 50_000)
    assert large < 2 * 1024 * 1024, f"peak {large} bytes for 50k streamed rows"
    assert large < small + 512 * 1024, f"peak grew with the rows: {small} -> {large} bytes"


def _spool(loser_conn: psycopg.Connection, query: sql.Composable, path: Path, ts_column: str = "updated_at",
           committed_at: dict[int, datetime] | None = None, xid: str = "0") -> RowSpool:
    """The rows of ``query`` on the loser into a spool as a failback reads them (its writer's
    xid: the ``xid`` expression over the row)."""
    spool = RowSpool(path, ts_column)
    spool_rows(loser_conn, spool, sql.SQL("select ({})::bigint, row_to_json(q) from ({}) q").format(
        sql.SQL(xid), query), None, committed_at or {})
    return spool


@pytest.mark.parametrize("table", list(EXPECTED_ACTIONS))
def test_rows_spooled_from_the_loser_are_decided_and_audited_like_rows_in_hand(db, pg, table, tmp_path):
    """The failback's path (COPY on the loser -> a spool file on the worker -> COPY of the file
    as it is into the survivor's JSON table): the same data and the same audit as the engine,
    every type surviving, and again after a preview read the same spool."""
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    before = table_rows(db, table)
    with pg.connect() as loser_conn:
        spool = _spool(loser_conn, _loser_table(loser_conn, table, loser), tmp_path / "rows",
                       TABLES[table].timestamp_column)
    assert len(spool) == len(loser)
    # Read back as rows too (the failback's foreign-key rounds read it again: the file stays).
    assert sorted(r["id"] for r in spool) == sorted(r["id"] for r in loser)
    # A preview first, as a failback's foreign-key rounds also read the spool again.
    apply_resolutions(db, table, TABLES[table], spool, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-1",
                      dry_run=True)
    assert table_rows(db, table) == before
    summary = apply_resolutions(db, table, TABLES[table], spool, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                                "wf-1", "run-1", approved_by="oncall@example")
    seen = TABLES[table].model_copy(update={"created_column": summary.created_column})
    expected = resolve_changes(seen, before, loser, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW)
    assert {k[0]: a["action"] for k, a in audit(db, table).items()} == EXPECTED_ACTIONS[table]
    assert_agrees(db, table, summary, expected, before)


def test_a_spooled_row_takes_its_commit_time_over_a_stale_stamp_and_nothing_else_changes(db, pg, tmp_path):
    """A row whose timestamp is older than the commit that wrote it (an UPDATE that bypassed
    the trigger) is stamped with the commit time; a newer stamp, or an unknown commit, leaves
    it. Nothing else of the row is re-encoded: a json column keeps its exact text (spacing,
    key order, a repeated key), which re-encoding the whole row as jsonb would lose, and its
    raw tabs and line breaks survive the COPY's text format."""
    doc = '{\n\t"b": 1,\r\n   "a": 2, "a": 3}'  # pretty-printed: raw tab, CR and newline between tokens
    committed = at(10)
    db.execute("drop table if exists stamped")
    db.execute("create table stamped (id int primary key, doc json, note text, updated_at timestamptz not null)")
    cfg = TableConflictConfig(strategy="last-write-wins", key=["id"], timestamp_column="updated_at")
    with pg.connect() as loser_conn:
        loser_conn.execute("drop table if exists loser_stamped")
        loser_conn.execute("create table loser_stamped (like stamped)")
        loser_conn.execute("insert into loser_stamped values (1, %s, e'tab\\there\\\\', %s),"
                           " (2, %s, 'newer', %s), (3, %s, 'unknown commit', %s)",
                           (doc, T0, doc, at(12), doc, at(5)))
        spool = _spool(loser_conn, sql.SQL("select * from loser_stamped"), tmp_path / "rows",
                       committed_at={1: committed, 2: committed}, xid="q.id")
    assert [r["updated_at"] for r in spool] == [committed.isoformat(), at(12).isoformat(), at(5).isoformat()]
    summary = apply_resolutions(db, "stamped", cfg, spool, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-1")
    assert summary.inserted == 3
    got = {r["id"]: r for r in db.execute("select id, doc::text, note, updated_at from stamped")}
    assert {i: r["updated_at"] for i, r in got.items()} == {1: committed, 2: at(12), 3: at(5)}
    assert {r["doc"] for r in got.values()} == {doc}
    assert got[1]["note"] == "tab\there\\"


def test_a_spool_with_a_column_the_survivor_lacks_is_refused_naming_it(db, pg, tmp_path):
    db.execute("drop table if exists stamped")
    db.execute("create table stamped (id int primary key, updated_at timestamptz not null)")
    cfg = TableConflictConfig(strategy="last-write-wins", key=["id"], timestamp_column="updated_at")
    with pg.connect() as loser_conn:
        spool = _spool(loser_conn, sql.SQL("select 1 as id, now() as updated_at, 'x' as added_since"),
                       tmp_path / "rows")
    with pytest.raises(ValueError, match=r"missing \[\], not in the table \['added_since'\]"):
        apply_resolutions(db, "stamped", cfg, spool, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-1", "run-1")


def test_a_spooled_apply_holds_blocks_not_rows(db, pg, tmp_path):
    """The failback's path at 5,000 and 50,000 rows (15 MB of JSON at the larger size): Python's
    peak memory while the rows go to the spool and from it into the apply stays flat."""
    peaks = []
    with pg.connect() as loser_conn:
        for n in (5_000, 50_000):
            db.execute("truncate alerts")
            db.execute("drop table if exists eagle_dr.conflict_audit")
            loser_conn.execute("drop table if exists loser_alerts")
            loser_conn.execute("create table loser_alerts (like alerts)")
            loser_conn.execute("insert into loser_alerts (id, region, payload, created_at, updated_at) select g, %s, "
                               "jsonb_build_object('side', 'l', 'pad', repeat('l', 200)), %s, %s "
                               "from generate_series(1, %s) g", (LOSER, at(10), at(10), n))
            tracemalloc.start()
            try:
                spool = _spool(loser_conn, sql.SQL("select * from loser_alerts"), tmp_path / f"rows-{n}")
                summary = apply_resolutions(db, "alerts", TABLES["alerts"], spool, [], LOSER, SURVIVOR, PRIORITY,
                                            FORK, NOW, f"wf-spool-{n}", "run-1")
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert summary.inserted == n
    small, large = peaks
    # ~4 MB either way: the file goes to the COPY in 1 MB blocks (as text, then encoded).
    assert large < 6 * 1024 * 1024, f"peak {large} bytes for 50k spooled rows"
    assert large < small + 1024 * 1024, f"peak grew with the rows: {small} -> {large} bytes"


@pytest.mark.parametrize("table", list(EXPECTED_ACTIONS))
def test_the_audit_keeps_both_versions_wherever_one_was_thrown_away(db, table):
    """A one-sided change keeps only the result (the changed side's version, the other being
    the row at the fork); conflicts, flags, merges and deletions keep both versions in full."""
    survivor, loser, deleted = scenario_inputs(table)
    seed(db, table, survivor)
    before = table_rows(db, table)
    sent = {(r["id"],): r for r in loser}
    run_both(db, table, loser, deleted)
    got = audit(db, table)
    elided = {k for k, a in got.items() if a["versions_elided"]}
    assert elided and elided != set(got)
    for key, a in got.items():
        if key in elided:
            assert not a["conflict"] and a["action"] in ("apply_loser", "insert_loser", "keep_survivor"), a
            assert a["survivor_version"] is None and a["loser_version"] is None
            winner = sent[key] if a["action"] != "keep_survivor" else before.get(key)
            if winner is not None:
                assert datetime.fromisoformat(a["result"]["updated_at"]) == winner["updated_at"]
        else:
            assert a["conflict"] or a["action"] in ("flag", "merge", "delete") or "diverged" in a["reason"], a
            assert (a["survivor_version"] is not None) == (key in before)
            assert (a["loser_version"] is not None) == (key in sent)


# -- column types as the loser's row_to_json gives them ----------------------------------------


def _loser_json_rows(db, table: str, where: str) -> list[dict[str, Any]]:
    """The loser's rows as the failback reads them (activities/postgres/divergence.py)."""
    import json
    return [json.loads(r["j"], parse_float=Decimal)
            for r in db.execute(sql.SQL("select row_to_json(x)::text as j from {} x where " + where)
                                .format(sql.Identifier(table)))]


def test_loser_rows_of_every_common_type_are_applied_exactly_as_the_loser_had_them(db):
    """A uuid key, a bytea, an inet, a 2-D array, an interval, a negative numeric with its
    scale, a float NaN, nested jsonb numbers, text with tabs and backslashes, and a stored
    generated column, as row_to_json gives them: strings, lists and dicts. The typed COPY took
    each string to the column type's Python dumper and a uuid key failed the reconcile
    ("'str' object has no attribute 'int'"), after the point of no return."""
    import uuid as uuidlib
    db.execute("drop table if exists typed, typed_loser")
    db.execute("create table typed (id uuid primary key, blob bytea, d date, ip inet, arr int[], iv interval,"
               " n numeric, f float8, j jsonb, txt text, at2 timestamptz,"
               " doubled numeric generated always as (n * 2) stored, updated_at timestamptz not null)")
    db.execute("create table typed_loser (like typed including generated)")
    kept, gone, new = (uuidlib.uuid4() for _ in range(3))
    for table in ("typed", "typed_loser"):
        db.execute(sql.SQL("insert into {} (id, n, updated_at) values (%s, 1, %s), (%s, 2, %s)")
                   .format(sql.Identifier(table)), (kept, T0, gone, T0))
    # After the fork, on the loser: one row updated, one inserted, one deleted.
    values = ("\\xdeadbeef00", "2024-05-01", "10.0.0.1/24", "{{1,2},{3,4}}", "1 mon 2 days", "-1.50", "NaN",
              '{"x": 1.50, "s": "a\\tb", "deep": [{"y": -0.0}]}', "tab\there\nnew\\line", "2024-05-01T10:00:00+02")
    db.execute("update typed_loser set blob = %s, d = %s, ip = %s, arr = %s, iv = %s, n = %s, f = %s, j = %s,"
               " txt = %s, at2 = %s, updated_at = %s where id = %s", (*values, at(5), kept))
    db.execute("insert into typed_loser (id, blob, d, ip, arr, iv, n, f, j, txt, at2, updated_at)"
               " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", (new, *values, at(6)))
    db.execute("delete from typed_loser where id = %s", (gone,))
    rows = _loser_json_rows(db, "typed_loser", "true")
    assert isinstance(rows[0]["id"], str) and isinstance(rows[0]["arr"], list) and "doubled" in rows[0]

    summary = apply_resolutions(db, "typed", TableConflictConfig(strategy="last-write-wins", key=["id"]), rows,
                                [(gone,)], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-types", "run-1")

    assert (summary.inserted, summary.updated, summary.deleted) == (1, 1, 1), summary
    def text_rows(table: str) -> list[str]:
        return [r["t"] for r in db.execute(sql.SQL("select x::text as t from {} x order by id")
                                           .format(sql.Identifier(table)))]
    assert text_rows("typed") == text_rows("typed_loser") and len(text_rows("typed")) == 2


def test_the_loser_inserts_move_serial_and_identity_sequences_past_them(db):
    """Both sides drew keys from the sequence after the fork. The loser's inserts, kept, must not
    be drawn again by the survivor: its next insert would fail on a duplicate key. A dry run
    moves nothing."""
    db.execute("drop table if exists seq_identity, seq_serial")
    db.execute("create table seq_identity (id bigint generated always as identity primary key, v text,"
               " updated_at timestamptz not null)")
    db.execute("create table seq_serial (id serial primary key, v text, updated_at timestamptz not null)")
    for table in ("seq_identity", "seq_serial"):
        ident = sql.Identifier(table)
        db.execute(sql.SQL("insert into {} (v, updated_at) select 'survivor', %s from generate_series(1, 3)")
                   .format(ident), (at(1),))
        loser = [{"id": i, "v": "loser", "updated_at": at(2)} for i in (4, 5, 6)]
        cfg = TableConflictConfig(strategy="last-write-wins", key=["id"])
        apply_resolutions(db, table, cfg, loser, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-seq", "run-1",
                          dry_run=True)
        seq = db.execute("select pg_get_serial_sequence(%s, 'id') as s", (table,)).fetchone()["s"]
        assert db.execute("select pg_sequence_last_value(%s) as v", (seq,)).fetchone()["v"] == 3
        summary = apply_resolutions(db, table, cfg, loser, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-seq",
                                    "run-1")
        assert summary.inserted == 3, summary
        nxt = db.execute(sql.SQL("insert into {} (v, updated_at) values ('after', now()) returning id")
                         .format(ident)).fetchone()["id"]
        assert nxt == 7, (table, nxt)


def test_a_survivor_change_that_left_its_timestamp_alone_is_a_conflict_not_overwritten(db):
    """After the fork the survivor changed key 1 without moving updated_at (its trigger bypassed:
    a bulk fix, a replica-role session); the loser changed it too, stamped later. Only the
    survivor row's xmin shows its change is from after the fork. With the survivor's xid horizon
    key 1 is a conflict and the audit keeps the survivor's version; by timestamp alone it was
    "only the loser changed it": overwritten, its version kept nowhere. Key 2, which the
    survivor left alone, must stay a plain loser update."""
    table = "subscriptions"  # last-write-wins: the later-stamped loser version still wins key 1
    seed(db, table, [row(table, 1, at(-60), 0), row(table, 2, at(-60), 0)])
    # Every transaction from here on is "after the fork", as on a node promoted here.
    horizon = int(db.execute("select pg_current_xact_id()::text as x").fetchone()["x"]) + 1
    db.execute("set session_replication_role = replica")
    db.execute("update subscriptions set channel = 'pager' where id = 1")
    db.execute("reset session_replication_role")
    assert db.execute("select updated_at from subscriptions where id = 1").fetchone()["updated_at"] == at(-60)
    loser = [row(table, 1, at(10), 1), row(table, 2, at(10), 1)]
    before = table_rows(db, table)
    summary = apply_resolutions(db, table, TABLES[table], loser, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                                "wf-1", "run-1", survivor_xid_from=horizon)
    expected = resolve_changes(TABLES[table], before, loser, [], LOSER, SURVIVOR, PRIORITY, FORK, NOW,
                               survivor_written=[(1,)])
    assert_agrees(db, table, summary, expected, before)
    got = audit(db, table)
    assert (got[(1,)]["conflict"], got[(1,)]["action"]) == (True, "apply_loser")
    assert got[(1,)]["survivor_version"]["channel"] == "pager"
    assert (got[(2,)]["conflict"], got[(2,)]["action"]) == (False, "apply_loser")
