"""PostgreSQL fences against clients that try to write anyway, and against a restart of the
fenced server, on a throwaway real PostgreSQL (lab/scratch_postgres.py)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import psycopg.sql
import pytest

from activities.postgres.fence import fence_read_only, fence_stop, lift_stop_fence, unfence
from activities.postgres.status import pg_status
from lab.scratch_postgres import scratch_postgres
from tests.conftest import PORT_SHIFT

PORT = 17801 + PORT_SHIFT - 2000

# What a client does to get past default_transaction_read_only.
BYPASSES = [
    ["begin read write", "insert into alerts (id, region, payload) values (%(id)s, 'x', '{}')", "commit"],
    ["set session characteristics as transaction read write",
     "insert into alerts (id, region, payload) values (%(id)s, 'x', '{}')"],
    ["set default_transaction_read_only = off", "set transaction_read_only = off",
     "insert into alerts (id, region, payload) values (%(id)s, 'x', '{}')"],
]


@pytest.fixture(scope="module")
def node():
    with scratch_postgres(PORT, "fence") as n:
        with n.connect() as conn:
            conn.execute("create role app login password 'app'")
            conn.execute("grant all on alerts to app")
        yield n


def _dsn(node, user: str) -> str:
    return node.cfg.dsn() if user == "superuser" else node.cfg.dsn().replace("user=postgres", "user=app")


def _try_write(node, user: str, steps: list[str], key: int) -> str | None:
    """Run a client's write attempt; None if it committed, else the error that stopped it."""
    try:
        with psycopg.connect(_dsn(node, user), connect_timeout=3, autocommit=True) as conn:
            for s in steps:
                conn.execute(s, {"id": key} if "%(id)s" in s else None)
        return None
    except psycopg.Error as e:
        return str(e).strip().splitlines()[0]


def _count(node, key: int) -> int:
    # Through eagle-dr's own connection, which a fence lets in.
    from activities.postgres.status import connect
    with connect(node.cfg) as conn:
        return conn.execute("select count(*) from alerts where id = %s", (key,)).fetchone()[0]


def _assert_refused(node, base: int) -> None:
    for user in ("app", "superuser"):
        for i, steps in enumerate(BYPASSES):
            key = base + i + (100 if user == "app" else 0)
            err = _try_write(node, user, steps, key)
            assert err is not None, f"{user} wrote through the fence with {steps}"
            assert _count(node, key) == 0


def test_read_only_fence_refuses_bypasses_and_survives_a_restart(node):
    assert _try_write(node, "app", BYPASSES[0], 1) is None  # writable before the fence
    held = psycopg.connect(_dsn(node, "app"), autocommit=True)
    f = fence_read_only(node.cfg)
    assert f.reachable and f.method == "read_only" and f.last_lsn
    # A session from before the fence is ended, not left writing.
    with pytest.raises(psycopg.OperationalError):
        held.execute("insert into alerts (id, region, payload) values (2, 'x', '{}')")
    held.close()
    _assert_refused(node, 1000)
    st = pg_status(node.cfg)
    assert st.reachable and st.role == "primary" and st.read_only  # eagle-dr still sees it, as fenced

    node.ctl.stop("fast")
    node.ctl.start()
    _assert_refused(node, 2000)
    assert fence_read_only(node.cfg).method == "read_only"  # idempotent

    unfence(node.cfg)
    assert _try_write(node, "app", BYPASSES[0], 3000) is None
    node.ctl.stop("fast")
    node.ctl.start()
    assert _try_write(node, "app", BYPASSES[1], 3001) is None  # lifted for good


