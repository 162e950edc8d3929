"""Row recovery from a restored copy, on two real PostgreSQL 15 servers (ports 17970-17971 +
the test port shift): the copy's versions come back, the primary's newer rows are counted and
kept, keys match across encodings, and an operator's WHERE is taken as written."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest

from activities.backup.recover import RowSelection, SelectionError, recover_rows
from lab.scratch_postgres import scratch_connect, scratch_pair

PORT = 17970 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000
RESTORED_TO = datetime(2026, 3, 1, tzinfo=timezone.utc)
DDL = ["create extension if not exists hstore",
       "create table items (id text primary key, doc json, qty numeric, attrs hstore,"
       " updated_at timestamptz not null)",
       "insert into items select 'i' || g, ('{\"n\": ' || g || '}')::json, g / 4.0, ('a=>' || g)::hstore, '2026-02-01'"
       " from generate_series(1, 300) g",
       "insert into items values ('café', '{\n\t\"pretty\": true\n}', 1.50, '\"b c\"=>d', '2026-02-01')"]


@pytest.fixture(scope="module")
def servers():
    with scratch_pair(PORT, "recover-primary", "recover-copy") as pair:
        yield pair


def test_recovered_rows_come_back_and_rows_the_copy_lacks_are_counted_and_kept(servers, tmp_path):
    """A corrupting UPDATE and DELETE on the primary after the restore point, and a row it
    gained since: the copy's versions come back (a json, an hstore and an exact numeric intact), the new
    row is counted as missing in the copy and kept, and a non-ASCII key is matched although
    the primary's sessions speak LATIN1."""
    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ["drop table if exists items", "drop schema if exists eagle_dr cascade", *DDL]:
            primary.execute(q)
            copy.execute(q)
        primary.execute("update items set qty = -1, attrs = 'x=>y', updated_at = now() where id in ('i1', 'i2', 'café')")
        primary.execute("delete from items where id = 'i3'")
        primary.execute("insert into items values ('new', '{}', 7, null, now())")
        primary.execute("alter role postgres set client_encoding = 'LATIN1'")
    try:
        with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
            got = recover_rows(copy, primary, [RowSelection(table="items")], {}, "us-east-1", RESTORED_TO,
                               "wf-recover", "run-1", "oncall@example", False, tmp_path)
            assert [(t.rows_in_copy, t.missing_in_copy) for t in got.tables] == [(301, 1)]
            # The copy's rows went through a spool file, not the worker's memory.
            assert sorted(f.name for f in tmp_path.iterdir()) == ["0.keys", "0.rows"]
            assert (got.tables[0].inserted, got.tables[0].updated) == (1, 3)
            rows = {r[0]: r[1:] for r in primary.execute("select id, doc::jsonb::text, qty, attrs::text from items")}
    finally:
        with scratch_connect(PORT) as primary:
            primary.execute("alter role postgres reset client_encoding")
    assert rows["café"] == ('{"pretty": true}', 1.50, '"b c"=>"d"') and rows["i1"][1:] == (0.25, '"a"=>"1"')
    assert rows["i3"][1] == 0.75
    assert rows["new"][1] == 7 and len(rows) == 302


def test_a_where_clause_that_does_not_work_names_the_field_and_writes_nothing(servers, tmp_path):
    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ["drop table if exists items", "drop schema if exists eagle_dr cascade", *DDL]:
            primary.execute(q)
            copy.execute(q)
        primary.execute("delete from items")
        with pytest.raises(SelectionError) as e:
            recover_rows(copy, primary, [RowSelection(table="items", where="id like 'i1%'"),
                                         RowSelection(table="items", where="nosuchcolumn = 1")], {}, "us-east-1",
                         RESTORED_TO, "wf-recover", "run-1", None, False, tmp_path)
        assert e.value.field == "tables[1].where"
        assert primary.execute("select count(*) from items").fetchone()[0] == 0


@pytest.mark.parametrize("where", [
    "true); commit; delete from items where (true",
    # Shaped for the read's query as it is now, a subquery under the row's JSON.
    "true)) x; commit; delete from items; select '', '' from (select 1 where (true",
])
def test_a_where_clause_that_smuggles_in_statements_runs_none_of_them(servers, tmp_path, where):
    """The WHERE is the operator's SQL, run before any approval (the preview reads with it).
    As a simple query, "true); commit; delete ..." ended the read-only transaction and then
    deleted every row, on the copy and on the primary. Now it is refused, naming the field,
    and both sides keep every row."""
    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ["drop table if exists items", "drop schema if exists eagle_dr cascade", *DDL]:
            primary.execute(q)
            copy.execute(q)
        with pytest.raises(SelectionError) as e:
            recover_rows(copy, primary, [RowSelection(table="items", where=where)],
                         {}, "us-east-1", RESTORED_TO, "wf-recover", "run-1", None, True, tmp_path)
        assert e.value.field == "tables[0].where"
        assert [c.execute("select count(*) from items").fetchone()[0] for c in (primary, copy)] == [301, 301]


