"""Anchor numbers: what a stock Patroni 3.0.2 + etcd 3.4 cluster does on this machine.

eagle-dr's own failover/switchover benchmarks are printed beside these figures, so they
are measured the same way the lab notes (shared/notes/lab.md, section 9) measured them:

* a single etcd (client 12301, peer 12302, metrics 12303);
* two Patroni nodes, PostgreSQL 15 on 15501/15502, Patroni REST on 12311/12312, all
  running as the unprivileged lab user, data under a throw-away temp dir;
* a probe writer that opens a **new connection** and INSERTs every 50 ms into whichever
  node accepts the write (it tries the node that last accepted one, then the other);
* failover = ``kill -9`` of the leader's Patroni **and** its postmaster **and** the
  postmaster's children at once (the backends call setsid(), so killing the process
  group would miss them, see lab notes section 3);
* host freeze ("timeout path") = the same processes SIGSTOPped and never continued: the
  survivor sees no closed socket, only silence, as after a network loss;
* switchover = ``patronictl switchover --leader X --candidate Y --force``.

Fairness (issue 10): Patroni gets the fastest ttl/loop_wait/retry_timeout that obey its
rule ``loop_wait + 2*retry_timeout <= ttl`` and this version's minimums, and that survive
a 3 s SIGSTOP of the leader node (Patroni + postmaster + children) twice without a failover
-- the same false-positive check eagle-dr must pass. The SIGSTOP is timed just before the
leader's next lease refresh, the worst phase, so a pass is not the luck of a fresh lease.

Usage::

    python -m bench.patroni_anchor --runs 5          # search the fastest passing settings, measure
    python -m bench.patroni_anchor --search-only     # only the search, each candidate's outcome
    python -m bench.patroni_anchor --runs 5 --ttl 10 --loop-wait 2 --retry-timeout 4
    from bench.patroni_anchor import run_anchor      # same figures as a dict (with "label",
                                                     # "settings" and "stall_checks")

Everything the harness starts is killed when the ``PatroniCluster`` context exits, also on
exceptions, Ctrl-C and SIGTERM: processes are found by their working directory or command
line pointing into the cluster's temp dir (PostgreSQL backends inherit the postmaster's
cwd, the data directory), not by name, so other people's servers on this host are safe.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml

from lab.osuser import LabUser, ensure_lab_user, make_dir
from lab.processes import LabProcessError, is_running, read_pid, spawn, wait_for

PG_BIN = "/usr/lib/postgresql/15/bin"
PATRONI = "/usr/bin/patroni"
PATRONICTL = "/usr/bin/patronictl"
ETCD = "/usr/bin/etcd"
ETCD_CLIENT, ETCD_PEER, ETCD_METRICS = 12301, 12302, 12303
NODES = (("node1", 15501, 12311), ("node2", 15502, 12312))
SCOPE = "anchor"
NAMESPACE = "/patroni-anchor/"
LEADER_KEY = f"{NAMESPACE}{SCOPE}/leader"
PROBE_TABLE = "anchor_probe"
WRITE_INTERVAL = 0.05

MAXIMUM_LAG_ON_FAILOVER = 1048576

# What Patroni 3.0.2 (the Debian package read in /usr/lib/python3/dist-packages/patroni/)
# enforces or silently adjusts for ttl / loop_wait / retry_timeout, with the etcd3 DCS:
#
# * validator.py: bootstrap.dcs ttl, loop_wait and retry_timeout must be ints (a float is a
#   ConfigParseError at start); config.py casts DCS values with int(), truncating silently.
# * No minimum and no check of loop_wait + 2*retry_timeout <= ttl: 3.0.2 starts with 10/2/5
#   without a word (lab notes, section 9). The minimums the docs list from 3.2 on (ttl 20,
#   loop_wait 1, retry_timeout 3) are not in this version; MODERN_MINIMUMS below has them.
# * loop_wait 0: __main__.schedule_next_run never naps, a busy loop warning "Loop time
#   exceeded" every cycle. So loop_wait >= 1.
# * retry_timeout: it is the etcd client's read timeout and the DCS retry deadline, and half
#   of it the deadline of Patroni's PostgreSQL queries. 0 makes etcd.py _calculate_timeouts
#   find no usable etcd node. 1 is accepted but breaks the leader: etcd3.py _update_leader
#   refreshes the lease, then, if the leader key is not on that lease (the lease was lost, or
#   ttl was changed, which drops the lease), raises "update_leader timeout" when less than 1 s
#   of the retry deadline is left, which with retry_timeout 1 is always: the leader demotes
#   itself instead of re-attaching its key. So retry_timeout >= 2 with etcd3.
# * ttl: etcd raises a lease TTL below its minimum (1.5 election timeouts, rounded up: 2 s
#   with etcd's defaults) to that minimum, silently; the rule with the minimums above
#   already forces ttl >= 1 + 2*2 = 5, so that never bites.
# * watchdog/base.py: a watchdog needs ttl - safety_margin (default 5) >= loop_wait; below
#   that Patroni silently runs without one ("Watchdog not supported because leader TTL ..."),
#   with mode "required" it refuses to lead. The anchor runs watchdog "off" (no
#   /dev/watchdog here), so this does not change its figures -- but a production Patroni at
#   ttl 5 has no watchdog fencing a leader that froze and woke up.
# * ha.py fetch_node_status: before taking the lock a replica asks the other members' REST
#   API with a fixed 2 s timeout, not a setting. It still asks the old leader when the
#   lease (leader and member key alike) has just expired, so a frozen leader, which accepts
#   the TCP connection and never answers, costs the survivor those 2 s ("Read timed out"
#   in its log; the host-freeze row: lock expired ~4.8 s, taken ~7 s), a dead one nothing.
PATRONI_MINIMUMS = {"ttl": 2, "loop_wait": 1, "retry_timeout": 2}
MODERN_MINIMUMS = {"ttl": 20, "loop_wait": 1, "retry_timeout": 3}


@dataclass(frozen=True)
class DcsSettings:
    """Patroni's timing settings (bootstrap.dcs). Build with ``dcs_settings`` to validate."""

    ttl: int
    loop_wait: int
    retry_timeout: int

    def as_dcs(self) -> dict:
        return {"ttl": self.ttl, "loop_wait": self.loop_wait, "retry_timeout": self.retry_timeout,
                "maximum_lag_on_failover": MAXIMUM_LAG_ON_FAILOVER}

    def describe(self) -> str:
        return f"ttl {self.ttl}, loop_wait {self.loop_wait}, retry_timeout {self.retry_timeout}"