def test_stop_fence_restarts_as_a_read_only_standby_and_unfence_restores_the_primary(node):
    timeline = pg_status(node.cfg).timeline
    with psycopg.connect(node.cfg.dsn(), autocommit=True) as conn:
        conn.execute("alter system set work_mem = '7MB'")  # an operator's own setting, to be kept
    f = fence_stop(node.cfg)
    assert f.method == "stop" and f.last_lsn and f.timeline == timeline
    assert not node.running()
    assert fence_stop(node.cfg).method == "stop"  # idempotent while down

    # A reboot, or an operator's pg_ctl start: it comes up in recovery, following nothing.
    node.ctl.start()
    st = pg_status(node.cfg)
    assert st.role == "standby" and st.upstream is None
    # The read-only fence taken before the stop still keeps clients out; a superuser that
    # gets past it still cannot write to a standby.
    _assert_refused(node, 4000)
    from activities.postgres.status import connect
    with connect(node.cfg) as conn, pytest.raises(psycopg.errors.FeatureNotSupported, match="during recovery"):
        conn.execute("begin read write")
        conn.execute("insert into alerts (id, region, payload) values (4999, 'x', '{}')")

    assert lift_stop_fence(node.cfg)
    unfence(node.cfg)
    st = pg_status(node.cfg)
    assert st.role == "primary" and st.timeline == timeline  # the same history: nothing was promoted
    assert _try_write(node, "app", BYPASSES[0], 5000) is None
    with psycopg.connect(node.cfg.dsn(), autocommit=True) as conn:
        assert conn.execute("show work_mem").fetchone()[0] == "7MB"
    assert not (node.data_dir / "standby.signal").exists()


def test_a_hold_interrupted_after_its_marker_is_finished_by_the_retry(node):
    """The hold writes its marker first: a worker killed right after it leaves a marker with
    no standby.signal. The retry must finish the hold (the server then starts as a standby of
    nothing), not take the marker for a finished one; and the lift puts the server back."""
    import json

    from activities.postgres.ctl import FENCE_MARKER
    from activities.postgres.fence import hold_as_standby

    node.ctl.stop("fast")
    auto = node.data_dir / "postgresql.auto.conf"
    original = auto.read_text()
    node.ctl.write_file(node.data_dir / FENCE_MARKER, json.dumps({"auto_conf": original,
                                                                  "created_standby_signal": True}))
    try:
        assert hold_as_standby(node.ctl)
        assert (node.data_dir / "standby.signal").exists() and "eagle-dr fence" in auto.read_text()
        node.ctl.start()
        st = pg_status(node.cfg, files=True)
        assert st.role == "standby" and st.upstream is None and st.hold == "eagle-dr", st
    finally:
        assert lift_stop_fence(node.cfg)
    st = pg_status(node.cfg, files=True)
    assert st.role == "primary" and st.hold == "none", st
    assert "eagle-dr fence" not in auto.read_text()


def _up_as_the_primary(node, *reset: str) -> None:
    """Whatever a test that held the node got to: running, unfenced, the primary again, with the
    named settings reset (the module's tests share the node)."""
    from activities.postgres.status import connect

    if not node.running():
        (node.data_dir / "standby.signal").unlink(missing_ok=True)
        node.ctl.start()
    unfence(node.cfg)
    with connect(node.cfg) as conn:
        for name in reset:
            conn.execute(f"alter system reset {name}")


def test_a_held_server_starts_though_a_pin_names_a_timeline_before_its_promotion(node):
    """A standby rebuilt from a backup keeps recovery_target_timeline pinned to the timeline it
    followed (rebuild.py), and the pin outlives its promotion. Held as a standby of nothing, it
    must still come up: in recovery towards the pinned (older) timeline it waited for its own
    last checkpoint's WAL forever, so the fenced node never started and a split brain's read of
    the loser hung (CI)."""
    from activities.postgres.status import connect

    # A promotion, as the rebuilt standby had: a standby of nothing, promoted.
    node.ctl.stop("fast")
    node.ctl.write_file(node.data_dir / "standby.signal", "")
    node.ctl.start()
    pinned = pg_status(node.cfg).timeline
    with connect(node.cfg) as conn:
        conn.execute("select pg_promote()")
    with connect(node.cfg) as conn:
        conn.execute(f"alter system set recovery_target_timeline = '{pinned}'")
    assert pg_status(node.cfg).timeline == pinned + 1
    try:
        fence_stop(node.cfg)
        node.ctl.start(timeout=30)  # a hang shows as PgCtlError here, not as a stuck test
        st = pg_status(node.cfg)
        assert st.role == "standby" and st.timeline == pinned + 1, st
        assert lift_stop_fence(node.cfg)
        unfence(node.cfg)
        assert pg_status(node.cfg).role == "primary"
        # The lift does not put the pin back: the node has left that timeline, and a later
        # start in recovery would wait for it again.
        assert "recovery_target_timeline" not in (node.data_dir / "postgresql.auto.conf").read_text()
    finally:
        _up_as_the_primary(node, "recovery_target_timeline")


