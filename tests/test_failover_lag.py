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
