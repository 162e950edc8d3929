"""Retention on the real lab: ``pgbackrest expire`` through ExpireWorkflow, asserted on
pgBackRest's own output and on ``pgbackrest info`` afterwards.

The configured policy is time-based (30 days); backups made seconds ago cannot age, and
faketime cannot be used against S3 (SigV4 rejects the skewed clock). So: the time policy is
run as configured (it must remove nothing), then the count override (``keep_fulls``), which
pgBackRest applies with the same rule: drop backup sets older than the newest kept full and
the WAL before it, and keep the kept full's WAL onwards (what PITR from it needs).
"""

from __future__ import annotations

import uuid

import pytest

from activities.backup.catalog import read_catalog
from activities.backup.pgbackrest import Stanza
from tests.histories import record
from tests.lab_helpers import _primary
from workflows.backup import BackupInput, BackupWorkflow
from workflows.expire import ExpireInput, ExpireResult, ExpireWorkflow

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _run(lab, client, wf, inp, name: str | None = None):
    handle = await client.start_workflow(wf, inp, id=f"test-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    res = await handle.result()
    if name:
        await record(handle, name)
    return res


async def test_expiry_removes_what_the_policy_says_and_keeps_what_pitr_needs(lab, client):
    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    backups = []
    for i, t in enumerate(("full", "incr", "full")):
        r = await _run(lab, client, BackupWorkflow.run, BackupInput(type=t, repos=[primary], trigger="test"),
                       "backup-full-one-repo" if i == 0 else None)
        assert r.outcome == "succeeded", r
        backups.append(r.backups[0])
    f1, i1, f2 = backups
    assert i1.prior == f1.label
    stanza = Stanza(lab.cfg, primary)
    before = read_catalog(stanza)
    other_before = [b.label for b in before.on(other)]

    # The configured time policy (30 days): nothing is old enough.
    res: ExpireResult = await _run(lab, client, ExpireWorkflow.run, ExpireInput(trigger="test"), "expire")
    assert res.outcome == "succeeded" and sorted(e.repo_region for e in res.repos) == sorted(lab.cfg.region_names)
    for e in res.repos:
        assert e.policy == "time 30 days" and not e.expired_sets and not e.removed_backups and not e.archive_removed
        assert any("retention not met" in n for n in e.notes), e
    assert [b.label for b in read_catalog(stanza).on(primary)] == [b.label for b in before.on(primary)]

    # Keep one full, as a dry run: pgBackRest names what it would remove, and removes nothing.
    dry = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], keep_fulls=1, dry_run=True))
    (d,) = dry.repos
    older = [b.label for b in before.on(primary) if b.stopped < f2.started or b.label in (f1.label, i1.label)]
    older = [x for x in older if x != f2.label]
    assert {f1.label, i1.label} <= set(d.removed_backups) and f2.label not in d.removed_backups
    assert sorted(d.removed_backups) == sorted(older)
    assert [b.label for b in read_catalog(stanza).on(primary)] == [b.label for b in before.on(primary)]

    # For real.
    res = await _run(lab, client, ExpireWorkflow.run, ExpireInput(repos=[primary], keep_fulls=1))
    (e,) = res.repos
    assert sorted(e.removed_backups) == sorted(d.removed_backups)
    assert [s[0] for s in e.expired_sets] and all(s[0].endswith("F") for s in e.expired_sets)
    after = read_catalog(stanza)
    # (The stanza's own status may read "different across repos": the other bucket holds other backups.)
    assert after.repo(primary).ok, after.repos
    left = [b.label for b in after.on(primary)]
    assert f2.label in left and f1.label not in left and i1.label not in left
    assert all(b.started >= f2.started for b in after.on(primary))
    # WAL: what the kept full needs stays (from its start on), what only F1 needed is gone.
    arch = next(a for a in after.archive if a.repo_region == primary)
    assert e.archive_removed and all(a.stop < f2.wal_start for a in e.archive_removed)
    assert arch.min_wal <= f2.wal_start and arch.min_wal > f1.wal_stop, (arch, f1, f2)
    assert arch.max_wal >= f2.wal_stop
    # The other region's bucket was not asked.
    assert [b.label for b in after.on(other)] == other_before


async def test_bad_expire_input_names_the_field(lab, client):
    from temporalio.client import WorkflowFailureError

    for raw, field in (({"keep_fulls": 0}, "keep_fulls"), ({"repos": ["mars-1"]}, "repos.0")):
        with pytest.raises(WorkflowFailureError) as e:
            await client.execute_workflow("ExpireWorkflow", raw, id=f"test-{uuid.uuid4()}",
                                          task_queue=lab.cfg.temporal.control_task_queue)
        assert e.value.cause.type == "InvalidInput" and field in str(e.value.cause)