def test_a_recovery_target_left_in_the_config_does_not_stop_a_held_server_coming_up(node):
    """A recovery target left from a manual PITR (here an LSN) in a held server that crashed:
    its recovery replays the WAL since the last checkpoint, meets the target before the
    consistent point and PostgreSQL refuses to start ("requested recovery stop point is before
    consistent recovery point"), so the fenced node never came up. The hold clears every target;
    the lift leaves them off (the node is a primary again)."""
    from activities.postgres.fence import hold_as_standby
    from activities.postgres.status import connect

    with connect(node.cfg) as conn:
        conn.execute("checkpoint")
        conn.execute("insert into alerts (id, region, payload) values (7001, 'x', '{}')")
        target = conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        conn.execute("insert into alerts (id, region, payload) select g, 'x', '{}' from generate_series(7002, 7100) g")
        conn.execute(f"alter system set recovery_target_lsn = '{target}'")
        conn.execute("alter system set recovery_target_action = 'promote'")
    timeline = pg_status(node.cfg).timeline
    try:
        node.ctl.kill()  # a crash: the WAL after the checkpoint is replayed at the next start
        assert hold_as_standby(node.ctl)
        node.ctl.start(timeout=30)  # PgCtlError without the fix: the startup process exits FATAL
        st = pg_status(node.cfg)
        assert st.role == "standby" and st.timeline == timeline, st
        with connect(node.cfg) as conn:
            assert conn.execute("select count(*) from alerts where id between 7001 and 7100").fetchone()[0] == 100
        assert lift_stop_fence(node.cfg)
        assert pg_status(node.cfg).role == "primary"
        assert "recovery_target_lsn" not in (node.data_dir / "postgresql.auto.conf").read_text()
    finally:
        _up_as_the_primary(node, "recovery_target_lsn", "recovery_target_action")
        with connect(node.cfg) as conn:
            conn.execute("delete from alerts where id between 7001 and 7100")


def test_a_promote_trigger_file_appearing_does_not_promote_a_held_server(node):
    """PostgreSQL 12-15 promote a standby when the file named by promote_trigger_file appears.
    An operator's trigger (or an old HA tool's) made a held old primary writable beside the new
    primary. The hold empties the setting; the lift puts the operator's back."""
    from activities.postgres.status import connect

    trigger = node.data_dir / "promote.now"  # where the server's user can look
    with connect(node.cfg) as conn:
        conn.execute(f"alter system set promote_trigger_file = '{trigger}'")
        # The startup process looks for the trigger at each retry of its wait for WAL: look often.
        conn.execute("alter system set wal_retrieve_retry_interval = '50ms'")
    try:
        fence_stop(node.cfg)
        trigger.write_text("")
        node.ctl.start(timeout=30)
        # Without the fix the trigger is consumed and the node promoted within one retry (50 ms).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert pg_status(node.cfg).role == "standby" and trigger.exists(), "the held node promoted"
        trigger.unlink()
        assert lift_stop_fence(node.cfg)
        unfence(node.cfg)
        assert pg_status(node.cfg).role == "primary"
        assert f"promote_trigger_file = '{trigger}'" in (node.data_dir / "postgresql.auto.conf").read_text()
    finally:
        trigger.unlink(missing_ok=True)
        _up_as_the_primary(node, "promote_trigger_file", "wal_retrieve_retry_interval")


@pytest.mark.parametrize(("version", "written"), [("12", True), ("15", True), ("16", False), ("17", False), ("", False)])
def test_the_hold_names_promote_trigger_file_only_where_the_version_has_it(tmp_path, version, written):
    """PostgreSQL 16 removed promote_trigger_file, and an unknown name in postgresql.auto.conf
    keeps the server from starting: a hold that wrote it there would keep a fenced 16 down for
    good. An unreadable version writes nothing rather than guess."""
    from types import SimpleNamespace

    from activities.postgres.fence import _hold_settings

    (tmp_path / "PG_VERSION").write_text(f"{version}\n")
    assert ("promote_trigger_file = ''" in _hold_settings(SimpleNamespace(data_dir=tmp_path))) is written


