"""``eagle_dr.consistency_runs`` on the primary: one row per check, append-only (a check never
updates or deletes an earlier one's row: the table is the history of what checks found)."""

from __future__ import annotations

import json
from datetime import datetime

import psycopg

_DDL = """
create schema if not exists eagle_dr;
create table if not exists eagle_dr.consistency_runs (
    id           bigserial primary key,
    workflow_id  text not null,
    run_id       text not null,
    started_at   timestamptz not null,
    finished_at  timestamptz not null default now(),
    region_a     text not null,
    region_b     text not null,
    outcome      text not null,
    differences  bigint not null,
    result       jsonb not null,
    unique (workflow_id, run_id)
)"""


def record_run(dsn: str, *, workflow_id: str, run_id: str, started_at: datetime, region_a: str, region_b: str,
               outcome: str, differences: int, result: dict) -> int | None:
    """The run's row; a retried activity (same run) finds it there and adds none."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(_DDL)
        row = conn.execute(
            "insert into eagle_dr.consistency_runs (workflow_id, run_id, started_at, region_a, region_b, outcome, "
            "differences, result) values (%s, %s, %s, %s, %s, %s, %s, %s) on conflict (workflow_id, run_id) "
            "do nothing returning id",
            (workflow_id, run_id, started_at, region_a, region_b, outcome, differences, json.dumps(result))).fetchone()
        return row[0] if row else None


def read_run(dsn: str, workflow_id: str) -> dict | None:
    """The newest recorded result of a check's workflow id (None: not recorded here)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("select to_regclass('eagle_dr.consistency_runs')").fetchone()[0] is None:
            return None
        row = conn.execute("select result from eagle_dr.consistency_runs where workflow_id = %s "
                           "order by id desc limit 1", (workflow_id,)).fetchone()
        return row[0] if row else None
