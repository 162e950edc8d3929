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


def test_a_move_whose_routing_failed_has_an_unknown_rto_never_met():
    """The verify writes to the databases directly, so it passed while no client was routed
    to the new primary: the RTO was reported met, and exported as the last RTO. A failed
    "re-route traffic" step (the last one: a retried routing counts by its retry) makes the
    RTO unknown, with why, and the step timing is not exported as an RTO."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from workflows.failover import finish_measurement, rto_text
    from workflows.models import Rpo, Rto, StepRecord
    from workflows.notify import measurement_lines
    from workflows.runbook import Runbook

    def steps(*statuses: str) -> SimpleNamespace:
        return SimpleNamespace(steps=[StepRecord(name="promote", status="done")]
                               + [StepRecord(name="re-route traffic", status=s) for s in statuses])

    assert Runbook.routed(steps()) and Runbook.routed(steps("done")) and Runbook.routed(steps("failed", "done"))
    assert not Runbook.routed(steps("failed")) and not Runbook.routed(steps("done", "failed"))

    t = datetime(2026, 12, 6, tzinfo=timezone.utc)

    def rto() -> Rto:
        return Rto(detected_at=t, decided_at=t + timedelta(seconds=1), writable_at=t + timedelta(seconds=2),
                   serving_at=t + timedelta(seconds=4), target_s=60)

    served = rto()
    finish_measurement(served, Rpo(), verified=True, routed=True)
    assert served.met is True and served.serving_basis is None and rto_text(served) == "RTO 4.0s"
    stranded = rto()
    finish_measurement(stranded, Rpo(), verified=True, routed=False)
    assert stranded.met is None and "routing failed" in stranded.serving_basis, stranded
    assert rto_text(stranded).startswith("RTO unknown (routing failed") and "4.0 s after detection" in \
        rto_text(stranded)
    line = measurement_lines(stranded, None)[0]
    assert line.startswith("RTO unknown (routing failed"), line
