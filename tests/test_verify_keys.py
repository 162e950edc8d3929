"""A failback's verify that follows the divergence (activities/consistency/keys.py): the keys a
run audited, compared on two sides. On two databases with differences injected, every
differing key is named exactly and nothing else; on the real primary and its standby while the
primary keeps rewriting those very keys, nothing is reported."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from activities.conflicts.apply import ensure_audit_table
from activities.consistency.keys import BATCH, compare_audited_keys
from tests.lab_helpers import _async, _exec, _lag_bytes, _live_writes_on_a_trailing_standby, _pg, _primary, _until

DB_A, DB_B = "eagle_vk_a", "eagle_vk_b"
ROWS = BATCH * 2 + 500  # three batches: the cursor's paging is part of what is checked

_DDL = ["create table vk_items (id bigint primary key, region text not null, payload jsonb not null)",
        "create table vk_pairs (region text, n int, v text, primary key (region, n))",
        # A mixed-case name (as conflicts: may spell it) and a numeric key past a float's digits.
        'create table "VkMixed" (id numeric(30, 12) primary key, v text)']
LONG = "1234567890.123456789012"



def _audit(conn: psycopg.Connection, wf: str, run: str, table: str, keys: list[dict | str]) -> None:
    """Audit rows as the reconcile writes them; a key given as text is the jsonb's own text."""
    ensure_audit_table(conn)
    with conn.cursor() as cur:
        cur.executemany("insert into eagle_dr.conflict_audit (workflow_id, run_id, table_name, primary_key, strategy, "
                        "conflict, action, reason) values (%s, %s, %s, %s::jsonb, 'last-write-wins', false, 'insert', "
                        "'test')", [(wf, run, table, k if isinstance(k, str) else json.dumps(k)) for k in keys])


@pytest.fixture
def two_databases(lab):
    primary = _primary(lab)
    with _pg(lab, primary) as c:
        for db in (DB_A, DB_B):
            c.execute(f"drop database if exists {db}")
            c.execute(f"create database {db}")
    for db in (DB_A, DB_B):
        with _pg(lab, primary, db) as c:
            for ddl in _DDL:
                c.execute(ddl)
            c.execute("insert into vk_items select g, 'r' || (g %% 5), jsonb_build_object('n', g) "
                      "from generate_series(1, %s) g", (ROWS,))
            c.execute("insert into vk_pairs select r, n, md5(r || n) from unnest(array['eu', 'us']) r, "
                      "generate_series(1, 50) n")
            c.execute('insert into "VkMixed" values (%s, \'x\'), (2.5, \'y\')', (LONG,))
    yield primary
    with _pg(lab, primary) as c:
        for db in (DB_A, DB_B):
            c.execute(f"drop database if exists {db} with (force)")


