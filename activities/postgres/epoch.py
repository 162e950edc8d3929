"""The DR epoch: a fencing token that only ever goes up, stored in the database itself.

Every failover or switchover takes the next epoch and writes it into the new primary as
soon as it is writable. The row replicates to the standby, so whichever node survives
knows the latest epoch. Side-effecting steps carry their run's epoch and refuse to act
when a higher one is already recorded: a stale activity from a superseded run (retried
after a long partition, say) can never move anything back.
"""

from __future__ import annotations

from datetime import datetime

import psycopg
from pydantic import BaseModel

from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig

SCHEMA = """
create schema if not exists eagle_dr;
create table if not exists eagle_dr.dr_epoch (
    service     text primary key,
    epoch       bigint not null,
    region      text not null,
    workflow_id text not null,
    run_id      text not null,
    updated_at  timestamptz not null default clock_timestamp()
);
create table if not exists eagle_dr.dr_epoch_history (
    service     text not null,
    epoch       bigint not null,
    region      text not null,
    workflow_id text not null,
    run_id      text not null,
    recorded_at timestamptz not null default clock_timestamp(),
    primary key (service, epoch)
);
"""


class EpochRecord(BaseModel):
    service: str
    epoch: int
    region: str | None = None
    workflow_id: str | None = None
    run_id: str | None = None
    updated_at: datetime | None = None


class StaleEpoch(RuntimeError):
    """A newer runbook already holds a higher epoch."""


def read_epoch(cfg: PostgresConfig, service: str) -> EpochRecord:
    """Works on a standby too (the table replicates); 0 when no runbook ever ran."""
    with connect(cfg) as conn:
        return read_epoch_on(conn, service)


def read_epoch_on(conn: psycopg.Connection, service: str) -> EpochRecord:
    """``read_epoch`` on an open session (0 when the table does not exist yet)."""
    if not conn.execute("select to_regclass('eagle_dr.dr_epoch') is not null").fetchone()[0]:
        return EpochRecord(service=service, epoch=0)
    return read_epoch_in(conn, service)


def highest_epoch(nodes: list[PostgresConfig], service: str) -> EpochRecord:
    """The highest record on any node that answers (a stopped or unreachable one is no evidence).
    Lifting a fence is checked against every node, not only the fenced one: a stopped old
    primary cannot be read, and a newer move records its epoch on the other region's primary."""
    best = EpochRecord(service=service, epoch=0)
    for cfg in nodes:
        try:
            got = read_epoch(cfg, service)
        except psycopg.Error:
            continue
        if got.epoch > best.epoch:
            best = got
    return best


def refuse_stale(held: EpochRecord, epoch: int, run_id: str | None = None, what: str = "act") -> None:
    """Raise ``StaleEpoch`` when ``held`` is newer than ``epoch`` (or, given ``run_id``, the
    same epoch held by another run: workflow ids are reused)."""
    other_run = run_id is not None and held.run_id is not None and held.run_id != run_id
    if held.epoch > epoch or (held.epoch == epoch and other_run):
        raise StaleEpoch(f"stale epoch {epoch}: epoch {held.epoch} is recorded by {held.workflow_id} "
                         f"(run {held.run_id}) in {held.region}; refusing to {what}")


def advance_epoch(cfg: PostgresConfig, service: str, epoch: int, region: str, workflow_id: str,
                  run_id: str) -> EpochRecord:
    """Record ``epoch`` on the (writable) primary. Idempotent for the same run; refuses to go back."""
    with connect(cfg) as conn:
        return advance_epoch_in(conn, service, epoch, region, workflow_id, run_id)


def advance_epoch_in(conn: psycopg.Connection, service: str, epoch: int, region: str, workflow_id: str,
                     run_id: str) -> EpochRecord:
    """``advance_epoch`` on a session already open to the primary (autocommit)."""
    conn.execute(SCHEMA)
    with conn.transaction():
        row = conn.execute("select epoch, workflow_id, run_id from eagle_dr.dr_epoch where service = %s "
                           "for update", (service,)).fetchone()
        if row is not None:
            # Tied to the run, not the workflow id: dr-move-<service> is reused by every
            # incident, and a late step of an old run must not pass as the new one's.
            if row[0] > epoch or (row[0] == epoch and row[2] != run_id):
                raise StaleEpoch(f"{service}: epoch {row[0]} is already held by {row[1]} (run {row[2]}); "
                                 f"refusing epoch {epoch}")
            if row[0] == epoch:
                return read_epoch_in(conn, service)
        conn.execute(
            "insert into eagle_dr.dr_epoch (service, epoch, region, workflow_id, run_id) values (%s,%s,%s,%s,%s) "
            "on conflict (service) do update set epoch = excluded.epoch, region = excluded.region, "
            "workflow_id = excluded.workflow_id, run_id = excluded.run_id, updated_at = clock_timestamp()",
            (service, epoch, region, workflow_id, run_id))
        conn.execute("insert into eagle_dr.dr_epoch_history (service, epoch, region, workflow_id, run_id) "
                     "values (%s,%s,%s,%s,%s) on conflict do nothing",
                     (service, epoch, region, workflow_id, run_id))
    return read_epoch_in(conn, service)


def read_epoch_in(conn: psycopg.Connection, service: str) -> EpochRecord:
    row = conn.execute("select epoch, region, workflow_id, run_id, updated_at from eagle_dr.dr_epoch "
                       "where service = %s", (service,)).fetchone()
    if row is None:
        return EpochRecord(service=service, epoch=0)
    return EpochRecord(service=service, epoch=row[0], region=row[1], workflow_id=row[2], run_id=row[3],
                       updated_at=row[4])


def epoch_history(cfg: PostgresConfig, service: str) -> list[EpochRecord]:
    with connect(cfg) as conn:
        if not conn.execute("select to_regclass('eagle_dr.dr_epoch_history') is not null").fetchone()[0]:
            return []
        rows = conn.execute("select epoch, region, workflow_id, run_id, recorded_at from eagle_dr.dr_epoch_history "
                            "where service = %s order by epoch", (service,)).fetchall()
    return [EpochRecord(service=service, epoch=r[0], region=r[1], workflow_id=r[2], run_id=r[3], updated_at=r[4])
            for r in rows]
