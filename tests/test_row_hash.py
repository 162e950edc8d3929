"""The row digest a consistency check compares (activities/consistency/rowhash.py), on a real
PostgreSQL: two databases of one throwaway server as the two sides, compared by compare_table.

Every column kind the digest treats its own way must show a one-cell change as exactly that
key: chained NOT NULL columns, the record of nullable ones (NULL to a value and back), a type
hashed by its text form, timestamptz, a case-only change under a nondeterministic collation.
And the things a per-column digest could get wrong: values exchanged between two rows, the
same columns in another physical order, other columns on the other side."""

from __future__ import annotations

import psycopg
import pytest

from activities.consistency.check import compare_table
from activities.consistency.ranges import connect
from activities.consistency.rowhash import SchemaDiffers, row_hash
from activities.consistency.tables import list_tables
from lab.scratch_postgres import scratch_postgres
from tests.conftest import PORT_SHIFT

PORT = 17980 + PORT_SHIFT - 2000
ROWS = 3000

_TYPES = [
    "create type mood as enum ('calm', 'busy')",
    "create domain label as text check (value <> '')",
    "create collation ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
]
# Every way rowhash.py hashes a column: NOT NULL with a direct function (bigint, varchar via
# text, text under a nondeterministic collation, a domain, float8), timestamptz (NOT NULL and
# nullable), nullable and indirect types in the record (boolean, date, bytea), and by their
# text: types with no hash function at all (json, point), an enum, and types whose hash leaves
# part of the value out (numeric, jsonb, arrays).
_COLUMNS = [
    ("id", "bigint primary key", "g"),
    ("v", "varchar(20) not null", "'v' || g"),
    ("ci", "text collate ci not null", "'name-' || g"),
    ("dom", "label not null", "'d' || g"),
    ("jb", "jsonb not null", "jsonb_build_object('n', g)"),
    ("num", "numeric not null", "g * 1.5"),
    ("f", "float8 not null", "g / 3.0"),
    ("ts", "timestamptz not null", "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 s'"),
    ("tsn", "timestamptz", "case when g % 2 = 0 then timestamptz '2026-01-01 00:00:00+00' + g * interval '1 s' end"),
    ("flag", "boolean not null", "g % 2 = 0"),
    ("day", "date", "date '2026-01-01' + (g % 300)"),
    ("raw", "bytea", "decode(md5(g::text), 'hex')"),
    ("m", "mood not null", "(array['calm', 'busy'])[1 + g % 2]::mood"),
    ("arr", "int[]", "array[g, g + 1]"),
    ("note", "text", "case when g % 3 = 0 then 'n' || g end"),
    ("js", "json not null", "json_build_object('g', g)"),
    ("pt", "point", "point(g, g)"),
    # OID-valued: 't' is another OID in each database, the same table name on both.
    ("rc", "regclass not null", "'t'::regclass"),
    ("amount", "money not null", "(g * 2)::money"),
    ("tags", "text[] collate ci", "array['tag-' || g]"),
    ("debit", "float8 not null", "case when g % 2 = 0 then 0 else g end"),
    ("credit", "float8 not null", "case when g % 2 = 0 then g else 0 end"),
    ("fz", "float8", "case when g % 5 = 0 then 0 end"),
    ("jz", "jsonb", "case when g % 5 = 0 then '{}'::jsonb end"),
    # Types whose own hash leaves part of the value out: by their text.
    ("signed", "numeric not null", "g * 1.5"),
    ("special", "numeric", "case when g % 2 = 0 then 'NaN'::numeric end"),
    ("shape", "jsonb not null", "'{}'::jsonb"),
    ("dims", "int[] not null", "array[g, g + 1, g + 2, g + 3]"),
    ("scale", "numeric not null", "1.5"),
]
# One changed cell per column, each on its own row: (key, statement on B).
_CHANGES = [
    (11, "update t set v = v || 'x' where id = 11"),  # the first character kept: char(1) would miss it
    (12, "update t set ci = upper(ci) where id = 12"),  # equal under the collation, not the same value
    (13, "update t set dom = 'other' where id = 13"),
    (14, "update t set jb = '{\"n\": -1}' where id = 14"),
    (15, "update t set num = num + 0.1 where id = 15"),
    (16, "update t set f = f + 1e-9 where id = 16"),
    (17, "update t set ts = ts + interval '1 microsecond' where id = 17"),
    (18, "update t set tsn = null where id = 18"),  # a value to NULL
    (19, "update t set tsn = now() where id = 19"),  # NULL to a value
    (20, "update t set flag = not flag where id = 20"),
    (21, "update t set day = null where id = 21"),
    (22, "update t set raw = '\\x00' where id = 22"),
    (23, "update t set m = case m when 'calm' then 'busy'::mood else 'calm'::mood end where id = 23"),
    (24, "update t set arr = array[24] where id = 24"),
    (25, "update t set note = 'now set' where id = 25"),  # NULL to a value (25 is not a multiple of 3)
    (26, "update t set js = '{\"g\": 0}' where id = 26"),
    (27, "update t set pt = point(0, 0) where id = 27"),
    (28, "update t set amount = amount + 1::money where id = 28"),
    (29, "update t set tags = array['TAG-29'] where id = 29"),  # case only, under the collation
    (30, "update t set (debit, credit) = (credit, debit) where id = 30"),  # 0 and 30 exchanged
    (31, "update t set fz = 0 where id = 31"),  # NULL to a float zero (whose hash is its seed)
    (32, "update t set jz = '{}' where id = 32"),  # NULL to an empty jsonb (the same)
    # numeric's hash has no sign, no difference between NaN and the infinities; jsonb's none
    # between {} and [] nor a number's sign; an array's no dimensions: each hashed alike.
    (33, "update t set signed = -signed where id = 33"),
    (34, "update t set special = 'Infinity' where id = 34"),
    (35, "update t set shape = '[]' where id = 35"),
    (36, "update t set jb = '{\"n\": -36}' where id = 36"),
    (37, "update t set dims = array[[37, 38], [39, 40]] where id = 37"),
    (38, "update t set scale = 1.50 where id = 38"),  # equal as numbers, not as they print
]


