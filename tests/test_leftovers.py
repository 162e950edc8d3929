"""What a terminated runbook leaves behind (Terminate cannot be handled by a workflow):
`eagle-dr status` names the fences no runbook owns, with the repair, and `eagle-dr unfence`
lifts them. Real lab."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg

from activities.postgres.fence import fence_read_only
from activities.redis import failover as redis_failover
from eagle_dr.status import collect
from tests.lab_helpers import _names


def test_status_names_fences_no_runbook_owns_and_unfence_lifts_them(lab, lab_config_path):
    a, _ = _names(lab)
    fence_read_only(lab.cfg.region(a).postgres)
    redis_failover.fence(lab.cfg.region(a).redis)
    st = collect(lab.cfg)
    assert st.move_running is False
    text = "\n".join(st.leftovers)
    assert f"{a}: PostgreSQL is a fenced read-only primary" in text and f"{a}: Redis refuses writes" in text
    assert f"eagle-dr unfence --region {a}" in text
    assert st.primaries == []  # a fenced primary is no writer: no split brain is claimed

    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "unfence",
                        "--region", a], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert collect(lab.cfg).leftovers == []
    with psycopg.connect(lab.cfg.region(a).postgres.dsn(), autocommit=True) as conn:
        conn.execute("create temp table writable_again (x int)")
        assert conn.execute("show default_transaction_read_only").fetchone()[0] == "off"
    lab.redis(a).client().set("eagle-dr:leftover-test", "ok")


def test_unfence_refuses_a_region_a_newer_move_superseded(lab, lab_config_path):
    """`eagle-dr unfence` carries the epoch of the move whose fences it lifts (the newest one the
    fenced region records); another region recording a newer one means a later move superseded
    it, and lifting its fences would bring back a stale primary."""
    from activities.redis import epoch as redis_epochs

    a, b = _names(lab)
    fence_read_only(lab.cfg.region(a).postgres)
    redis_failover.fence(lab.cfg.region(a).redis)
    # A newer move's record on b's side: written on b's Redis replica, made writable for it.
    replica = lab.redis(b).client()
    replica.config_set("replica-read-only", "no")
    try:
        replica.hset(redis_epochs.key(lab.cfg.service), mapping={"epoch": 99, "region": b, "workflow_id": "dr-move-x",
                                                                 "run_id": "run-newer"})
        cli = [sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "unfence", "--region", a]
        r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr + r.stdout
        assert "records DR epoch 99" in " ".join(r.stderr.split()) and "superseded" in r.stderr
        st = collect(lab.cfg)
        assert any(f"{a}: PostgreSQL is a fenced read-only primary" in x for x in st.leftovers)  # nothing lifted
        assert any(f"{a}: Redis refuses writes" in x for x in st.leftovers)
        replica.delete(redis_epochs.key(lab.cfg.service))
    finally:
        replica.config_set("replica-read-only", "yes")
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert collect(lab.cfg).leftovers == []


def _settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and not name.strip().startswith("#"):
            out[name.strip()] = value.strip()
    return out


def test_a_hold_left_on_a_running_primary_is_named_and_lifted_in_place(lab, lab_config_path):
    """A switchover terminated between its hold and its stop (Terminate cannot be handled)
    leaves a writable primary whose data directory says "standby" at the next start: nothing
    shows it until a restart brings the primary up read-only. `eagle-dr status` names it, and
    `eagle-dr unfence --local` lifts it in place: the same postmaster keeps serving (no
    restart), and a restart afterwards comes up as the writable primary."""
    from activities.postgres.ctl import FENCE_MARKER, PgCtl
    from activities.postgres.ctl import RECOVERY_KEYS
    from activities.postgres.fence import hold_as_standby
    from activities.postgres.status import pg_status

    a, _ = _names(lab)
    pg = lab.cfg.region(a).postgres
    ctl = PgCtl(pg)
    assert pg_status(pg, files=True).hold == "none"
    auto_before = (ctl.data_dir / "postgresql.auto.conf").read_text()
    assert hold_as_standby(ctl, before_stop=True)  # what the switchover's hold step does
    pid = ctl.pid
    st = collect(lab.cfg)
    assert st.move_running is False
    assert next(r for r in st.regions if r.name == a).postgres.hold == "eagle-dr"
    text = "\n".join(st.leftovers)
    assert f"{a}: PostgreSQL is a writable primary, but its data directory still holds a stop fence's hold" in text, \
        text
    assert f"eagle-dr unfence --region {a} --local" in text, text

    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "unfence",
                        "--region", a, "--local"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert ctl.pid == pid  # lifted in place: no restart, no write outage
    assert not (ctl.data_dir / "standby.signal").exists() and not (ctl.data_dir / FENCE_MARKER).exists()
    # Reset through ALTER SYSTEM (serialised with any other): every setting from before the
    # hold is there, none of the hold's, and its comment is gone.
    after = (ctl.data_dir / "postgresql.auto.conf").read_text()
    assert "eagle-dr fence" not in after, after
    # The recovery settings are reset, not restored: the node is a primary (a rebuilt standby's
    # timeline pin, say, would only be waited for at its next start in recovery).
    assert _settings(after) == {k: v for k, v in _settings(auto_before).items() if k not in RECOVERY_KEYS}, after
    assert collect(lab.cfg).leftovers == []
    ctl.stop("fast")
    ctl.start()
    st = pg_status(pg, files=True)
    assert st.role == "primary" and not st.read_only and st.hold == "none", st
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("create temp table writable_after_restart (x int)")
    # The tests after this one expect a streaming standby.
    standby = lab.cfg.region(lab.cfg.other(a).name).postgres
    deadline = time.monotonic() + 60
    while pg_status(standby).receiver_status != "streaming":
        assert time.monotonic() < deadline, "the standby did not stream again after the primary's restart"
        time.sleep(0.2)
