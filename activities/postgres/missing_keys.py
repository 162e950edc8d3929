"""Keys one server has that another lacks, compared on the server, never in the worker.

A failback that reads a table in full asks which of the survivor's unchanged rows the old
primary deleted. It once read every key of both sides into Python sets: for a table of
hundreds of millions of rows, gigabytes of worker memory in the middle of a runbook. Here the
other side's keys go COPY to COPY into a temp table on this side, and this side's query finds
the ones missing there with an anti-join; only the answer (the divergence) comes back.

Not for row recovery (backup/recover.py) as it stands: there both queries hold the operator's
WHERE, and the other side's second read, under the relay's pinned DateStyle, could select
other rows than the read of the rows did (a date literal read day first). Its keys would have
to come from the one read of its rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from activities.conflicts.loser_copy import OUTPUT_SETTINGS
from activities.conflicts.resolve_sql import same_key

_KEYS = sql.SQL("pg_temp._eagle_dr_other_keys")


def keys_missing_there(here: psycopg.Connection, here_query: sql.Composable, params: Sequence,
                       there: psycopg.Connection, there_query: sql.Composable, like: sql.Composable,
                       key: list[str]) -> list[tuple]:
    """The keys ``here_query`` gives on ``here`` that ``there_query`` does not give on ``there``.
    Both queries select exactly the ``key`` columns, named so; ``like`` is the table whose key
    columns' types the temp table takes. ``here_query`` runs in a read-only transaction (it can
    hold an operator's predicate), and so does ``there_query``. Both connections are in
    autocommit mode; the temp table lives on ``here`` for the call only.

    A key with a NULL part (a nullable unique key) matches a NULL there, as a Python tuple
    comparison did, in a query of its own so that the rest keeps a hash anti-join on "="."""
    bare = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    try:
        # The bytes go from one session to the other as they are: both in one encoding, or a
        # key in another (café under LATIN1) would match nothing and come out as missing.
        with here.transaction():
            here.execute("set local client_encoding = 'UTF8'")
            here.execute(sql.SQL("create temp table {} as select {} from {} with no data").format(_KEYS, bare, like))
            with there.transaction(), there.cursor() as src_cur:
                src_cur.execute("set transaction read only")
                for setting in (*OUTPUT_SETTINGS, "set local client_encoding = 'UTF8'"):
                    src_cur.execute(setting)
                with src_cur.copy(sql.SQL("copy ({}) to stdout").format(there_query)) as src, \
                        here.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(_KEYS, bare)) as dst:
                    for block in src:
                        dst.write(block)
            here.execute(sql.SQL("analyze {}").format(_KEYS))
        some_null = sql.SQL(" or ").join(sql.SQL("h.{} is null").format(sql.Identifier(k)) for k in key)
        other_null = sql.SQL(" or ").join(sql.SQL("o.{} is null").format(sql.Identifier(k)) for k in key)
        alike = sql.SQL(" and ").join(sql.SQL("o.{0} is not distinct from h.{0}").format(sql.Identifier(k))
                                      for k in key)
        with here.transaction():
            here.execute("set transaction read only")
            # The anti-join hashes every key of the other side; at the default 4 MB it spills.
            here.execute("set local work_mem = '64MB'")
            cur = here.cursor(row_factory=tuple_row)
            return [tuple(r) for r in cur.execute(sql.SQL(
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
    finally:
        if not here.closed:
            here.execute(sql.SQL("drop table if exists {}").format(_KEYS))
