"""Foreign keys across a reconcile, on a real PostgreSQL 15 (port 17851 + the test port shift).

The apply writes with ``session_replication_role = replica``, which skips PostgreSQL's own
foreign-key checks and cascades: these tests merge two sides that were each consistent into
one that would not be, and hold the apply to flagging the writes that break a key instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from activities.conflicts.apply import ApplySummary, apply_resolutions
from activities.conflicts.foreign_keys import Holds, apply_in_bounded_waits, apply_keeping_foreign_keys
from activities.postgres.table_locks import TablesBusy, lock_tables
from eagle_dr.config import TableConflictConfig
from lab.postgres import PostgresNode
from lab.scratch_postgres import scratch_postgres

_SHIFT = int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000
PORT = 17851 + _SHIFT
BASE = Path(tempfile.gettempdir()) / ("eagle-dr-test-foreign-keys" + (f"-{_SHIFT}" if _SHIFT else ""))

SURVIVOR, LOSER = "us-west-2", "us-east-1"
PRIORITY = {SURVIVOR: 1, LOSER: 2}
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
FORK = T0 + timedelta(hours=2)
NOW = FORK + timedelta(minutes=30)
LWW = TableConflictConfig(strategy="last-write-wins")

SCHEMA = """
drop table if exists fk_note, fk_reply, fk_child, fk_parent cascade;
create table fk_parent (id bigint primary key, name text not null,
                        created_at timestamptz not null, updated_at timestamptz not null);
create table fk_child (id bigint primary key, parent_id bigint references fk_parent (id) on delete cascade,
                       body text not null, created_at timestamptz not null, updated_at timestamptz not null);
create table fk_reply (id bigint primary key, child_id bigint not null references fk_child (id),
                       body text not null, created_at timestamptz not null, updated_at timestamptz not null);
-- Nobody lists it under conflicts: and the loser never touched it; its rows still count.
create table fk_note (id bigint primary key, parent_id bigint references fk_parent (id), body text);
drop table if exists eagle_dr.conflict_audit;
"""


def at(minute: float) -> datetime:
    return FORK + timedelta(minutes=minute)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresNode]:
    with scratch_postgres(PORT, "foreign-keys", BASE) as node:
        yield node


@pytest.fixture
def db(pg: PostgresNode) -> Iterator[psycopg.Connection]:
    with pg.connect(row_factory=dict_row) as conn:
        conn.autocommit = True
        conn.execute(SCHEMA)
        yield conn


def parent(key: int, name: str, created: datetime = T0, updated: datetime | None = None) -> dict[str, Any]:
    return {"id": key, "name": name, "created_at": created, "updated_at": updated or created}


def child(key: int, parent_id: int | None, body: str, created: datetime = T0, table: str = "parent_id") -> dict[str, Any]:
    return {"id": key, table: parent_id, "body": body, "created_at": created, "updated_at": created}


def seed(conn: psycopg.Connection, table: str, *rows: dict[str, Any]) -> None:
    for r in rows:
        cols = list(r)
        conn.execute(f"insert into {table} ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})",
                     [r[c] for c in cols])


# The loser's post-fork changes per table: (rows it wrote, keys it deleted).
Changes = dict[str, tuple[list[dict[str, Any]], list[tuple]]]


def reconcile(conn: psycopg.Connection, changes: Changes, preview: bool = False
              ) -> tuple[dict[str, ApplySummary], list[str]]:
    """What failback's reconcile does: every table in one transaction, foreign keys kept."""
    def apply_all(holds: Holds, checked: frozenset[str]) -> dict[str, ApplySummary]:
        return {t: apply_resolutions(conn, t, LWW, rows, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-fk",
                                     "run-1", rehearse=preview and t in checked, dry_run=preview and t not in checked,
                                     hold=holds.get(t))
                for t, (rows, deleted) in changes.items()}

    with conn.transaction(force_rollback=preview):
        return apply_keeping_foreign_keys(conn, {t: ["id"] for t in changes}, apply_all, survivor_region=SURVIVOR)


def ids(conn: psycopg.Connection, table: str) -> list[int]:
    return [r["id"] for r in conn.execute(f"select id from {table} order by id")]


def audited(conn: psycopg.Connection, table: str) -> dict[int, dict[str, Any]]:
    return {r["primary_key"]["id"]: r for r in conn.execute(
        "select * from eagle_dr.conflict_audit where table_name = %s", (table,))}


