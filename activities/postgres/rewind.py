"""Bringing a failed-over old primary back as a standby: find the fork, measure what it
had that the new primary never got, keep its post-fork rows, then pg_rewind it (or, when
rewind is impossible, re-clone it with pg_basebackup and say why).

All of this acts on the old primary's data directory: it runs on that region's worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from pydantic import BaseModel

from activities.postgres.ctl import PgCtl, PgCtlError
from activities.postgres.lsn import lsn_diff, lsn_to_int
from activities.postgres.standby import _streaming_from, ensure_slot
from activities.postgres.status import connect
from eagle_dr.config import PostgresConfig


class ForkPoint(BaseModel):
    new_timeline: int
    old_timeline: int
    fork_lsn: str


class LostWal(BaseModel):
    """What the old primary wrote after the fork: the true RPO of the failover."""

    fork_lsn: str
    end_lsn: str | None
    lost_bytes: int | None
    lost_commits: int
    first_lost_commit_at: datetime | None = None
    last_commit_before_fork_at: datetime | None = None


class Rewound(BaseModel):
    method: str  # "already-standby" | "pg_rewind" | "pg_basebackup"
    fallback_reason: str | None = None
    seconds: float
    upstream: str


def fork_point(primary: PostgresConfig) -> ForkPoint:
    """The newest timeline history file on the current primary names the fork."""
    with connect(primary) as conn:
        tli = conn.execute("select ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
                           ).fetchone()[0]
        text = conn.execute("select pg_read_file(%s)", (f"pg_wal/{tli:08X}.history",)).fetchone()[0]
    last = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")][-1].split()
    return ForkPoint(new_timeline=tli, old_timeline=int(last[0]), fork_lsn=last[1])


_COMMIT = re.compile(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \w+)")
# pg_waldump ends with an error naming where the WAL stops ("invalid record length at X").
_END = re.compile(r"(?:at|after) ([0-9A-F]+/[0-9A-F]+)")


def _commit_times(output: str) -> list[datetime]:
    out = []
    for m in _COMMIT.finditer(output):
        stamp = m.group(1).rsplit(" ", 1)[0]
        out.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc))
    return out


def lost_wal(old: PostgresConfig, fork: ForkPoint) -> LostWal:
    """pg_waldump the stopped old primary's WAL from the fork on (see shared lab notes, RPO)."""
    ctl = PgCtl(old)
    wal = str(Path(old.data_dir) / "pg_wal")
    after = ctl.run([ctl.tool("pg_waldump"), "-p", wal, "-t", str(fork.old_timeline), "-s", fork.fork_lsn],
                    timeout=300)
    commits = _commit_times(after.stdout)
    m = _END.search(after.stderr)
    end = m.group(1) if m else None
    # The last commit before the fork: scan the fork's segment up to the fork.
    seg_start = lsn_to_int(fork.fork_lsn) & ~(16 * 1024 * 1024 - 1)
    before = ctl.run([ctl.tool("pg_waldump"), "-p", wal, "-t", str(fork.old_timeline),
                      "-s", f"{seg_start >> 32:X}/{seg_start & 0xFFFFFFFF:X}", "-e", fork.fork_lsn], timeout=300)
    before_commits = _commit_times(before.stdout)
    return LostWal(fork_lsn=fork.fork_lsn, end_lsn=end, lost_bytes=lsn_diff(end, fork.fork_lsn) if end else None,
                   lost_commits=len(commits), first_lost_commit_at=commits[0] if commits else None,
                   last_commit_before_fork_at=before_commits[-1] if before_commits else None)


# How far before the last pre-fork commit extraction starts: a transaction that began
# earlier (its updated_at is its statement time) may still have committed after the fork.
EXTRACTION_MARGIN = timedelta(minutes=5)


def read_old_primary(old: PostgresConfig, tables: dict[str, list[str]], since: datetime, ts_column: dict[str, str]
                     ) -> tuple[dict[str, list[dict]], dict[str, set[tuple]]]:
    """Start the old primary read-only on its socket only (no client can reach it) and read,
    per table (name -> key columns): the rows changed since ``since`` (JSON-safe dicts) and
    every key it holds (to find what it deleted). Stops it again."""
    ctl = PgCtl(old)
    ctl.start_isolated()
    rows: dict[str, list[dict]] = {}
    keys: dict[str, set[tuple]] = {}
    try:
        with psycopg.connect(host=old.socket_dir, port=old.port, dbname=old.database, user=old.user,
                             autocommit=True) as conn:
            for t, key in tables.items():
                if conn.execute("select to_regclass(%s) is null", (t,)).fetchone()[0]:
                    continue
                found = conn.execute(f'select row_to_json(x)::text from "{t}" x where "{ts_column[t]}" > %s',
                                     (since,)).fetchall()
                rows[t] = [json.loads(r[0]) for r in found]
                cols = ", ".join(f'"{k}"' for k in key)
                keys[t] = {tuple(r) for r in conn.execute(f'select {cols} from "{t}"').fetchall()}
    finally:
        ctl.stop("fast")
    return rows, keys


def rewind_to_standby(old: PostgresConfig, primary: PostgresConfig, application_name: str, slot: str,
                      heartbeat=None) -> Rewound:
    """pg_rewind the old primary onto the new primary's timeline, else pg_basebackup it."""
    t0 = time.monotonic()
    ctl = PgCtl(old)
    upstream = f"{primary.host}:{primary.port}"
    if ctl.running() and _streaming_from(old, primary):
        return Rewound(method="already-standby", seconds=0.0, upstream=upstream)
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
        ctl.start()
    except PgCtlError as e:
        if method != "pg_rewind":
            raise
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
