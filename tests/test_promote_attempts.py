"""What a promote step's attempt may conclude, on a real standby (a scratch PostgreSQL in
recovery with nothing to follow, so it never catches up on its own):

- ``NotPromoted`` is proof that no attempt ever asked for a promotion, so the switchover undoes
  its stop without touching the standby. Only a first attempt that saw the node answer, in
  recovery and short of the checkpoint, with no ``promote`` file pending, may conclude it.
  Anything else is "unknown", and the runbook settles it with abort_promotion.
- A worker shutdown is not a cancel: the attempt is retried.
- An attempt that stalled past half its heartbeat timeout does not promote: the server may have
  given up on it and retried.
"""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from temporalio.activity import ActivityCancellationDetails
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.postgres.activities import PostgresActivities, PromoteRequest, PromoteWhenReplayedRequest
from eagle_dr.config import DEFAULT_CONFIG, parse_config
from lab.scratch_postgres import scratch_postgres
from tests.conftest import PORT_SHIFT

PORT = 17994 + PORT_SHIFT - 2000
REGION = "us-west-2"
FAR = "FF/0"  # a checkpoint the standby never reaches


def _standby(name: str, port: int = PORT):
    node_cm = scratch_postgres(port, name)
    node = node_cm.__enter__()
    node.stop("fast")
    (node.data_dir / "standby.signal").touch()
    node.start()
    return node_cm, node


@pytest.fixture(scope="module")
def standby():
    cm, node = _standby("promote-attempts")
    try:
        yield node
    finally:
        cm.__exit__(None, None, None)


def _activities(node) -> PostgresActivities:
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for r in doc["regions"]:
        if r["name"] == REGION:
            # A trust-auth scratch server without TLS in place of the lab's node.
            for k in ("password", "replication_password", "sslmode", "sslrootcert"):
                r["postgres"].pop(k, None)
            r["postgres"].update(host=node.cfg.host, port=node.cfg.port, user=node.cfg.user,
                                 database=node.cfg.database, data_dir=str(node.data_dir),
                                 socket_dir=node.cfg.socket_dir)
        else:
            # Nothing answers there (a developer's `make lab` on the default ports must not), and
            # its password reference stays unresolvable: another region's secret on this worker.
            r["postgres"].update(port=1)
    return PostgresActivities(parse_config(doc, env={}))


def _env(attempt: int = 1, heartbeat_s: float = 10, scheduled_ago_s: float = 0) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt, heartbeat_timeout=timedelta(seconds=heartbeat_s),
                                   scheduled_time=datetime.now(timezone.utc) - timedelta(seconds=scheduled_ago_s))
    return env


def _wait(**kw) -> PromoteWhenReplayedRequest:
    return PromoteWhenReplayedRequest(region=REGION, epoch=1, record_epoch=True, lsn=FAR,
                                      catch_up_timeout_seconds=kw.pop("timeout", 0.3), **kw)


def _in_recovery(node) -> bool:
    with node.connect() as c:
        return c.execute("select pg_is_in_recovery()").fetchone()[0]


def test_a_first_attempt_short_of_the_checkpoint_proves_not_promoted(standby):
    with pytest.raises(ApplicationError) as e:
        _env().run(_activities(standby).promote_when_replayed, _wait())
    assert e.value.type == "NotPromoted" and e.value.non_retryable, e.value
    assert "not replayed past FF/0" in str(e.value)
    assert _in_recovery(standby)


def test_a_later_attempt_proves_nothing(standby):
    """An earlier attempt may still be alive behind it (stalled, given up on by the server)."""
    with pytest.raises(ApplicationError) as e:
        _env(attempt=2).run(_activities(standby).promote_when_replayed, _wait())
    assert e.value.type == "PromotionUnknown" and "attempt 2" in str(e.value), e.value
    assert _in_recovery(standby)


def test_a_retried_wait_ends_at_the_first_attempts_deadline(standby):
    """Each attempt waiting the whole catch-up timeout again would let worker restarts hold
    the write outage open five times as long as asked: a later attempt scheduled after the
    timeout has run out since the first ends at once, and a retried wait with time left
    still waits. Run beside, so that a wait restarted from zero fails the test instead of
    hanging it."""
    acts, outcome = _activities(standby), {}

    def attempt(name: str, env: ActivityEnvironment) -> threading.Thread:
        def run() -> None:
            try:
                env.run(acts.promote_when_replayed, _wait(timeout=600))
            except ApplicationError as e:
                outcome[name] = e
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    late = attempt("late", _env(attempt=3, scheduled_ago_s=601))
    late.join(60)
    assert not late.is_alive(), "a later attempt waited the whole catch-up timeout again"
    e = outcome["late"]
    assert e.type == "PromotionUnknown" and "within 600 s" in str(e) and "attempt 3" in str(e), e
    assert _in_recovery(standby)

    env = _env(attempt=3, scheduled_ago_s=30)
    on_time = attempt("on time", env)
    on_time.join(2)
    assert on_time.is_alive(), outcome.get("on time")  # 570 s of its wait are left
    env.cancel(cancellation_details=ActivityCancellationDetails(cancel_requested=True))
    on_time.join(60)
    assert not on_time.is_alive()
    assert outcome["on time"].type == "PromotionUnknown" and "cancelled" in str(outcome["on time"])
    assert _in_recovery(standby)


