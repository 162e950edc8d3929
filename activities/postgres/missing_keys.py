"""Keys one server has that another lacks, compared on the server, never in the worker.

A failback that reads a table in full asks which of the survivor's unchanged rows the old
primary deleted. It once read every key of both sides into Python sets: for a table of
hundreds of millions of rows, gigabytes of worker memory in the middle of a runbook. Here the
other side's keys go into a temp table on this side, and this side's query finds the ones
missing there with an anti-join; only the answer (the divergence) comes back.

Two ways in, for two callers:
- ``relay``: COPY to COPY from the other server (failback), the bytes as they are, both
  sessions pinned to one encoding and one output style;
- ``load_json``: one JSON object per key, written to a file by the caller while it streams
  the other side's rows (row recovery, backup/recover.py). Its keys must come from its one
  read of the rows: a second read, under pinned output settings, could select other rows
  than the first (the operator's WHERE with a date literal read day first). JSON writes dates
  in ISO 8601 whatever the session's DateStyle; text inside it (a daterange) is read back
  under the writer's DateStyle; the file is UTF-8, whatever either session's encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from activities.postgres.output_styles import pin_output, pin_output_keeping_input
from activities.postgres.row_spool import copy_text
from activities.conflicts.resolve_sql import same_key

_KEYS = sql.SQL("pg_temp._eagle_dr_other_keys")
_KEYS_JSON = sql.SQL("pg_temp._eagle_dr_other_keys_json")


class OtherKeys:
    """The other side's keys in a temp table on ``here`` (an autocommit connection) for the
    ``with`` block. ``like`` is the table whose key columns' types the temp table takes."""

    def __init__(self, here: psycopg.Connection, like: sql.Composable, key: list[str]):
        self.here, self.like, self.key = here, like, key
        self._bare = sql.SQL(", ").join(sql.Identifier(k) for k in key)

    def __enter__(self) -> OtherKeys:
        self.here.execute(sql.SQL("create temp table {} as select {} from {} with no data").format(
            _KEYS, self._bare, self.like))
        return self

    def __exit__(self, *exc) -> None:
        if not self.here.closed:
            self.here.execute(sql.SQL("drop table if exists {}").format(_KEYS))

    def relay(self, there: psycopg.Connection, there_query: sql.Composable) -> None:
        """``there_query``'s keys (exactly the key columns, named so), run on ``there`` (an
        autocommit connection) in a read-only transaction."""
        here = self.here
        # The bytes go from one session to the other as they are: both in one encoding, or a
        # key in another (café under LATIN1) would match nothing and come out as missing.
        with here.transaction():
            here.execute("set local client_encoding = 'UTF8'")
            with there.transaction(), there.cursor() as src_cur:
                src_cur.execute("set transaction read only")
                pin_output(there)
                src_cur.execute("set local client_encoding = 'UTF8'")
                with src_cur.copy(sql.SQL("copy ({}) to stdout").format(there_query)) as src, \
                        here.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(_KEYS, self._bare)) as dst:
                    for block in src:
                        dst.write(block)
            here.execute(sql.SQL("analyze {}").format(_KEYS))

    @staticmethod
    @contextmanager
    def writer(path: Path) -> Iterator[Callable[[str], None]]:
        """A writer of the file ``load_json`` reads: one key per call, as a JSON object."""
        with path.open("w", encoding="utf-8", newline="\n") as out:
            yield lambda key_json: out.write(copy_text(key_json) + "\n")

    def load_json(self, path: Path, settings: Mapping[str, str]) -> None:
        """Keys from ``path``: one JSON object (column name to value, as ``row_to_json`` gives
        it) per line, in COPY's text format. The caller writes the file while it streams the
        other side's rows, so that no transaction stays open here meanwhile (it held back
        vacuum on a live primary, and a role's statement_timeout cancelled the COPY).
        ``settings``: the writing session's DateStyle and IntervalStyle, under which the text
        inside the JSON (a daterange key) was written and is read back here."""
        here = self.here
        with here.transaction():
            # Our own bulk load, bounded by the file, not by a timeout meant for the application.
            here.execute("set local statement_timeout = 0")
            # The file is UTF-8: a key a LATIN1 session cannot hold would fail the COPY.
            here.execute("set local client_encoding = 'UTF8'")
            for name, value in settings.items():
                here.execute("select set_config(%s, %s, true)", (name, value))
            here.execute(sql.SQL("create temp table {} (j json) on commit drop").format(_KEYS_JSON))
            with path.open(encoding="utf-8", newline="\n") as f, \
                    here.cursor().copy(sql.SQL("copy {} (j) from stdin").format(_KEYS_JSON)) as dst:
                while block := f.read(1 << 20):
                    dst.write(block)
            # PostgreSQL's own JSON-to-row conversion into the key columns' types, as the apply does.
            here.execute(sql.SQL("insert into {k} select (json_populate_record(null::{k}, j)).* from {j}").format(
                k=_KEYS, j=_KEYS_JSON))
            here.execute(sql.SQL("analyze {}").format(_KEYS))

    def missing(self, here_query: sql.Composable, params: Sequence | None = None,
                pin_output: bool = False) -> list[tuple]:
        """The keys ``here_query`` (exactly the key columns, named so) gives on ``here`` that
        the temp table lacks. It runs in a read-only transaction, as one statement of the
        extended protocol (``stream`` forces it, whatever the connection's prepare settings):
        it can hold an operator's predicate, which as a simple query could add statements.

        A key with a NULL part (a nullable unique key) matches a NULL there, as a Python tuple
        comparison did, in a query of its own so that the rest keeps a hash anti-join on "=".
        ``pin_output``: the values' text in the forms pin_output_keeping_input gives (the other
        side's read of an operator's WHERE had them)."""
        key = self.key
        some_null = sql.SQL(" or ").join(sql.SQL("h.{} is null").format(sql.Identifier(k)) for k in key)
        other_null = sql.SQL(" or ").join(sql.SQL("o.{} is null").format(sql.Identifier(k)) for k in key)
        alike = sql.SQL(" and ").join(sql.SQL("o.{0} is not distinct from h.{0}").format(sql.Identifier(k))
                                      for k in key)
        here = self.here
        with here.transaction():
            here.execute("set transaction read only")
            # The anti-join hashes every key of the other side; at the default 4 MB it spills.
            here.execute("set local work_mem = '64MB'")
            if pin_output:
                pin_output_keeping_input(here)
            cur = here.cursor(row_factory=tuple_row)
            return [tuple(r) for r in cur.stream(sql.SQL(
                # The NULL branch compares only with the other side's keys that have a NULL
                # too (no hash on "is not distinct from": each of its rows scans them).
                "with h as ({q}), n as materialized (select * from {keys} o where {other_null})"
                " select * from h where not ({some_null}) and not exists (select from {keys} o where {same})"
                " union all select * from h where ({some_null}) and not exists (select from n o where {alike})"
            ).format(q=here_query, some_null=some_null, other_null=other_null, keys=_KEYS,
                     same=same_key("h", "o", key), alike=alike),
                # None, not (): with parameters psycopg reads every % as a placeholder, and an
                # operator's WHERE can hold a LIKE pattern.
                params or None)]


def keys_missing_there(here: psycopg.Connection, here_query: sql.Composable, params: Sequence,
                       there: psycopg.Connection, there_query: sql.Composable, like: sql.Composable,
                       key: list[str]) -> list[tuple]:
    """The keys ``here_query`` gives on ``here`` that ``there_query`` does not give on ``there``
    (both select exactly the ``key`` columns, named so; both connections in autocommit mode)."""
    with OtherKeys(here, like, key) as other:
        other.relay(there, there_query)
        return other.missing(here_query, params)
