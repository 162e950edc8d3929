"""The restore drill's table checksums on a real PostgreSQL 15 (port 17978 + the test port
shift): a checksum covers the whole row, whatever the table's columns are called."""

from __future__ import annotations

import os

import psycopg

from activities.backup.drill import checksums
from lab.scratch_postgres import scratch_postgres

PORT = 17978 + int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000


def test_a_checksum_covers_the_whole_row_even_with_a_column_named_like_its_alias():
    """The query aliases the table t. With a column named t, md5(t::text) summed that column
    alone: a restored copy differing in any other column passed the drill as identical."""
    with scratch_postgres(PORT, "drill-checksums") as n, \
            psycopg.connect(host="127.0.0.1", port=PORT, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute("create table tt (id int primary key, t text, v text)")
        c.execute("insert into tt select g, 'same', 'v' || g from generate_series(1, 100) g")
        before = checksums(c, ["public.tt"])
        c.execute("update tt set v = 'changed' where id = 42")
        after = checksums(c, ["public.tt"])
    assert before[0].rows == after[0].rows == 100
    assert before[0].checksum != after[0].checksum