def test_a_pending_promote_file_proves_nothing(standby):
    promote = Path(standby.data_dir) / "promote"
    promote.touch()  # no signal: nothing reads it until a startup process (re)starts
    try:
        with pytest.raises(ApplicationError) as e:
            _env().run(_activities(standby).promote_when_replayed, _wait())
    finally:
        promote.unlink(missing_ok=True)
    assert e.value.type == "PromotionUnknown" and "promote file" in str(e.value), e.value


def test_a_cancel_is_proof_only_when_the_runbook_asked(standby):
    acts = _activities(standby)
    for details, expected, non_retryable in (
            (ActivityCancellationDetails(cancel_requested=True), "NotPromoted", True),
            (ActivityCancellationDetails(worker_shutdown=True), "AttemptInterrupted", False)):
        env = _env()
        env.on_heartbeat = lambda *_: env.cancel(cancellation_details=details)  # noqa: B023 - used at once
        with pytest.raises(ApplicationError) as e:
            env.run(acts.promote_when_replayed, _wait(timeout=60))
        assert (e.value.type, e.value.non_retryable) == (expected, non_retryable), e.value
        assert _in_recovery(standby)


def test_an_attempt_that_stalled_past_its_bound_does_not_promote():
    """Its bound is half the heartbeat timeout: here 1 ms, which the epoch check and the slot
    reservation alone take longer than. The same standby then promotes on an attempt that is
    on time: a retry of the switchover's step whose first attempt was scheduled longer ago than
    both its catch-up and its promotion timeouts (the wait for the replay used that time, and
    the promotion's own wait is per attempt: it must still promote, not give up at once)."""
    cm, node = _standby("promote-stalled", PORT + 1)
    try:
        acts = _activities(node)
        for run in (acts.promote_postgres, acts.promote_when_replayed):
            req = PromoteRequest(region=REGION, epoch=1, record_epoch=True) if run == acts.promote_postgres else \
                PromoteWhenReplayedRequest(region=REGION, epoch=1, record_epoch=True, lsn="0/0")
            with pytest.raises(ApplicationError) as e:
                _env(heartbeat_s=0.002).run(run, req)
            assert e.value.type == "AttemptStalled" and not e.value.non_retryable, e.value
            assert _in_recovery(node)
            assert not (Path(node.data_dir) / "promote").exists()
        promotion = _env(attempt=2, scheduled_ago_s=1000).run(acts.promote_when_replayed, PromoteWhenReplayedRequest(
            region=REGION, epoch=1, record_epoch=True, lsn="0/0", catch_up_timeout_seconds=600, timeout_seconds=120))
        assert promotion.timeline and not _in_recovery(node)
    finally:
        cm.__exit__(None, None, None)


def test_an_abort_proves_from_the_data_directory_without_sql_and_heartbeats_through_a_slow_start():
    """abort_promotion after a promote step that timed out, on a standby that takes no
    connections (hot_standby off, as some run their standbys) and starts slowly (each WAL
    segment is asked of a restore_command that takes seconds, as an archive in another region
    does). Its proof is the stopped data directory: it needs no SQL, not even the epoch check
    (the target's record could not be read: the step failed every attempt, leaving the old
    primary fenced and the standby stopped, no writer at all). And the start heartbeats: a
    start longer than the step's heartbeat timeout was retried beside itself, the retry
    stopping the starting server again."""
    from activities.postgres.activities import EpochRequest
    from activities.postgres.status import in_recovery

    cm, node = _standby("promote-abort", PORT + 2)
    try:
        node.stop("fast")
        with open(Path(node.data_dir) / "postgresql.auto.conf", "a") as f:
            f.write("hot_standby = off\nrestore_command = 'sleep 3; false'\n")
        node.start()
        assert in_recovery(node.cfg) is None  # answers nothing: no SQL to be had
        acts = _activities(node)
        env, beats = _env(heartbeat_s=30), []
        env.on_heartbeat = lambda *details: beats.append(details)
        aborted = env.run(acts.abort_promotion, EpochRequest(region=REGION, epoch=1))
        assert aborted.state == "standby", aborted
        assert (Path(node.data_dir) / "standby.signal").exists() and node.ctl.running()
        assert any("starting" in str(d) for d in beats), beats
    finally:
        cm.__exit__(None, None, None)