def dcs_settings(ttl: int, loop_wait: int, retry_timeout: int,
                 minimums: dict[str, int] = PATRONI_MINIMUMS) -> DcsSettings:
    """Validated settings: ints, Patroni's minimums, and ``loop_wait + 2*retry_timeout <= ttl``.

    The rule is Patroni's own safety margin: a leader whose DCS is unreachable keeps retrying
    for retry_timeout, once in a cycle and once more before the key's lease runs out; if the
    sum exceeded the TTL the replica could take the key while the old leader still believes
    it holds it -- two writable primaries. A benchmark that breaks it would buy speed with
    the very risk the comparison is about, so it is refused, not warned about."""
    values = {"ttl": ttl, "loop_wait": loop_wait, "retry_timeout": retry_timeout}
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be a whole number of seconds (Patroni truncates it), got {v!r}")
        if v < minimums[name]:
            raise ValueError(f"{name} {v} is below the minimum {minimums[name]}")
    if loop_wait + 2 * retry_timeout > ttl:
        raise ValueError(f"ttl {ttl} breaks Patroni's rule loop_wait + 2*retry_timeout <= ttl "
                         f"({loop_wait} + 2*{retry_timeout} = {loop_wait + 2 * retry_timeout})")
    return DcsSettings(ttl, loop_wait, retry_timeout)


def legal_settings(max_ttl: int = 30, minimums: dict[str, int] = PATRONI_MINIMUMS) -> list[DcsSettings]:
    """Every legal setting up to ``max_ttl``, fastest first.

    Failure detection is the lease running out: about ttl minus the time since the leader's
    last refresh (one refresh per loop_wait), so ttl orders the candidates. At equal ttl a
    shorter loop_wait refreshes more often and so tolerates a longer stall; retry_timeout
    does not change the speed, so the smallest comes first, as asked."""
    out = []
    for ttl in range(minimums["ttl"], max_ttl + 1):
        for loop_wait in range(minimums["loop_wait"], ttl + 1):
            for retry in range(minimums["retry_timeout"], ttl + 1):
                try:
                    out.append(dcs_settings(ttl, loop_wait, retry, minimums))
                except ValueError:
                    continue
    return out


# The anchor's former 10/2/5 broke the rule (2 + 2*5 = 12 > 10); 10/2/4 is the legal neighbour.
DEFAULT_SETTINGS = dcs_settings(ttl=10, loop_wait=2, retry_timeout=4)


class AnchorError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# process bookkeeping
# --------------------------------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process, zombies included."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            table[int(entry)] = (int(rest[1]), rest[0])
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def _points_into(pid: int, root: str) -> bool:
    """True if the process' cwd or command line is inside ``root``."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
        if cwd == root or cwd.startswith(root + "/"):
            return True
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return root.encode() in f.read()
    except OSError:
        return False


def _pids_gone(pids, timeout: float) -> bool:
    """Wait until the pids have left the process table (zombies reaped), by deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.05)
    return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------------------
# HTTP helpers (stdlib only: the harness must not depend on what the venv happens to hold)
# --------------------------------------------------------------------------------------

def _http(url: str, data: bytes | None = None, timeout: float = 1.0) -> tuple[int, dict | None]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def etcd_get(key: str, timeout: float = 0.5) -> str | None:
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    _, resp = _http(f"http://127.0.0.1:{ETCD_CLIENT}/v3/kv/range", body, timeout)
    kvs = (resp or {}).get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def connect(port: int, timeout: int = 2) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True,
        connect_timeout=timeout, options="-c statement_timeout=2000",
    )


# --------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------

