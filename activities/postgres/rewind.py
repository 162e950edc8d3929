"""Bringing a diverged old primary back as a standby: pg_rewind it onto the current
primary's timeline or, when rewind is impossible, re-clone it with pg_basebackup and say why.

What it wrote after the fork is measured and kept before this runs (``divergence.py``):
rewinding destroys it. This acts on the node's data directory: it runs on that region's worker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

from pydantic import BaseModel

from psycopg.conninfo import make_conninfo

from activities.postgres.credentials import check_source, redact, source_failure, tool_env
from activities.postgres.ctl import PgCtl, PgCtlError, alive
from activities.postgres.standby import _streaming_from, ensure_slot
from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig, scrub
from eagle_dr.locks import exclusive


class Rewound(BaseModel):
    method: str  # "already-standby" | "pg_rewind" | "pg_basebackup"
    fallback_reason: str | None = None
    seconds: float
    upstream: str
    # Where the seconds went, in order (stop, checkpoint on the primary, copy, start, until
    # streaming): a slow rewind says which part was slow.
    phases: dict[str, float] = {}

    def summary(self) -> str:
        where = ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items())
        return f"{self.method} in {self.seconds:.1f}s" + (f" ({where})" if where else "") + (
            f" (pg_rewind impossible: {self.fallback_reason})" if self.fallback_reason else "")


# A rewound standby that cannot reach consistency (its primary no longer has the WAL it needs)
# waits forever: give up on it well before the activity's own timeout.
START_TIMEOUT_S = 60
# A copy is bounded by the activity's own start-to-close; the activity heartbeats meanwhile.
COPY_TIMEOUT_S = 3600


def rewind_to_standby(old: PostgresConfig, primary: PostgresConfig, application_name: str, slot: str) -> Rewound:
    """pg_rewind the old primary onto the new primary's timeline, else pg_basebackup it."""
    with exclusive(_lock(Path(old.data_dir))):
        return _rewind_to_standby(old, primary, application_name, slot)


def _lock(data_dir: Path) -> Path:
    # One rewind per data directory (eagle_dr/locks.py): a retry waits for a slow first
    # attempt instead of re-cloning under it.
    return data_dir.parent / f".{data_dir.name}.eagle-dr-rewind.lock"


def _rewind_to_standby(old: PostgresConfig, primary: PostgresConfig, application_name: str, slot: str) -> Rewound:
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    mark = [t0]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = phases.get(name, 0.0) + now - mark[0]
        mark[0] = now

    ctl = PgCtl(old)
    upstream = f"{primary.host}:{primary.port}"
    _finish_interrupted_swap(ctl.data_dir)
    marker = rewind_marker(ctl.data_dir)
    # An earlier attempt's pg_rewind did not finish (its worker killed, its source lost
    # mid-copy): the directory holds some of the source's files and its own old control file.
    # pg_rewind run again reads it as the old primary still, and can copy too little: a
    # standby that starts, streams and differs. Only a re-clone is safe now.
    interrupted = marker.exists()
    if not interrupted and ctl.running() and _streaming_from(old, primary):
        return Rewound(method="already-standby", seconds=0.0, upstream=upstream)
    # A worker killed mid-rewind leaves its pg_rewind or pg_basebackup running: two copies
    # writing one directory would corrupt it, so the retry ends the orphan first.
    _kill_orphans(ctl.data_dir)
    _kill_orphans(_clone_dir(ctl.data_dir))
    ctl.stop("fast")
    phase("stop")
    # pg_rewind's own connection, made first by us: a wrong password or a pg_hba.conf that
    # refuses it stops the step here, with the node stopped and its directory untouched.
    check_source(primary, replication=False, what="pg_rewind")
    ensure_slot(primary, slot)
    phase("source checks")
    # A freshly promoted primary's control file still names its pre-promotion timeline until
    # its first checkpoint completes; pg_rewind reads it from there and would stamp the
    # target with a minimum recovery point on the wrong timeline (Patroni checkpoints too).
    with connect(primary) as conn:
        conn.execute("checkpoint")
    phase("checkpoint")
    if interrupted:
        method, reason = "pg_basebackup", ("an earlier attempt's pg_rewind was interrupted (worker killed, or its "
                                           "source lost mid-copy): a partly rewound directory cannot be rewound "
                                           "again safely")
        _reclone(ctl, primary)
        marker.unlink(missing_ok=True)
    else:
        method, reason = _rewind_or_reclone(ctl, primary, old, marker)
    phase(method)
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
        fatal = scrub(next((ln for ln in str(e).splitlines() if "FATAL" in ln), str(e).splitlines()[0]))
        method, reason = "pg_basebackup", f"pg_rewind finished but the server would not start: {fatal[:400]}"
        _reclone(ctl, primary)
        ctl.write_standby_config(primary, application_name, slot)
        ctl.start()
    phase("start")
    deadline = time.monotonic() + 300
    while not _streaming_from(old, primary):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{old.host}:{old.port} did not stream from {upstream} after {method}")
        time.sleep(0.1)
    phase("until streaming")
    return Rewound(method=method, fallback_reason=reason, seconds=time.monotonic() - t0, upstream=upstream,
                   phases={k: round(v, 3) for k, v in phases.items()})


# libpq's words for a connection that was never made (refused, unreachable, authentication):
# pg_rewind connects before it writes anything. A connection lost later reads otherwise
# ("server closed the connection unexpectedly", "could not fetch remote file").
_NEVER_CONNECTED = re.compile(r"connection to server (?:at|on socket) .* failed|could not connect to server")