def test_a_date_in_the_where_and_in_the_key_means_what_each_session_reads(servers, tmp_path):
    """The copy's sessions read dates day first, the primary's month first. The WHERE's date
    literal selects on each side what that side's sessions read it as (as the operator's own
    psql there would), the copy's rows are read once, and their keys (a date in them) reach the
    primary as JSON, in ISO 8601: no key is read as another day, so a row the primary also
    holds is never counted as missing from the copy. A second read of the keys under a pinned
    style selected other rows than the first. A daterange, whose text JSON keeps as the copy
    wrote it (day first), comes back as the same days; columns named x and r (the read's own
    aliases) come back too."""
    ddl = ["drop table if exists days", "drop schema if exists eagle_dr cascade",
           "create table days (k text, day date, v text, span daterange, x int, r int,"
           " updated_at timestamptz not null default '2026-02-01', primary key (k, day))",
           # 1 to 12 March 2026: '03/02/2026' is 3 February day first, 2 March month first.
           "insert into days (k, day, v, span, x, r) select 'k', date '2026-03-01' + g, 'before',"
           " daterange(date '2026-03-01' + g, date '2026-03-13'), g, -g from generate_series(0, 11) g"]
    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ddl:
            primary.execute(q)
            copy.execute(q)
        want = primary.execute("select day, span::text, x, r from days order by day").fetchall()
        primary.execute("update days set v = 'corrupt', span = null, x = null, r = null, updated_at = now()")
    try:
        with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
            copy.execute("alter role postgres set datestyle = 'SQL, DMY'")
            primary.execute("alter role postgres set datestyle = 'SQL, MDY'")
        with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
            got = recover_rows(copy, primary, [RowSelection(table="days",
                                                            where="day >= '01/03/2026' and day <> '05/03/2026'")],
                               {}, "us-east-1", RESTORED_TO, "wf-recover", "run-1", "oncall@example", False, tmp_path)
            # Day first on the copy: 1 to 12 March but the 5th, 11 rows. Month first on the
            # primary: from 3 January but 3 May, all 12, of which only 5 March is not among
            # the copy's: a key misread would count more.
            assert [(t.rows_in_copy, t.missing_in_copy, t.updated) for t in got.tables] == [(11, 1, 11)]
    finally:
        for port in (PORT, PORT + 1):
            with scratch_connect(port) as c:
                c.execute("alter role postgres reset datestyle")
    with scratch_connect(PORT) as primary:
        fixed = primary.execute("select day, span::text, x, r from days where v = 'before' order by day").fetchall()
    assert fixed == [w for w in want if w[0].day != 5]


def test_a_key_the_primary_reads_otherwise_is_refused_naming_the_table(servers, tmp_path):
    """An enum label renamed on the primary after the restore point: the copy's keys do not
    read as the primary's type. The refusal names the table, not the WHERE, and nothing is
    written."""
    ddl = ["drop table if exists moods", "drop type if exists mood", "drop schema if exists eagle_dr cascade",
           "create type mood as enum ('calm', 'angry')",
           "create table moods (m mood primary key, v text, updated_at timestamptz not null default '2026-02-01')",
           "insert into moods (m, v) values ('calm', 'a'), ('angry', 'b')"]
    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ddl:
            primary.execute(q)
            copy.execute(q)
        primary.execute("alter type mood rename value 'angry' to 'cross'")
        primary.execute("update moods set v = 'corrupt'")
        with pytest.raises(SelectionError, match="do not read as the primary's key types") as e:
            recover_rows(copy, primary, [RowSelection(table="moods")], {}, "us-east-1", RESTORED_TO, "wf-recover",
                         "run-1", None, False, tmp_path)
        assert e.value.field == "tables[0].table"
        assert primary.execute("select count(*) from moods where v = 'corrupt'").fetchone()[0] == 2
        # Not in the key: the rows' write refuses it, naming the table, and writes nothing.
        for q in ["drop table moods", "create table moods (id int primary key, m mood, updated_at timestamptz"
                  " not null default '2026-02-01')"]:
            primary.execute(q)
            copy.execute(q)
        copy.execute("insert into moods (id, m) values (1, 'calm'), (2, 'angry')")
        (tmp_path / "not-key").mkdir()
        with pytest.raises(SelectionError, match="cannot be written to the primary") as e:
            recover_rows(copy, primary, [RowSelection(table="moods")], {}, "us-east-1", RESTORED_TO, "wf-recover",
                         "run-1", None, False, tmp_path / "not-key")
        assert e.value.field == "tables[0].table"
        assert primary.execute("select count(*) from moods").fetchone()[0] == 0