@pytest.fixture(scope="module")
def server():
    with scratch_postgres(PORT, "rowhash") as node:
        with psycopg.connect(node.cfg.dsn(), autocommit=True) as c:
            c.execute("drop database if exists side_a")
            c.execute("drop database if exists side_b")
            c.execute("create database side_a")
            c.execute("create database side_b")
        yield node


def _fill(conn: psycopg.Connection, columns=_COLUMNS) -> None:
    conn.execute("drop table if exists t")
    for ddl in _TYPES:
        try:
            conn.execute(ddl)
        except psycopg.errors.DuplicateObject:
            pass
    conn.execute("create table t (" + ", ".join(f"{n} {ty}" for n, ty, _ in columns) + ")")
    conn.execute("insert into t (" + ", ".join(n for n, _, _ in columns) + ") select " +
                 ", ".join(e for _, _, e in columns) + f" from generate_series(1, {ROWS}) g")


@pytest.fixture()
def sides(server):
    dsn_a, dsn_b = server.cfg.dsn("side_a"), server.cfg.dsn("side_b")
    with psycopg.connect(dsn_a, autocommit=True) as a, psycopg.connect(dsn_b, autocommit=True) as b:
        _fill(a)
        _fill(b)
        yield dsn_a, dsn_b, a, b


def _compare(dsn_a: str, dsn_b: str):
    with connect(dsn_a) as c:
        table = list_tables(c, ["t"])[0]
    return compare_table(dsn_a, dsn_b, table, follower=False, chunk_rows=500, parallel=2, max_lag=30, cap=100,
                         resume=None, beat=lambda pos: None)


def test_identical_sides_have_no_difference_and_every_changed_cell_is_its_key(sides):
    dsn_a, dsn_b, _, b = sides
    same = _compare(dsn_a, dsn_b)
    assert (same.rows_a, same.rows_b, same.differences) == (ROWS, ROWS, 0), same
    # json and point have no hash function, and the enum's hash is its label's OID (not the same
    # in the two databases: with it, every row differed): hashed by their text, and said so.
    assert same.row_hash == "hash+text"
    for _, stmt in _CHANGES:
        assert b.execute(stmt).rowcount == 1, stmt
    res = _compare(dsn_a, dsn_b)
    assert sorted(int(k[0]) for k in res.diff.updated_keys) == [k for k, _ in _CHANGES], res.diff
    assert (res.diff.inserted, res.diff.deleted, res.diff.updated) == (0, 0, len(_CHANGES))


def test_values_exchanged_between_two_rows_are_both_found(sides):
    """An XOR of independent column hashes would cancel here: the range's digest is the same
    multiset of (column, value) pairs. The chained digest ties each value to its row's key."""
    dsn_a, dsn_b, _, b = sides
    b.execute("update t set v = case id when 101 then 'v202' else 'v101' end, "
              "tsn = case id when 101 then (select tsn from t where id = 202) else null end where id in (101, 202)")
    res = _compare(dsn_a, dsn_b)
    assert sorted(int(k[0]) for k in res.diff.updated_keys) == [101, 202], res.diff


def test_the_same_columns_in_another_order_are_the_same_rows(sides):
    dsn_a, dsn_b, _, b = sides
    _fill(b, list(reversed(_COLUMNS)))
    res = _compare(dsn_a, dsn_b)
    assert (res.rows_b, res.differences) == (ROWS, 0), res


def test_other_columns_on_the_other_side_are_named_not_compared(sides):
    dsn_a, dsn_b, a, b = sides
    b.execute("alter table t add column extra int")
    b.execute("alter table t alter column f type numeric")
    with connect(dsn_a) as ca, connect(dsn_b) as cb:
        table = list_tables(ca, ["t"])[0]
        with pytest.raises(SchemaDiffers) as e:
            row_hash(ca, cb, table)
    assert "only on B: extra (integer)" in str(e.value), e.value
    assert "f (double precision on A, numeric on B)" in str(e.value), e.value
    assert "only on A" not in str(e.value)


def test_a_table_of_hashable_types_is_hashed_without_text(sides):
    dsn_a, dsn_b, a, b = sides
    cols = [c for c in _COLUMNS if c[0] not in ("js", "pt", "m", "rc", "amount", "jb", "num", "arr", "tags", "jz",
                                                "signed", "special", "shape", "dims", "scale")]
    _fill(a, cols)
    _fill(b, cols)
    res = _compare(dsn_a, dsn_b)
    assert (res.row_hash, res.differences) == ("hash", 0), res
    b.execute("update t set ci = upper(ci) where id = 7")
    assert _compare(dsn_a, dsn_b).diff.updated_keys == [["7"]]


def test_a_wide_table_is_hashed_and_a_change_in_its_last_columns_found(sides):
    """Past rowhash.MAX_CHAIN chained columns the rest go into the record: no nesting deep enough
    to meet the server's stack limit, and those columns still count."""
    dsn_a, dsn_b, a, b = sides
    cols = [("id", "bigint primary key", "g")] + [(f"c{i}", "int not null", f"g + {i}") for i in range(400)]
    _fill(a, cols)
    _fill(b, cols)
    assert _compare(dsn_a, dsn_b).differences == 0
    b.execute("update t set c399 = -1 where id = 9")
    assert _compare(dsn_a, dsn_b).diff.updated_keys == [["9"]]
