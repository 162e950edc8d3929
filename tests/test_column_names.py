"""Queries that alias a user table or add columns of their own, on a real PostgreSQL 15 (port
17978 + the test port shift): a user column named like the alias or the added column changes
nothing (PostgreSQL reads a bare name as a column before a table alias)."""

from __future__ import annotations

import os

from activities.backup.drill import checksums
from lab.scratch_postgres import scratch_connect, scratch_postgres

PORT = 17978 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000


def test_a_checksum_covers_the_whole_row_even_with_a_column_named_like_its_alias():
    """The query aliases the table t. With a column named t, md5(t::text) summed that column
    alone: a restored copy differing in any other column passed the drill as identical."""
    with scratch_postgres(PORT, "drill-checksums"), \
            scratch_connect(PORT) as c:
        c.execute("create table tt (id int primary key, t text, v text)")
        c.execute("insert into tt select g, 'same', 'v' || g from generate_series(1, 100) g")
        before = checksums(c, ["public.tt"])
        c.execute("update tt set v = 'changed' where id = 42")
        after = checksums(c, ["public.tt"])
    assert before[0].rows == after[0].rows == 100
    assert before[0].checksum != after[0].checksum


def test_a_consistency_range_splits_a_key_named_like_its_row_counter():
    """A consistency check cuts a non-integer key's range at every n-th key, counting rows in a
    column it named rn: a key column named rn made two, and every check and bisect of the
    table failed ("column reference rn is ambiguous")."""
    from activities.consistency.ranges import Range, split
    from activities.consistency.tables import list_tables

    with scratch_postgres(PORT, "range-split"), \
            scratch_connect(PORT) as c:
        c.execute("create table codes (rn text, region text, v text, primary key (rn, region))")
        c.execute("insert into codes select 'c' || lpad(g::text, 4, '0'), 'eu', 'v' from generate_series(1, 400) g")
        table = list_tables(c, ["codes"], "table")[0]
        got = split([c], table, Range(), parts=4, rows=400)
    assert [r.lo for r in got] == [None, ["c0101", "eu"], ["c0201", "eu"], ["c0301", "eu"]]
    assert got[-1].hi is None
