"""What a diverged node (the loser) wrote that the survivor never got, found before anything
rewinds it away: the fork point from the timeline history files, the post-fork WAL
(the true RPO), and the post-fork rows themselves.

The loser may be on either side of the fork. After a failover the old primary stayed on
the old timeline and the survivor's history file names the fork. In a split brain the
promoted node can lose (the active region survives): then the loser's own history file
names it. Runs on the loser's worker, with the loser stopped.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
from pydantic import BaseModel

from activities.postgres.ctl import PgCtl
from activities.postgres.lsn import int_to_lsn, lsn_diff, lsn_to_int
from activities.postgres.status import CURRENT_TIMELINE, connect
from eagle_dr.config import PostgresConfig


class NoFork(RuntimeError):
    """The two nodes' timelines do not say where they diverged."""


class ForkPoint(BaseModel):
    new_timeline: int
    old_timeline: int
    fork_lsn: str
    # The timeline the loser wrote its post-fork WAL on (old_timeline after a failover).
    loser_timeline: int | None = None


class LostWal(BaseModel):
    """What the loser wrote after the fork: the true RPO of the failover or split."""

    fork_lsn: str
    end_lsn: str | None
    lost_bytes: int | None
    lost_commits: int
    first_lost_commit_at: datetime | None = None
    last_commit_before_fork_at: datetime | None = None


def _switchpoint(history: str, parent: int) -> str | None:
    """The LSN at which the history left timeline ``parent`` (lines: parent switchpoint reason)."""
    for line in history.splitlines():
        fields = line.split()
        if fields and not line.startswith("#") and int(fields[0]) == parent:
            return fields[1]
    return None


def fork_between(survivor: PostgresConfig, loser: PostgresConfig) -> ForkPoint:
    """Where the loser's history left the survivor's; the loser must be stopped (its control
    file then names its current timeline)."""
    loser_tli = int(PgCtl(loser).controldata()["Latest checkpoint's TimeLineID"])
    with connect(survivor) as conn:
        survivor_tli = conn.execute(f"select {CURRENT_TIMELINE}").fetchone()[0]
        history = None
        if survivor_tli > loser_tli:
            history = conn.execute("select pg_read_file(%s)", (f"pg_wal/{survivor_tli:08X}.history",)).fetchone()[0]
    if survivor_tli == loser_tli:
        raise NoFork(f"both nodes are on timeline {survivor_tli}: the history files name no fork between them")
    if history is None:
        path = Path(loser.data_dir) / "pg_wal" / f"{loser_tli:08X}.history"
        history = path.read_text()
    lower, higher = min(survivor_tli, loser_tli), max(survivor_tli, loser_tli)
    lsn = _switchpoint(history, lower)
    if lsn is None:
        raise NoFork(f"timeline {higher}'s history does not descend from timeline {lower}: unrelated histories")
    return ForkPoint(new_timeline=higher, old_timeline=lower, fork_lsn=lsn, loser_timeline=loser_tli)


# pg_waldump prints commit times in its process's local time zone: it runs with TZ=UTC.
_COMMIT = re.compile(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC")
# pg_waldump ends with an error naming where the WAL stops ("invalid record length at X").
_END = re.compile(r"(?:at|after) ([0-9A-F]+/[0-9A-F]+)")
_UTC = {"TZ": "UTC"}


class WalUnreadable(RuntimeError):
    """The loser's WAL after the fork could not be read: its post-fork writes are unknown."""


def _commit_times(output: str) -> list[datetime]:
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
            for m in _COMMIT.finditer(output)]


def lost_wal(loser: PostgresConfig, fork: ForkPoint) -> LostWal:
    """pg_waldump the stopped loser's WAL from the fork on (see shared lab notes, RPO)."""
    ctl = PgCtl(loser)
    wal = str(Path(loser.data_dir) / "pg_wal")
    tli = str(fork.loser_timeline or fork.old_timeline)
    after = ctl.run([ctl.tool("pg_waldump"), "-p", wal, "-t", tli, "-s", fork.fork_lsn], timeout=300, env=_UTC)
    commits = _commit_times(after.stdout)
    # The last LSN named: "first record is after X, at Y" (a fork at a segment start) comes first.
    found = _END.findall(after.stderr)
    end = found[-1] if found else None
    # It always ends with an error; only "the WAL stops here" means everything was read. A
    # missing segment read as "0 commits" would let the rewind erase the loser's writes.
    if end is None or lsn_to_int(end) < lsn_to_int(fork.fork_lsn):
        raise WalUnreadable(f"pg_waldump of {wal} from {fork.fork_lsn} on timeline {tli}: "
                            f"{after.stderr.strip()[:400]}")
    return LostWal(fork_lsn=fork.fork_lsn, end_lsn=end, lost_bytes=lsn_diff(end, fork.fork_lsn) if end else None,
                   lost_commits=len(commits), first_lost_commit_at=commits[0] if commits else None,
                   last_commit_before_fork_at=_last_commit_before(ctl, wal, tli, str(fork.old_timeline),
                                                                  fork.fork_lsn))


SEGMENT = 16 * 1024 * 1024


def _last_commit_before(ctl: PgCtl, wal: str, tli: str, old_tli: str, fork_lsn: str, segments: int = 4
                        ) -> datetime | None:
    """The newest commit before the fork, looking back a few WAL segments (a fork right after
    a segment switch has none in its own). The fork's segment is read on the loser's timeline
    (a promoted loser's first segment there starts with a copy of the WAL up to the fork, the
    old one is renamed .partial); earlier segments belong to the old timeline."""
    end = lsn_to_int(fork_lsn)
    seg = end & ~(SEGMENT - 1)
    for i in range(segments):
        r = ctl.run([ctl.tool("pg_waldump"), "-p", wal, "-t", tli if i == 0 else old_tli, "-s", int_to_lsn(seg),
                     "-e", int_to_lsn(end)], timeout=300, env=_UTC)
        if times := _commit_times(r.stdout):
            return times[-1]
        if seg == 0:
            break
        end, seg = seg, seg - SEGMENT
    return None


# How far before the last pre-fork commit extraction starts: a transaction that began
# earlier (its updated_at is its statement time) may still have committed after the fork.
EXTRACTION_MARGIN = timedelta(minutes=5)


def read_loser(loser: PostgresConfig, tables: dict[str, list[str]], since: datetime, ts_column: dict[str, str]
               ) -> tuple[dict[str, list[dict]], dict[str, set[tuple]]]:
    """Start the loser read-only on its socket only (no client can reach it) and read, per
    table (name -> key columns): the rows changed since ``since`` (JSON-safe dicts) and every
    key it holds (to find what it deleted). Stops it again."""
    ctl = PgCtl(loser)
    ctl.start_isolated()
    rows: dict[str, list[dict]] = {}
    keys: dict[str, set[tuple]] = {}
    try:
        with psycopg.connect(host=loser.socket_dir, port=loser.port, dbname=loser.database, user=loser.user,
                             autocommit=True) as conn:
            for t, key in tables.items():
                if conn.execute("select to_regclass(%s) is null", (t,)).fetchone()[0]:
                    continue
                found = conn.execute(f'select row_to_json(x)::text from "{t}" x where "{ts_column[t]}" > %s',
                                     (since,)).fetchall()
                # numeric stays Decimal: a float would not COPY back into a numeric column.
                rows[t] = [json.loads(r[0], parse_float=Decimal) for r in found]
                cols = ", ".join(f'"{k}"' for k in key)
                keys[t] = {tuple(r) for r in conn.execute(f'select {cols} from "{t}"').fetchall()}
    finally:
        ctl.stop("fast")
    return rows, keys