def test_every_differing_audited_key_is_named_and_nothing_else(lab, two_databases):
    primary = two_databases
    wf, run = f"failback-{uuid.uuid4()}", "run-1"
    with _pg(lab, primary, DB_B) as b:
        b.execute("update vk_items set payload = '{\"n\": -1}' where id = 11")  # not a timestamp column
        b.execute("delete from vk_items where id = 12")
        b.execute("insert into vk_items values (%s, 'b', '{}')", (ROWS + 1,))
        b.execute("update vk_items set region = 'moved' where id = %s", (ROWS - 3,))  # a key nobody audited
        b.execute("update vk_pairs set v = 'changed' where region = 'us' and n = 2")
        b.execute('update "VkMixed" set v = \'changed\' where id = %s', (LONG,))
    with _pg(lab, primary, DB_A) as a:
        # Every key of vk_items (three cursor batches), one only B has, one neither has;
        # two composite keys of vk_pairs. Another run's key that differs must not count.
        _audit(a, wf, run, "vk_items", [{"id": i} for i in range(1, ROWS - 10)] + [{"id": ROWS + 1}, {"id": ROWS + 2}])
        _audit(a, wf, run, "public.vk_pairs", [{"region": "eu", "n": 1}, {"region": "us", "n": 2}])
        _audit(a, wf, run, "VkMixed", [f'{{"id": {LONG}}}', '{"id": 2.5}'])
        _audit(a, wf, "run-0", "vk_items", [{"id": ROWS - 3}])
    beats: list[str] = []
    dsn = lab.cfg.region(primary).postgres.dsn
    res = compare_audited_keys(dsn(DB_A), dsn(DB_B), "a", "b", wf, run, ["vk_items", "public.vk_pairs", "VkMixed"],
                               max_lag=5, cap=50, beat=beats.append, follower=False)
    items, pairs, mixed = res.tables
    assert items.keys == ROWS - 11 + 2 and pairs.keys == 2, res
    assert (items.diff.updated_keys, items.diff.deleted_keys, items.diff.inserted_keys) == \
        ([["11"]], [["12"]], [[str(ROWS + 1)]]), items.diff
    assert pairs.diff.updated_keys == [["us", "2"]] and pairs.differences == 1, pairs.diff
    # Found by its case-kept name, and the key read back digit for digit (as a float it would be
    # another key, on neither side, and "identical").
    assert not mixed.missing and mixed.keys == 2 and mixed.diff.updated_keys == [[LONG]], mixed
    assert res.differences == 5 and items.in_flight == 0
    assert any(b.startswith("vk_items: ") for b in beats), beats


def test_a_table_gone_from_the_survivor_is_named_missing(lab, two_databases):
    primary = two_databases
    wf = f"failback-{uuid.uuid4()}"
    with _pg(lab, primary, DB_A) as a:
        _audit(a, wf, "r", "vk_gone", [{"id": 1}])
    dsn = lab.cfg.region(primary).postgres.dsn
    res = compare_audited_keys(dsn(DB_A), dsn(DB_B), "a", "b", wf, "r", ["vk_gone"], max_lag=5, cap=50,
                               beat=lambda _: None, follower=False)
    assert res.tables[0].missing and res.keys == 0, res


async def test_no_false_positives_on_the_standby_while_the_primary_rewrites_the_audited_keys(lab):
    """The real standby, its replay trailing, while the primary keeps updating the very keys
    being compared: in flight, never a difference."""
    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    _exec(lab, primary, "create table if not exists vk_live (id bigint primary key, n int not null)",
          "truncate vk_live", "insert into vk_live select g, 0 from generate_series(1, 3000) g")
    wf, run = f"failback-{uuid.uuid4()}", "run-1"
    with _pg(lab, primary) as c:
        _audit(c, wf, run, "vk_live", [{"id": i} for i in range(1, 3001)])
    await _until(_async(lambda: _lag_bytes(lab, primary) == 0), 30, "the standby to catch up")
    try:
        with _live_writes_on_a_trailing_standby(
                lab, primary, ("update vk_live set n = n + 1 where id %% 20 = %s", lambda i: (i % 20,))) as writes:
            await _until(_async(lambda: writes[0] > 20), 30, "the writer to run")
            before = writes[0]
            dsn = lambda r: lab.cfg.region(r).postgres.dsn()  # noqa: E731
            # Five rounds: without the consistent point, one round alone reported 150 keys in one
            # run and none in another (how far replay trails when B is read is chance).
            results = [compare_audited_keys(dsn(primary), dsn(standby), primary, standby, wf, run, ["vk_live"],
                                            max_lag=30, cap=50, beat=lambda _: None) for _ in range(5)]
            during = writes[0] - before
    finally:
        # Other tests check every user table and count audit rows: leave neither behind.
        _exec(lab, primary, "drop table vk_live", f"delete from eagle_dr.conflict_audit where workflow_id = '{wf}'")
    assert during > 0, "the writer stalled while the compare ran"
    assert [(r.keys, r.differences) for r in results] == [(3000, 0)] * 5, results