def test_a_column_the_copy_lacks_is_refused_naming_the_table(servers, tmp_path):
    """A column added on the primary after the restore point, or a type changed: the copy's
    rows cannot come back whole. The refusal names the table, not the WHERE (its
    UndefinedColumn once did)."""
    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ["drop table if exists items", "drop schema if exists eagle_dr cascade", *DDL]:
            primary.execute(q)
            copy.execute(q)
        primary.execute("alter table items add column added text")
        with pytest.raises(SelectionError, match="lacks the primary's column") as e:
            recover_rows(copy, primary, [RowSelection(table="items", where="id = 'i1'")], {}, "us-east-1",
                         RESTORED_TO, "wf-recover", "run-1", None, True, tmp_path)
        assert e.value.field == "tables[0].table"
        # A length or a precision widened since is no change of type: the preview goes
        # through. A scale narrowed since would round the copy's numbers: refused.
        primary.execute("alter table items drop column added")
        for q in ["drop table if exists sized", "create table sized (id int primary key, s varchar(5), n numeric(10, 2),"
                  " updated_at timestamptz not null default '2026-02-01')",
                  "insert into sized (id, s, n) values (1, 'abcde', 0.125)"]:
            primary.execute(q)
            copy.execute(q)
        primary.execute("alter table sized alter column s type varchar(50)")
        primary.execute("alter table sized alter column n type numeric(12, 2)")
        (tmp_path / "widened").mkdir()
        got = recover_rows(copy, primary, [RowSelection(table="sized")], {}, "us-east-1",
                           RESTORED_TO, "wf-recover", "run-1", None, True, tmp_path / "widened")
        assert [t.rows_in_copy for t in got.tables] == [1]
        primary.execute("alter table sized alter column n type numeric(12, 1)")
        with pytest.raises(SelectionError, match=r"n \(numeric\(10,2\) on the copy, numeric\(12,1\) on the primary\)") as e:
            recover_rows(copy, primary, [RowSelection(table="sized")], {}, "us-east-1",
                         RESTORED_TO, "wf-recover", "run-1", None, True, tmp_path)
        assert e.value.field == "tables[0].table"
        # A type changed since: the copy's numbers in a text column are not its rows as they were.
        primary.execute("alter table items alter column qty type text")
        with pytest.raises(SelectionError, match="changed type since the restore point") as e:
            recover_rows(copy, primary, [RowSelection(table="items", where="id = 'i1'")], {}, "us-east-1",
                         RESTORED_TO, "wf-recover", "run-1", None, True, tmp_path)
        assert e.value.field == "tables[0].table"


def test_a_full_disk_under_the_spool_fails_the_read_and_writes_nothing(servers, tmp_path):
    """The copy's rows go to the worker's disk before anything is written to the primary: a
    full disk there (the kernel's own ENOSPC, /dev/full) fails the read, which the activity
    reports as SpoolFull and retries, with the primary untouched."""
    import errno

    with scratch_connect(PORT) as primary, scratch_connect(PORT + 1) as copy:
        for q in ["drop table if exists items", "drop schema if exists eagle_dr cascade", *DDL]:
            primary.execute(q)
            copy.execute(q)
        primary.execute("update items set qty = -1, updated_at = now()")
        (tmp_path / "0.rows").symlink_to("/dev/full")
        with pytest.raises(OSError) as e:
            recover_rows(copy, primary, [RowSelection(table="items")], {}, "us-east-1", RESTORED_TO, "wf-recover",
                         "run-1", None, False, tmp_path)
        assert e.value.errno == errno.ENOSPC
        assert primary.execute("select count(*) from items where qty = -1").fetchone()[0] == 301
        assert primary.execute("select to_regclass('eagle_dr.conflict_audit')").fetchone()[0] is None