def test_stop_fence_waits_for_the_archive_backlog_while_writes_still_flow(node):
    """A segment waiting for the archiver is pushed before the stop (clients still write), not
    inside the fast shutdown, which would hold the write outage until it is archived."""
    import threading
    import time

    from activities.postgres.fence import drain_archive

    ready = Path(node.cfg.data_dir) / "pg_wal" / "archive_status" / "0000000100000000000000FE.ready"
    ready.write_text("")
    # The "archiver": marks it done a moment later, as archive_command's success would.
    t = threading.Timer(0.4, lambda: ready.rename(ready.with_suffix(".done")))
    t.start()
    try:
        started = time.monotonic()
        assert drain_archive(node.cfg, max_wait=10) == 0
        assert time.monotonic() - started >= 0.35
        # Nothing fenced meanwhile: clients could write all along.
        assert _try_write(node, "app", [BYPASSES[0][1]], 990001) is None
    finally:
        t.cancel()
        for p in (ready, ready.with_suffix(".done")):
            p.unlink(missing_ok=True)
    # Bounded: a backlog that never drains costs at most max_wait.
    ready.write_text("")
    try:
        started = time.monotonic()
        assert drain_archive(node.cfg, max_wait=0.3) == 1
        assert time.monotonic() - started < 3
    finally:
        ready.unlink(missing_ok=True)


def test_a_stop_fence_at_the_checkpoint_returns_while_the_archiver_still_pushes():
    """The switchover's fence: the shutdown closes a WAL segment before its checkpoint and waits
    for the archiver to push it. The fence returns at the checkpoint, while that push still
    holds the postmaster, with the checkpoint that stays the server's last record; the push and
    the exit finish on their own, and a restart still comes up fenced."""
    import time

    from activities.postgres.ctl import alive

    with scratch_postgres(PORT + 1, "fence-archive") as n:
        base = Path(n.cfg.data_dir).parent
        archive, gate = base / "archive", base / "gate"
        archive.mkdir()
        archive.chmod(0o777)
        # An archiver that holds every push until the test opens the gate: the shutdown's wait
        # for it is then as long as the test wants, never a race.
        cmd = f"while [ ! -e {gate} ]; do sleep 0.02; done; cp %p {archive}/%f"
        with n.connect() as conn:
            conn.execute("alter system set archive_mode = on")
            conn.execute(psycopg.sql.SQL("alter system set archive_command = {}").format(psycopg.sql.Literal(cmd)))
        n.ctl.stop("fast")
        n.ctl.start()
        gate.touch()  # let the segments of the start through
        assert drain_archive_until_empty(n.cfg)
        gate.unlink()
        # A write after the last switch: the shutdown has a segment to close and push.
        with psycopg.connect(n.cfg.dsn(), autocommit=True) as conn:
            conn.execute("insert into alerts (id, region, payload) values (6001, 'x', '{}')")

        with psycopg.connect(n.cfg.dsn(), autocommit=True) as conn:
            conn.execute("alter system set work_mem = '7MB'")  # an operator's own setting, to be kept
        pid = n.ctl.pid
        f = fence_stop(n.cfg, at_checkpoint=True)
        assert f.method == "stop" and f.clean_shutdown and f.exiting
        assert alive(pid), "the postmaster is still waiting for its archiver"
        assert (n.data_dir / "standby.signal").exists()
        closed = list(archive.iterdir())
        assert fence_stop(n.cfg, at_checkpoint=True).last_lsn == f.last_lsn  # a retry: same proof

        gate.touch()
        deadline = time.monotonic() + 30
        while alive(pid):
            assert time.monotonic() < deadline, "the postmaster did not exit after the push"
            time.sleep(0.02)
        # The segment the shutdown closed reached the archive after the fence returned, and
        # the checkpoint the fence reported is the last one the server wrote.
        assert len(list(archive.iterdir())) > len(closed)
        assert n.ctl.controldata()["Latest checkpoint location"] == f.last_lsn
        n.ctl.start()
        st = pg_status(n.cfg)
        assert st.role == "standby" and st.upstream is None
        assert lift_stop_fence(n.cfg)
        # Lifting the stop fence restarts it a primary that is still read-only fenced (the
        # hold was taken before the read-only fence, and lifting it must not drop that one):
        # `eagle-dr unfence` checks the epoch before anything can write.
        assert pg_status(n.cfg).role == "primary"
        assert _try_write(n, "superuser", BYPASSES[0], 6003) is not None
        unfence(n.cfg)
        assert pg_status(n.cfg).role == "primary"
        assert _try_write(n, "superuser", BYPASSES[0], 6002) is None
        with psycopg.connect(n.cfg.dsn(), autocommit=True) as conn:
            assert conn.execute("show work_mem").fetchone()[0] == "7MB"
        assert not (n.data_dir / "standby.signal").exists()


