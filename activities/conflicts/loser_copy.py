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

from activities.postgres.output_styles import pin_output

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
            pin_output(self.conn)
            with cur.copy(sql.SQL("copy (select {}, false from ({}) q) to stdout").format(cols, self.query)) as src:
                for block in src:
                    dest.write(block)
                    sent += len(block)
        return sent
