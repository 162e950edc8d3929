"""The loser's changed rows streamed from the old primary to the survivor, COPY to COPY.

``apply_resolutions`` takes either rows already in Python (a list or any iterable of dicts)
or a ``LoserCopy``: a query the caller runs on the loser, whose output goes through
``COPY (...) TO STDOUT`` there and ``COPY ... FROM STDIN`` into the survivor's temp table one
block at a time. Python then holds one block (about a network buffer), not the rows: the
worker's memory stays flat however large the divergence, and no row is parsed into Python
objects and dumped again.

Text format, not binary: binary COPY needs the two sides' column types to match exactly
(a domain or an altered type on one side fails it), while text is what pg_dump relies on
between servers. The loser session's output settings are pinned the way pg_dump pins them,
so a value reads back on the survivor as the loser wrote it whatever either server's
defaults are: ISO dates, postgres interval style, floats with every digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

# What pg_dump sets before its COPYs, for the same reason.
OUTPUT_SETTINGS = ("set local datestyle = 'ISO, YMD'", "set local intervalstyle = 'postgres'",
                    "set local extra_float_digits = 3", "set local bytea_output = 'hex'")
# The ones of those that also change how text is read back (a date's field order, an
# interval's signs): what the reading side sets while it parses text written under them.
OUTPUT_STYLES = {"DateStyle": "ISO, YMD", "IntervalStyle": "postgres"}


def pin_output_keeping_input(conn: psycopg.Connection) -> dict[str, str]:
    """In ``conn``'s open transaction: values written in forms any session reads back alike
    (ISO dates with numeric offsets inside a range, where SQL style wrote a zone abbreviation
    that another session's timezone_abbreviations can read as another zone), without changing
    how an operator's literals read there (row recovery's WHERE). DateStyle's field order
    (DMY) and an sql_standard IntervalStyle decide how input is read, so they stay; the rest
    is output only (PostgreSQL's datetime input reads DateOrder alone). Returns the settings
    another session reads the text back under."""
    cur = conn.cursor(row_factory=tuple_row)
    order, interval, digits = cur.execute(
        "select split_part(current_setting('DateStyle'), ', ', 2), current_setting('IntervalStyle'),"
        " current_setting('extra_float_digits')::int").fetchone()
    styles = {"DateStyle": f"ISO, {order or 'MDY'}",
              # postgres, postgres_verbose and iso_8601 read input alike.
              "IntervalStyle": interval if interval == "sql_standard" else "postgres"}
    for name, value in styles.items():
        cur.execute("select set_config(%s, %s, true)", (name, value))
    if digits < 1:
        cur.execute("set local extra_float_digits = 1")  # below 1, a float8 is written rounded
    return styles



@dataclass(frozen=True)
class LoserCopy:
    """The loser's changed rows as ``query`` on ``conn`` (open on the loser; read-only is
    enough). The query's output must name every column of the table being reconciled (extra
    columns are ignored, order does not matter); each output row is one changed row, one per
    key. The caller keeps ``conn`` open until ``apply_resolutions`` returns."""

    conn: psycopg.Connection
    query: sql.Composable

    def stream_into(self, dest: psycopg.Copy, names: list[str]) -> int:
        """Run the query through COPY on the loser and write every block to ``dest`` (a
        ``COPY ... FROM STDIN`` in text format whose columns are ``names`` plus the
        ``_e_deleted`` flag). Returns the bytes sent."""
        cols = sql.SQL(", ").join(sql.SQL("q.{}").format(sql.Identifier(n)) for n in names)
        sent = 0
        # One transaction: the settings stay local to it, and one snapshot covers the read.
        with self.conn.transaction(), self.conn.cursor() as cur:
            for setting in OUTPUT_SETTINGS:
                cur.execute(setting)
            with cur.copy(sql.SQL("copy (select {}, false from ({}) q) to stdout").format(cols, self.query)) as src:
                for block in src:
                    dest.write(block)
                    sent += len(block)
        return sent
