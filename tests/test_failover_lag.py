"""What the failover's lag guard reads from the two nodes' statuses (workflows/failover.py
standby_lag): a loss that cannot be measured is unknown, never 0."""

from __future__ import annotations

from activities.postgres.status import PgStatus
from workflows.failover import standby_lag


def test_a_target_that_did_not_answer_has_an_unknown_lag_not_0():
    # The approval's re-check of the lag guard probes the target again; a target that does not
    # answer has no received LSN, and the guard was told it lagged 0 bytes.
    source = PgStatus(reachable=True, role="primary", lsn="0/5000000")
    lag, basis = standby_lag(source, PgStatus(reachable=False, error="timeout"))
    assert lag is None and "unknown" in basis


def test_the_lag_is_what_the_source_wrote_that_the_target_did_not_receive():
    source = PgStatus(reachable=True, role="primary", lsn="0/5000000")
    target = PgStatus(reachable=True, role="standby", lsn="0/4000000", receive_lsn="0/4800000")
    assert standby_lag(source, target)[0] == 0x800000  # received but not replayed is not lost
    # The source gone: only its walsender's last report is known, and says so.
    lag, basis = standby_lag(None, target.model_copy(update={"sender_end_lsn": "0/4900000"}))
    assert lag == 0x100000 and "unknown" in basis
    assert standby_lag(None, target) == (None, "source unreachable and the standby has no report of its end of "
                                               "WAL: unknown")


def test_a_worker_clock_out_of_step_never_makes_an_rto_phase_negative():
    """writable_at comes from the target worker's clock, the other stamps from the server's.
    A worker 5 s behind put it before the promotion began; one 5 s ahead, after the service
    was serving. Each phase stays within what the server saw; the total is the server's alone."""
    from datetime import datetime, timedelta, timezone

    from workflows.failover import finish_measurement
    from workflows.models import Rpo, Rto

    t = datetime(2026, 12, 5, tzinfo=timezone.utc)
    for skew, decision_to_writable in ((-5, 1.0), (5, 3.0)):
        rto = Rto(detected_at=t, decided_at=t + timedelta(seconds=1), promotion_started_at=t + timedelta(seconds=2),
                  writable_at=t + timedelta(seconds=2.5 + skew), serving_at=t + timedelta(seconds=4))
        finish_measurement(rto, Rpo())
        assert rto.decision_to_writable_s == decision_to_writable, (skew, rto)
        assert rto.writable_to_serving_s >= 0 and rto.total_s == 4.0, rto
    rto = Rto(detected_at=t, decided_at=t + timedelta(seconds=1), promotion_started_at=t + timedelta(seconds=2),
              writable_at=t + timedelta(seconds=2.5), serving_at=t + timedelta(seconds=4))
    finish_measurement(rto, Rpo())
    assert rto.decision_to_writable_s == 1.5 and rto.writable_to_serving_s == 1.5  # in step: as measured