@dataclass
class Node:
    name: str
    pg_port: int
    rest_port: int
    dir: Path
    pid: int | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def conf(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def log(self) -> Path:
        return self.dir / "patroni.log"

    @property
    def pg_log(self) -> Path:
        return self.dir / "pglog" / "postgresql.log"

    def rest(self, path: str, timeout: float = 1.0) -> tuple[int, dict | None]:
        return _http(f"http://127.0.0.1:{self.rest_port}{path}", timeout=timeout)

    def is_leader(self) -> bool:
        try:
            return self.rest("/leader")[0] == 200
        except OSError:
            return False

    def postmaster_pid(self) -> int | None:
        return read_pid(self.data_dir / "postmaster.pid")


class PatroniCluster:
    """etcd + 2 Patroni nodes in a temp dir; a context manager that cleans up after itself."""

    def __init__(self, settings: DcsSettings = DEFAULT_SETTINGS, user: str = "eagle-dr",
                 boot_timeout: float = 120.0):
        self.settings = settings
        self.user: LabUser = ensure_lab_user(user)
        self.boot_timeout = boot_timeout
        self.root: Path | None = None
        self.nodes: list[Node] = []
        self.etcd_pid: int | None = None
        self.killed: set[int] = set()  # everything we SIGKILLed, so close() can wait for the zombies
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "PatroniCluster":
        busy = [p for p in (ETCD_CLIENT, ETCD_PEER, ETCD_METRICS) + tuple(x for n in NODES for x in n[1:])
                if _port_in_use(p)]
        if busy:
            raise AnchorError(f"ports already in use: {busy} (if a killed run left its cluster behind: "
                              "python -m bench.patroni_anchor --cleanup-stale)")
        self.root = Path(tempfile.mkdtemp(prefix="patroni-anchor-"))
        make_dir(self.root, self.user)
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _env(self, home: Path) -> dict[str, str]:
        return {
            "PATH": f"{PG_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONUNBUFFERED": "1",
        }

    def _start(self) -> None:
        assert self.root
        etcd_dir = make_dir(self.root / "etcd", self.user)
        self.etcd_pid = spawn(
            [ETCD, "--name", "lab", "--data-dir", str(etcd_dir / "data"),
             "--listen-client-urls", f"http://127.0.0.1:{ETCD_CLIENT}",
             "--advertise-client-urls", f"http://127.0.0.1:{ETCD_CLIENT}",
             "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER}",
             "--initial-cluster", f"lab=http://127.0.0.1:{ETCD_PEER}",
             "--listen-metrics-urls", f"http://127.0.0.1:{ETCD_METRICS}"],
            pidfile=etcd_dir / "etcd.pid", logfile=etcd_dir / "etcd.log", user=self.user,
            env=self._env(etcd_dir), cwd=etcd_dir,
        )
        wait_for(lambda: _http(f"http://127.0.0.1:{ETCD_CLIENT}/health")[1].get("health") == "true",
                 30, "etcd health", interval=0.05)

        for name, pg_port, rest_port in NODES:
            node = Node(name, pg_port, rest_port, make_dir(self.root / name, self.user))
            make_dir(node.dir / "pglog", self.user)
            node.conf.write_text(yaml.safe_dump(self._patroni_config(node), sort_keys=False))
            self.user.own(node.conf)
            self.nodes.append(node)
        # node1 first so it bootstraps; node2 clones from it with pg_basebackup.
        self.start_node(self.nodes[0])
        wait_for(self.nodes[0].is_leader, self.boot_timeout, "node1 to bootstrap and take the leader key")
        self.start_node(self.nodes[1])
        self.wait_healthy(self.boot_timeout)
        with connect(self.nodes[0].pg_port) as c:
            c.execute(f"create table if not exists {PROBE_TABLE} "
                      "(id bigserial primary key, node text, t timestamptz default clock_timestamp())")

    def _patroni_config(self, node: Node) -> dict:
        pw = "anchor"  # trust auth; Patroni still wants credentials to create the roles
        return {
            "scope": SCOPE,
            "namespace": NAMESPACE,
            "name": node.name,
            "log": {"level": "INFO", "format": "%(created).3f %(levelname)s: %(message)s"},
            "restapi": {"listen": f"127.0.0.1:{node.rest_port}", "connect_address": f"127.0.0.1:{node.rest_port}"},
            "etcd3": {"hosts": f"127.0.0.1:{ETCD_CLIENT}"},
            "bootstrap": {
                "dcs": {
                    **self.settings.as_dcs(),
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {"wal_log_hints": "on", "wal_keep_size": "64MB", "hot_standby": "on"},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, {"auth": "trust"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}",
                "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.data_dir),
                "bin_dir": PG_BIN,
                "pgpass": str(node.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": pw},
                    "replication": {"username": "replicator", "password": pw},
                    "rewind": {"username": "rewinder", "password": pw},
                },
                "parameters": {
                    "unix_socket_directories": str(node.dir),
                    # server log with epoch-ms timestamps: promote request / ready times
                    "logging_collector": "on",
                    "log_directory": str(node.pg_log.parent),
                    "log_filename": node.pg_log.name,
                    "log_line_prefix": "%n [%p] ",
                },
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
            "watchdog": {"mode": "off"},
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }

    def start_node(self, node: Node) -> None:
        node.pid = spawn([PATRONI, str(node.conf)], pidfile=node.dir / "patroni.pid", logfile=node.log,
                         user=self.user, env=self._env(node.dir), cwd=node.dir)

    def close(self) -> None:
        """Kill everything this cluster started and remove its temp dir. Idempotent."""
        if self._closed or self.root is None:
            return
        self._closed = True
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:  # a second Ctrl-C must not interrupt the cleanup; it is delivered afterwards
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            just_killed = self._kill_everything()
            # PID 1 here is not a real init and reaps killed processes ~1.9 s later; wait so
            # that not even zombies are left, but don't fail the caller over them. (Earlier
            # victims only count while still zombies: their pids may have been reused.)
            table = _proc_table()
            _pids_gone(just_killed | {p for p in self.killed if table.get(p, (0, ""))[1] == "Z"}, 15)
            shutil.rmtree(self.root, ignore_errors=True)
            atexit.unregister(self.close)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    def _our_processes(self) -> set[int]:
        assert self.root
        root = str(self.root)
        table = _proc_table()
        me = os.getpid()
        tracked = {p for p in [self.etcd_pid, *(n.pid for n in self.nodes), *(n.postmaster_pid() for n in self.nodes)]
                   if p and p in table and _points_into(p, root)}  # guard against pid reuse
        mine = {p for p in table if p != me and table[p][1] not in ("Z", "X") and _points_into(p, root)}
        found = _descendants(tracked | mine, table)
        found.discard(me)
        return {p for p in found if table.get(p, (0, "Z"))[1] not in ("Z", "X")}

    def _kill_everything(self, timeout: float = 20.0) -> set[int]:
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            victims = self._our_processes()
            if not victims:
                return killed
            for p in victims:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed |= victims
            if time.monotonic() > deadline:
                raise AnchorError(f"could not kill processes {sorted(victims)}")
            time.sleep(0.05)

    # -- state ----------------------------------------------------------------------------

    def other(self, node: Node) -> Node:
        return self.nodes[1] if node is self.nodes[0] else self.nodes[0]

    def by_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.pg_port == port)

    def leader(self) -> Node | None:
        leaders = [n for n in self.nodes if n.is_leader()]
        return leaders[0] if len(leaders) == 1 else None

    def healthy(self) -> Node | None:
        """The leader, if there is exactly one and the other node streams from it."""
        leader = self.leader()
        if leader is None:
            return None
        replica = self.other(leader)
        try:
            status, info = replica.rest("/replica")
        except OSError:
            return None
        if status != 200 or (info or {}).get("role") != "replica":
            return None
        with connect(leader.pg_port, timeout=1) as c:
            row = c.execute("select count(*) from pg_stat_replication where application_name = %s "
                            "and state = 'streaming'", (replica.name,)).fetchone()
        return leader if row and row[0] == 1 else None

    def wait_healthy(self, timeout: float = 90.0) -> Node:
        return wait_for(self.healthy, timeout, "a leader and a streaming replica", interval=0.1)

    def signal_node(self, node: Node, sig: int) -> set[int]:
        """Send ``sig`` to the node's Patroni, its postmaster and all their children at once.

        Signalling the postmaster's process group would miss the backends (each calls
        setsid()), so pids are collected first and signalled one by one in a tight loop;
        backends forked meanwhile are re-parented or new, so they are found by their cwd
        (the data directory) and signalled too, until no new one turns up."""
        table = _proc_table()
        pm = node.postmaster_pid()
        roots = {p for p in (node.pid, pm) if p and is_running(p)}
        if pm not in roots:
            raise AnchorError(f"{node.name}: postmaster not found")
        victims = _descendants(roots, table)
        pending = set(victims)
        while pending:
            for p in pending:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            table = _proc_table()
            found = _descendants(victims, table) | {
                p for p, (_, st) in table.items() if st not in ("Z", "X") and _points_into(p, str(node.data_dir))}
            pending = found - victims
            victims |= pending
        return victims

    def crash_node(self, node: Node) -> tuple[float, float, set[int]]:
        """kill -9 the node's Patroni, its postmaster and all their children at once.

        Returns (wall time, monotonic time, pids)."""
        t_wall, t_mono = time.time(), time.monotonic()
        victims = self.signal_node(node, signal.SIGKILL)
        self.killed |= victims
        return t_wall, t_mono, victims

    def leader_lease_ttl(self) -> int | None:
        """The granted TTL of the lease the leader key is attached to, as etcd has it."""
        body = json.dumps({"key": base64.b64encode(LEADER_KEY.encode()).decode()}).encode()
        _, resp = _http(f"http://127.0.0.1:{ETCD_CLIENT}/v3/kv/range", body, 0.5)
        kvs = (resp or {}).get("kvs") or []
        if not kvs or not kvs[0].get("lease"):
            return None
        _, lease = _http(f"http://127.0.0.1:{ETCD_CLIENT}/v3/lease/timetolive",
                         json.dumps({"ID": kvs[0]["lease"]}).encode(), 0.5)
        granted = (lease or {}).get("grantedTTL")
        return int(granted) if granted is not None else None

    def apply_settings(self, settings: DcsSettings, timeout: float = 60.0) -> None:
        """Change ttl/loop_wait/retry_timeout in the running cluster (patronictl edit-config).

        Cheaper than a new cluster per candidate, and the same path an operator takes.
        Applied means: the leader key sits on a lease with the new TTL (Patroni drops its
        lease on a TTL change and grants a new one), and both nodes have run an HA cycle
        since, so both hold the new loop_wait."""
        if settings == self.settings:
            return
        r = self.patronictl("edit-config", SCOPE, "--force", "-s", f"ttl={settings.ttl}",
                            "-s", f"loop_wait={settings.loop_wait}", "-s", f"retry_timeout={settings.retry_timeout}")
        if r.returncode != 0:
            raise AnchorError(f"patronictl edit-config failed: {r.stdout}{r.stderr}")
        self.settings = settings
        wait_for(lambda: self.leader_lease_ttl() == settings.ttl, timeout,
                 f"the leader key on a lease of {settings.ttl} s", 0.1)
        offsets = {n.name: _size(n.log) for n in self.nodes}
        wait_for(lambda: all(any("no action." in line for line in _log_lines_after(n.log, offsets[n.name]))
                             for n in self.nodes), timeout, "an HA cycle on both nodes", 0.1)
        self.wait_healthy(timeout)

    def patronictl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        node = self.nodes[0]
        return subprocess.run([PATRONICTL, "-c", str(node.conf), *args], capture_output=True, text=True,
                              timeout=timeout, env=self._env(node.dir),
                              # popen_kwargs() sets cwd "/" when run as root: the node's dir wins
                              **{**self.user.popen_kwargs(), "cwd": node.dir})


# --------------------------------------------------------------------------------------
# probe writer and DCS monitor
# --------------------------------------------------------------------------------------

@dataclass
class ProbeWriter:
    """New connection + INSERT every 50 ms to whichever node takes it.

    ``fan_out``: one writer per node instead, each every 50 ms. Used when the old leader is
    frozen rather than dead: a connection to a stopped postmaster is accepted by the kernel
    and then hangs until connect_timeout (2 s), so a single writer that tries the old node
    first would report the new leader up to 2 s late -- the client's timeout, not Patroni."""

    ports: tuple[int, int]
    interval: float = WRITE_INTERVAL
    fan_out: bool = False
    acks: list[tuple[float, int, int]] = field(default_factory=list)  # (monotonic, port, id)
    failures: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        if self.fan_out:
            self._threads = [threading.Thread(target=self._run_one, args=(p,), name=f"probe-writer-{p}", daemon=True)
                             for p in self.ports]
        else:
            self._threads = [threading.Thread(target=self._run, name="probe-writer", daemon=True)]
        self._preferred = self.ports[0]

    def __enter__(self) -> "ProbeWriter":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _run_one(self, port: int) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                new_id = self._insert(port)
                self.acks.append((time.monotonic(), port, new_id))
            except Exception:
                self.failures += 1
            nxt = max(nxt + self.interval, time.monotonic())
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def _insert(self, port: int) -> int:
        with connect(port) as c:
            return c.execute(f"insert into {PROBE_TABLE}(node) values (%s) returning id", (str(port),)).fetchone()[0]

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            other = self.ports[1] if self._preferred == self.ports[0] else self.ports[0]
            for port in (self._preferred, other):
                try:
                    new_id = self._insert(port)
                except Exception:
                    self.failures += 1
                    continue
                self.acks.append((time.monotonic(), port, new_id))
                self._preferred = port
                break
            nxt = max(nxt + self.interval, time.monotonic())
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def first_ack(self, port: int, after: float) -> tuple[float, int, int] | None:
        return next((a for a in list(self.acks) if a[1] == port and a[0] > after), None)

    def last_ack_before(self, port: int, before: float) -> tuple[float, int, int] | None:
        return next((a for a in reversed(list(self.acks)) if a[1] == port and a[0] < before), None)

    def count(self, port: int, after: float = 0.0) -> int:
        return sum(1 for a in list(self.acks) if a[1] == port and a[0] > after)

    def longest_gap(self, start: float, end: float) -> float:
        """Longest time without an acknowledged write (any node) from ``start`` to ``end``,
        counting from the last ack before ``start`` and up to ``end`` if none came since."""
        times = sorted(a[0] for a in list(self.acks))
        before = [t for t in times if t <= start]
        inside = [t for t in times if start < t <= end]
        points = ([before[-1]] if before else [start]) + inside + [end]
        return max(b - a for a, b in zip(points, points[1:]))


class LeaderKeyMonitor:
    """Polls the leader key in etcd every 20 ms and records its changes."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.changes: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-key-monitor", daemon=True)

    def __enter__(self) -> "LeaderKeyMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last: object = object()
        while not self._stop.is_set():
            try:
                value = etcd_get(LEADER_KEY)
            except OSError:
                value = "<etcd unreachable>"
            if value != last:
                self.changes.append((time.monotonic(), value))
                last = value
            self._stop.wait(self.interval)

    def first(self, pred, after: float) -> float | None:
        return next((t for t, v in list(self.changes) if t >= after and pred(v)), None)


def _log_lines_after(path: Path, offset: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _first_log_time(path: Path, offset: int, needle: str) -> float | None:
    """Epoch time of the first line after ``offset`` containing ``needle`` (lines start with epoch secs)."""
    for line in _log_lines_after(path, offset):
        if needle in line:
            try:
                return float(line.split(" ", 1)[0])
            except ValueError:
                continue
    return None


def _last_log_time_before(path: Path, needle: str, before: float) -> float | None:
    """Epoch time of the last line containing ``needle`` logged before ``before``."""
    last = None
    for line in _log_lines_after(path, 0):
        if needle in line:
            try:
                t = float(line.split(" ", 1)[0])
            except ValueError:
                continue
            if t < before:
                last = t
    return last


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _lost_acks(cluster: PatroniCluster, writer: ProbeWriter, old_port: int, new_leader: Node) -> int:
    ids = [a[2] for a in writer.acks if a[1] == old_port]
    if not ids:
        return 0
    with connect(new_leader.pg_port) as c:
        present = c.execute(f"select count(*) from {PROBE_TABLE} where id = any(%s)", (ids,)).fetchone()[0]
    return len(ids) - present


def _rejoin(cluster: PatroniCluster, timeout: float = 90.0) -> tuple[Node, bool]:
    """Wait for 2 healthy nodes; if the rejoin is stuck, reinit the replica once."""
    try:
        return cluster.wait_healthy(timeout), False
    except LabProcessError:
        leader = cluster.leader()
        if leader is None:
            raise
        r = cluster.patronictl("reinit", SCOPE, cluster.other(leader).name, "--force")
        if r.returncode != 0:
            raise AnchorError(f"patronictl reinit failed: {r.stdout}{r.stderr}")
        return cluster.wait_healthy(timeout), True


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------

WARMUP_WRITES = 5


def measure_failover(cluster: PatroniCluster, timeout: float = 60.0, fault: str = "kill") -> dict:
    """kill -9 the leader (Patroni + postmaster + backends); time to the first write on the new leader.

    fault="freeze": SIGSTOP the same processes and never continue them -- a host freeze,
    which the survivor cannot tell from a network loss: nothing closes a socket, every
    request to the old node hangs until a timeout (the "timeout path"). Measured with the
    fan-out writer (see ProbeWriter); the frozen processes are killed afterwards.

    detection_s: kill -> the survivor takes the leader key in etcd (polled every 20 ms), i.e.
    the moment its Patroni decides to promote; Patroni's "promoted self to leader" log line
    is the fallback. promotion_s = kill_to_first_write_s - detection_s. The killed node's
    Patroni is restarted afterwards (crash recovery + pg_rewind) and rejoin_s is how long
    until both nodes are healthy again."""
    leader = cluster.wait_healthy()
    survivor = cluster.other(leader)
    ports = (leader.pg_port, survivor.pg_port)
    log_off, pglog_off = _size(survivor.log), _size(survivor.pg_log)

    if fault not in ("kill", "freeze"):
        raise ValueError(f"fault must be 'kill' or 'freeze', got {fault!r}")
    with ProbeWriter(ports, fan_out=fault == "freeze") as writer, LeaderKeyMonitor() as keymon:
        wait_for(lambda: writer.count(leader.pg_port) >= WARMUP_WRITES, 30, "warm-up writes on the leader", 0.02)

        if fault == "kill":
            t_kill_wall, t_kill, victims = cluster.crash_node(leader)
        else:
            t_kill_wall, t_kill = time.time(), time.monotonic()
            victims = cluster.signal_node(leader, signal.SIGSTOP)

        first = wait_for(lambda: writer.first_ack(survivor.pg_port, t_kill), timeout,
                         "first write on the new leader", 0.01)

    kill_to_first = first[0] - t_kill
    last_old = writer.last_ack_before(leader.pg_port, t_kill + 1e-3)
    key_taken = keymon.first(lambda v: v == survivor.name, t_kill)
    key_gone = keymon.first(lambda v: v is None, t_kill)
    promote_log = _first_log_time(survivor.log, log_off, "promoted self to leader")
    pg_promote = _first_log_time(survivor.pg_log, pglog_off, "received promote request")
    pg_ready = _first_log_time(survivor.pg_log, pglog_off, "database system is ready to accept connections")
    # Patroni logs this after each HA cycle in which it refreshed the leader lease: the key
    # expires about ttl seconds after the last refresh, so this explains run-to-run spread.
    refreshed = _last_log_time_before(leader.log, "the leader with the lock", t_kill_wall)

    if key_taken is not None:
        detection, source = key_taken - t_kill, "etcd leader key"
    elif promote_log is not None:
        detection, source = promote_log - t_kill_wall, "patroni log"
    else:
        detection, source = float("nan"), "unknown"

    result = {
        "kill_to_first_write_s": kill_to_first,
        "detection_s": detection,
        "promotion_s": kill_to_first - detection,
        "detection_source": source,
        "last_write_before_kill_s": (t_kill - last_old[0]) if last_old else None,
        "leader_key_expired_s": (key_gone - t_kill) if key_gone is not None else None,
        "last_lease_refresh_before_kill_s": (t_kill_wall - refreshed) if refreshed else None,
        "patroni_promote_log_s": (promote_log - t_kill_wall) if promote_log else None,
        "pg_promote_request_s": (pg_promote - t_kill_wall) if pg_promote else None,
        "pg_ready_s": (pg_ready - t_kill_wall) if pg_ready else None,
        "lost_acked_writes": _lost_acks(cluster, writer, leader.pg_port, survivor),
        "old_leader": leader.name,
        "new_leader": survivor.name,
        "fault": fault,
    }
    if fault == "freeze":  # the frozen host is declared dead for good
        _, _, victims = cluster.crash_node(leader)

    # restore: once the killed processes have left the process table (no real init here, so
    # they linger as zombies for a moment), restart Patroni; it recovers and pg_rewinds.
    if not _pids_gone(victims, 30):
        raise AnchorError(f"killed processes of {leader.name} never went away")
    t_restart = time.monotonic()
    cluster.start_node(leader)
    new_leader, reinit = _rejoin(cluster)
    result["rejoin_s"] = time.monotonic() - t_restart
    result["rejoin_needed_reinit"] = reinit
    if new_leader is not survivor:
        raise AnchorError(f"unexpected leader after rejoin: {new_leader.name}")
    return result


def measure_switchover(cluster: PatroniCluster, timeout: float = 60.0) -> dict:
    """patronictl switchover while the writer runs.

    write_gap_s: last acknowledged write on the old leader -> first on the new one.
    command_s: wall time of the patronictl command."""
    leader = cluster.wait_healthy()
    candidate = cluster.other(leader)
    with ProbeWriter((leader.pg_port, candidate.pg_port)) as writer:
        wait_for(lambda: writer.count(leader.pg_port) >= WARMUP_WRITES, 30, "warm-up writes on the leader", 0.02)
        t0 = time.monotonic()
        r = cluster.patronictl("switchover", "--leader", leader.name, "--candidate", candidate.name, "--force")
        command_s = time.monotonic() - t0
        if r.returncode != 0:
            raise AnchorError(f"patronictl switchover failed ({r.returncode}): {r.stdout}{r.stderr}")
        first = wait_for(lambda: writer.first_ack(candidate.pg_port, t0), timeout,
                         "first write on the new leader", 0.01)
    last_old = writer.last_ack_before(leader.pg_port, first[0])
    writes_on_old_after_new = sum(1 for a in writer.acks if a[1] == leader.pg_port and a[0] > first[0])
    result = {
        "write_gap_s": first[0] - last_old[0] if last_old else float("nan"),
        "command_s": command_s,
        "start_to_first_write_s": first[0] - t0,
        "lost_acked_writes": _lost_acks(cluster, writer, leader.pg_port, candidate),
        "writes_on_old_after_new": writes_on_old_after_new,
        "old_leader": leader.name,
        "new_leader": candidate.name,
    }
    t_rejoin = time.monotonic()
    new_leader, reinit = _rejoin(cluster)
    result["rejoin_s"] = time.monotonic() - t_rejoin  # after patronictl returned
    result["rejoin_needed_reinit"] = reinit
    if new_leader is not candidate:
        raise AnchorError(f"unexpected leader after switchover: {new_leader.name}")
    return result


def _wait_worst_phase(node: Node, loop_wait: int, margin: float = 0.15, timeout: float = 30.0) -> float:
    """Wait until just before the leader's next lease refresh; return when its last one was.

    The leader refreshes its lease once per HA cycle (etcd3 _update_leader forces it) and
    logs "the leader with the lock" right after. A stall that starts just before the next
    refresh finds the lease already a whole loop_wait old: the worst moment, so a setting
    that survives it survives any phase -- a pass is then not the luck of a fresh lease."""
    off = _size(node.log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t_lock = _last_log_time_after(node.log, off, "the leader with the lock")
        if t_lock is not None:
            target = t_lock + loop_wait - margin
            if target > time.time() + 0.02:
                # pacing the fault to a moment on the leader's clock, not waiting for a state
                time.sleep(target - time.time())
                return t_lock
        time.sleep(0.01)
    raise AnchorError(f"{node.name} logged no lease refresh in {timeout} s")


def _last_log_time_after(path: Path, offset: int, needle: str) -> float | None:
    last = None
    for line in _log_lines_after(path, offset):
        if needle in line:
            try:
                last = float(line.split(" ", 1)[0])
            except ValueError:
                continue
    return last


def _in_recovery(node: Node) -> bool | None:
    try:
        with connect(node.pg_port, timeout=1) as c:
            return c.execute("select pg_is_in_recovery()").fetchone()[0]
    except Exception:
        return None


def stall_check(cluster: PatroniCluster, seconds: float = 3.0, watch: float | None = None,
                worst_phase: bool = True) -> dict:
    """SIGSTOP the leader node (Patroni, postmaster and all children) for ``seconds``, SIGCONT
    it, and watch whether Patroni fails over. A pass is: the leader key never leaves the
    leader and the replica stays in recovery, for ttl + loop_wait + 3 s after the SIGCONT
    (by then a lease the stall had doomed has long run out). The writer runs as in the
    failover measurement; longest_write_gap_s is its longest time without an ack from the
    SIGSTOP to the end of the watch.

    An expired lock counts as a failover even if the stopped leader wins it back: whether
    the replica takes it first is then a race (it first asks the silent leader's REST API,
    which times out in 2 s), not something the settings guarantee."""
    st = cluster.settings
    leader = cluster.wait_healthy()
    replica = cluster.other(leader)
    watch = st.ttl + st.loop_wait + 3.0 if watch is None else watch
    failover: str | None = None
    with ProbeWriter((leader.pg_port, replica.pg_port)) as writer, LeaderKeyMonitor() as keymon:
        wait_for(lambda: writer.count(leader.pg_port) >= WARMUP_WRITES, 30, "warm-up writes on the leader", 0.02)
        t_refresh = _wait_worst_phase(leader, st.loop_wait) if worst_phase else None
        t_stop_wall, t_stop = time.time(), time.monotonic()
        stopped: set[int] = set()
        try:
            stopped = cluster.signal_node(leader, signal.SIGSTOP)
            # the fault's length, not a synchronisation; counted from the first SIGSTOP, as
            # collecting the processes may take a while on a loaded host
            threading.Event().wait(max(0.0, seconds - (time.monotonic() - t_stop)))
        finally:
            for p in stopped:
                try:
                    os.kill(p, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        t_cont = time.monotonic()
        deadline = t_cont + watch
        while failover is None and time.monotonic() < deadline:
            lost = next((v for t, v in list(keymon.changes) if t >= t_stop and v != leader.name), leader.name)
            if lost != leader.name:
                failover = f"{lost} took the leader key" if lost else f"{leader.name}'s leader lock expired"
            elif _in_recovery(replica) is False:
                failover = f"{replica.name} promoted"
            else:
                time.sleep(0.1)
        t_end = time.monotonic()
    changes = [(round(t - t_stop, 3), v) for t, v in keymon.changes if t >= t_stop]
    result = {
        "settings": st.describe(),
        "stall_s": t_cont - t_stop,
        "lease_age_at_stop_s": (t_stop_wall - t_refresh) if t_refresh else None,
        "failover": failover is not None,
        "how": failover,
        "leader_key_changes_s": changes,
        "longest_write_gap_s": writer.longest_gap(t_stop, t_end),
        "watched_after_cont_s": t_end - t_cont,
        "old_leader": leader.name,
    }
    if failover:
        new_leader, reinit = _rejoin(cluster)
        result["new_leader"] = new_leader.name
        result["rejoin_needed_reinit"] = reinit
    else:
        cluster.wait_healthy()
    return result


def _dominated(candidate: DcsSettings, failed: list[DcsSettings]) -> bool:
    """A longer loop_wait at the same ttl and retry_timeout only lets the lease age more
    between refreshes, so it cannot survive a stall the shorter one did not."""
    return any(f.ttl == candidate.ttl and f.retry_timeout == candidate.retry_timeout
               and f.loop_wait <= candidate.loop_wait for f in failed)


def fastest_settings(stall_seconds: float = 3.0, cluster: PatroniCluster | None = None, checks: int = 2,
                     max_ttl: int = 30, minimums: dict[str, int] = PATRONI_MINIMUMS,
                     verbose: bool = True) -> dict:
    """The fastest legal settings that survive a ``stall_seconds`` SIGSTOP of the leader
    ``checks`` times in a row; candidates from ``legal_settings``, fastest first.

    Returns {"settings": DcsSettings | None, "stall_checks": [the passing checks],
    "tried": [{"settings", "passed", "checks"}]}. The cluster is left on the settings found
    (a new one is started and stopped if none is given)."""
    if cluster is None:
        with _sigterm_as_exit(), PatroniCluster() as own:
            return fastest_settings(stall_seconds, own, checks, max_ttl, minimums, verbose)
    tried, failed = [], []
    for cand in legal_settings(max_ttl, minimums):
        if _dominated(cand, failed):
            continue
        cluster.apply_settings(cand)
        results = []
        for _ in range(checks):
            r = stall_check(cluster, stall_seconds)
            results.append(r)
            if r["failover"]:
                break
        passed = not any(r["failover"] for r in results)
        tried.append({"settings": cand.describe(), "passed": passed, "checks": results})
        if verbose:
            print(f"{cand.describe()}: " + ("PASSED" if passed else "FAILED") + f" {stall_seconds:g} s SIGSTOP; "
                  + "; ".join(f"lease age {r['lease_age_at_stop_s'] or float('nan'):.2f} s at stop, "
                              + (r["how"] if r["failover"] else "no failover")
                              + f", write gap {r['longest_write_gap_s']:.2f} s" for r in results),
                  file=sys.stderr, flush=True)
        if passed:
            return {"settings": cand, "stall_checks": results, "tried": tried}
        failed.append(cand)
    return {"settings": None, "stall_checks": [], "tried": tried}


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------

FAILOVER_FIGURES = ("kill_to_first_write_s", "detection_s", "promotion_s", "leader_key_expired_s",
                    "last_lease_refresh_before_kill_s",
                    "pg_promote_request_s", "rejoin_s", "lost_acked_writes")
SWITCHOVER_FIGURES = ("write_gap_s", "command_s", "start_to_first_write_s", "rejoin_s", "lost_acked_writes")


def _summary(runs: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}
    return out


def cleanup_stale() -> list[int]:
    """Kill what a SIGKILLed harness left behind: processes pointing into /tmp/patroni-anchor-*."""
    roots = [str(p) for p in Path(tempfile.gettempdir()).glob("patroni-anchor-*") if p.is_dir()]
    table = _proc_table()
    victims = [p for p, (_, st) in table.items()
               if p != os.getpid() and st not in ("Z", "X") and any(_points_into(p, r) for r in roots)]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _pids_gone(victims, 15)
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)
    return victims


@contextmanager
def _sigterm_as_exit():
    """SIGTERM -> SystemExit, so the cluster's cleanup runs (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _label(settings: DcsSettings, stall_seconds: float, checks: list[dict]) -> str:
    if not checks:
        verdict = "no SIGSTOP check run"
    elif all(not c["failover"] for c in checks):
        verdict = f"passed a {stall_seconds:g} s SIGSTOP " + ("twice" if len(checks) == 2 else f"{len(checks)} times")
    else:
        verdict = f"FAILED a {stall_seconds:g} s SIGSTOP"
    return f"Patroni ({settings.describe()}; {verdict})"


def run_anchor(runs: int = 5, settings: DcsSettings | None = None, verbose: bool = False,
               stall_seconds: float = 3.0, stall_checks: int = 2, freeze_runs: int | None = None,
               max_ttl: int = 30) -> dict:
    """Failovers, host freezes and switchovers on one fresh cluster; return the figures.

    settings=None: first search the fastest legal settings that pass ``stall_checks``
    SIGSTOPs of ``stall_seconds`` (``fastest_settings``), then measure with them. Given
    settings are stall-checked too, so the result always says what they tolerate.
    ``freeze_runs`` (default ``runs``): failovers where the leader is SIGSTOPped for good."""
    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    freeze_runs = runs if freeze_runs is None else freeze_runs
    t_start = time.monotonic()
    failovers, freezes, switchovers = [], [], []
    search = None
    with _sigterm_as_exit(), PatroniCluster(settings or DEFAULT_SETTINGS) as cluster:
        say(f"cluster up in {time.monotonic() - t_start:.1f} s ({cluster.root})")
        if settings is None:
            search = fastest_settings(stall_seconds, cluster, stall_checks, max_ttl, verbose=verbose)
            if search["settings"] is None:
                raise AnchorError(f"no legal setting up to ttl {max_ttl} survived a {stall_seconds:g} s SIGSTOP")
            checks = search["stall_checks"]
        else:
            checks = [stall_check(cluster, stall_seconds) for _ in range(stall_checks)]
            for c in checks:
                say(f"stall check ({settings.describe()}): "
                    + (c["how"] if c["failover"] else "no failover") + f", write gap {c['longest_write_gap_s']:.2f} s")
        used = cluster.settings
        say(f"measuring with {used.describe()}")
        for i in range(runs):
            r = measure_failover(cluster)
            failovers.append(r)
            say(f"failover {i + 1}/{runs}: kill->first write {r['kill_to_first_write_s']:.3f} s "
                f"(detection {r['detection_s']:.3f} s, promotion {r['promotion_s']:.3f} s, "
                f"rejoin {r['rejoin_s']:.1f} s, lost {r['lost_acked_writes']})")
        for i in range(freeze_runs):
            r = measure_failover(cluster, fault="freeze")
            freezes.append(r)
            say(f"freeze {i + 1}/{freeze_runs}: SIGSTOP->first write {r['kill_to_first_write_s']:.3f} s "
                f"(detection {r['detection_s']:.3f} s, promotion {r['promotion_s']:.3f} s, "
                f"rejoin {r['rejoin_s']:.1f} s, lost {r['lost_acked_writes']})")
        for i in range(runs):
            r = measure_switchover(cluster)
            switchovers.append(r)
            say(f"switchover {i + 1}/{runs}: write gap {r['write_gap_s']:.3f} s, "
                f"patronictl {r['command_s']:.3f} s, lost {r['lost_acked_writes']}")
    return {
        "system": "Patroni 3.0.2 + etcd 3.4, 2 nodes, PostgreSQL 15",
        "label": _label(used, stall_seconds, checks),
        "settings": {"ttl": used.ttl, "loop_wait": used.loop_wait, "retry_timeout": used.retry_timeout,
                     "write_interval_s": WRITE_INTERVAL},
        "stall_seconds": stall_seconds,
        "stall_checks": checks,
        "stall_checks_passed": bool(checks) and not any(c["failover"] for c in checks),
        "settings_search": search and search["tried"],
        "runs": runs,
        "failover": _summary(failovers, FAILOVER_FIGURES),
        "freeze": _summary(freezes, FAILOVER_FIGURES),
        "switchover": _summary(switchovers, SWITCHOVER_FIGURES),
        "raw": {"failover": failovers, "freeze": freezes, "switchover": switchovers},
        "wall_s": time.monotonic() - t_start,
    }


def _print_report(res: dict) -> None:
    print(f"{res['label']}: {res['system']}, writer every "
          f"{int(res['settings']['write_interval_s'] * 1000)} ms; {res['runs']} runs each")
    for c in res["stall_checks"]:
        age = c["lease_age_at_stop_s"]
        print(f"  stall check: SIGSTOP {c['stall_s']:.2f} s"
              + (f" with the lease {age:.2f} s old" if age is not None else "")
              + ": " + (c["how"] if c["failover"] else "no failover")
              + f"; longest write gap {c['longest_write_gap_s']:.2f} s")
    titles = {"failover": "failover (kill -9)", "freeze": "failover (host freeze: SIGSTOP, never continued)",
              "switchover": "switchover"}
    for section in ("failover", "freeze", "switchover"):
        if not res[section]:
            continue
        print(f"\n{titles[section]}:")
        print(f"  {'figure':34} {'median':>9} {'min':>9} {'max':>9}   runs")
        for k, s in res[section].items():
            floats = any(isinstance(v, float) for v in s["runs"])
            fmt = (lambda v: f"{v:9.3f}") if floats else (lambda v: f"{v:9g}")
            runs = ", ".join(f"{v:.3f}" if floats else str(v) for v in s["runs"])
            print(f"  {k:34} {fmt(s['median'])} {fmt(s['min'])} {fmt(s['max'])}   {runs}")
    print(f"\ntotal wall time {res['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="failovers, freezes and switchovers each (default 5)")
    ap.add_argument("--fastest", action="store_true",
                    help="search the fastest legal settings that pass the SIGSTOP check (the default "
                         "unless --ttl/--loop-wait/--retry-timeout are given)")
    ap.add_argument("--ttl", type=int, help=f"DCS ttl (default {DEFAULT_SETTINGS.ttl} when another setting is given)")
    ap.add_argument("--loop-wait", type=int, help=f"DCS loop_wait (default {DEFAULT_SETTINGS.loop_wait})")
    ap.add_argument("--retry-timeout", type=int, help=f"DCS retry_timeout (default {DEFAULT_SETTINGS.retry_timeout})")
    ap.add_argument("--stall", type=float, default=3.0, help="SIGSTOP length of the false-positive check (s)")
    ap.add_argument("--stall-checks", type=int, default=2, help="SIGSTOP checks per setting (default 2)")
    ap.add_argument("--freeze-runs", type=int, help="host-freeze failovers (default: --runs)")
    ap.add_argument("--search-only", action="store_true", help="only search the fastest settings, print them")
    ap.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-run progress on stderr")
    ap.add_argument("--cleanup-stale", action="store_true",
                    help="only kill processes/remove dirs a SIGKILLed earlier run left in /tmp/patroni-anchor-*")
    args = ap.parse_args(argv)
    if args.cleanup_stale:
        print(f"killed {len(cleanup_stale())} stale processes")
        return {}
    explicit = (args.ttl, args.loop_wait, args.retry_timeout)
    if args.fastest and any(v is not None for v in explicit):
        ap.error("--fastest searches the settings: give it no --ttl/--loop-wait/--retry-timeout")
    settings = None
    if any(v is not None for v in explicit):
        try:
            settings = dcs_settings(args.ttl if args.ttl is not None else DEFAULT_SETTINGS.ttl,
                                    args.loop_wait if args.loop_wait is not None else DEFAULT_SETTINGS.loop_wait,
                                    args.retry_timeout if args.retry_timeout is not None
                                    else DEFAULT_SETTINGS.retry_timeout)
        except ValueError as e:
            ap.error(str(e))
    if args.search_only:
        found = fastest_settings(args.stall, checks=args.stall_checks, verbose=not args.quiet)
        res = {**found, "settings": found["settings"] and found["settings"].describe()}
        print(f"fastest passing: {res['settings']}")
    else:
        res = run_anchor(args.runs, settings, verbose=not args.quiet, stall_seconds=args.stall,
                         stall_checks=args.stall_checks, freeze_runs=args.freeze_runs)
        _print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
