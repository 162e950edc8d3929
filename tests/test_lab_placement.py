"""The lab run by root from a checkout its servers' user cannot enter (a clone under /root):
state and binaries go where that user can reach them, and no tool runs from the closed cwd."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from eagle_dr.config import DEFAULT_CONFIG, LabConfig, load_config
from lab.lab import Lab
from lab.osuser import RELOCATED_STATE_ROOT, ensure_lab_user, make_dir, reachable_state_dir
from lab.postgres import PostgresNode
from lab.scratch_postgres import PG15_BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root runs servers as another user")

SHIFT = int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")) - 2000


@pytest.fixture
def closed_dir() -> Path:
    """A directory like /root: root's own, mode 700, in an open one (pytest's tmp_path is
    itself under a 700 directory)."""
    base = Path(tempfile.mkdtemp(prefix="eagle-dr-placement-"))
    os.chmod(base, 0o755)
    d = base / "home"
    d.mkdir()
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(base, ignore_errors=True)


def test_state_moves_out_of_a_closed_checkout(closed_dir):
    user = ensure_lab_user(LabConfig().os_user)
    configured = closed_dir / "checkout" / ".eagle-dr"
    assert not user.can_reach(configured)
    moved = reachable_state_dir(configured, user.name)
    assert moved.parent == RELOCATED_STATE_ROOT and moved.name.startswith("checkout-eagle-dr-")
    assert user.can_reach(moved / "regions" / "pgdata")
    assert reachable_state_dir(configured, user.name) == moved, "the same place on every call"
    assert reachable_state_dir(closed_dir.parent / "x" / ".eagle-dr", user.name) != moved
    os.chmod(closed_dir, 0o711)
    assert reachable_state_dir(configured, user.name) == configured


def test_config_of_a_closed_checkout_points_everything_at_the_moved_state(closed_dir):
    cfg_path = closed_dir / "checkout" / "config" / "eagle-dr.yaml"
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_text(DEFAULT_CONFIG.read_text())
    cfg = load_config(cfg_path, env={})
    state = Path(cfg.lab.state_dir)
    assert state.parent == RELOCATED_STATE_ROOT
    assert cfg.primary.postgres.data_dir == f"{state}/regions/us-east-1/pgdata"
    assert cfg.primary.redis.password.file == f"{state}/secrets/redis-password"
    # What the lab hands its workers (EAGLE_DR_STATE_DIR) resolves to the same place.
    assert load_config(cfg_path, env={"EAGLE_DR_STATE_DIR": str(state)}).lab.state_dir == str(state)


def test_binary_out_of_reach_is_linked_where_the_user_can_run_it(closed_dir):
    user = ensure_lab_user(LabConfig().os_user)
    binary = closed_dir / "venv" / "bin" / "tool"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho ok\n")
    os.chmod(binary, 0o755)
    into = closed_dir.parent / "state" / "bin"
    got = user.reachable_binary(str(binary), into)
    assert Path(got).parent == into and user.can_reach(Path(got))
    assert Path(got).read_text() == binary.read_text()
    assert user.reachable_binary(str(binary), into) == got
    assert user.reachable_binary("/bin/sh", into) == "/bin/sh"


def test_a_closed_checkouts_postgres_initialises_and_starts(closed_dir, monkeypatch):
    """What `make drill` does first, from a clone in a directory the lab user cannot enter:
    initdb and start in the state the config names, run from that directory. It used to fail
    with 'initdb: could not change directory ... Permission denied'."""
    monkeypatch.chdir(closed_dir)
    cfg_path = closed_dir / "checkout" / "config" / "eagle-dr.yaml"
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_text(DEFAULT_CONFIG.read_text())
    cfg = load_config(cfg_path, env={})
    user = ensure_lab_user(cfg.lab.os_user)
    state = Path(cfg.lab.state_dir)
    pg = cfg.primary.postgres.model_copy(update={"port": 17860 + SHIFT,
                                                 "bin_dir": PG15_BIN if os.path.isdir(PG15_BIN) else None})
    lab = Lab(cfg)
    # With the lab's CA and server certificate, as Lab.postgres builds it: the config asks for
    # verify-full, so a node without them refuses every TCP connection.
    node = PostgresNode(pg, Path(pg.data_dir), Path(pg.socket_dir), user, "closed-checkout", tls=lab.tls)
    try:
        make_dir(state, user, 0o755)  # as Lab.up_servers does
        lab.ensure_secrets()  # the PostgreSQL passwords the bootstrap sets
        node.init_primary()
        with node.connect() as conn:
            assert conn.execute("select count(*) from alerts").fetchone()[0] == 0
        # No tool of the lab user's starts in (and tries to return to) the closed directory.
        assert node.ctl.run([node.ctl.tool("pg_ctl"), "--version"]).stderr == ""
    finally:
        if node.running():
            node.stop("immediate")
        shutil.rmtree(state, ignore_errors=True)
