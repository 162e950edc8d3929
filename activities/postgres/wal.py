"""Reading a stopped node's WAL with pg_waldump: where it really ends, which transactions
committed after a point, and which relations they changed.

Physical WAL holds no readable tuple contents, but it names, for every heap change, the
transaction and the relation file it touched; the commit records name each committed
transaction and its subtransactions. That is enough to say *which* relations a diverged
node changed after a fork and *which* transactions did it (their ids are the ``xmin`` of the
rows they wrote), whatever the tables' timestamp columns say.

Two pg_waldump habits shape this module:
- given only ``-p DIR``, it takes the WAL segment size from whichever segment file readdir
  lists first; a preallocated (all-zero) segment there makes it fail with "WAL segment size
  must be a power of two ... header specifies 0 bytes". So it is always given the first and
  last segment file names: it then reads the size from the start segment, which holds WAL.
- it always ends with an error; only "the WAL stops here" errors mean everything was read.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from psycopg import sql

from activities.postgres.ctl import PgCtl
from activities.postgres.lsn import int_to_lsn, lsn_to_int


class WalUnreadable(RuntimeError):
    """The WAL after a point could not be read to its end: what it holds is unknown."""


# pg_waldump prints commit times in its process's local time zone: it runs with TZ=UTC.
_UTC = {"TZ": "UTC"}
_RECORD = re.compile(r"^rmgr: (\w+)\s+len \(rec/tot\):\s*\d+/\s*\d+, tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), "
                     r"prev [0-9A-F]+/[0-9A-F]+, desc: (\S+)(.*)$")
_COMMIT_AT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC")
_SUBXACTS = re.compile(r"subxacts:((?: \d+)+)")
_REL = re.compile(r"rel (\d+)/(\d+)/(\d+)")
# A Storage CREATE record: a relation file made (a new table, or a rewrite: VACUUM FULL, CLUSTER).
_CREATED = re.compile(r"(?:base|pg_tblspc/(\d+)/[^/]+)/(\d+)/(\d+)")
# A MULTI_INSERT record (COPY, batched inserts) carries many rows: "ntuples: N" (16+) or "N tuples".
_NTUPLES = re.compile(r"ntuples: (\d+)|\b(\d+) tuples")
_TRUNCATED = re.compile(r"relids((?: \d+)+)")
# A snapshot of the running transactions (logged at checkpoints and every 15 s): its top-level
# xids. pg_waldump prints the "; N xacts:" part only when N > 0: a quiet moment's snapshot is
# just "RUNNING_XACTS nextXid ... oldestRunningXid ...", and it is a snapshot all the same.
_RUNNING = re.compile(r"RUNNING_XACTS nextXid \d+\b(?:.*?; \d+ xacts:((?: \d+)*))?")
# The newest transaction that had ended when the snapshot was taken (see WalScan.xid_horizon).
_LATEST_COMPLETED = re.compile(r"\blatestCompletedXid (\d+)")
# Every block a record references; the main fork's have no "fork" word (PG15+ format).
_BLKREF = re.compile(r"blkref #\d+: rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk (\d+)")
# The error pg_waldump ends with when it reached the end of the WAL.
_END_AT = re.compile(r"invalid record length at ([0-9A-F]+/[0-9A-F]+)|"
                     r"could not find a valid record after ([0-9A-F]+/[0-9A-F]+)|"
                     r"record with incorrect prev-link [0-9A-F]+/[0-9A-F]+ at ([0-9A-F]+/[0-9A-F]+)|"
                     r"record length \d+ at ([0-9A-F]+/[0-9A-F]+) too long|"
                     r"invalid resource manager ID \d+ at ([0-9A-F]+/[0-9A-F]+)|"
                     r"contrecord is requested by ([0-9A-F]+/[0-9A-F]+)")
# The end falls on a segment boundary and the next segment was never written (zero-filled or
# recycled): PostgreSQL 15 names the segment and the offset, later versions the LSN as well.
_END_IN_SEGMENT = re.compile(r"(?:invalid magic number [0-9A-F]+|unexpected pageaddr [0-9A-F]+/[0-9A-F]+) in "
                             r"(?:log|WAL) segment ([0-9A-F]{24})(?:, LSN [0-9A-F]+/[0-9A-F]+)?, offset (\d+)")

# Heap changes that alter a table's contents. Vacuum, pruning, freezing, row locks and
# in-place catalog statistics change no row anyone reads.
DATA_OPS = {
    ("Heap", "INSERT"): "insert", ("Heap", "UPDATE"): "update", ("Heap", "HOT_UPDATE"): "update",
    ("Heap", "DELETE"): "delete", ("Heap", "TRUNCATE"): "truncate", ("Heap2", "MULTI_INSERT"): "insert",
}
DEFAULT_TABLESPACE = 1663


# Transaction ids are 32 bits and wrap; 0-2 are reserved (invalid, bootstrap, frozen).
XID_SPACE = 2 ** 32
FIRST_NORMAL_XID = 3


def xid_follows(a: int, b: int) -> bool:
    """``a`` was handed out after ``b`` (PostgreSQL's modulo-2^32 order of normal xids)."""
    return 0 < (a - b) % XID_SPACE < XID_SPACE // 2


def xmin_from(xmin: sql.Composable, horizon: int, before: sql.Composable | None = None) -> sql.Composable:
    """SQL: the row version whose ``xmin`` this is was written by a transaction with an id at or
    after ``horizon`` and, given ``before`` (an xid8 or xid expression: the server's next id),
    before that (a reserved xmin is never either).

    ``before`` matters: the ``xmin`` column keeps a row's original id after freezing, so on a
    cluster more than 2^31 ids old, half of its old frozen rows sit "after" any horizon by the
    circular order alone. Between the horizon and the next id are only the ids handed out since
    (a frozen row's raw id lands there only after 2^32 ids, and then only by chance)."""
    x = sql.SQL("({}::text::bigint)").format(xmin)
    dist = sql.SQL("((({v}) - {h}) % {space} + {space}) % {space}")
    fields = dict(h=sql.Literal(horizon), space=sql.Literal(XID_SPACE))
    bound = sql.Literal(XID_SPACE // 2) if before is None else dist.format(
        v=sql.SQL("({}::text::bigint % {})").format(before, sql.Literal(XID_SPACE)), **fields)
    return sql.SQL("({x} >= {first} and {d} < {bound})").format(
        x=x, first=sql.Literal(FIRST_NORMAL_XID), d=dist.format(v=x, **fields), bound=bound)


@dataclass(frozen=True)
class Commit:
    xid: int
    subxids: tuple[int, ...]
    at: datetime
    lsn: str


@dataclass
class RelChange:
    """Changes committed to one relation file (``relfilenode``) or, for TRUNCATE, one relation oid."""

    tablespace: int
    database: int
    relfilenode: int | None = None
    truncated_oid: int | None = None
    # Rows per kind ("insert", "update", "delete", "truncate"): one per heap record, a
    # MULTI_INSERT record's tuples each.
    ops: dict[str, int] = field(default_factory=dict)
    # The file's main-fork blocks the committed changes wrote (new row versions live there),
    # and the blocks of their DELETE/UPDATE records (where the row versions they removed were).
    # The LOSER's physical blocks: only read on the loser, or on the survivor for row versions
    # that both nodes already held at the fork (identical there, physical replication).
    blocks: set[int] = field(default_factory=set)
    removed_blocks: set[int] = field(default_factory=set)


@dataclass
class WalScan:
    start_lsn: str
    end_lsn: str
    commits: list[Commit]
    # Keyed by (tablespace, database, relfilenode) or (0, 0, -oid) for a TRUNCATE, whose record
    # names relation oids, not files, and no database.
    changes: dict[tuple[int, int, int], RelChange]
    # Committed after the start but with no record of their own in the scanned WAL other than
    # the commit (with ``lookback``: not even before the start, in the start's segment), or
    # already running at the first snapshot of running transactions (RUNNING_XACTS) the read
    # met before the start and not followed back to a snapshot that does not list them
    # (_follow_back: the WAL in reach ends first), so possibly writing before the read: what
    # they changed may be unknown, and block-driven extraction cannot be trusted for them. When
    # the lookback found no snapshot at all in the WAL it could read, every commit is here.
    unplaced_xids: set[int] = field(default_factory=set)
    # Relation files created after the start, as (tablespace, database, relfilenode): another
    # node's catalog may give the same number to a different relation.
    created_files: set[tuple[int, int, int]] = field(default_factory=set)
    # With ``lookback``: one past the newest transaction id the WAL read before the start names
    # (a record's, a commit's subtransactions', a snapshot's running and latestCompletedXid). A node promoted
    # at the start replayed that WAL, and recovery moves the next xid past every record's, so
    # each transaction it ran after the promotion has an id from here on: its rows with such an
    # xmin were written after the fork, whatever their timestamps say. And every row committed
    # before the start has an older xmin: committed after the snapshot of running transactions
    # the read reaches back to, its commit record was read; before it, the snapshot's
    # latestCompletedXid is at least its id. None: no snapshot reached, or nothing named.
    xid_horizon: int | None = None

    @property
    def xids(self) -> set[int]:
        """Every committed transaction id after the start, subtransactions included."""
        return {x for c in self.commits for x in (c.xid, *c.subxids)}


def current_timeline(ctl: PgCtl) -> int:
    """The timeline a stopped node last wrote on. pg_controldata alone can be stale: a node
    promoted and then crashed before its first checkpoint still names the old timeline there,
    and scanning that one from the fork would find nothing after it. The newest WAL segment's
    timeline (a node writes, preallocates and recycles segments on its current one) says."""
    tli = int(ctl.controldata().get("Latest checkpoint's TimeLineID", "0") or 0)
    wal_dir = Path(ctl.data_dir) / "pg_wal"
    names = [n for n in os.listdir(wal_dir) if len(n) == 24 and all(c in "0123456789ABCDEF" for c in n)]
    return max([tli] + [int(n[:8], 16) for n in names])


def segment_size(ctl: PgCtl) -> int:
    return int(ctl.controldata().get("Bytes per WAL segment", 16 * 1024 * 1024))


def segment_name(tli: int, lsn: int, seg_size: int) -> str:
    segno = lsn // seg_size
    per_id = 0x100000000 // seg_size
    return f"{tli:08X}{segno // per_id:08X}{segno % per_id:08X}"


def segment_start(name: str, seg_size: int) -> int:
    per_id = 0x100000000 // seg_size
    return (int(name[8:16], 16) * per_id + int(name[16:24], 16)) * seg_size


def _segments(wal_dir: str, tli: int) -> list[str]:
    prefix = f"{tli:08X}"
    return sorted(n for n in os.listdir(wal_dir)
                  if len(n) == 24 and n.startswith(prefix) and all(c in "0123456789ABCDEF" for c in n))


def waldump(ctl: PgCtl, wal_dir: str, tli: int, start: str, seg_size: int, *, end: str | None = None,
            one_segment: bool = False):
    """pg_waldump from ``start`` on timeline ``tli``: to the end of the WAL, to ``end`` (which must
    lie in the start segment), or to the end of the start segment (``one_segment``)."""
    first = segment_name(tli, lsn_to_int(start), seg_size)
    argv = [ctl.tool("pg_waldump"), "-p", wal_dir, "-s", start]
    if end is not None:
        argv += ["-e", end, first]
    elif one_segment:
        argv += [first]
    else:
        last = max(_segments(wal_dir, tli), default=first)
        argv += [first, max(first, last)]
    return ctl.run(argv, timeout=300, env=_UTC)


def end_of_wal(stderr: str, seg_size: int) -> str | None:
    """Where the WAL stops, from pg_waldump's closing error; None when the error is anything
    else (a missing segment, an unreadable file: the WAL beyond it is unknown)."""
    if m := _END_IN_SEGMENT.search(stderr):
        return int_to_lsn(segment_start(m.group(1), seg_size) + int(m.group(2)))
    found = list(_END_AT.finditer(stderr))
    return next(g for g in found[-1].groups() if g) if found else None


# How many segments before the start's a lookback may read to find a RUNNING_XACTS snapshot.
_LOOKBACK_SEGMENTS = 8


# Every resource manager but the index access methods': index records are as many as the
# heap's (half of pg_waldump's text, parsed for nothing), and a transaction never writes one
# without a heap record of its own. The others stay even where the scan reads nothing of them
# but the transaction id: a transaction whose only records are a sequence's (an ORM fetching
# ids in a transaction of their own) or a logical message's must still count as placed, or it
# would send every changed table to a full read (see unplaced_xids).
_RMGRS = ("XLOG", "Transaction", "Storage", "CLOG", "Database", "Tablespace", "MultiXact", "RelMap", "Standby",
          "Heap2", "Heap", "Sequence", "CommitTs", "ReplicationOrigin", "Generic", "LogicalMessage")


_VERSION = re.compile(r"\(PostgreSQL\) (\d+)")


@functools.lru_cache(maxsize=8)
def _major(tool: str) -> int:
    r = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    m = _VERSION.search(r.stdout)
    return int(m.group(1)) if m else 0


def _argv(ctl: PgCtl, wal_dir: str, tli: int, start: str, seg_size: int, one_segment: bool, *extra: str,
          end: str | None = None) -> list[str]:
    tool = ctl.tool("pg_waldump")
    # Before 15, pg_waldump keeps only the last --rmgr given: filtered, it would print one kind
    # of record and the scan would find no commit at all. Unfiltered there (slower, same result).
    rmgrs = [f"--rmgr={r}" for r in _RMGRS] if _major(tool) >= 15 else []
    first = segment_name(tli, lsn_to_int(start), seg_size)
    argv = [tool, "-p", wal_dir, "-s", start, *rmgrs, *extra, first]
    if end is not None:
        # pg_waldump refuses an end outside the last file named; an end on a segment boundary
        # is the end of the segment before it.
        argv[-1:-1] = ["-e", end]
        argv.append(max(first, segment_name(tli, lsn_to_int(end) - 1, seg_size)))
    elif not one_segment:
        argv.append(max(first, max(_segments(wal_dir, tli), default=first)))
    return argv


# pg_waldump silent this long is hung (on its storage, say), not slow: it prints a line per
# record as it reads, and the scan reads a few hundred thousand lines a second.
_IDLE_TIMEOUT_S = 300.0


def _dump(ctl: PgCtl, wal_dir: str, tli: int, start: str, seg_size: int, *, one_segment: bool = False,
          end: str | None = None):
    """pg_waldump as ``waldump``, its output streamed: (lines, stderr filled once they are read)."""
    return ctl.lines(_argv(ctl, wal_dir, tli, start, seg_size, one_segment, end=end), _IDLE_TIMEOUT_S, env=_UTC)


_STATS_TOTAL = re.compile(r"^Total\s+(\d+)", re.MULTILINE)


def _records(ctl: PgCtl, wal_dir: str, tli: int, start: str, seg_size: int, end: str | None,
             one_segment: bool = False) -> int:
    """How many records pg_waldump itself counts from ``start`` up to ``end``, where the read
    being checked stopped (--stats, the same filter): what the lines that read took for records
    are checked against. Bounded by ``end`` because a running node (a plan, a failover's RPO)
    writes on between the two passes."""
    try:
        r = ctl.run(_argv(ctl, wal_dir, tli, start, seg_size, one_segment, "--stats=record", end=end),
                    timeout=3600, env=_UTC)
    except subprocess.TimeoutExpired as e:
        raise WalUnreadable(f"pg_waldump --stats of {wal_dir} from {start} did not finish in an hour") from e
    m = _STATS_TOTAL.search(r.stdout)
    if m is None:
        # Not a forgery: the count pass itself could not read the same stretch (on a running
        # node a checkpoint can recycle the first segment between the two passes).
        raise WalUnreadable(f"pg_waldump could not count the records of {wal_dir} from {start} again, so the read "
                            f"cannot be checked (the WAL changed under it?): {r.stderr.strip()[:300]}")
    return int(m.group(1))


def end_from(ctl: PgCtl, wal_dir: str, tli: int, start: str, seg_size: int) -> str | None:
    """Where the WAL after ``start`` ends (end_of_wal), its records streamed past unread."""
    with _dump(ctl, wal_dir, tli, start, seg_size) as (lines, stderr):
        for _ in lines:
            pass
    return end_of_wal(stderr[0], seg_size)


def _snapshot_in_segment(ctl: PgCtl, wal_dir: str, tli: int, seg_start: int, first: int, seg_size: int) -> bool:
    """Whether one segment holds a RUNNING_XACTS record before ``first``."""
    with _dump(ctl, wal_dir, tli, int_to_lsn(seg_start), seg_size, one_segment=True) as (lines, _):
        for line in lines:
            m = _RECORD.match(line)
            if m and m.group(1) == "Standby" and lsn_to_int(m.group(3)) < first and _RUNNING.search(line):
                return True
    return False


class _Reader:
    """One pass over a pg_waldump stream, in constant memory whatever the WAL's size (a long
    divergence is gigabytes of WAL, and of pg_waldump text: held whole, a 400 MB read took 3 GB).

    A data record's change waits under its transaction id only until that transaction's
    commit or abort record, which comes later in the WAL: on a commit after the start it joins
    ``changes``, otherwise it is dropped. What stays is per committed transaction (its commit)
    and per changed relation file (its blocks), not per record."""

    def __init__(self, first: int, lookback: bool, stop_at: int | None = None):
        # stop_at: records from here on are counted (for the check against pg_waldump's own
        # count) and their start noted, nothing else: another read's (see _follow_back).
        self.first, self.lookback, self.stop_at = first, lookback, stop_at
        self.commits: list[Commit] = []
        # xid -> relation key -> (blocks, removed blocks, rows per kind after the start)
        self.pending: dict[int, dict[tuple[int, int, int], RelChange]] = {}
        self.placed: set[int] = set()
        self.running_before: set[int] = set()
        # The running transactions at the first snapshot before the start the read met: one
        # not among them began after it, so the read holds all its records (see result).
        self.running_at_first: set[int] | None = None
        self.snapshot_before = False
        self.created: set[tuple[int, int, int]] = set()
        self.changes: dict[tuple[int, int, int], RelChange] = {}
        self.records = 0  # lines taken for records (see _read)
        # The first record's start and its back-link, the last record's start: where a read of
        # the WAL before this one must end, and the link that proves it chains into this one.
        self.first_lsn: str | None = None
        self.second_lsn: str | None = None
        self.last_lsn: str | None = None
        self.newest_xid_before: int | None = None

    def feed(self, line: str) -> None:
        m = _RECORD.match(line)
        if not m:
            return
        self.records += 1
        if self.first_lsn is None:
            self.first_lsn = m.group(3)
        elif self.second_lsn is None:
            self.second_lsn = m.group(3)
        self.last_lsn = m.group(3)
        if self.stop_at is not None and lsn_to_int(m.group(3)) >= self.stop_at:
            return
        rmgr, xid, op, rest = m.group(1), int(m.group(2)), m.group(4), m.group(5)
        before = self.lookback and lsn_to_int(m.group(3)) < self.first
        if before:
            self._saw_before(xid)
        if rmgr == "Transaction":
            self._end_of(m, xid, op, before)
            return
        if before and rmgr == "Standby" and (running := _RUNNING.search(line)):
            # Running at this point before the start: they may have written before the segment
            # read too. The newest snapshot before the start wins.
            self.running_before = {int(x) for x in (running.group(1) or "").split()}
            if self.running_at_first is None:
                self.running_at_first = self.running_before
            self.snapshot_before = True
            # For the horizon: the newest transaction ended by then, and the running ones. One
            # listed running may have written its commit already (the snapshot is taken before it
            # is logged), possibly in a segment not read: its rows are pre-fork, and left out they
            # would count as the survivor's changes. (One still running that had written nothing
            # moves the horizon past ids the survivor may hand out first: its first rows are then
            # judged by timestamp.)
            if done := _LATEST_COMPLETED.search(rest):
                self._saw_before(int(done.group(1)))
            for x in self.running_before:
                self._saw_before(x)
        self.placed.add(xid)
        if rmgr == "Storage" and not before and op == "CREATE" and (made := _CREATED.search(rest)):
            self.created.add((int(made.group(1) or DEFAULT_TABLESPACE), int(made.group(2)), int(made.group(3))))
        kind = DATA_OPS.get((rmgr, op.split("+", 1)[0]))
        if kind is None:
            return
        mine = self.pending.setdefault(xid, {})
        if kind == "truncate":
            ids = _TRUNCATED.search(rest)
            for oid in (ids.group(1).split() if ids else []):
                rc = mine.setdefault((0, 0, -int(oid)), RelChange(0, 0, truncated_oid=int(oid)))
                if not before:
                    rc.ops[kind] = rc.ops.get(kind, 0) + 1
            return
        if rel := _REL.search(rest):
            spc, db, node = (int(g) for g in rel.groups())
            rc = mine.setdefault((spc, db, node), RelChange(spc, db, relfilenode=node))
            for b in _BLKREF.finditer(rest):
                if (int(b.group(1)), int(b.group(2)), int(b.group(3))) == (spc, db, node) and b.group(4) is None:
                    rc.blocks.add(int(b.group(5)))
                    if kind in ("update", "delete"):
                        rc.removed_blocks.add(int(b.group(5)))
            if not before:  # ops count the rows written after the start only
                rows = 1
                if op.startswith("MULTI_INSERT") and (n := _NTUPLES.search(rest)):
                    rows = int(n.group(1) or n.group(2))
                rc.ops[kind] = rc.ops.get(kind, 0) + rows

    def _saw_before(self, xid: int) -> None:
        if xid >= FIRST_NORMAL_XID and (self.newest_xid_before is None or xid_follows(xid, self.newest_xid_before)):
            self.newest_xid_before = xid

    def _end_of(self, m: re.Match, xid: int, op: str, before: bool) -> None:
        commit = _commit(m) if not before else None
        if commit is not None:
            self.commits.append(commit)
            # Only committed work counts: an aborted transaction's changes are invisible anyway.
            for x in (commit.xid, *commit.subxids):
                self._count(self.pending.pop(x, {}))
        elif op in ("COMMIT", "ABORT", "COMMIT_PREPARED", "ABORT_PREPARED"):
            # Ended without counting: aborted, or committed before the start (a lookback).
            # A subtransaction's records carry its own xid; its parent's end names it. (Not
            # any other Transaction record: an ASSIGNMENT names subxacts of one still running.)
            if prepared := _PREPARED_XID.match(m.group(5)):
                xid = int(prepared.group(1))  # the record's own tx is 0; the prepared xid is named
            subs = _SUBXACTS.search(m.group(5))
            for x in (xid, *(int(s) for s in (subs.group(1).split() if subs else ()))):
                self.pending.pop(x, None)
                if before and op.startswith("COMMIT"):
                    # Committed before the start: its rows and its subtransactions' are pre-fork,
                    # and a COMMIT PREPARED's record carries only the prepared xid (tx 0).
                    self._saw_before(x)

    def running_early(self) -> set[int]:
        """Commits after the start whose transaction was running at the first snapshot the read
        met before it: they may have written before the read began."""
        return {c.xid for c in self.commits if c.xid in (self.running_at_first or ())}

    def add_earlier(self, earlier: _Reader, xids: set[int]) -> None:
        """What ``earlier`` (a read of the WAL before this one's) saw ``xids``' transactions
        write, and their subtransactions, as changes of theirs."""
        for c in self.commits:
            if c.xid in xids:
                for x in (c.xid, *c.subxids):
                    self._count(earlier.pending.get(x, {}))
                    if x in earlier.placed:
                        self.placed.add(x)

    def _count(self, changes: dict[tuple[int, int, int], RelChange]) -> None:
        for key, rc in changes.items():
            have = self.changes.setdefault(key, RelChange(rc.tablespace, rc.database, rc.relfilenode,
                                                          rc.truncated_oid))
            have.blocks |= rc.blocks
            have.removed_blocks |= rc.removed_blocks
            for kind, rows in rc.ops.items():
                have.ops[kind] = have.ops.get(kind, 0) + rows

    def result(self, start: str, end: str, reached: bool, placed_earlier: set[int] = frozenset()) -> WalScan:
        # A change only before the start (lookback) names no op: still a relation the
        # transactions committed after the start changed (in flight at the start).
        for rc in self.changes.values():
            if not rc.ops:
                rc.ops["in flight"] = 1
        # A subtransaction's records carry its own xid; the commit names it among subxacts.
        # Running at the first snapshot the read met: possibly written before the read began,
        # unless an earlier read (placed_earlier) reached back past its start.
        early = self.running_early() - placed_earlier
        unplaced = {c.xid for c in self.commits if not ({c.xid, *c.subxids} & self.placed)
                    or c.xid in early or not reached}
        horizon = None
        if reached and self.newest_xid_before is not None:
            horizon = (self.newest_xid_before + 1) % XID_SPACE
            horizon = max(horizon, FIRST_NORMAL_XID)  # ids below 3 are never handed out
        return WalScan(start_lsn=start, end_lsn=end, commits=self.commits, changes=self.changes,
                       unplaced_xids=unplaced, created_files=self.created, xid_horizon=horizon)


def _read(ctl: PgCtl, wal_dir: str, tli: int, dump_from: str, seg_size: int, first: int,
          lookback: bool, until: str | None = None, stop_at: int | None = None) -> tuple[_Reader, str | None, str]:
    """A read from ``dump_from`` to the end of the WAL, or to ``until``."""
    reader = _Reader(first, lookback, stop_at)
    with _dump(ctl, wal_dir, tli, dump_from, seg_size, end=until) as (lines, stderr):
        for line in lines:
            reader.feed(line)
    end = end_of_wal(stderr[0], seg_size)
    if until is not None and not stderr[0].strip():
        end = until  # pg_waldump stops at -e without a word; short of it, it says where and why
    if end is not None:
        _check_count(ctl, wal_dir, tli, dump_from, seg_size, end, reader.records)
    return reader, end, stderr[0]


# How far back (in segments before the read) to follow transactions in flight at the start
# that were already running at the first snapshot the read met: 1, 2, 4, ... up to this.
_FOLLOW_SEGMENTS = 64


def _follow_back(ctl: PgCtl, wal_dir: str, tli: int, reader: _Reader, read_from: str, end: str | None,
                 seg_size: int) -> set[int]:
    """Read the WAL before ``read_from`` for what the transactions committed after the start
    but already running before the read wrote there, farther back each time (1, 2, 4, ...
    segments), until a snapshot of the running transactions no longer lists them: all their
    writes are then read. Their changes join ``reader``'s; returns the ones so placed (those
    the farthest read in reach still finds running stay unplaced). Only the WAL before the
    read is read again, never the divergence itself.

    Each earlier read goes on through the read's first record (pg_waldump checks every
    record's link back to the one before: a segment of another history of the timeline, which
    does not lead here, stops it with an error, and nothing is taken from it) and stops at the
    second; what it sees from the first on is the read's own. So a record that begins before
    ``read_from`` and ends after it (the read, from a segment's start, skips its tail) is in
    it. (Stopped with -e at the first record itself, pg_waldump 15 reads that record's header
    from a stale buffer after a segment switch and reports a broken link that is not there.)"""
    early = reader.running_early()
    if not early or reader.first_lsn is None or end is None:
        return set()
    until = reader.second_lsn or end
    base = lsn_to_int(read_from)
    present = set(_segments(wal_dir, tli))
    reach = 0  # contiguous segments on disk before the read's
    while reach < _FOLLOW_SEGMENTS and base - (reach + 1) * seg_size >= 0 and \
            segment_name(tli, base - (reach + 1) * seg_size, seg_size) in present:
        reach += 1
    n = 1
    while reach:
        n = min(n, reach)
        try:
            earlier, _, stderr = _read(ctl, wal_dir, tli, int_to_lsn(base - n * seg_size), seg_size, base, True,
                                       until=until, stop_at=lsn_to_int(reader.first_lsn))
        except WalUnreadable:
            return set()  # old WAL that cannot be trusted: they stay unplaced, as without it
        if stderr.strip() or earlier.last_lsn != reader.first_lsn:
            return set()  # stopped short: it does not lead into the read
        started_after = early - (earlier.running_at_first if earlier.running_at_first is not None else early)
        if started_after == early or n == reach:
            reader.add_earlier(earlier, started_after)
            return started_after
        n *= 2
    return set()


def _check_count(ctl: PgCtl, wal_dir: str, tli: int, start: str, seg_size: int, end: str | None, records: int,
                 one_segment: bool = False) -> None:
    """Every line a read took for a record must be one of the records pg_waldump counts itself.

    pg_waldump prints user strings as they are (a logical message's prefix, a restore point's
    or a prepared transaction's name): one with a line break can print a line that reads as a
    record, and a forged ABORT, snapshot or COMMIT would make the scan drop a committed
    transaction's changes or move the fork's time. Otherwise nothing read can be trusted. (No
    line read as a record: nothing to check, and nothing for pg_waldump to count when the WAL
    ends right at the start, as after a failover that lost nothing.)"""
    if not records:
        return
    counted = _records(ctl, wal_dir, tli, start, seg_size, end, one_segment)
    if counted != records:
        raise WalUnreadable(
            f"pg_waldump of {wal_dir} from {start} printed {records} lines that read as records where it counts "
            f"{counted} records: a string written into the WAL (a logical message, a restore point or a prepared "
            "transaction's name) holds a line break and forges a record, so the read cannot be trusted")


def scan(ctl: PgCtl, wal_dir: str, tli: int, start: str, lookback: bool = False) -> WalScan:
    """Every committed change from ``start`` to the end of the WAL on timeline ``tli``.

    ``lookback``: also read the WAL before ``start`` back to a snapshot of the running transactions
    (the start's segment, or earlier ones), and count the blocks that
    transactions committed after ``start`` wrote there (transactions in flight at a fork: their
    commit is after it, some of their rows before). Commits before ``start`` are not counted.
    A promoted node's first segment on its timeline begins with a copy of the WAL up to the
    fork, so the same file serves both sides of a fork.

    The WAL is read as it streams out of pg_waldump (see _Reader): memory stays flat however
    far the node wrote past ``start``."""
    seg_size = segment_size(ctl)
    first = lsn_to_int(start)
    dump_from = int_to_lsn(first - first % seg_size) if lookback else start
    reader, end, stderr = _read(ctl, wal_dir, tli, dump_from, seg_size, first, lookback)
    if end is None or lsn_to_int(end) < first:
        raise WalUnreadable(f"pg_waldump of {wal_dir} from {dump_from} on timeline {tli}: {stderr.strip()[:400]}")
    # The lookback must reach a snapshot of the running transactions (RUNNING_XACTS: logged at
    # every checkpoint and every 15 s of activity) before ``start``: a transaction not running
    # at it began after it, so all its writes are in the WAL read. Without one in the start's
    # segment, look back segment by segment (one segment read each) for one; if none is found
    # in reach (WAL recycled, another timeline), what a transaction in flight wrote is unknown
    # and every commit counts as unplaced (the caller reads in full).
    # (The start's own segment is the first of the _LOOKBACK_SEGMENTS.)
    reached = not lookback or (_LOOKBACK_SEGMENTS > 0 and reader.snapshot_before)
    if lookback and not reached:
        # The earlier segments in reach that exist, nearest first; the nearest with a snapshot
        # (one segment read each) bounds how far back to read. Without one, read as far back as
        # reach allows all the same: a transaction in flight at the start counts the relations
        # it wrote there (a table nobody listed is then still named), though all commits are
        # unplaced. Read from the farthest first, through to the end: only a read that
        # reaches the same end is the same WAL. An earlier segment may be from another history
        # of this timeline (timeline numbers are reused: a rewound node promoted again gets the
        # same one) and not chain into the next: pg_waldump then stops at a broken prev-link,
        # possibly just past the start, and taking that read would drop every commit after it;
        # the next nearer segment is tried then.
        back: list[int] = []
        seg = lsn_to_int(dump_from)
        present = set(_segments(wal_dir, tli))
        for _ in range(_LOOKBACK_SEGMENTS - 1):
            seg -= seg_size
            if seg < 0 or segment_name(tli, seg, seg_size) not in present:
                break
            back.append(seg)
            if _snapshot_in_segment(ctl, wal_dir, tli, seg, first, seg_size):
                break
        for seg in reversed(back):
            again, again_end, _ = _read(ctl, wal_dir, tli, int_to_lsn(seg), seg_size, first, lookback)
            if again_end == end:
                reader, reached, dump_from = again, again.snapshot_before, int_to_lsn(seg)
                break
    placed = _follow_back(ctl, wal_dir, tli, reader, dump_from, end, seg_size) if lookback and reached else set()
    return reader.result(start, end, reached, placed)


def commits_in_segment_before(ctl: PgCtl, wal_dir: str, tli: int, seg_start: int, before: int,
                              seg_size: int) -> list[Commit]:
    """Commits in one segment whose record starts before ``before``, the read checked like a
    scan's (_check_count)."""
    start = int_to_lsn(seg_start)
    found, records = [], 0
    with _dump(ctl, wal_dir, tli, start, seg_size, one_segment=True) as (lines, stderr):
        for m in map(_RECORD.match, lines):
            if m:
                records += 1
                if (c := _commit(m)) is not None and lsn_to_int(c.lsn) < before:
                    found.append(c)
    _check_count(ctl, wal_dir, tli, start, seg_size, end_of_wal(stderr[0], seg_size), records, one_segment=True)
    return found


# COMMIT PREPARED / ROLLBACK PREPARED are logged by whichever session ends the prepared
# transaction (tx 0 or its own): the prepared transaction's xid, the one its rows carry, is
# the first thing in the description ("COMMIT_PREPARED 764: <time>; subxacts: 765").
_PREPARED_XID = re.compile(r"^\s*(\d+): ")


def _commit(m: re.Match) -> Commit | None:
    """The commit a pg_waldump record line (matched by _RECORD) is, if it is one: a COMMIT, or a
    COMMIT_PREPARED (a two-phase transaction's; it counts under the prepared xid)."""
    if m.group(1) != "Transaction" or m.group(4) not in ("COMMIT", "COMMIT_PREPARED"):
        return None
    desc, xid = m.group(5), int(m.group(2))
    if m.group(4) == "COMMIT_PREPARED":
        if not (prepared := _PREPARED_XID.match(desc)):
            return None
        xid, desc = int(prepared.group(1)), desc[prepared.end():]
    if not (t := _COMMIT_AT.match(desc.strip())):
        return None
    subs = _SUBXACTS.search(desc)
    return Commit(xid=xid, subxids=tuple(int(x) for x in subs.group(1).split()) if subs else (),
                  at=datetime.strptime(t.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc),
                  lsn=m.group(3))