def orphans(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return [(r["t"], r["id"]) for r in conn.execute("""
        select 'fk_child' t, id from fk_child c where parent_id is not null
            and not exists (select 1 from fk_parent p where p.id = c.parent_id)
        union all select 'fk_reply', id from fk_reply r where not exists (select 1 from fk_child c where c.id = r.child_id)
        union all select 'fk_note', id from fk_note n where parent_id is not null
            and not exists (select 1 from fk_parent p where p.id = n.parent_id)""")]


def test_a_loser_child_under_a_parent_the_survivor_deleted_is_flagged_not_orphaned(db):
    # Parent 1 existed at the fork; the survivor deleted it since (its children with it).
    seed(db, "fk_parent", parent(2, "kept"))
    summaries, broken = reconcile(db, {
        "fk_child": ([child(10, 1, "under the deleted parent", at(5)), child(11, 2, "under a kept one", at(5))], []),
    })
    assert broken == []
    assert ids(db, "fk_child") == [11]
    assert orphans(db) == []
    s = summaries["fk_child"]
    assert (s.inserted, s.flagged) == (1, 1)
    row = audited(db, "fk_child")[10]
    assert row["action"] == "flag" and "foreign key fk_child_parent_id_fkey" in row["reason"]
    # The loser's row is kept in the audit for the human who settles it; nothing else holds it.
    assert row["loser_version"]["body"] == "under the deleted parent" and row["survivor_version"] is None
    assert audited(db, "fk_child")[11]["action"] == "insert_loser"


def test_a_loser_delete_of_a_parent_the_survivor_gave_new_children_is_flagged_not_cascaded(db):
    seed(db, "fk_parent", parent(3, "p3"), parent(4, "p4"), parent(8, "p8"))
    seed(db, "fk_child", child(30, 3, "old child"), child(31, 3, "survivor's new child", at(4)))
    db.execute("insert into fk_note values (80, 8, 'a note nobody listed')")
    # The loser deleted parents 3, 4 and 8, and child 30 with 3 (its cascade).
    summaries, broken = reconcile(db, {"fk_parent": ([], [(3,), (4,), (8,)]), "fk_child": ([], [(30,)])})
    assert broken == []
    assert ids(db, "fk_parent") == [3, 8]
    assert ids(db, "fk_child") == [31]
    assert ids(db, "fk_note") == [80]
    assert orphans(db) == []
    assert (summaries["fk_parent"].deleted, summaries["fk_parent"].flagged) == (1, 2)
    kept = audited(db, "fk_parent")
    assert kept[3]["action"] == kept[8]["action"] == "flag"
    assert "fk_child" in kept[3]["reason"] and "fk_note" in kept[8]["reason"]
    assert kept[3]["survivor_version"]["name"] == "p3" and kept[3]["result"]["name"] == "p3"
    assert kept[4]["action"] == "delete"


def test_a_held_parent_holds_the_loser_rows_under_it_however_deep_and_whatever_the_table_order(db):
    # Both sides inserted a parent 5 after the fork: two rows, one key, the loser's is flagged.
    seed(db, "fk_parent", parent(5, "survivor's 5", at(3)))
    changes = {
        "fk_reply": ([child(500, 50, "reply to the loser's child", at(7), table="child_id"),
                      child(600, 60, "reply under a new parent", at(7), table="child_id")], []),
        "fk_child": ([child(50, 5, "under the loser's 5", at(6)), child(60, 6, "under a new parent", at(6))], []),
        "fk_parent": ([parent(5, "loser's 5", at(2)), parent(6, "new", at(2))], []),
    }
    summaries, broken = reconcile(db, changes)
    assert broken == []
    assert ids(db, "fk_parent") == [5, 6] and ids(db, "fk_child") == [60] and ids(db, "fk_reply") == [600]
    assert db.execute("select name from fk_parent where id = 5").fetchone()["name"] == "survivor's 5"
    assert orphans(db) == []
    assert [summaries[t].flagged for t in ("fk_parent", "fk_child", "fk_reply")] == [1, 1, 1]
    assert audited(db, "fk_child")[50]["action"] == audited(db, "fk_reply")[500]["action"] == "flag"
    assert audited(db, "fk_child")[50]["loser_version"]["body"] == "under the loser's 5"


def test_a_preview_shows_the_holds_and_leaves_everything_as_it_was(db):
    seed(db, "fk_parent", parent(3, "p3"))
    seed(db, "fk_child", child(31, 3, "survivor's new child", at(4)))
    summaries, broken = reconcile(db, {"fk_parent": ([], [(3,)]), "fk_child": ([child(10, 1, "orphan", at(5))], [])},
                                  preview=True)
    assert broken == []
    assert (summaries["fk_parent"].flagged, summaries["fk_child"].flagged) == (1, 1)
    assert {s["action"] for s in summaries["fk_child"].sample} == {"flag"}
    assert ids(db, "fk_parent") == [3] and ids(db, "fk_child") == [31]
    assert db.execute("select to_regclass('eagle_dr.conflict_audit') is null as gone").fetchone()["gone"]


def test_a_retry_after_the_run_committed_holds_its_writes_again(db):
    seed(db, "fk_parent", parent(2, "kept"))
    changes: Changes = {"fk_child": ([child(10, 1, "orphan", at(5)), child(11, 2, "fine", at(5))], [])}
    reconcile(db, changes)
    # The first attempt committed (its result was lost); the app has since deleted child 11 and
    # parent 2. The retry writes no audit row, so only its own decisions can tell the check.
    db.execute("delete from fk_child where id = 11")
    db.execute("delete from fk_parent where id = 2")
    summaries, broken = reconcile(db, changes)
    assert broken == []
    # The retry decided child 10 again (an insert, as before its hold): held again, not written.
    assert ids(db, "fk_child") == [] and orphans(db) == []
    assert summaries["fk_child"].audit_rows == 0
    assert (summaries["fk_child"].inserted, summaries["fk_child"].flagged) == (1, 1)  # the run's, from its audit
    assert len(audited(db, "fk_child")) == 2


def test_tables_without_foreign_keys_take_one_round_and_record_nothing_extra(db):
    db.execute("create table fk_free (id bigint primary key, body text, updated_at timestamptz not null)")
    calls: list[Holds] = []

    def apply_all(holds: Holds, checked: frozenset[str]) -> ApplySummary:
        calls.append(holds)
        return apply_resolutions(db, "fk_free", LWW, [{"id": 1, "body": "b", "updated_at": at(1)}], [], LOSER,
                                 SURVIVOR, PRIORITY, FORK, NOW, "wf-fk", "run-1")

    try:
        with db.transaction():
            summary, broken = apply_keeping_foreign_keys(db, {"fk_free": ["id"]}, apply_all, survivor_region=SURVIVOR)
            assert db.execute("select to_regclass('pg_temp._eagle_dr_touched') is null as none").fetchone()["none"]
        assert (summary.inserted, broken, calls) == (1, [], [{}])
    finally:
        db.execute("drop table fk_free")


# -- what a review found ---------------------------------------------------------------------

def test_children_under_a_partitioned_parent_are_checked_against_the_whole_parent(db):
    """A key to a partitioned table has a hidden copy per partition: checked one by one, each
    child would be missing from every partition but its own."""
    db.execute("""
        create table fk_pp (id bigint primary key, created_at timestamptz not null, updated_at timestamptz not null)
            partition by range (id);
        create table fk_pp_a partition of fk_pp for values from (0) to (100);
        create table fk_pp_b partition of fk_pp for values from (100) to (200);
        create table fk_pc (id bigint primary key, parent_id bigint references fk_pp (id), body text not null,
                            created_at timestamptz not null, updated_at timestamptz not null)""")
    try:
        db.execute("insert into fk_pp values (1, %s, %s), (150, %s, %s)", (T0, T0, T0, T0))
        summaries, broken = reconcile(db, {"fk_pc": ([child(10, 1, "in a", at(5)), child(11, 150, "in b", at(5)),
                                                      child(12, 99, "in neither", at(5))], [])})
        assert broken == []
        assert (summaries["fk_pc"].inserted, summaries["fk_pc"].flagged) == (2, 1)
        assert ids(db, "fk_pc") == [10, 11]
    finally:
        db.execute("drop table fk_pc, fk_pp")


def test_a_chain_of_deletes_down_to_a_survivor_reply_keeps_the_whole_chain_in_one_round(db, monkeypatch):
    """The loser deleted a thread (its cascade: comments 1 -> 2 -> ... -> 6); the survivor had
    replied to comment 6. Each delete above a held one is held too, in one round: five rounds
    were all a chain of six got, and the sixth delete was committed, orphaning the rest."""
    from activities.conflicts import foreign_keys

    db.execute("""create table fk_thread (id bigint primary key, parent_id bigint references fk_thread (id)
                  on delete cascade, body text not null, created_at timestamptz not null,
                  updated_at timestamptz not null)""")
    try:
        seed(db, "fk_thread", *[child(i, i - 1 if i > 1 else None, f"comment {i}") for i in range(1, 7)])
        seed(db, "fk_thread", child(7, 6, "survivor's reply", at(4)))
        rounds: list[Holds] = []
        original = foreign_keys._Check.broken

        def counted(self, holds):
            rounds.append(holds)
            return original(self, holds)

        monkeypatch.setattr(foreign_keys._Check, "broken", counted)
        summaries, broken = reconcile(db, {"fk_thread": ([], [(i,) for i in range(1, 7)])})
        assert broken == [] and len(rounds) == 2  # one that holds, one that finds nothing more
        assert ids(db, "fk_thread") == [1, 2, 3, 4, 5, 6, 7]
        assert summaries["fk_thread"].flagged == 6
    finally:
        db.execute("drop table fk_thread")


def test_a_parent_an_application_deletes_meanwhile_is_waited_for_not_taken_as_there(db, pg):
    """The parent table is not one the reconcile locks (the loser never touched it). The
    application deletes the parent and commits while the check runs: the check waits for it,
    as PostgreSQL's own would, and holds the child."""
    import threading

    db.execute("""create table fk_att (id bigint primary key, parent_id bigint references fk_parent (id),
                  body text not null, created_at timestamptz not null, updated_at timestamptz not null)""")
    seed(db, "fk_parent", parent(1, "p1"))
    app = pg.connect()
    app.autocommit = False  # the delete stays uncommitted until the check waits for it
    app.execute("set lock_timeout = '20s'")  # a failure here must fail, not hang
    pid = db.execute("select pg_backend_pid() as pid").fetchone()["pid"]
    done = threading.Event()

    def commit_once_the_check_waits() -> None:
        with pg.connect() as watcher:
            watcher.autocommit = True
            while not done.is_set():  # polled: the check waits on the app's row lock
                if watcher.execute("select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                                   (pid,)).fetchone()[0]:
                    app.commit()
                    return
                watcher.execute("select pg_sleep(0.01)")

    def apply_all(holds: Holds, checked: frozenset[str]) -> dict[str, ApplySummary]:
        out = {"fk_att": apply_resolutions(db, "fk_att", LWW, [child(10, 1, "under p1", at(5))], [], LOSER,
                                           SURVIVOR, PRIORITY, FORK, NOW, "wf-fk", "run-1", hold=holds.get("fk_att"))}
        if not holds:
            app.execute("delete from fk_parent where id = 1")  # not committed when the check looks
        return out

    waiter = threading.Thread(target=commit_once_the_check_waits)
    waiter.start()
    try:
        db.execute("set lock_timeout = '20s'")
        with db.transaction():
            summaries, broken = apply_keeping_foreign_keys(db, {"fk_att": ["id"]}, apply_all,
                                                           survivor_region=SURVIVOR)
    finally:
        done.set()
        waiter.join(timeout=60)
        app.close()
        db.execute("reset lock_timeout")
    try:
        assert broken == [] and summaries["fk_att"].flagged == 1
        assert ids(db, "fk_att") == [] and ids(db, "fk_parent") == []
    finally:
        db.execute("drop table fk_att")


def test_a_flagged_update_of_a_parent_holds_no_child_still_referring_to_it(db):
    """An append-only parent the loser edited is flagged, yet it is the same row on both
    sides: a child the loser edited that still refers to it is applied."""
    append_only = TableConflictConfig(strategy="immutable-append-only")
    seed(db, "fk_parent", parent(1, "p1"))
    seed(db, "fk_child", child(10, 1, "old"))

    def apply_all(holds: Holds, checked: frozenset[str]) -> dict[str, ApplySummary]:
        return {"fk_parent": apply_resolutions(db, "fk_parent", append_only, [parent(1, "edited", T0, at(5))], [],
                                               LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-fk", "run-1",
                                               hold=holds.get("fk_parent")),
                "fk_child": apply_resolutions(db, "fk_child", LWW, [{**child(10, 1, "edited"), "updated_at": at(6)}],
                                              [], LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-fk", "run-1",
                                              hold=holds.get("fk_child"))}

    with db.transaction():
        summaries, broken = apply_keeping_foreign_keys(db, {"fk_parent": ["id"], "fk_child": ["id"]}, apply_all,
                                                       survivor_region=SURVIVOR)
    assert broken == []
    assert (summaries["fk_parent"].flagged, summaries["fk_child"].flagged, summaries["fk_child"].updated) == (1, 0, 1)
    assert db.execute("select body from fk_child where id = 10").fetchone()["body"] == "edited"


def test_a_key_the_run_flagged_stays_flagged_in_its_retry(db):
    """The first attempt held child 10 (no parent) and committed; the application then created
    the parent. The retry writes no audit row: writing the child would leave the audit saying
    "flagged" about a row that was written."""
    changes: Changes = {"fk_child": ([child(10, 1, "orphan at first", at(5))], [])}
    reconcile(db, changes)
    seed(db, "fk_parent", parent(1, "created since"))
    summaries, broken = reconcile(db, changes)
    assert ids(db, "fk_child") == []
    assert audited(db, "fk_child")[10]["action"] == "flag" and summaries["fk_child"].flagged == 1


def test_reading_the_audit_never_waits_for_a_reconcile(db, pg):
    """The audit table's DDL runs only when it is not as it should be: ALTER TABLE ... IF NOT
    EXISTS still takes an ACCESS EXCLUSIVE lock, held to the end of the reconcile's one
    transaction, and an operator reading the audit would hang."""
    reconcile(db, {"fk_child": ([], [])})  # the audit table now exists, committed
    with db.transaction(), pg.connect() as reader:
        apply_resolutions(db, "fk_child", LWW, [child(10, None, "x", at(5))], [], LOSER, SURVIVOR, PRIORITY, FORK,
                          NOW, "wf-fk", "run-2")
        reader.execute("set lock_timeout = '2s'")
        assert reader.execute("select count(*) from eagle_dr.conflict_audit").fetchone()[0] == 0


def test_no_table_to_apply_is_one_empty_round(db):
    """A failback whose old primary changed no listed table after the fork (only catalogs: a
    temporary table) still passes through: nothing to lock, nothing to check."""
    with db.transaction():
        assert apply_keeping_foreign_keys(db, {}, lambda holds, checked: {}, survivor_region=SURVIVOR) == ({}, [])


def test_a_preview_writes_only_the_tables_a_foreign_key_involves_and_no_audit(db, monkeypatch):
    """A preview rehearses writes (rolled back) only where the check must see them: every
    other table is decided as before, and no audit row is written for nothing (on a live
    primary, a rehearsal is WAL, dead rows and locks)."""
    from activities.conflicts import apply

    db.execute("create table fk_free (id bigint primary key, body text, updated_at timestamptz not null)")
    written, audited_tables = [], []
    real_write, real_audit = apply._write, apply._audit
    monkeypatch.setattr(apply, "_write", lambda cur, target, *a: (written.append(target.as_string(cur)),
                                                                  real_write(cur, target, *a))[1])
    monkeypatch.setattr(apply, "_audit", lambda cur, table, *a: (audited_tables.append(table),
                                                                 real_audit(cur, table, *a))[1])
    try:
        summaries, broken = reconcile(db, {"fk_free": ([{"id": 1, "body": "b", "updated_at": at(1)}], []),
                                           "fk_child": ([child(10, 1, "orphan", at(5))], [])}, preview=True)
        assert broken == [] and summaries["fk_child"].flagged == 1 and summaries["fk_free"].inserted == 1
        assert set(written) == {'"fk_child"'} and audited_tables == []  # (a round per hold)
        assert ids(db, "fk_free") == [] and ids(db, "fk_child") == []
    finally:
        db.execute("drop table fk_free")


def test_a_loser_update_of_a_referenced_column_the_survivor_still_refers_to_is_flagged(db):
    """The key of the reference is a unique column, not the table's key. Only the old primary
    changed the row (renamed its code), so its decision keeps no survivor version; the survivor
    has since given the old code a new child. Applying the rename orphans it."""
    db.execute("""create table fk_acct (id bigint primary key, code text unique not null,
                      created_at timestamptz not null, updated_at timestamptz not null);
                  create table fk_entry (id bigint primary key, acct_code text references fk_acct (code),
                      created_at timestamptz not null, updated_at timestamptz not null)""")
    try:
        db.execute("insert into fk_acct values (1, 'a', %s, %s), (2, 'c', %s, %s)", (T0, T0, T0, T0))
        db.execute("insert into fk_entry values (50, 'a', %s, %s)", (at(4), at(4)))
        rename = {"id": 1, "code": "b", "created_at": T0, "updated_at": at(5)}
        other = {"id": 2, "code": "d", "created_at": T0, "updated_at": at(5)}  # nothing refers to it
        summaries, broken = reconcile(db, {"fk_acct": ([rename, other], [])})
        assert broken == []
        assert (summaries["fk_acct"].updated, summaries["fk_acct"].flagged) == (1, 1)
        assert [r["code"] for r in db.execute("select code from fk_acct order by id")] == ["a", "d"]
        assert "fk_entry" in audited(db, "fk_acct")[1]["reason"]
    finally:
        db.execute("drop table fk_entry, fk_acct")


def test_an_update_of_a_parent_whose_key_is_referenced_searches_no_child(db, monkeypatch):
    """An update cannot change the conflict key: when the foreign key refers to it, the loser's
    parent updates take nothing away, and the child table (whose column may have no index) is
    not searched for them."""
    from activities.conflicts import foreign_keys

    seed(db, "fk_parent", parent(1, "p1"))
    seed(db, "fk_child", child(10, 1, "survivor's child", at(4)))
    searched: list[str] = []
    real = foreign_keys._Check._run
    monkeypatch.setattr(foreign_keys._Check, "_run", lambda self, q, table, **p: (searched.append(table),
                                                                                 real(self, q, table, **p))[1])
    summaries, broken = reconcile(db, {"fk_parent": ([parent(1, "renamed", T0, at(5))], [])})
    assert broken == [] and summaries["fk_parent"].updated == 1 and searched == []


def _waiting_on_a_lock(watcher: psycopg.Connection, pid: int, deadline_s: float = 30.0) -> None:
    """Polls until session ``pid`` waits on a heavyweight lock (or fails at the deadline)."""
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if watcher.execute("select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                           (pid,)).fetchone()[0]:
            return
        watcher.execute("select pg_sleep(0.01)")
    raise AssertionError(f"session {pid} never waited on a lock")


def test_a_reconcile_waiting_for_its_table_locks_never_queues_the_applications_writes(db, pg):
    """The survivor is the live primary. A batch job holds a write on a table the reconcile
    must lock; a plain LOCK TABLE would wait behind it and every later write of the
    application would queue behind the LOCK: a write outage as long as the batch. The
    reconcile asks in short tries instead, so the application's next write goes through while
    it waits; once the batch commits, the reconcile goes on."""
    import threading

    seed(db, "fk_parent", parent(1, "p1"))
    batch, app = pg.connect(), pg.connect()
    batch.autocommit = False
    batch.execute("set application_name = 'billing-batch'")
    batch.execute("insert into fk_parent values (2, 'batch', now(), now())")  # ROW EXCLUSIVE, held
    pid = db.execute("select pg_backend_pid() as pid").fetchone()["pid"]
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = reconcile_waiting(db, {"fk_parent": ([parent(3, "loser", at(5))], [])})
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    try:
        with pg.connect() as watcher:
            watcher.autocommit = True
            _waiting_on_a_lock(watcher, pid)
            app.autocommit = True
            app.execute("set statement_timeout = '5s'")  # queued behind a LOCK, it would fail here
            app.execute("insert into fk_parent values (4, 'app', now(), now())")
        batch.commit()
    finally:
        worker.join(timeout=60)
        batch.close()
        app.close()
    assert not worker.is_alive(), "the reconcile did not finish once the batch committed"
    assert "error" not in out, out
    summaries, broken = out["result"]
    assert broken == [] and summaries["fk_parent"].inserted == 1
    assert ids(db, "fk_parent") == [1, 2, 3, 4]


def reconcile_waiting(conn: psycopg.Connection, changes: Changes, patience: float = 60.0):
    def apply_all(holds: Holds, checked: frozenset[str]) -> dict[str, ApplySummary]:
        return {t: apply_resolutions(conn, t, LWW, rows, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-fk",
                                     "run-1", hold=holds.get(t)) for t, (rows, deleted) in changes.items()}

    with conn.transaction():
        return apply_keeping_foreign_keys(conn, {t: ["id"] for t in changes}, apply_all, survivor_region=SURVIVOR,
                                          lock_try=0.2, lock_patience=patience)


def test_a_reconcile_that_cannot_lock_its_tables_gives_up_naming_who_holds_them(db, pg):
    """Past its patience the reconcile stops (the activity retries later) and says which
    session holds which table, so the on-call can see it is a batch job, not a hung
    reconcile."""
    seed(db, "fk_parent", parent(1, "p1"))
    with pg.connect() as batch:
        batch.autocommit = False
        batch.execute("set application_name = 'billing-batch'")
        batch.execute("insert into fk_child values (9, 1, 'batch', now(), now())")
        holder = batch.execute("select pg_backend_pid()").fetchone()[0]
        try:
            with pytest.raises(TablesBusy) as e:
                reconcile_waiting(db, {"fk_parent": ([parent(3, "loser", at(5))], []),
                                       "fk_child": ([child(10, 1, "loser", at(5))], [])}, patience=1.0)
        finally:
            batch.rollback()
    assert f"fk_child held by pid {holder} (billing-batch," in str(e.value), str(e.value)


def test_the_applications_writes_go_on_while_a_reconcile_waits_behind_a_batch(db, pg):
    """A batch holds one table of the reconcile's; the reconcile keeps asking for both. A plain
    LOCK TABLE would wait behind the batch and every application write to either table would
    queue behind it for as long as the batch runs; in short tries, bounded as a whole
    statement, the application's writes get through while the batch still runs, and the
    reconcile gives up past its patience naming the batch."""
    import threading
    import time

    seed(db, "fk_parent", parent(1, "p1"))
    got: dict = {}

    def reconcile() -> None:
        try:
            with db.transaction():
                lock_tables(db, [sql.Identifier("fk_parent"), sql.Identifier("fk_child")], lock_try=0.2,
                            patience=8)
        except TablesBusy as e:
            got["busy"] = str(e)

    with pg.connect() as batch, pg.connect() as app:
        batch.autocommit, app.autocommit = False, True
        batch.execute("set application_name = 'billing-batch'")
        batch.execute("insert into fk_child values (9, 1, 'batch', now(), now())")
        waiter = threading.Thread(target=reconcile)
        waiter.start()
        try:
            pid = db.pgconn.backend_pid
            end = time.monotonic() + 10
            while not app.execute("select exists (select from pg_locks where pid = %s and not granted)",
                                  (pid,)).fetchone()[0]:
                assert time.monotonic() < end, "the reconcile never asked for the locks"
                time.sleep(0.01)
            # Behind a plain LOCK these would wait for the batch (held until the finally).
            app.execute("set statement_timeout = '5s'")
            for n in range(3):
                app.execute("insert into fk_parent values (%s, 'app', now(), now())", (100 + n,))
                app.execute("insert into fk_child values (%s, 1, 'app', now(), now())", (100 + n,))
            assert waiter.is_alive(), "the reconcile gave up before the application wrote"
        finally:
            waiter.join(30)
            batch.rollback()
    assert "fk_child held by pid" in got.get("busy", "") and "billing-batch" in got["busy"], got


def test_a_lock_taken_in_tries_is_held_and_leaves_the_sessions_timeouts_as_they_were(db):
    """The tries set lock_timeout and statement_timeout for the LOCK alone: left at the try's
    half second, every later statement of the reconcile (a row lock an application holds, a
    long audit insert) would fail half way."""
    db.execute("set lock_timeout = '20s'")
    db.execute("set statement_timeout = '33s'")
    try:
        with db.transaction():
            lock_tables(db, [sql.Identifier("fk_parent"), sql.Identifier("fk_child")], lock_try=0.2)
            assert [db.execute(f"show {n}").fetchone()[n] for n in ("lock_timeout", "statement_timeout")] == \
                ["20s", "33s"]
            held = db.execute("select relation::regclass::text as t from pg_locks where pid = pg_backend_pid()"
                              " and mode = 'ShareRowExclusiveLock' and granted order by 1").fetchall()
            assert [r["t"] for r in held] == ["fk_child", "fk_parent"]
        with pytest.raises(RuntimeError, match="open transaction"):
            lock_tables(db, [sql.Identifier("fk_parent")])  # nothing would hold it
    finally:
        db.execute("reset lock_timeout")
        db.execute("reset statement_timeout")


def test_an_autovacuum_in_the_way_is_cancelled_as_postgresql_would(db, pg):
    """A long autovacuum of a busy table holds a lock ours conflicts with. PostgreSQL cancels
    it for a waiting lock request after deadlock_timeout (1 s), which a half-second try never
    reaches: left alone it would outlast every try and fail the reconcile."""
    import time

    db.execute("create table fk_vacuumed (id bigint, pad text) with (autovacuum_vacuum_cost_delay = 100,"
               " autovacuum_vacuum_cost_limit = 1, autovacuum_vacuum_threshold = 0,"
               " autovacuum_vacuum_scale_factor = 0)")  # a crawling autovacuum, minutes long
    db.execute("insert into fk_vacuumed select g, repeat('x', 200) from generate_series(1, 100000) g")
    db.execute("delete from fk_vacuumed")
    db.execute("alter system set autovacuum_naptime = 1")
    db.execute("select pg_reload_conf()")
    try:
        end = time.monotonic() + 60
        while not db.execute("select exists (select from pg_stat_activity where backend_type = 'autovacuum worker'"
                             " and query like '%%fk_vacuumed%%') as on").fetchone()["on"]:
            assert time.monotonic() < end, "no autovacuum of fk_vacuumed started"
            db.execute("select pg_sleep(0.05)")
        with db.transaction():
            lock_tables(db, [sql.Identifier("fk_vacuumed")], lock_try=0.2, patience=20)
            assert db.execute("select count(*) as n from pg_locks where relation = 'fk_vacuumed'::regclass"
                              " and mode = 'ShareUpdateExclusiveLock' and granted").fetchone()["n"] == 0
    finally:
        db.execute("alter system reset autovacuum_naptime")
        db.execute("select pg_reload_conf()")
        db.execute("drop table if exists fk_vacuumed")


def reconcile_bounded(conn: psycopg.Connection, changes: Changes, patience: float = 60.0, preview: bool = False):
    """What failback, row recovery and data sync run: the apply in a transaction of its own,
    every lock wait bounded (``apply_in_bounded_waits``), with a test's patience."""
    def apply_all(holds: Holds, checked: frozenset[str]) -> dict[str, ApplySummary]:
        return {t: apply_resolutions(conn, t, LWW, rows, deleted, LOSER, SURVIVOR, PRIORITY, FORK, NOW, "wf-fk",
                                     "run-1", rehearse=preview and t in checked, dry_run=preview and t not in checked,
                                     hold=holds.get(t)) for t, (rows, deleted) in changes.items()}

    return apply_in_bounded_waits(conn, {t: ["id"] for t in changes}, apply_all, survivor_region=SURVIVOR,
                                  force_rollback=preview, patience=patience)


def test_a_write_waiting_for_an_applications_row_lock_never_queues_its_other_writes(db, pg):
    """Once the tables are locked, the apply's update of a row waits for an application
    holding that row (SELECT ... FOR UPDATE: compatible with the table lock). While it waited,
    every other write of the application to the table queued behind our lock, for as long as
    the row was held. Now the wait is bounded: the whole transaction rolls back, the queue
    drains, and it runs again; once the row is free the loser's version is applied."""
    import threading

    seed(db, "fk_parent", parent(1, "p1"), parent(2, "p2"))
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = reconcile_bounded(db, {"fk_parent": ([parent(1, "loser", T0, at(5))], [])})
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    with pg.connect() as holder, pg.connect() as app, pg.connect() as watcher:
        holder.autocommit = False
        holder.execute("set application_name = 'report-job'")
        holder.execute("select * from fk_parent where id = 1 for update")  # held to its commit
        worker = threading.Thread(target=run)
        worker.start()
        try:
            _waiting_on_a_lock(watcher, db.pgconn.backend_pid)
            # Behind a write that waits for the row to its end, these would wait for the holder.
            app.execute("set statement_timeout = '5s'")
            for n in range(3):
                app.execute("insert into fk_parent values (%s, 'app', now(), now())", (100 + n,))
            assert worker.is_alive(), out
        finally:
            holder.commit()
            worker.join(timeout=60)
    assert not worker.is_alive(), "the reconcile did not finish once the row was free"
    assert "error" not in out, out
    summaries, broken = out["result"]
    assert broken == [] and summaries["fk_parent"].updated == 1, summaries
    assert db.execute("select name from fk_parent where id = 1").fetchone()["name"] == "loser"
    assert ids(db, "fk_parent") == [1, 2, 100, 101, 102]
    assert list(audited(db, "fk_parent")) == [1]  # one audit row: the rolled-back tries left none


def test_a_row_held_past_the_patience_gives_up_naming_who_holds_it_and_writes_nothing(db, pg):
    seed(db, "fk_parent", parent(1, "p1"))
    seed(db, "fk_child", child(5, 1, "c5"))
    with pg.connect() as holder:
        holder.autocommit = False
        holder.execute("set application_name = 'report-job'")
        holder.execute("select * from fk_parent where id = 1 for update")
        pid = holder.pgconn.backend_pid
        try:
            with pytest.raises(TablesBusy) as e:
                reconcile_bounded(db, {"fk_parent": ([parent(1, "loser", T0, at(5))], []),
                                       "fk_child": ([child(6, 1, "loser", at(5))], [])}, patience=2.0)
        finally:
            holder.rollback()
    assert f"fk_parent held by pid {pid} (report-job," in str(e.value) and "by a lock wait past" in str(e.value), \
        str(e.value)
    assert db.execute("select name from fk_parent where id = 1").fetchone()["name"] == "p1"
    assert ids(db, "fk_child") == [5]
    # Not even the audit table the first try created (the schema dropped it): all rolled back.
    assert db.execute("select to_regclass('eagle_dr.conflict_audit') is null t").fetchone()["t"]
    assert db.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_bounded_preview_leaves_nothing_and_the_sessions_lock_timeout_as_it_was(db):
    seed(db, "fk_parent", parent(1, "p1"))
    db.execute("set lock_timeout = '7s'")
    try:
        summaries, _ = reconcile_bounded(db, {"fk_parent": ([parent(1, "loser", T0, at(5))], [])}, preview=True)
        assert summaries["fk_parent"].updated == 1
        assert db.execute("show lock_timeout").fetchone()["lock_timeout"] == "7s"
        assert db.execute("select name from fk_parent where id = 1").fetchone()["name"] == "p1"
        summaries, _ = reconcile_bounded(db, {"fk_parent": ([parent(1, "loser", T0, at(5))], [])})
        assert db.execute("show lock_timeout").fetchone()["lock_timeout"] == "7s"
        assert db.execute("select name from fk_parent where id = 1").fetchone()["name"] == "loser"
    finally:
        db.execute("reset lock_timeout")


def test_the_audit_tables_creation_waits_for_another_first_run_however_long_before_any_table_is_locked(db, pg):
    """The audit table's DDL (a first run, or an upgrade of its columns) waits for another
    run creating it, or for a reader of the audit, for as long as that takes: it comes before
    any table of the application is locked, so nothing queues behind it, and a bound would
    only end every try (and the step, past the patience) for a wait that harms no one."""
    import threading
    import time

    seed(db, "fk_parent", parent(1, "p1"))
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = reconcile_bounded(db, {"fk_parent": ([parent(1, "loser", T0, at(5))], [])}, patience=1.0)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    with pg.connect() as other, pg.connect() as app:
        other.execute("select pg_advisory_lock(hashtext('eagle_dr.conflict_audit'))")  # another first run's
        worker = threading.Thread(target=run)
        worker.start()
        try:
            pid = db.pgconn.backend_pid
            end = time.monotonic() + 30
            # Waiting past the patience (a bounded wait would have given up by now), holding no lock
            # of the application's: its writes go on.
            while not app.execute("select wait_event_type = 'Lock' and now() - query_start > interval '1.5 s'"
                                  " from pg_stat_activity where pid = %s", (pid,)).fetchone()[0]:
                assert time.monotonic() < end and worker.is_alive(), out
                app.execute("select pg_sleep(0.02)")
            app.execute("set statement_timeout = '5s'")
            app.execute("insert into fk_parent values (7, 'app', now(), now())")
        finally:
            other.execute("select pg_advisory_unlock(hashtext('eagle_dr.conflict_audit'))")
            worker.join(timeout=60)
    assert "error" not in out, out
    assert out["result"][0]["fk_parent"].updated == 1
    assert ids(db, "fk_parent") == [1, 7]


def test_the_patience_counts_what_each_try_waited_for_the_table_locks(db, pg):
    """Each try waits for the table locks afresh. A try that waited most of the patience for
    them, then ended on a row held past its bound, lost that wait too: counted only by its
    bound and pause, tries that each waited long for the tables ran for the patience many
    times over. A batch holds the table for about 1.5 s, a report job a row for good, with a
    patience of 2.5 s: the first try's wait for the table (1.5 s) and its row bound (0.5 s)
    leave too little for a second try's bound (1 s), so it gives up after two tries. Counting
    bounds alone, it made a third (0.5 + 1 s lost, then a 2 s bound)."""
    import threading

    seed(db, "fk_parent", parent(1, "p1"))
    with pg.connect() as holder, pg.connect() as batch:
        holder.autocommit = False
        holder.execute("set application_name = 'report-job'")
        holder.execute("select * from fk_parent where id = 1 for update")
        batch.autocommit = False
        batch.execute("insert into fk_parent values (50, 'batch', now(), now())")  # the table's lock, held
        ended = threading.Timer(1.5, batch.rollback)  # the fault's length, not a synchronisation
        ended.start()
        try:
            with pytest.raises(TablesBusy) as e:
                reconcile_bounded(db, {"fk_parent": ([parent(1, "loser", T0, at(5))], [])}, patience=2.5)
        finally:
            ended.cancel()
            ended.join()
            holder.rollback()
    assert ": 2 tries ended (" in str(e.value), str(e.value)
    assert db.execute("select name from fk_parent where id = 1").fetchone()["name"] == "p1"
    assert ids(db, "fk_parent") == [1]
