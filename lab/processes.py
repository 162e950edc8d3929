"""Starting, finding and killing the lab's server processes.

The lab's servers outlive the command that started them (``eagle-dr lab up`` returns), so
every process is tracked by a pid file. A killed process may linger as a zombie until the
machine's init reaps it, and PostgreSQL refuses to start while its old postmaster pid is
still in the process table, so kills wait until the pid is really gone.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from lab.osuser import LabUser


class LabProcessError(RuntimeError):
    pass


# Pid files their servers write themselves, each working in the file's directory (Redis's and
# Sentinel's ``dir``, PostgreSQL's data directory).
SELF_WRITTEN = frozenset({"redis.pid", "sentinel.pid", "postmaster.pid"})


def read_pid(pidfile: Path) -> int | None:
    """The pid a pid file names, or None when that pid is now some other process.

    A pid file left by a dead server may name a pid the kernel has since given to an
    unrelated process (seen in CI: a stale lab state named the other test process's Redis,
    which a teardown then killed). ``spawn`` records the process's start time in clock ticks
    since boot beside the pid, which identifies it exactly. A file a server wrote itself (Redis,
    Sentinel, PostgreSQL's postmaster.pid) has only the pid; each of those servers works in
    the directory that holds its pid file (Redis's ``dir``, the data directory), so a process
    working anywhere else is not the one that wrote it. The start time alone did not do: with
    pid_max at 32768 (these VMs) a pid can come back within the minute it allowed, and a lab
    stopping its leftovers then kills another lab's Redis (the likely cause of 49 failures in
    a CI run with a second test session beside it: that Redis died as the session started).
    Where the working directory cannot be read, a process that started well after the file was
    last written cannot be the one that wrote it ("well after": a minute, so that a wall-clock
    step on a fresh VM does not disown a live server)."""
    try:
        lines = pidfile.read_text().split("\n")
        pid = int(lines[0].strip()) if lines[0].strip() else None
        written = pidfile.stat().st_mtime
    except (OSError, ValueError):
        return None
    if not pid:
        return None
    ticks = _start_ticks(pid)
    recorded = next((x[len("start="):] for x in lines[1:] if x.startswith("start=")), None)
    if recorded is not None:
        return pid if ticks is not None and str(ticks) == recorded.strip() else None
    cwd = None
    if pidfile.name in SELF_WRITTEN:  # not a spawn file of an older checkout (no start=): their cwd is ours
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            pass  # gone, or not ours to read: the start time decides
    if cwd is not None:
        return pid if os.path.realpath(cwd) == os.path.realpath(pidfile.parent) else None
    if ticks is not None and _boot_time() + ticks / os.sysconf("SC_CLK_TCK") > written + 60:
        return None
    return pid


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None when it is not running."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise LabProcessError("no btime in /proc/stat")


def is_running(pid: int | None) -> bool:
    """True for a live process; a zombie counts as dead."""
    if not pid:
        return False
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(entry)
        if fields and len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry))
    return out


def wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    """Until none of ``pids`` runs. Zombies count as gone: init reaps them in its own time,
    and the only thing they block, a PostgreSQL restart, removes the stale pid file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(is_running(p) for p in pids):
            return
        time.sleep(0.02)
    raise LabProcessError(f"processes still running after {timeout}s: {[p for p in pids if is_running(p)]}")


def kill_tree(pid: int | None, sig: int = signal.SIGKILL, timeout: float = 15.0) -> list[int]:
    """Kill a process and its direct children at once, like a host losing power.

    PostgreSQL backends call setsid(), so killing the process group misses them: the
    postmaster and its ``ps --ppid`` children must be signalled together."""
    if not pid or not is_running(pid):
        return []
    victims = [pid, *children(pid)]
    for p in victims:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        wait_gone(victims, timeout)
    return victims


def spawn(
    argv: list[str],
    *,
    pidfile: Path,
    logfile: Path,
    user: LabUser | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start a long-lived process detached from the caller and return its pid.

    A short-lived shell backgrounds the server and exits, so the server is re-parented to
    init, which reaps it when it is killed; had the caller stayed its parent, a killed
    server would stay a zombie for the caller's whole life."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_suffix(".spawn")
    script = f"{shlex.join(argv)} </dev/null >>{shlex.quote(str(logfile))} 2>&1 & echo $! > {shlex.quote(str(tmp))}"
    if user:
        user.own(logfile, pidfile.parent)
    kw = user.popen_kwargs() if user else {}
    if cwd is not None:
        kw["cwd"] = cwd
    subprocess.run(["sh", "-c", script], check=True, start_new_session=True, env=env, **kw)
    pid = int(tmp.read_text().strip())
    tmp.unlink()
    ticks = _start_ticks(pid)
    pidfile.write_text(f"{pid}\n" + (f"start={ticks}\n" if ticks is not None else ""))
    return pid


def wait_for(check, timeout: float, what: str, interval: float = 0.1):
    """Poll ``check`` until it returns a truthy value; raise with ``what`` on deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the thing we wait for is not up yet
            last_exc = e
        time.sleep(interval)
    detail = f": {last_exc}" if last_exc else ""
    raise LabProcessError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
