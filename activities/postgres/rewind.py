"""Bringing a diverged old primary back as a standby: pg_rewind it onto the current
primary's timeline or, when rewind is impossible, re-clone it with pg_basebackup and say why.

What it wrote after the fork is measured and kept before this runs (``divergence.py``):
rewinding destroys it. This acts on the node's data directory: it runs on that region's worker.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from activities.postgres.ctl import PgCtl, PgCtlError
from activities.postgres.standby import _streaming_from, ensure_slot
from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig


class Rewound(BaseModel):
    method: str  # "already-standby" | "pg_rewind" | "pg_basebackup"
    fallback_reason: str | None = None
    seconds: float
    upstream: str


# A rewound standby that cannot reach consistency (its primary no longer has the WAL it needs)
# waits forever: give up on it well before the activity's own timeout.
START_TIMEOUT_S = 60


def rewind_to_standby(old: PostgresConfig, primary: PostgresConfig, application_name: str, slot: str,
                      heartbeat=None) -> Rewound:
    """pg_rewind the old primary onto the new primary's timeline, else pg_basebackup it."""
    with _exclusive(Path(old.data_dir)):
        return _rewind_to_standby(old, primary, application_name, slot, heartbeat)


@contextmanager
def _exclusive(data_dir: Path):
    """One rewind per data directory: a retry started while a slow first attempt still runs
    (a missed heartbeat, not a dead worker) waits for it instead of re-cloning under it."""
    lock = data_dir.parent / f".{data_dir.name}.eagle-dr-rewind.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rewind_to_standby(old: PostgresConfig, primary: PostgresConfig, application_name: str, slot: str,
                       heartbeat=None) -> Rewound:
    t0 = time.monotonic()
    ctl = PgCtl(old)
    upstream = f"{primary.host}:{primary.port}"
    if ctl.running() and _streaming_from(old, primary):
        return Rewound(method="already-standby", seconds=0.0, upstream=upstream)
    # A worker killed mid-rewind leaves its pg_rewind or pg_basebackup running: two copies
    # writing one directory would corrupt it, so the retry ends the orphan first.
    _kill_orphans(ctl.data_dir)
    ctl.stop("fast")
    ensure_slot(primary, slot)
    # A freshly promoted primary's control file still names its pre-promotion timeline until
    # its first checkpoint completes; pg_rewind reads it from there and would stamp the
    # target with a minimum recovery point on the wrong timeline (Patroni checkpoints too).
    with connect(primary) as conn:
        conn.execute("checkpoint")
    source = f"host={primary.host} port={primary.port} user={primary.user} dbname=postgres"
    r = _run_heartbeating(ctl, [ctl.tool("pg_rewind"), "-D", str(ctl.data_dir), f"--source-server={source}"],
                          heartbeat)
    method, reason = "pg_rewind", None
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).strip().splitlines()
        # The first error line says why; pg_rewind's last lines are only context.
        reason = next((ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()),
                      lines[-1] if lines else f"exit {r.returncode}")[:500]
        method = "pg_basebackup"
        _reclone(ctl, primary, heartbeat)
    ctl.write_standby_config(primary, application_name, slot)
    try:
        ctl.start(timeout=START_TIMEOUT_S)
    except PgCtlError as e:
        if method != "pg_rewind":
            raise
        # pg_ctl -w gives up but leaves a server that waits for WAL running: stop it before
        # its directory is replaced, or it would run on with its files deleted under it.
        ctl.stop("immediate")
        # A rewound directory the server will not recover from (seen: "requested timeline
        # does not contain minimum recovery point") is no better than none: re-clone it.
        fatal = next((ln for ln in str(e).splitlines() if "FATAL" in ln), str(e).splitlines()[0])
        method, reason = "pg_basebackup", f"pg_rewind finished but the server would not start: {fatal[:400]}"
        _reclone(ctl, primary, heartbeat)
        ctl.write_standby_config(primary, application_name, slot)
        ctl.start()
    deadline = time.monotonic() + 300
    while not _streaming_from(old, primary):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{old.host}:{old.port} did not stream from {upstream} after {method}")
        if heartbeat:
            heartbeat({"waiting": "streaming", "method": method})
        time.sleep(0.1)
    return Rewound(method=method, fallback_reason=reason, seconds=time.monotonic() - t0, upstream=upstream)


def _reclone(ctl: PgCtl, primary: PostgresConfig, heartbeat) -> None:
    data = ctl.data_dir
    owner = (data.stat().st_uid, data.stat().st_gid) if data.exists() else None
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(mode=0o700)
    if owner:
        os.chown(data, *owner)
    r = _run_heartbeating(ctl, [ctl.tool("pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U",
                                primary.replication_user, "-D", str(data), "-X", "stream", "-c", "fast"], heartbeat)
    if r.returncode != 0:
        raise PgCtlError(f"pg_basebackup failed: {r.stderr.strip()}")


def _run_heartbeating(ctl: PgCtl, argv: list[str], heartbeat) -> subprocess.CompletedProcess:
    """Long copies heartbeat so a dead worker is noticed in seconds, not at start-to-close."""
    kw = {"user": ctl.cfg.os_user, "extra_groups": []} if os.geteuid() == 0 and ctl.cfg.os_user else {}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    while True:
        try:
            out, err = p.communicate(timeout=2)
            return subprocess.CompletedProcess(argv, p.returncode, out, err)
        except subprocess.TimeoutExpired:
            if heartbeat:
                heartbeat({"running": os.path.basename(argv[0])})


def _kill_orphans(data_dir: Path) -> list[int]:
    """SIGKILL any pg_rewind / pg_basebackup whose command line names ``data_dir``."""
    killed = []
    target = str(data_dir)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0].decode(errors="replace")) in ("pg_rewind", "pg_basebackup") and \
                any(a.decode(errors="replace") == target for a in argv[1:]):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
            except ProcessLookupError:
                pass
    for pid in killed:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            try:
                if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) in ("Z", "X"):
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.05)
    return killed
