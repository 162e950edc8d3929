"""Starting and stopping a region's PostgreSQL with pg_ctl, as the data directory's owner.

Only a worker in the same region (same host in the lab) can do this: these calls act on
``data_dir``, not on a network address.
"""

from __future__ import annotations

import codecs
import glob
import os
import pwd
import re
import select
import signal
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from psycopg.conninfo import make_conninfo

from activities.postgres.credentials import write_passfile
from activities.postgres.pgcontrol import read_control
from eagle_dr.config import PostgresConfig


# What pg_ctl stop sends for each mode (pg_ctl.c, set_mode).
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _is_postmaster(pid: int, data_dir: Path) -> bool:
    """The pid file's pid is still this data directory's postmaster: a postgres process whose
    working directory is the data directory (the postmaster changes into it) and whose parent's
    is not (its backends share the postmaster's). Not a pid reused since, by another cluster's
    server or one of its backends, which a signal must never reach; unreadable (another user's
    process) counts as no, and pg_ctl, as the server's user, is asked instead."""
    try:
        home = os.path.realpath(data_dir)
        if os.path.realpath(f"/proc/{pid}/cwd") != home:
            return False
        with open(f"/proc/{pid}/stat") as f:
            head, tail = f.read().rsplit(")", 1)
        if head.split(" (", 1)[1] not in ("postgres", "postmaster"):
            return False
        parent = int(tail.split()[1])
        try:
            return os.path.realpath(f"/proc/{parent}/cwd") != home
        except OSError:
            return True  # a parent we may not read (a supervisor as another user): not a backend's
    except (OSError, IndexError, ValueError):
        return False