def rewind_marker(data: Path) -> Path:
    """Present while a pg_rewind may be writing the directory (see _rewind_to_standby)."""
    return data.with_name(f".{data.name}.eagle-dr-rewinding")


def _rewind_or_reclone(ctl: PgCtl, primary: PostgresConfig, old: PostgresConfig,
                       marker: Path) -> tuple[str, str | None]:
    """pg_rewind, else (impossible) a re-clone: (method, why not pg_rewind)."""
    # No password in it: argv is readable by every user in /proc. pg_rewind gets PGPASSWORD.
    source = make_conninfo("", host=primary.host, port=primary.port, user=primary.user, dbname="postgres",
                           connect_timeout=10, **primary.ssl_params)
    marker.write_text(f"pg_rewind started {time.time():.0f} by pid {os.getpid()}\n")
    _fsync_dir(marker.parent)
    r = ctl.run([ctl.tool("pg_rewind"), "-D", str(ctl.data_dir), f"--source-server={source}"], timeout=COPY_TIMEOUT_S,
                env=tool_env(primary.password))
    if r.returncode == 0:
        marker.unlink(missing_ok=True)
        return "pg_rewind", None
    text = redact(r.stderr + r.stdout, primary, old)
    # "Could not connect" or "authentication failed" says nothing about whether a rewind
    # is possible, and is no reason to throw the only copy of this node away: stop, and
    # leave the directory as it is (pg_rewind connects before it writes anything). Only
    # what pg_rewind itself finds impossible (WAL gone, no common timeline) falls back.
    refused = source_failure(text, "pg_rewind", primary, primary.user)
    if refused:
        # Never connected: nothing was written. A connection lost mid-copy (the same class of
        # failure) keeps the marker: the retry re-clones.
        if _NEVER_CONNECTED.search(text):
            marker.unlink(missing_ok=True)
        raise refused
    lines = text.strip().splitlines()
    # The first error line says why; pg_rewind's last lines are only context.
    reason = next((ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()),
                  lines[-1] if lines else f"exit {r.returncode}")[:500]
    _reclone(ctl, primary)
    # The directory was replaced whole: nothing of the partial rewind is left.
    marker.unlink(missing_ok=True)
    return "pg_basebackup", reason


def _reclone(ctl: PgCtl, primary: PostgresConfig) -> None:
    """Replace the data directory with a fresh pg_basebackup of ``primary``.

    The copy is made beside the old directory and swapped in only once pg_basebackup has
    succeeded: until then the old one, the only copy of whatever this node held, is never
    touched. An unreachable source, a refused password or a full disk then costs a retry,
    not the node. The price is room for a second copy for the duration of the clone."""
    data = ctl.data_dir
    # The replication connection pg_basebackup will make: refused or unreachable, stop here.
    check_source(primary, replication=True, what="pg_basebackup")
    clone = _clone_dir(data)
    # A clone left by an interrupted attempt is never the only copy: start it over.
    shutil.rmtree(clone, ignore_errors=True)
    ref = data if data.exists() else data.parent
    clone.mkdir(mode=0o700)
    os.chown(clone, ref.stat().st_uid, ref.stat().st_gid)
    r = ctl.run([ctl.tool("pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U",
                 primary.replication_user, "-D", str(clone), "-X", "stream", "-c", "fast"], timeout=COPY_TIMEOUT_S,
                env=tool_env(primary.replication_secret, primary))
    if r.returncode != 0:
        shutil.rmtree(clone, ignore_errors=True)
        text = redact(r.stderr.strip() or r.stdout.strip(), primary)
        raise source_failure(text, "pg_basebackup", primary, primary.replication_user) or \
            PgCtlError(f"pg_basebackup failed ({data} untouched): {text[:1000]}")
    _swap_in(clone, data)


def _clone_dir(data: Path) -> Path:
    return data.with_name(f".{data.name}.eagle-dr-clone")


def _aside_dir(data: Path) -> Path:
    return data.with_name(f".{data.name}.eagle-dr-replaced")


def _swap_in(clone: Path, data: Path) -> None:
    """Two renames in one directory; a worker killed between them is finished by the retry
    (``_finish_interrupted_swap``)."""
    aside = _aside_dir(data)
    shutil.rmtree(aside, ignore_errors=True)  # a finished swap's leftover: ``data`` exists
    if data.exists():
        os.rename(data, aside)
    os.rename(clone, data)
    _fsync_dir(data.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _finish_interrupted_swap(data: Path) -> None:
    clone, aside = _clone_dir(data), _aside_dir(data)
    if not data.exists() and aside.exists():
        # The old directory was moved aside, which happens only after the clone succeeded:
        # the clone is complete. Had it already been renamed, ``data`` would exist.
        os.rename(clone if clone.exists() else aside, data)
        _fsync_dir(data.parent)
    if data.exists():
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copiers(data_dir: str | Path) -> list[int]:
    """The pg_rewind and pg_basebackup processes whose command line names ``data_dir``."""
    target = str(data_dir)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if os.path.basename(argv[0]) in ("pg_rewind", "pg_basebackup") and target in argv[1:]:
            found.append(int(proc.name))
    return found


def _kill_orphans(data_dir: Path) -> list[int]:
    """SIGKILL the copiers a killed worker left writing ``data_dir``, and wait until they are gone."""
    killed = []
    for pid in copiers(data_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed
