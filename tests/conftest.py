"""Session fixtures: a real two-region lab on 127.0.0.1 and a real Temporal dev server.

The test lab uses the default config with every port moved up by PORT_SHIFT and its own
state directory, so it never collides with a developer's running ``make lab``.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from moto.server import ThreadedMotoServer

from eagle_dr.config import ConfigError, EagleConfig, LabConfig, load_config
from lab.osuser import reachable_state_dir
from lab.ports import write_shifted_config

# Below the ephemeral range (32768+), where outgoing connections could take a listen port.
# EAGLE_DR_TEST_PORT_SHIFT lets a second checkout run its tests beside this one (2000-3500).
# Under pytest-xdist (`make test` runs three processes) each process gets a lab of its own,
# 350 ports above the previous one: a step at which no port of one lab is a
# port of the other (100 puts one lab's S3 TLS port on the other's SeaweedFS volume gRPC port;
# 900 and 1000 collide too). The environment is rewritten, not only PORT_SHIFT, because test
# modules and the CLI subprocesses read it too.
_XDIST = os.environ.get("PYTEST_XDIST_WORKER", "")
if _XDIST.startswith("gw") and "EAGLE_DR_TEST_BASE_SHIFT" not in os.environ:
    os.environ["EAGLE_DR_TEST_BASE_SHIFT"] = os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000")
    os.environ["EAGLE_DR_TEST_PORT_SHIFT"] = str(int(os.environ["EAGLE_DR_TEST_BASE_SHIFT"]) + 350 * int(_XDIST[2:]))
PORT_SHIFT = int(os.environ.get("EAGLE_DR_TEST_PORT_SHIFT", "2000"))


def write_test_config(directory: Path, shift: int = PORT_SHIFT, **overrides) -> Path:
    """The default config on shifted ports, with automatic failover OFF unless a test asks for
    it: the suite shares one lab, its tests kill regions and stop servers on purpose, and an
    always-on monitor started by a test (``schedules apply``) must never move the lab under
    the tests that follow. Tests of automatic failover start their own monitor with it on."""
    path = write_shifted_config(directory, shift, **overrides)
    doc = yaml.safe_load(path.read_text())
    if "auto_failover" not in (overrides.get("health") or {}):
        doc.setdefault("health", {})["auto_failover"] = False
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


TEST_LAB_DIR = Path(__file__).resolve().parent.parent / (".eagle-dr-test" + (f"-{_XDIST}" if _XDIST not in ("", "gw0") else ""))


def _stop_leftovers(d: Path) -> None:
    """A test run killed before its teardown leaves servers behind: stop them by their pid files."""
    cfg_path = d / "eagle-dr.yaml"
    if not cfg_path.exists():
        return
    from eagle_dr.devserver import DevServer
    from lab.lab import Lab

    try:
        cfg = load_config(cfg_path, env={})
    except ConfigError:
        # Written by an older checkout whose config this one no longer accepts: stop what its
        # pid files name instead.
        from lab.processes import kill_tree, read_pid

        for pidfile in d.rglob("*.pid"):
            kill_tree(read_pid(pidfile))
        return
    Lab(cfg).down()
    DevServer(cfg).down()


@pytest.fixture(scope="session")
def lab_dir():
    """A fixed place, so the next run can find and stop what a killed run left behind."""
    d = TEST_LAB_DIR
    _stop_leftovers(d)
    fresh_lab_dir(d)
    yield d


def fresh_lab_dir(d: Path) -> None:
    """An empty lab directory at ``d`` (its servers already stopped), with no state left of an
    earlier or killed run: a state brought back would restart its servers' data as it was, and
    its pid files would name whatever process has the pid now."""
    shutil.rmtree(d, ignore_errors=True)
    # Root running from a checkout the lab user cannot reach (under /root): the state lives
    # elsewhere (lab.osuser.reachable_state_dir), and a killed run's must go too.
    state = reachable_state_dir(d / "state", LabConfig().os_user)
    if state != d / "state":
        shutil.rmtree(state, ignore_errors=True)
    d.mkdir()
    # The lab's servers run as an unprivileged user that must reach the state directory.
    os.chmod(d, 0o755)


@pytest.fixture(scope="session")
def lab_config_path(lab_dir) -> Path:
    return write_test_config(lab_dir)


@pytest.fixture(scope="session")
def lab_cfg(lab_config_path) -> EagleConfig:
    return load_config(lab_config_path, env={})


@pytest.fixture(scope="session")
def dev_server(lab_cfg):
    from eagle_dr.devserver import DevServer

    ds = DevServer(lab_cfg)
    ds.up()
    yield ds
    ds.down()


@pytest.fixture(scope="session")
def lab(lab_cfg, lab_config_path, dev_server):
    """PostgreSQL A->B, Redis + 3 Sentinels, SeaweedFS, regional and control workers."""
    from lab.lab import Lab

    lab = Lab(lab_cfg, str(lab_config_path))
    try:
        lab.up_servers()
        lab.wait_replication()
        lab.start_workers()
        lab.start_codec_server()
        yield lab
        if _XDIST:
            _scan_for_secrets(lab, dev_server)
    finally:
        lab.down()


def _scan_for_secrets(lab, dev_server) -> None:
    """Under pytest-xdist, every history this process's dev server holds once its tests are
    done, scanned for the lab's secrets (see tests/test_zz_secret_scan.py): a hit fails the
    session as an error in this teardown."""
    import asyncio

    from eagle_dr.temporal import connect
    from tests.secret_scan import _lab_secrets, scan_histories

    async def scan():
        client = await connect(target_host=dev_server.address, config=lab.cfg)
        return await scan_histories(client, _lab_secrets(lab))

    hits, runs = asyncio.run(scan())
    assert hits == [], f"{len(hits)} secret(s) in {len(runs)} histories of {_XDIST}'s dev server: {hits[:5]}"


# -- moto: the Route 53 API over HTTP --------------------------------------------------------------


def _free_port(ports: range) -> int:
    # ThreadedMotoServer.start() waits forever if its bind fails, so find a port it can take.
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    raise OSError(errno.EADDRINUSE, f"no free port in {ports}")


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    port = _free_port(range(19600, 19700))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def client(dev_server, lab_cfg):
    """A client like the lab's workers and CLI: the lab's payload codec (its key written first,
    so a test that starts runs before the lab is up encrypts with the key the workers use)."""
    from eagle_dr.temporal import connect
    from lab.lab import Lab

    Lab(lab_cfg).ensure_secrets()
    return await connect(target_host=dev_server.address, config=lab_cfg)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def configured_topology(lab, client):
    """The configured primary is primary and the other region streams from it: what a module
    that names ``lab.cfg.primary`` as "the primary" assumes (``pytestmark =
    pytest.mark.usefixtures("configured_topology")``). A file before it may have left the other
    region primary: in one process the order of files decides that, under xdist the
    distribution. A switchover back costs a few seconds, only when needed."""
    from activities.postgres.status import pg_status
    from eagle_dr.launch import start_move
    from workflows.models import SwitchoverInput

    want = lab.cfg.primary.name
    now = next((r.name for r in lab.cfg.regions if pg_status(r.postgres).role == "primary"), None)
    if now != want:
        result = await (await start_move(client, lab.cfg, SwitchoverInput(
            service=lab.cfg.service, target_region=want, reason="tests: back to the configured topology"))).result()
        assert result.outcome == "succeeded", result
    elif lab.router.active_region() != want:
        # A test that moved the primary by hand may have left routing behind (the file keeps
        # its epoch: no runbook's later move is refused for it).
        lab.router.set_active_region(want)
    lab.wait_replication()
    yield


# -- a headless Debian Chromium (tests/browser.py) ---------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def browser(tmp_path):
    """A fresh headless Chromium page; ``await browser.shot(name)`` and ``await browser.open_file(html)``
    keep screenshots under this test's tmp_path. Skips only when Debian's chromium is missing."""
    from tests.browser import chromium

    async with chromium(tmp_path) as b:
        yield b


# -- CI's 30-minute budget: the long variants of a tested behaviour run in `make test-long` ---


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a long variant of behaviour `make test` already covers; "
                                       "run by `make test-long` (EAGLE_DR_LONG=all)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        _bound_coroutine(item)
    if os.environ.get("EAGLE_DR_LONG") == "all":
        return
    long = [i for i in items if i.get_closest_marker("long")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [i for i in items if not i.get_closest_marker("long")]


# -- a hung test fails where it waits, and the run goes on -----------------------------------

# The slowest test takes under 2 minutes here (`--durations`). A test still running after
# TEST_BOUND is cancelled where it awaits (a workflow's result, a poll): its traceback names
# that line, its `finally` blocks run (a SIGSTOPped server gets its SIGCONT) and the next test
# starts. Without it one stuck workflow held CI until its time ran out, naming nothing.
TEST_BOUND = float(os.environ.get("EAGLE_DR_TEST_BOUND", "420"))


class TestHung(AssertionError):
    """The test was still running past TEST_BOUND."""


def _bound_coroutine(item: pytest.Item) -> None:
    import asyncio
    import functools
    import inspect

    func = getattr(item, "obj", None)
    # pytest-asyncio runs `item.obj` when the test runs (its runtest), so a wrapper set here is
    # what it runs. A hypothesis test is run through another attribute: left alone.
    if not inspect.iscoroutinefunction(func) or getattr(func, "hypothesis", None) is not None:
        return

    @functools.wraps(func)
    async def bounded(*args, **kwargs):
        try:
            async with asyncio.timeout(TEST_BOUND) as bound:
                return await func(*args, **kwargs)
        except TimeoutError as e:
            if not bound.expired():
                raise  # the test's own (a wait_for of its own): its failure, not a hang
            raise TestHung(f"{item.nodeid} was still running after {TEST_BOUND:.0f} s "
                           f"(EAGLE_DR_TEST_BOUND); the traceback above shows where it waited") from e

    item.obj = bounded


# -- the SDK's crash at interpreter exit (sdk-python#300): leave with pytest's own status ----

_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
