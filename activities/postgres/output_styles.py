"""How a session writes values as text, where another session reads that text back.

Rows cross between servers as text (COPY's text format, or JSON whose dates are ISO but
whose ranges and intervals inside are their text forms), and a value reads back as written
only if both sessions agree on the forms: DateStyle's field order (05/03 is May or March),
IntervalStyle's signs, a float's digits. pg_dump pins them before its COPYs; so do the
runbooks, except where an operator's own SQL runs in the same session (row recovery's
WHERE), whose literals must keep reading as the operator meant them.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import tuple_row

# What pg_dump sets before its COPYs, for the same reason.
_PINNED = {"DateStyle": "ISO, YMD", "IntervalStyle": "postgres", "extra_float_digits": "3", "bytea_output": "hex"}
# The ones of those that also change how text is read back (a date's field order, an
# interval's signs): what the reading side sets while it parses text written under them.
OUTPUT_STYLES = {"DateStyle": "ISO, YMD", "IntervalStyle": "postgres"}


def pin_output(conn: psycopg.Connection, local: bool = True) -> None:
    """pg_dump's output settings on ``conn``: for its open transaction (``local``), or for the
    session (a connection of the runbook's own, such as the isolated old primary's)."""
    cur = conn.cursor(row_factory=tuple_row)
    for name, value in _PINNED.items():
        cur.execute("select set_config(%s, %s, %s)", (name, value, local))


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
