"""Unlogged tables and sequences: the relations no move carries.

PostgreSQL never writes an unlogged relation to WAL. A standby, a restored backup and a
promoted node hold only its empty init fork, and an unlogged sequence on the new primary
starts again from its start value (it hands out keys that were handed out before). So every
failover and switchover loses their contents, whatever the RPO of the logged data, and a
consistency check cannot compare them. eagle-dr cannot carry them; it can say so: the
readiness check warns while any exist, the runbooks name them in their RPO, and the
consistency check lists them as not compared.

The catalog is replicated, so a standby knows their names; only a primary (or a node that
ran as one) has their data, so only there is a size read.
"""

from __future__ import annotations

import psycopg
from pydantic import BaseModel

from eagle_dr.config import PostgresConfig, scrubbed_first_line

# Tables and sequences (partitions as leaves; a partitioned parent has no storage of its own).
# The size is the main fork's: on a standby the file is absent or empty and reading it is
# pointless, so the caller asks for sizes only on a primary.
_UNLOGGED = """
select n.nspname || '.' || c.relname, case c.relkind when 'S' then 'sequence' else 'table' end,
       case when %(sizes)s and c.relkind = 'r' then pg_relation_size(c.oid) end
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relpersistence = 'u' and c.relkind in ('r', 'S')
  and n.nspname not in ('pg_catalog', 'information_schema', 'eagle_dr') and n.nspname not like 'pg\\_%%'
order by 3 desc nulls last, 1
limit 500"""  # bounds a probe's result; a database with more has bigger problems than this list


class Unlogged(BaseModel):
    name: str  # schema.relation
    kind: str  # "table" | "sequence"
    # Bytes of data a move would lose (main fork, on the primary); None where not read.
    bytes: int | None = None


def unlogged_relations(conn: psycopg.Connection, sizes: bool) -> list[Unlogged]:
    """The database's unlogged tables and sequences, largest first when ``sizes``."""
    return [Unlogged(name=r[0], kind=r[1], bytes=r[2])
            for r in conn.execute(_UNLOGGED, {"sizes": sizes}).fetchall()]


def describe(rels: list[Unlogged], most: int = 5) -> str:
    """'public.cache (12.0 MiB), public.seq_x (sequence), and 3 more'."""
    def one(u: Unlogged) -> str:
        if u.kind == "sequence":
            return f"{u.name} (sequence)"
        return f"{u.name} ({u.bytes / 1048576:.1f} MiB)" if u.bytes is not None else u.name
    head = ", ".join(one(u) for u in rels[:most])
    return head + (f", and {len(rels) - most} more" if len(rels) > most else "")


# PostgreSQL 15 does not flush an unlogged sequence's init fork when a standby replays its
# creation (seq_redo only dirties the buffer; the init forks of tables and indexes are flushed).
# Promotion copies init forks to main forks from disk, so a sequence created or reset since the
# standby's last restartpoint comes up as a zero page: every nextval() fails with "bad magic
# number" until it is recreated or the node restarts through crash recovery. Seen on 15.18.
_SEQUENCES = """
select c.oid, n.nspname || '.' || c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relpersistence = 'u' and c.relkind = 'S'
  and n.nspname not in ('pg_catalog', 'information_schema', 'eagle_dr') and n.nspname not like 'pg\\_%'
order by 2"""


def unreadable_sequences(conn: psycopg.Connection) -> list[str]:
    """On a primary (autocommit): each unlogged sequence whose page cannot be read, with why."""
    out = []
    for oid, name in conn.execute(_SEQUENCES).fetchall():
        try:
            conn.execute("select pg_sequence_last_value(%s::oid::regclass)", (oid,))
        except psycopg.errors.InternalError_ as e:  # XX000: "bad magic number", unreadable page
            out.append(f"{name}: {scrubbed_first_line(e)}")
        except psycopg.Error:
            pass  # dropped meanwhile, no privilege: not this fault
    return out


def flush_init_forks(primary: PostgresConfig, standby: PostgresConfig, timeout_s: float, heartbeat=None) -> str:
    """Before a planned promotion of ``standby``: make it write every replayed page to disk,
    the unlogged sequences' init forks among them (see above). A CHECKPOINT on the primary
    gives the standby a checkpoint record to take a restartpoint at (without a new one it
    skips the restartpoint and flushes nothing); once that is replayed, a CHECKPOINT on the
    standby performs the restartpoint. Idempotent. Returns the primary's checkpoint record's LSN."""
    from activities.postgres.standby import wait_replayed_past
    from activities.postgres.status import connect

    with connect(primary, 10) as conn:
        conn.execute("checkpoint")
        # Where the checkpoint record starts: replayed strictly past it = the record replayed.
        (lsn,) = conn.execute("select checkpoint_lsn::text from pg_control_checkpoint()").fetchone()
    wait_replayed_past(standby, lsn, timeout_s, heartbeat=heartbeat)
    with connect(standby, 10) as conn:
        conn.execute("checkpoint")  # on a standby: a restartpoint, every dirty buffer written
    return lsn