def test_a_server_starting_after_a_clean_stop_is_not_taken_for_one_exiting(node):
    """pg_control keeps "shut down" from a clean stop until the next start's startup ends: only
    the postmaster's own "stopping" status (postmaster.pid, line 8) tells a shutdown past its
    checkpoint from a start that has not finished. Read with the node's real pg_control."""
    import os

    ctl = node.ctl
    ctl.stop("fast")
    pidfile = node.data_dir / "postmaster.pid"
    try:
        # A live pid (this test's), as a postmaster's would be while it starts.
        for status, exiting in (("starting", False), ("ready", False), ("stopping", True)):
            pidfile.write_text(f"{os.getpid()}\n{node.data_dir}\n0\n{node.cfg.port}\n/tmp\n*\n0 0\n{status}\n")
            assert ctl.running()
            assert (ctl.exiting() is not None) is exiting, status
        # The same "stopping" with pg_control from before a stop that found it in production:
        # an unchanged checkpoint is not the shutdown's.
        was = {**ctl.controldata(), "Database cluster state": "in production"}
        assert ctl.exiting(was) is None
    finally:
        pidfile.unlink(missing_ok=True)
        ctl.start()


def drain_archive_until_empty(cfg) -> bool:
    from activities.postgres.fence import drain_archive
    with psycopg.connect(cfg.dsn(), autocommit=True) as conn:
        conn.execute("select pg_switch_wal()")
    return drain_archive(cfg, max_wait=30) == 0


def test_a_refused_port_proves_the_server_gone_only_without_a_proxy(tmp_path):
    """A closed port on the server's own host: nothing listens, nobody writes (no wait for a
    self-fence). Behind a proxy the same refusal may come from the proxy for a live server."""
    import socket

    from eagle_dr.config import PostgresConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    direct = PostgresConfig(port=closed)
    assert fence_read_only(direct, timeout=2).refused is True
    proxied = fence_read_only(direct.model_copy(update={"behind_proxy": True}), timeout=2)
    assert not proxied.reachable and proxied.refused is False, proxied


def test_pg_control_read_in_process_agrees_with_pg_controldata_and_refuses_a_torn_read(node, tmp_path):
    """The stop fence's poll reads pg_control itself (activities/postgres/pgcontrol.py)."""
    from activities.postgres.pgcontrol import read_control

    keys = ("Database cluster state", "Latest checkpoint location", "Latest checkpoint's REDO location",
            "Latest checkpoint's TimeLineID", "pg_control version number")

    def both() -> tuple[dict, dict]:
        full = node.ctl.controldata()
        return read_control(node.data_dir), {k: full[k] for k in keys}

    with psycopg.connect(node.cfg.dsn(), autocommit=True) as conn:
        conn.execute("insert into alerts (id, region, payload) values (6001, 'x', '{}')")
        conn.execute("checkpoint")
    mine, theirs = both()
    assert mine == theirs and theirs["Database cluster state"] == "in production", (mine, theirs)
    node.ctl.stop("fast")
    try:
        mine, theirs = both()
        assert mine == theirs and theirs["Database cluster state"] == "shut down", (mine, theirs)
        # A read that caught the file half rewritten: the CRC no longer matches, so no answer
        # (the caller asks pg_controldata, which warns about the same read).
        torn = bytearray((node.data_dir / "global" / "pg_control").read_bytes())
        torn[33] ^= 0x01  # inside the latest checkpoint location
        (tmp_path / "global").mkdir()
        (tmp_path / "global" / "pg_control").write_bytes(bytes(torn))
        assert read_control(tmp_path) is None
        (tmp_path / "global" / "pg_control").write_bytes(bytes(torn[:40]))
        assert read_control(tmp_path) is None
        assert read_control(tmp_path / "nowhere") is None
    finally:
        node.ctl.start()