def alive(pid: int | None) -> bool:
    """A process that runs: an unreaped zombie (init here reaps late) counts as gone."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# In the data directory of an old primary held as a standby by a stop fence (fence.py).
FENCE_MARKER = "eagle_dr_fence.json"
# A read-only fence (activities/postgres/fence.py) names this non-existent library in
# session_preload_libraries: every new session fails at start, except a superuser's that
# overrides the setting in its startup packet, as eagle-dr's own connections do.
FENCE_LIBRARY = "eagle_dr_fenced_old_primary"
# Who put the read-only fence on, in postgresql.auto.conf beside it: "runbook", or "self" for
# a regional worker's self-fence (workers/self_fence.py), which only a fence of its own may lift.
FENCED_BY = "eagle_dr.fenced_by"
# The recovery settings a node's postgresql.auto.conf can carry: the stop fence's hold writes
# them all (fence.py, "a standby of nothing"), write_standby_config its own.
RECOVERY_TARGETS = ("recovery_target", "recovery_target_lsn", "recovery_target_name", "recovery_target_time",
                    "recovery_target_xid")
RECOVERY_KEYS = ("primary_conninfo", "primary_slot_name", "restore_command", "recovery_target_timeline",
                 *RECOVERY_TARGETS)
PROMOTE_TRIGGER = "promote_trigger_file"  # PostgreSQL 12-15 only (fence.py)
# The line the stop fence's hold puts above its recovery settings (fence.py).
HOLD_COMMENT = "# eagle-dr fence: this old primary must not take writes; it starts as a standby of nothing."
# What write_standby_config writes itself, or takes out of postgresql.auto.conf: the recovery
# settings (a stop fence's "standby of nothing", an earlier upstream, a PITR's targets and
# what they do at the end), the read-only fence and its mark (its library is taken out of
# session_preload_libraries, the rest kept), and hot_standby (off, the standby would never
# take the reads that tell eagle-dr it streams: a rejoin would wait out its deadline).
_STANDBY_REWRITES = (*RECOVERY_KEYS, "recovery_target_action", "recovery_target_inclusive", PROMOTE_TRIGGER,
                     "default_transaction_read_only", FENCED_BY, "hot_standby")
_STANDBY_COMMENT = "# Written by eagle-dr when this node became a standby."


def _reap(proc: subprocess.Popen, gave_up: list[str], tool: str) -> None:
    """Wait a bounded time for a tool's exit: one killed in uninterruptible I/O ends only when
    its I/O does, and is left to end then (its zombie with it) rather than waited for here."""
    if proc.returncode is not None or any(g.endswith(_LEFT_BEHIND) for g in gave_up):
        return  # reaped, or already waited for once (the caller's finally reaps again)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gave_up.append(f"{tool} did not exit 10 s after the kill (uninterruptible I/O?); {_LEFT_BEHIND}")


_LEFT_BEHIND = "left behind"


class PgCtlError(RuntimeError):
    pass


def bin_dir(cfg: PostgresConfig) -> str:
    if cfg.bin_dir:
        return cfg.bin_dir
    # Debian keeps server binaries in /usr/lib/postgresql/<major>/bin, off PATH.
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    p = shutil.which("pg_ctl")
    if not p:
        raise PgCtlError("PostgreSQL server binaries not found (Debian package 'postgresql')")
    return os.path.dirname(p)


def in_netns(netns: str, argv: list[str], uid: int | None = None, gid: int | None = None) -> list[str]:
    """``argv`` run in network namespace ``netns`` (the lab's partition tests), as uid/gid when
    given: into the namespace as root, then down to the user, since `ip netns exec` needs the
    privilege that subprocess's user= would drop first."""
    drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"] if uid is not None else []
    return ["ip", "netns", "exec", netns, *drop, *argv]


class PgCtl:
    def __init__(self, cfg: PostgresConfig, netns: str | None = None):
        if not cfg.data_dir:
            raise PgCtlError(f"postgres {cfg.host}:{cfg.port}: data_dir is not configured")
        self.cfg = cfg
        # The lab's partition tests (lab/netns.py): the server and its tools run in this network
        # namespace. Only the lab sets it; a regional worker already runs in its region's.
        self.netns = netns
        # Absolute: the tools run from "/" when they run as another user (see run).
        self.data_dir = Path(cfg.data_dir).absolute()
        self.log = self.data_dir.parent / "postgresql.log"

    def tool(self, name: str) -> str:
        return os.path.join(bin_dir(self.cfg), name)

    def run(self, argv: list[str], check: bool = False, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv, kw = self._as_server_user(argv, env)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise PgCtlError(f"{os.path.basename(argv[0])} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    @contextmanager
    def lines(self, argv: list[str], idle_timeout_s: float,
              env: dict[str, str] | None = None) -> Iterator[tuple[Iterator[str], list[str]]]:
        """Run a tool whose output can be far larger than memory (pg_waldump of a long
        divergence) and hand over its stdout line by line (without the line break); the second
        item is filled with its stderr once stdout is exhausted. The tool is killed if the
        caller stops early, and if it prints nothing for ``idle_timeout_s``: a read hung on its
        storage. The activities around it heartbeat from a thread of their own, so without this
        a hung tool would hold the step until its start-to-close timeout. The pipe is read with
        a timeout of its own, so a tool the kill cannot end (uninterruptible I/O) is left
        behind rather than waited for. Killed so, its stderr says why and carries no end of WAL
        (callers then refuse the read as incomplete)."""
        tool = os.path.basename(argv[0])
        argv, kw = self._as_server_user(argv, env)
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, **kw)
            stderr: list[str] = []
            gave_up: list[str] = []

            def read() -> Iterator[str]:
                assert proc.stdout is not None
                fd = proc.stdout.fileno()
                # Replaced, not raised on: pg_waldump prints user strings (a prepared transaction's
                # name, a logical message's prefix) in the database's encoding, which need not be
                # UTF-8. Split on "\n" only: a "\r" inside such a string stays inside its line.
                decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
                rest = ""
                while True:
                    if not select.select([fd], [], [], idle_timeout_s)[0]:
                        gave_up.append(f"{tool} killed: no output for {idle_timeout_s:g} s")
                        proc.kill()
                        break
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    lines = (rest + decode(chunk)).split("\n")
                    rest = lines.pop()
                    yield from lines
                tail = rest + decode(b"", final=True)
                if tail and not gave_up:
                    yield tail
                _reap(proc, gave_up, tool)
                err.seek(0)
                stderr.append(err.read() + "".join(f"\n{why}" for why in gave_up))

            try:
                yield read(), stderr
            finally:
                if proc.poll() is None:
                    proc.kill()
                _reap(proc, gave_up, tool)
                if proc.stdout is not None:
                    proc.stdout.close()

    def _as_server_user(self, argv: list[str], env: dict[str, str] | None) -> tuple[list[str], dict]:
        kw: dict = {"env": {**os.environ, **env}} if env else {}
        if os.geteuid() == 0 and self.cfg.os_user:
            # cwd "/": the server tools change back to their starting directory (initdb: "could
            # not change directory"), and the caller's (a checkout under /root) may be closed to them.
            kw |= {"user": self.cfg.os_user, "extra_groups": [], "cwd": "/"}
            # HOME of the user the tool runs as: libpq looks for ~/.postgresql/postgresql.crt on
            # every TLS connection (a standby's walreceiver, pg_basebackup, pg_rewind) and fails
            # on root's private home ("Permission denied") instead of going on without one.
            kw["env"] = {**kw.get("env", os.environ), "HOME": _home_of(self.cfg.os_user)}
        if self.netns and os.geteuid() == 0:
            user = kw.pop("user", None)
            kw.pop("extra_groups", None)
            if user:
                import pwd

                pw = pwd.getpwnam(user)
                argv = in_netns(self.netns, argv, pw.pw_uid, pw.pw_gid)
            else:
                argv = in_netns(self.netns, argv)
        return argv, kw

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return alive(self.pid)

    def start(self, timeout: int = 120, extra: str = "") -> None:
        if self.running():
            return
        # A kill -9 leaves postmaster.pid behind; PostgreSQL refuses to start while that pid
        # is still in the process table (an unreaped zombie counts), and it is known dead here.
        stale = self.data_dir / "postmaster.pid"
        if stale.exists():
            stale.unlink()
        # The socket lock file names the dead postmaster too.
        if self.cfg.socket_dir:
            for name in (f".s.PGSQL.{self.cfg.port}.lock", f".s.PGSQL.{self.cfg.port}"):
                p = Path(self.cfg.socket_dir) / name
                if p.exists():
                    p.unlink()
        opts = f"-p {self.cfg.port}" + (f" -k {self.cfg.socket_dir}" if self.cfg.socket_dir else "") + \
            (f" {extra}" if extra else "")
        r = self.run([self.tool("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t", str(timeout),
                      "-o", opts, "start"], timeout=timeout + 30)
        if r.returncode != 0:
            tail = self.log.read_text()[-1200:] if self.log.exists() else ""
            raise PgCtlError(f"pg_ctl start failed: {r.stdout}{r.stderr}\n{tail}")

    def start_isolated(self, timeout: int = 120) -> None:
        """Start read-only and reachable only through its Unix socket: to read a fenced old
        primary's data without letting any client write to it."""
        if self.running():
            raise PgCtlError("refusing an isolated start: the server is already running")
        if not self.cfg.socket_dir:
            raise PgCtlError("an isolated start needs socket_dir")
        # A read-only fence's session_preload_libraries would refuse our own session too.
        self.start(timeout, extra="-c listen_addresses='' -c default_transaction_read_only=on "
                                  "-c session_preload_libraries=''")

    def _request_stop(self, mode: str) -> int | None:
        """Send the stop signal and return the postmaster's pid to wait on (None: not running).
        "-W": pg_ctl only sends the signal; callers wait themselves. pg_ctl's own wait polls the
        pid file every 100 ms (WAITS_PER_SEC 10), which alone is a third of a switchover's
        write-gap budget; the callers poll every 5 ms."""
        pid = self.pid
        if not alive(pid):
            return None
        if _is_postmaster(pid, self.data_dir):
            # The signal pg_ctl -W would send, sent from here: pg_ctl is a process started as
            # the server's user (9-15 ms in the lab's switchovers, all of it write outage).
            try:
                os.kill(pid, _STOP_SIGNALS[mode])
                return pid
            except ProcessLookupError:
                return None
            except PermissionError:
                pass  # another user's server, and we are not root: pg_ctl as that user
        r = self.run([self.tool("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-W", "stop"], timeout=30)
        if r.returncode != 0 and alive(pid) and self.pid == pid:
            raise PgCtlError(f"pg_ctl stop failed: {r.stderr.strip()}")
        return pid

    def stop(self, mode: str = "fast", timeout: int = 120, kill_after: float | None = None) -> bool:
        """Stop and wait for the exit. ``kill_after``: a server not gone by then is SIGKILLed
        with its children (a hung or frozen host never acts on pg_ctl's signal). Returns
        whether it had to be killed."""
        pid = self._request_stop(mode)
        if pid is None:
            return False
        # The postmaster exits only after the checkpointer wrote the shutdown checkpoint, so
        # what callers read next (pg_controldata) is as final as after "pg_ctl -w".
        deadline = time.monotonic() + (timeout if kill_after is None else min(timeout, kill_after))
        while alive(pid):
            if time.monotonic() > deadline:
                if kill_after is not None:
                    self.kill()
                    return True
                raise PgCtlError(f"pg_ctl stop -m {mode}: the server (pid {pid}) did not stop within {timeout}s")
            time.sleep(0.005)
        return False

    def stop_to_checkpoint(self, mode: str = "fast", timeout: int = 120,
                           was: dict[str, str] | None = None) -> dict[str, str] | None:
        """Ask for a stop and return once the shutdown checkpoint is written, not once the
        postmaster has exited: pg_control's fields as read then, or None when it had exited.

        With archiving on, a shutdown switches to a new WAL segment before its checkpoint and
        then waits for the archiver to push the segment it closed: most of a fast stop with an
        S3 repository (0.8 s in the lab), and nothing that writes. pg_control turns "shut
        down" only after the checkpoint record is flushed, and by then every backend is gone and
        nothing may insert WAL again in this postmaster's life, so that checkpoint is the last
        record it writes; what callers read next (controldata) is as final as after the exit.
        The rest of the shutdown (the archiver's push, the walsenders' last sends) goes on
        alone; ``stop`` waits for it where a step needs the server gone.

        ``was``: pg_control as read before the request. When it said "in production", only a
        checkpoint other than that one's is the shutdown's (see ``exiting``)."""
        pid = self._request_stop(mode)
        if pid is None:
            return None
        deadline = time.monotonic() + timeout
        while alive(pid):
            if (data := self.exiting(was)) is not None:
                return data if alive(pid) else None
            if time.monotonic() > deadline:
                raise PgCtlError(f"pg_ctl stop -m {mode}: the server (pid {pid}) wrote no shutdown checkpoint "
                                 f"within {timeout}s")
            time.sleep(0.005)
        return None

    def pm_status(self) -> str | None:
        """The postmaster's own status line in postmaster.pid: starting, stopping, ready, standby."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().split("\n")
        except OSError:
            return None
        return lines[7].strip() if len(lines) > 7 else None

    def exiting(self, was: dict[str, str] | None = None) -> dict[str, str] | None:
        """pg_control's fields when the running postmaster is past its shutdown checkpoint, else
        None. Both must hold: its status line says "stopping" (a stop was asked for), and
        pg_control says "shut down". pg_control alone is not enough: a server *starting* after a
        clean stop keeps the old "shut down" until its startup ends, and it was read as exiting
        (a fence that fenced nothing). A server stopped while still starting never took a write,
        so the old checkpoint is then still its last record. ``was`` (read before the stop was
        asked for) saying "in production": the checkpoint must also be a new one. Read with the
        CRC checked: pg_controldata warns about a torn read of a file being rewritten, which is
        then read again rather than believed."""
        if self.pm_status() != "stopping":
            return None
        # Read here, not by pg_controldata, while it can (pgcontrol.py): this is polled inside
        # the write outage, and each pg_controldata run took 10-38 ms of it.
        data = read_control(self.data_dir) or self.controldata(check=False)
        if data is None or data.get("Database cluster state") != "shut down":
            return None
        if was is not None and was.get("Database cluster state") == "in production" and \
                data.get("Latest checkpoint location") == was.get("Latest checkpoint location"):
            return None
        return data

    def children(self) -> list[int]:
        """The postmaster's child processes (its backends and auxiliary processes)."""
        pid, out = self.pid, []
        if not pid:
            return out
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            out.append(int(entry))
                except (OSError, IndexError, ValueError):
                    continue
        return out

    def kill(self, timeout: float = 15) -> None:
        """SIGKILL the postmaster and its children together (killing only the postmaster
        leaves its children running; see shared lab notes), then wait until they are gone.
        Sent with ``pg_ctl kill`` as the data directory's owner. For a process that does not
        react to pg_ctl stop, e.g. one stuck (or SIGSTOPped) in recovery."""
        pid = self.pid
        if not alive(pid):
            return
        victims = [pid, *self.children()]
        for p in victims:
            self.run([self.tool("pg_ctl"), "kill", "KILL", str(p)], timeout=30)
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise PgCtlError(f"processes {victims} still alive {timeout:.0f}s after SIGKILL")
            time.sleep(0.05)

    def controldata(self, check: bool = True) -> dict[str, str] | None:
        """pg_control's fields (English labels: LC_ALL=C). ``check`` False: None for a read that
        failed or that pg_controldata flags as torn (CRC mismatch) instead of raising."""
        r = self.run([self.tool("pg_controldata"), "-D", str(self.data_dir)], check=check, env={"LC_ALL": "C"})
        if not check and (r.returncode != 0 or "WARNING" in r.stdout or "WARNING" in r.stderr):
            return None
        return _fields(r.stdout)

    @property
    def passfile(self) -> Path:
        """The replication password a standby's primary_conninfo names (see write_standby_config)."""
        return self.data_dir.parent / f"{self.data_dir.name}.replication.pgpass"

    def write_standby_config(self, primary: PostgresConfig, application_name: str, slot: str) -> None:
        """standby.signal, and postgresql.auto.conf with the recovery settings for ``primary``.

        The file keeps every other ALTER SYSTEM setting (an operator's tuning; after
        pg_rewind, the source's, which is the primary this node now follows), without the
        read-only fence a switchover left in it and without any earlier recovery settings: a
        standby whose max_connections or max_worker_processes fell below its primary's stops
        replaying, and the tuning would be gone when it is promoted back."""
        # The replication password goes in a passfile beside the data directory, not into
        # postgresql.auto.conf: pg_basebackup and pg_rewind copy that file from node to node,
        # and every base backup (those in S3 too) would carry the password; a standby's own
        # file never leaves its host, and rotating the password is rewriting one file (read
        # at the walreceiver's next connect), with no config change on the server.
        conninfo = self.standby_conninfo(primary, application_name)
        auto = self.data_dir / "postgresql.auto.conf"
        kept = _without_standby_settings(auto.read_text() if auto.exists() else "")
        text = "".join(line + "\n" for line in kept) + (
            f"{_STANDBY_COMMENT}\n"
            f"primary_conninfo = {_guc_string(conninfo)}\n"
            f"primary_slot_name = '{slot}'\n")
        signal = self.data_dir / "standby.signal"
        # Owned by the data directory's owner, so the server can read (and ALTER SYSTEM rewrite) them.
        self.write_file(auto, text)
        self.write_file(signal, "")
        # A real standby now: no fence left for an unfence to "restore" into a primary.
        (self.data_dir / FENCE_MARKER).unlink(missing_ok=True)

    def standby_conninfo(self, primary: PostgresConfig, application_name: str) -> str:
        """primary_conninfo for streaming from ``primary``, its password in this node's passfile."""
        st = self.data_dir.stat()
        passfile = write_passfile(self.passfile, primary, (st.st_uid, st.st_gid))
        # The replication stream crosses regions: it gets the primary's TLS settings
        # (verify-full in the lab), read by this standby's walreceiver.
        params = {"host": primary.host, "port": primary.port, "user": primary.replication_user,
                  "application_name": application_name, **primary.ssl_params}
        if passfile:
            params["passfile"] = str(passfile)
        return make_conninfo("", **params)

    def write_file(self, path: Path, text: str) -> None:
        """Write a file in the data directory durably (a fence must survive a power cut), owned
        by the data directory's owner so the server can read it (and ALTER SYSTEM rewrite it)."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0 and self.cfg.os_user:
            st = self.data_dir.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _fields(controldata: str) -> dict[str, str]:
    out = {}
    for line in controldata.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def setting_name(line: str) -> str | None:
    """The setting a line of postgresql.auto.conf sets, lower case as PostgreSQL reads names
    (None: a comment, a blank). The "=" is optional there: ``name 'value'`` sets it too."""
    m = _SETTING.match(line)
    return m.group(1).lower() if m else None


_SETTING = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.$]*)\s*(?:=|\s)")


def libraries(value: str | None) -> list[str]:
    """A session_preload_libraries value as its list of names."""
    return [x.strip().strip('"') for x in (value or "").split(",") if x.strip()]


def _without_standby_settings(text: str) -> list[str]:
    """The lines of a postgresql.auto.conf that write_standby_config keeps: all but the
    recovery settings, the read-only fence and its own comment lines (eagle-dr's)."""
    kept = []
    for line in text.splitlines():
        name = setting_name(line)
        if line.strip() in (_STANDBY_COMMENT, HOLD_COMMENT) or name in _STANDBY_REWRITES:
            continue
        if name == "session_preload_libraries":
            libs = libraries(line.partition("=")[2].strip().strip("'"))
            if FENCE_LIBRARY in libs:
                libs = [x for x in libs if x != FENCE_LIBRARY]
                if not libs:
                    continue
                line = f"session_preload_libraries = {_guc_string(', '.join(libs))}"
        kept.append(line)
    return kept


def _guc_string(value: str) -> str:
    """A quoted string for postgresql.conf: its parser reads backslash escapes and '' as a quote."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _home_of(user: str) -> str:
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return "/"
