"""Data sync and foreign keys, on two real PostgreSQL 15 servers (ports 17976-17977 + the test
port shift): a key re-copied from A must not break a foreign key on B toward a table the run
does not bring to A's state too (a table nobody listed for the check), while tables the run
syncs as well may disagree between their steps (each ends as A has it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest

from activities.consistency.sync import recopy_keys
from activities.consistency.tables import list_tables
from lab.scratch_postgres import scratch_connect, scratch_pair

PORT = 17976 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000
DDL = ["drop table if exists child", "drop table if exists parent", "drop schema if exists eagle_dr cascade",
       "create table parent (id int primary key, v text, updated_at timestamptz not null default '2026-01-01')",
       "create table child (id int primary key, parent_id int references parent (id),"
       " updated_at timestamptz not null default '2026-01-01')",
       "insert into parent (id, v) values (1, 'a'), (2, 'b')"]


@pytest.fixture(scope="module")
def servers():
    with scratch_pair(PORT, "sync-fk-a", "sync-fk-b") as pair:
        yield pair


@contextmanager
def _both(ddl: list[str]):
    """A (the source) and B (written), each given ``ddl``."""
    with scratch_connect(PORT) as a, scratch_connect(PORT + 1) as b:
        for q in ddl:
            a.execute(q)
            b.execute(q)
        yield a, b


def _sync(a, b, table: str, keys: list[list[str]], settled: list[str]):
    t = list_tables(a, [table], "table")[0]
    return recopy_keys(a, b, t, keys, {}, "us-east-1", "us-west-2", datetime.now(timezone.utc), "wf-sync", "run-1",
                       "oncall@example", settled=settled)


@pytest.mark.parametrize("settled", [[], ["public.child"]])
def test_a_parent_b_alone_holds_is_kept_while_a_table_outside_the_run_refers_to_it(servers, settled):
    """B has parent 3 and a child under it; A has neither. Re-copying the parent table deletes
    3 on B, which would orphan the child, silently (the engine writes with the foreign-key
    triggers off). When the child table is not in the run, 3 is held and flagged; when it is,
    its own step deletes the child and 3 goes."""
    with _both(DDL) as (a, b):
        b.execute("insert into parent (id, v) values (3, 'b only')")
        b.execute("insert into child (id, parent_id) values (10, 3)")
        summary, broken = _sync(a, b, "parent", [["3"]], settled)
        assert broken == []
        left = [r[0] for r in b.execute("select id from parent order by id")]
        if settled:
            assert (summary.deleted, summary.flagged, left) == (1, 0, [1, 2])
        else:
            assert (summary.deleted, summary.flagged, left) == (0, 1, [1, 2, 3])
            why = b.execute("select reason from eagle_dr.conflict_audit where action = 'flag'").fetchone()[0]
            assert "child_parent_id_fkey" in why


@pytest.mark.parametrize("settled", [[], ["public.parent"]])
def test_a_child_whose_parent_b_lacks_waits_for_its_parent_only_if_the_run_brings_it(servers, settled):
    """A has child 11 under parent 4; B has neither. Re-copying only the child table would
    leave it under nothing: flagged, unless the parent table is synced in the same run."""
    with _both(DDL) as (a, b):
        a.execute("insert into parent (id, v) values (4, 'a only')")
        a.execute("insert into child (id, parent_id) values (11, 4)")
        summary, broken = _sync(a, b, "child", [["11"]], settled)
        assert broken == []
        there = [r[0] for r in b.execute("select id from child")]
        assert (summary.inserted, summary.flagged, there) == ((1, 0, [11]) if settled else (0, 1, []))


def test_a_step_that_trusted_another_table_is_named_when_that_table_was_not_synced(servers):
    """The parent's step deleted B's parent 3, trusting the child table's own step to delete
    the child under it; that step never ran (it failed). The run-wide check after the steps
    names the orphaning delete from the run's audit; with the child's step done, it finds
    nothing."""
    from activities.conflicts.foreign_keys import broken_after_run

    with _both(DDL) as (a, b):
        b.execute("insert into parent (id, v) values (3, 'b only')")
        b.execute("insert into child (id, parent_id) values (10, 3)")
        summary, _ = _sync(a, b, "parent", [["3"]], ["public.child"])
        assert summary.deleted == 1
        keys = {"public.parent": ["id"], "public.child": ["id"]}
        found = broken_after_run(b, keys, "us-west-2", "wf-sync", "run-1", "collision")
        assert len(found) == 1 and found[0].startswith('public.parent {"id": 3}: foreign key child_parent_id_fkey'), found
        _sync(a, b, "child", [["10"]], ["public.parent"])
        assert broken_after_run(b, keys, "us-west-2", "wf-sync", "run-1", "collision") == []


def test_settled_partitions_settle_their_table_and_odd_names_are_checked_not_skipped(servers):
    """A check lists a partitioned table's partitions, while the foreign key is declared on the
    partitioned table: with every partition in the run it is left to their steps, with one
    missing it is checked. A table whose name no identifier spells (a dot in it) cannot be
    left to a step of its own: its foreign key is checked, and breaks nothing else."""
    ddl = ['drop table if exists ev, "odd.name"', *DDL[:3],
           "create table parent (id int primary key, v text, updated_at timestamptz not null default '2026-01-01')",
           "create table ev (id int, parent_id int references parent (id), updated_at timestamptz not null"
           " default '2026-01-01', primary key (id)) partition by range (id)",
           "create table ev_1 partition of ev for values from (0) to (100)",
           "create table ev_2 partition of ev for values from (100) to (200)",
           'create table "odd.name" (id int primary key, parent_id int references parent (id))',
           "insert into parent (id, v) values (1, 'a'), (2, 'b')"]
    for settled, odd_child, held in ((["public.ev_1", "public.ev_2"], False, False),
                                     (["public.ev_1"], False, True),
                                     (["public.ev_1", "public.ev_2", "public.odd.name"], True, True)):
        with _both(ddl) as (a, b):
            b.execute("insert into parent (id, v) values (3, 'b only')")
            b.execute("insert into ev (id, parent_id) values (150, 3)" if not odd_child else
                      'insert into "odd.name" (id, parent_id) values (1, 3)')
            summary, broken = _sync(a, b, "parent", [["3"]], settled)
            assert broken == [] and (summary.flagged, summary.deleted) == ((1, 0) if held else (0, 1)), settled


def test_a_table_the_engine_refuses_fails_its_step_for_good_naming_it(servers):
    """A column with the engine's reserved prefix: the refusal is the same on every retry, so
    the step fails at once as CannotSync (it was retried three times as a plain error)."""
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from activities.consistency.activities import ConsistencyActivities, SyncTableRequest
    from activities.consistency.results import KeyDiff
    from eagle_dr.config import DEFAULT_CONFIG, load_config

    cfg = load_config(DEFAULT_CONFIG, env={})
    regions = [r.model_copy(update={"postgres": r.postgres.model_copy(update={"host": "127.0.0.1", "port": port,
                                                                              "user": "postgres", "password": None,
                                                                              "sslmode": "disable",
                                                                              "database": "postgres"})})
               for r, port in zip(cfg.regions, (PORT, PORT + 1))]
    cfg = cfg.model_copy(update={"regions": regions})
    with scratch_connect(PORT) as a, scratch_connect(PORT + 1) as b:
        for c in (a, b):
            c.execute("drop table if exists refused")
            c.execute("create table refused (id int primary key, _e_x text, updated_at timestamptz not null)")
        a.execute("insert into refused values (1, 'a', now())")
    req = SyncTableRequest(region_a=regions[0].name, region_b=regions[1].name, table="public.refused", max_keys=10,
                           approved=KeyDiff(inserted=1, inserted_keys=[["1"]]), decided_at=datetime.now(timezone.utc))
    with pytest.raises(ApplicationError) as e:
        ActivityEnvironment().run(ConsistencyActivities(cfg).sync_table, req)
    assert e.value.type == "CannotSync" and e.value.non_retryable, e.value
    assert "public.refused" in e.value.message and "reserves" in e.value.message, e.value.message


def test_a_partition_that_foreign_keys_refer_to_through_its_table_is_checked(servers):
    """A check lists a partitioned table's partitions; a foreign key refers to the partitioned
    table, and PostgreSQL's per-partition copies of it were left out: deleting B's parent 3
    from its partition orphaned B's child under it, unchecked. Checked against the partitioned
    table, the delete is held; a parent B and A both have stays matched."""
    ddl = ["drop table if exists pchild, pparent", "drop schema if exists eagle_dr cascade",
           "create table pparent (id int primary key, updated_at timestamptz not null default '2026-01-01')"
           " partition by range (id)",
           "create table pparent_1 partition of pparent for values from (0) to (100)",
           "create table pparent_2 partition of pparent for values from (100) to (200)",
           "create table pchild (id int primary key, parent_id int references pparent (id))",
           "insert into pparent (id) values (1), (150)"]
    with _both(ddl) as (a, b):
        b.execute("insert into pparent (id) values (3)")
        b.execute("insert into pchild values (30, 3), (31, 1)")
        summary, broken = _sync(a, b, "pparent_1", [["3"]], [])
        assert broken == [] and (summary.flagged, summary.deleted) == (1, 0), summary
        assert [r[0] for r in b.execute("select id from pparent order by id")] == [1, 3, 150]