def test_the_stop_signal_goes_only_to_this_data_directorys_postmaster(node, tmp_path):
    """PgCtl signals the pid file's pid itself only when it is still this cluster's postmaster:
    never one of its backends, nor another cluster's process that reused a dead server's pid."""
    from activities.postgres.ctl import _is_postmaster

    assert _is_postmaster(node.ctl.pid, node.data_dir)
    assert not _is_postmaster(node.ctl.pid, tmp_path)  # the same process, another cluster's pid file
    with psycopg.connect(node.cfg.dsn(), autocommit=True) as conn:
        backend = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert not _is_postmaster(backend, node.data_dir)


def test_a_fenced_old_primary_made_a_standby_keeps_its_operators_settings_and_loses_the_fence(node):
    """write_standby_config (switchover's rejoin, failback's rewind, a rebuild) rewrote
    postgresql.auto.conf with only the recovery settings: every ALTER SYSTEM tuning of the
    node was lost, and a standby whose max_connections fell below its primary's stops
    replaying. Now it keeps them, and drops only the fence and the earlier recovery settings."""
    from activities.postgres.ctl import PgCtl
    from activities.postgres.fence import fence_read_only
    from eagle_dr.config import PostgresConfig

    auto = node.data_dir / "postgresql.auto.conf"
    before = auto.read_text()
    with psycopg.connect(node.cfg.dsn(), autocommit=True) as conn:
        conn.execute("alter system set work_mem = '77MB'")
        conn.execute("alter system set session_preload_libraries = 'auto_explain'")
    assert fence_read_only(node.cfg).method == "read_only"  # its library joins auto_explain
    fence_stop(node.cfg)  # and the hold: a standby of nothing
    # Nothing listens there: the node starts as a standby and waits for its primary.
    PgCtl(node.cfg).write_standby_config(PostgresConfig(port=PORT + 9), "old-primary", "old_primary_slot")
    node.ctl.start()
    try:
        with psycopg.connect(node.cfg.dsn(), autocommit=True) as conn:  # no fence: any session starts
            got = {n: conn.execute(f"show {n}").fetchone()[0] for n in
                   ("work_mem", "session_preload_libraries", "default_transaction_read_only", "primary_slot_name")}
            assert conn.execute("select pg_is_in_recovery()").fetchone()[0]
        assert got == {"work_mem": "77MB", "session_preload_libraries": "auto_explain",
                       "default_transaction_read_only": "off", "primary_slot_name": "old_primary_slot"}, got
        text = auto.read_text()
        assert "eagle-dr fence" not in text and "primary_conninfo = ''" not in text, text
        assert text.count("primary_conninfo") == 1 and text.count("work_mem") == 1, text
    finally:
        # Back to the primary the other tests of the module share.
        node.ctl.stop("fast")
        (node.data_dir / "standby.signal").unlink(missing_ok=True)
        (node.data_dir / "eagle_dr_fence.json").unlink(missing_ok=True)
        auto.write_text(before)
        node.ctl.start()


def test_a_workers_fence_never_takes_over_another_mark(node):
    """A runbook fenced the node between the worker's check and its fence: the runbook keeps
    its mark (and with it the undo that lifts it), and a worker's self-fence never turns a
    "superseded" fence into one the worker would lift."""
    from activities.postgres.fence import fenced_by
    from activities.postgres.status import connect

    def mark() -> str | None:
        with connect(node.cfg) as conn:
            return fenced_by(conn)

    try:
        assert fence_read_only(node.cfg, by="runbook").error is None
        for worker in ("superseded", "self"):
            f = fence_read_only(node.cfg, by=worker)
            assert f.method == "read_only" and f.error == "already fenced by runbook", f
            assert mark() == "runbook"
        unfence(node.cfg)
        assert fence_read_only(node.cfg, by="superseded").error is None
        assert fence_read_only(node.cfg, by="self").error == "already fenced by superseded"
        assert mark() == "superseded"
    finally:
        unfence(node.cfg)
    assert _try_write(node, "app", BYPASSES[0], 9000) is None
