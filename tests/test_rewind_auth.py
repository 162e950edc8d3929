"""Failback when the new primary will not let pg_rewind in: the old primary's data directory,
the only copy of what it wrote, is never deleted for it.

On the real lab (password auth on): a forced failover, then a failback whose pg_rewind is
refused by the new primary's pg_hba.conf. Leaves the lab as it found it in shape: one
primary and a streaming standby (the second failback rewinds it for real).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from temporalio.client import WorkflowFailureError

from activities.postgres.credentials import source_failure
from activities.postgres.status import pg_status
from eagle_dr.launch import start_move
from tests.lab_helpers import _async, _awaiting, _lag_bytes, _primary, _until
from workflows.failback import FailbackInput, FailbackWorkflow
from workflows.models import ApprovalDecision, ApprovalPolicy, FailoverInput, SwitchoverInput

MARKER = "eagle-dr-test-marker"


def _sql(lab, region: str, *statements) -> None:
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        for stmt in statements:
            conn.execute(*stmt) if isinstance(stmt, tuple) else conn.execute(stmt)


def _reload(lab, region: str) -> None:
    node = lab.postgres(region)
    node.ctl.run([node.ctl.tool("pg_ctl"), "-D", str(node.data_dir), "reload"], check=True)


def _snapshot(lab, region: str) -> dict:
    """What a deleted, re-cloned or rewound directory would change."""
    node = lab.postgres(region)
    data = node.data_dir
    cd = node.ctl.controldata()
    return {"data_inode": data.stat().st_ino, "pg_version_inode": (data / "PG_VERSION").stat().st_ino,
            "marker": (data / MARKER).read_text() if (data / MARKER).exists() else None,
            "control": {k: cd[k] for k in ("Database system identifier", "Database cluster state",
                                           "Latest checkpoint location", "Latest checkpoint's TimeLineID",
                                           "Minimum recovery ending location")},
            "files": sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())}


def _dry_rewind(lab, region: str, source, password: str):
    """pg_rewind --dry-run of the region's directory from ``source``, as the runbook runs it
    (database ``source.database``: only database postgres is refused by the test's pg_hba)."""
    node = lab.postgres(region)
    conninfo = make_conninfo("", host=source.host, port=source.port, user=source.user, dbname=source.database,
                             connect_timeout=5)
    return node.ctl.run([node.ctl.tool("pg_rewind"), "--dry-run", "-D", str(node.data_dir),
                         f"--source-server={conninfo}"], timeout=60, env={"PGPASSWORD": password})


def _fail_back(client, lab, region: str, **kw):
    return client.start_workflow(FailbackWorkflow.run, FailbackInput(service=lab.cfg.service, region=region,
                                                                     switch_back=False, **kw),
                                 id=f"failback-{uuid.uuid4()}", task_queue=lab.cfg.temporal.control_task_queue)


async def test_failback_refused_by_the_source_keeps_the_old_primarys_data(lab, client):
    old = _primary(lab)
    new = lab.cfg.other(old).name
    row = 9_400_000_000 + uuid.uuid4().int % 10**6
    _sql(lab, old, ("insert into audit_log (id, actor, action) values (%s, 't', 'before')", (row,)))
    await _until(_async(lambda: _lag_bytes(lab, old) == 0), 30, "the standby to catch up")
    lab.kill_region(old)
    failover = await (await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=new,
                                                                      reason="rewind auth test"))).result()
    assert failover.outcome == "succeeded"
    lab.heal_region(old)

    handle = await _fail_back(client, lab, old, reconcile_approval=ApprovalPolicy(required=True,
                                                                                  timeout_seconds=600))
    await _until(lambda: _awaiting(handle), 90, "the review (the old primary is stopped by then)")
    assert not lab.postgres(old).running()
    data = lab.postgres(old).data_dir
    (data / MARKER).write_text(str(row))
    before = _snapshot(lab, old)

    # The new primary now refuses the connection pg_rewind makes (user postgres, database
    # postgres) and nothing else: the workers' own connections go to database eagle.
    hba = lab.postgres(new).data_dir / "pg_hba.conf"
    original = hba.read_text()
    pg = lab.cfg.region(new).postgres
    hba.write_text(f"host postgres {pg.user} 127.0.0.1/32 reject\n" + original)
    _reload(lab, new)
    try:
        await handle.execute_update(FailbackWorkflow.approve, ApprovalDecision(approver="erin", decision="approve"))
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        # Should pg_rewind itself be the one refused (the source changed after the check),
        # its own error text is read the same way: refused or unreachable, never "impossible".
        for source, password, kind in ((pg.model_copy(update={"database": "postgres"}), pg.password.resolve(),
                                        "PostgresAuthFailed"),
                                       (pg, "wrong", "PostgresAuthFailed"),
                                       (pg.model_copy(update={"port": 1}), pg.password.resolve(),
                                        "PostgresSourceUnreachable")):
            r = _dry_rewind(lab, old, source, password)
            assert r.returncode != 0
            refused = source_failure(r.stderr + r.stdout, "pg_rewind", source, source.user)
            assert refused is not None and refused.type == kind, (r.stderr, kind)
            assert refused.non_retryable == (kind == "PostgresAuthFailed")
    finally:
        hba.write_text(original)
        _reload(lab, new)
    cause = failed.value.cause
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    assert getattr(cause, "type", None) == "PostgresAuthFailed", repr(cause)
    assert "pg_rewind" in str(cause) and "pg_hba.conf rejects" in str(cause), str(cause)
    assert pg.password.resolve() not in str(cause)
    # Refused, it neither rewound nor fell back to pg_basebackup: the directory is the same
    # directory, file for file, and the node is still stopped.
    assert _snapshot(lab, old) == before
    assert not lab.postgres(old).running()
    assert not [p for p in Path(data.parent).glob(f".{data.name}.eagle-dr-*") if p.is_dir()]  # no clone begun

    # With the source letting it in, the same failback rewinds it (the WAL is all there).
    report = await (await _fail_back(client, lab, old)).result()
    assert report.rewind is not None and report.rewind.method == "pg_rewind", report.rewind
    up = lab.cfg.region(new).postgres

    def streams():
        st = pg_status(lab.cfg.region(old).postgres)
        return st.role == "standby" and st.receiver_status == "streaming" and st.upstream == f"{up.host}:{up.port}"

    await _until(_async(streams), 60, f"{old} to stream from {new}")
    assert not (data / MARKER).exists()  # pg_rewind itself removes what the source lacks
    # Back to the topology the other tests expect: the old primary's region primary again.
    back = await (await start_move(client, lab.cfg, SwitchoverInput(service=lab.cfg.service, target_region=old))
                  ).result()
    assert back.outcome == "succeeded" and _primary(lab) == old
