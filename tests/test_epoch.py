"""The DR epoch on the real lab: a late fence from a superseded run cannot fence the primary of
a newer move, and the epoch is tied to the run, not to the reused workflow id."""

from __future__ import annotations

import psycopg
import pytest
from temporalio.exceptions import ApplicationError

from activities.postgres import epoch as epochs
from activities.postgres.activities import FenceRequest, PostgresActivities
from tests.lab_helpers import _primary


def _ensure_epoch(lab, region: str) -> int:
    pg = lab.cfg.region(region).postgres
    held = epochs.read_epoch(pg, lab.cfg.service).epoch
    if held == 0:
        held = epochs.advance_epoch(pg, lab.cfg.service, 1, region, "test-epoch", "run-1").epoch
    return held


def test_a_stale_fence_does_not_fence_the_current_primary(lab):
    primary = _primary(lab)
    held = _ensure_epoch(lab, primary)
    with pytest.raises(ApplicationError) as e:
        PostgresActivities(lab.cfg).fence_postgres(FenceRequest(region=primary, epoch=held - 1, method="read_only"))
    assert e.value.type == "StaleEpoch" and e.value.non_retryable
    with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create temp table still_writable (x int)")  # not fenced


def test_the_same_epoch_from_another_run_of_the_same_workflow_id_is_stale(lab):
    primary = _primary(lab)
    pg = lab.cfg.region(primary).postgres
    held = epochs.read_epoch(pg, lab.cfg.service)
    nxt = held.epoch + 1
    epochs.advance_epoch(pg, lab.cfg.service, nxt, primary, "dr-move-eagle-alert", "run-a")
    # The same run again (a retry) is fine; a later incident reusing the workflow id is not.
    assert epochs.advance_epoch(pg, lab.cfg.service, nxt, primary, "dr-move-eagle-alert", "run-a").epoch == nxt
    with pytest.raises(epochs.StaleEpoch):
        epochs.advance_epoch(pg, lab.cfg.service, nxt, primary, "dr-move-eagle-alert", "run-b")


def test_a_stale_rewind_or_rejoin_changes_nothing(lab):
    """pg_rewind and a rejoin are destructive: onto a primary a newer move has acted on, refused first."""
    from activities.failback import FailbackActivities, FailbackRequest
    from activities.postgres.activities import RejoinRequest
    from activities.postgres.status import pg_status

    primary = _primary(lab)
    other = lab.cfg.other(primary).name
    held = _ensure_epoch(lab, primary)
    before = pg_status(lab.cfg.region(other).postgres)
    with pytest.raises(ApplicationError) as e:
        FailbackActivities(lab.cfg).rewind_old_primary(FailbackRequest(region=other, primary_region=primary,
                                                                       epoch=held - 1))
    assert e.value.type == "StaleEpoch"
    with pytest.raises(ApplicationError) as e:
        PostgresActivities(lab.cfg).rejoin_as_standby(RejoinRequest(region=other, primary_region=primary,
                                                                    epoch=held - 1))
    assert e.value.type == "StaleEpoch"
    after = pg_status(lab.cfg.region(other).postgres)
    assert after.receiver_status == "streaming" and after.timeline == before.timeline


def test_a_stale_unfence_does_not_lift_a_newer_moves_fence(lab):
    """A late compensation of a superseded run must not make the fenced old primary writable
    next to a newer move's primary; the current run's unfence does lift it."""
    import dataclasses

    from temporalio.testing import ActivityEnvironment

    from activities.postgres.activities import UnfenceRequest
    from activities.postgres.status import pg_status

    primary = _primary(lab)
    pg = lab.cfg.region(primary).postgres
    held = _ensure_epoch(lab, primary)
    acts = PostgresActivities(lab.cfg)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id="dr-move-test", workflow_run_id="run-current")
    # The current move (the next epoch, as a runbook takes it) fences read-only...
    acts.fence_postgres(FenceRequest(region=primary, epoch=held + 1, method="read_only"))
    try:
        assert pg_status(pg).read_only
        with pytest.raises(ApplicationError) as e:
            env.run(acts.unfence_postgres, UnfenceRequest(region=primary, epoch=held - 1))
        assert e.value.type == "StaleEpoch" and e.value.non_retryable
        assert pg_status(pg).read_only, "a stale unfence lifted the fence"
    finally:
        # ...and lifts its own fence: the current epoch acts.
        env.run(acts.unfence_postgres, UnfenceRequest(region=primary, epoch=held + 1))
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("create temp table writable_again (x int)")


def test_the_next_epoch_is_above_what_either_region_records(lab):
    """A move cancelled after recording its epoch on the primary, before the standby received
    it: a failover reads the standby and took the same epoch again (then its unfence was
    refused as stale, with the wrong story). The other region's record counts when it answers;
    one that hangs is no evidence and no failure."""
    import os
    import signal

    from activities.postgres.activities import EpochReadRequest
    from tests.lab_helpers import _aux_pid

    primary = _primary(lab)
    standby = lab.cfg.other(primary).name
    pa, pb = lab.cfg.region(primary).postgres, lab.cfg.region(standby).postgres
    acts = PostgresActivities(lab.cfg)
    _ensure_epoch(lab, primary)
    lab.wait_replication()  # the standby holds what the primary holds, before it stops receiving
    receiver = _aux_pid(lab, standby, b"walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    try:
        held = epochs.read_epoch(pb, lab.cfg.service).epoch
        epochs.advance_epoch(pa, lab.cfg.service, held + 1, primary, "test-cancelled-move", "run-x")
        assert epochs.read_epoch(pb, lab.cfg.service).epoch == held  # never received
        assert acts.read_highest_epoch(EpochReadRequest(region=standby)).epoch == held
        got = acts.read_highest_epoch(EpochReadRequest(region=standby, others=[primary]))
        assert (got.epoch, got.workflow_id) == (held + 1, "test-cancelled-move"), got
        postmaster = lab.postgres(primary).pid
        os.kill(postmaster, signal.SIGSTOP)  # takes connections, answers none
        try:
            assert acts.read_highest_epoch(EpochReadRequest(region=standby, others=[primary])).epoch == held
        finally:
            os.kill(postmaster, signal.SIGCONT)
    finally:
        os.kill(receiver, signal.SIGCONT)


def test_the_next_epoch_is_above_what_redis_records_when_postgresql_missed_it(lab):
    """A failover whose PostgreSQL epoch record failed after the promotion degrades and goes on,
    recording its epoch in Redis only. The next move, reading PostgreSQL alone, took that epoch
    again and was refused by Redis (seen: its Redis never promoted, no replica link after)."""
    from activities.postgres.activities import EpochReadRequest
    from activities.redis import epoch as redis_epochs

    primary = _primary(lab)
    pg_held = epochs.read_epoch(lab.cfg.region(primary).postgres, lab.cfg.service).epoch
    master = next(r.redis for r in lab.cfg.regions if r.name == primary)
    rd = redis_epochs.highest_epoch([r.redis for r in lab.cfg.regions], lab.cfg.service)
    ahead = max(pg_held, rd.epoch) + 1
    redis_epochs.record_epoch(master, lab.cfg.service, ahead, primary, "test-redis-only", "run-r")
    got = PostgresActivities(lab.cfg).read_highest_epoch(EpochReadRequest(region=primary, redis=True))
    assert (got.epoch, got.workflow_id) == (ahead, "test-redis-only"), got
    assert got.updated_at is not None
    assert PostgresActivities(lab.cfg).read_highest_epoch(EpochReadRequest(region=primary)).epoch == pg_held
