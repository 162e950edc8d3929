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

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

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
    # already running at the last snapshot of running transactions (RUNNING_XACTS) before the
    # start, so possibly writing before it: what they changed may be unknown, and block-driven
    # extraction cannot be trusted for them. When the lookback found no snapshot at all in the
    # WAL it could read, every commit is here.
    unplaced_xids: set[int] = field(default_factory=set)
    # Relation files created after the start, as (tablespace, database, relfilenode): another
    # node's catalog may give the same number to a different relation.
    created_files: set[tuple[int, int, int]] = field(default_factory=set)

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


def _snapshot_before(dump: str, first: int) -> bool:
    for line in dump.splitlines():
        m = _RECORD.match(line)
        if m and m.group(1) == "Standby" and lsn_to_int(m.group(3)) < first and _RUNNING.search(line):
            return True
    return False


def scan(ctl: PgCtl, wal_dir: str, tli: int, start: str, lookback: bool = False) -> WalScan:
    """Every committed change from ``start`` to the end of the WAL on timeline ``tli``.

    ``lookback``: also read the WAL before ``start`` back to a snapshot of the running transactions
    (the start's segment, or earlier ones), and count the blocks that
    transactions committed after ``start`` wrote there (transactions in flight at a fork: their
    commit is after it, some of their rows before). Commits before ``start`` are not counted.
    A promoted node's first segment on its timeline begins with a copy of the WAL up to the
    fork, so the same file serves both sides of a fork."""
    seg_size = segment_size(ctl)
    first = lsn_to_int(start)
    dump_from = int_to_lsn(first - first % seg_size) if lookback else start
    r = waldump(ctl, wal_dir, tli, dump_from, seg_size)
    end = end_of_wal(r.stderr, seg_size)
    if end is None or lsn_to_int(end) < first:
        raise WalUnreadable(f"pg_waldump of {wal_dir} from {dump_from} on timeline {tli}: {r.stderr.strip()[:400]}")
    # The lookback must reach a snapshot of the running transactions (RUNNING_XACTS: logged at
    # every checkpoint and every 15 s of activity) before ``start``: a transaction not running
    # at it began after it, so all its writes are in the WAL read. Without one in the start's
    # segment, read back segment by segment; if none is found in reach (WAL recycled, another
    # timeline), what a transaction in flight wrote is unknown and every commit counts as
    # unplaced (the caller reads in full).
    reached = not lookback
    for _ in range(_LOOKBACK_SEGMENTS if lookback else 0):
        if _snapshot_before(r.stdout, first):
            reached = True
            break
        earlier = lsn_to_int(dump_from) - seg_size
        if earlier < 0:
            break
        again = waldump(ctl, wal_dir, tli, int_to_lsn(earlier), seg_size)
        again_end = end_of_wal(again.stderr, seg_size)
        if again_end is None or again_end != end:
            # That segment is gone or unreadable, or it is from another history of this
            # timeline (timeline numbers are reused: a rewound node promoted again gets the
            # same one) and does not chain into the next: pg_waldump then stops at a broken
            # prev-link, possibly just past the start, and taking that read would drop every
            # commit after it. Only a read through to the same end is the same WAL. Stop with
            # what was read (unreached: the caller reads in full).
            break
        r, dump_from = again, int_to_lsn(earlier)
    commits: list[Commit] = []
    pending: dict[int, list[tuple[tuple[int, int, int], RelChange, str, int]]] = {}
    placed: set[int] = set()
    running_before: set[int] = set()
    created: set[tuple[int, int, int]] = set()
    for line in r.stdout.splitlines():
        m = _RECORD.match(line)
        if not m:
            continue
        rmgr, xid, op, rest = m.group(1), int(m.group(2)), m.group(4), m.group(5)
        before = lookback and lsn_to_int(m.group(3)) < first
        if rmgr == "Transaction":
            if not before and (commit := _commit(m)):
                commits.append(commit)
            continue
        if before and rmgr == "Standby" and (running := _RUNNING.search(line)):
            # Running at this point before the start: they may have written before the segment
            # read too. The newest snapshot before the start wins.
            running_before = {int(x) for x in (running.group(1) or "").split()}
        placed.add(xid)
        if rmgr == "Storage" and not before and op == "CREATE" and (made := _CREATED.search(rest)):
            created.add((int(made.group(1) or DEFAULT_TABLESPACE), int(made.group(2)), int(made.group(3))))
        kind = DATA_OPS.get((rmgr, op.split("+", 1)[0]))
        if kind is None:
            continue
        if kind == "truncate":
            ids = _TRUNCATED.search(rest)
            for oid in (ids.group(1).split() if ids else []):
                key = (0, 0, -int(oid))
                pending.setdefault(xid, []).append((key, RelChange(0, 0, truncated_oid=int(oid)),
                                                    "" if before else kind, 1))
            continue
        if rel := _REL.search(rest):
            spc, db, node = (int(g) for g in rel.groups())
            rc = RelChange(spc, db, relfilenode=node)
            for b in _BLKREF.finditer(rest):
                if (int(b.group(1)), int(b.group(2)), int(b.group(3))) == (spc, db, node) and b.group(4) is None:
                    rc.blocks.add(int(b.group(5)))
                    if kind in ("update", "delete"):
                        rc.removed_blocks.add(int(b.group(5)))
            rows = 1
            if op.startswith("MULTI_INSERT") and (n := _NTUPLES.search(rest)):
                rows = int(n.group(1) or n.group(2))
            pending.setdefault(xid, []).append(((spc, db, node), rc, "" if before else kind, rows))
    changes: dict[tuple[int, int, int], RelChange] = {}
    committed = {x for c in commits for x in (c.xid, *c.subxids)}
    # Only committed work counts: an aborted transaction's changes are invisible anyway.
    for xid, items in pending.items():
        if xid not in committed:
            continue
        for key, rc, kind, rows in items:
            have = changes.setdefault(key, RelChange(rc.tablespace, rc.database, rc.relfilenode, rc.truncated_oid))
            have.blocks |= rc.blocks
            have.removed_blocks |= rc.removed_blocks
            if kind:  # ops count the rows written after the start only
                have.ops[kind] = have.ops.get(kind, 0) + rows
    # A change only before the start (lookback) names no op: still a relation the
    # transactions committed after the start changed (in flight at the start).
    for rc in changes.values():
        if not rc.ops:
            rc.ops["in flight"] = 1
    # A subtransaction's records carry its own xid; the commit names it among subxacts.
    unplaced = {c.xid for c in commits if not ({c.xid, *c.subxids} & placed) or c.xid in running_before
                or not reached}
    return WalScan(start_lsn=start, end_lsn=end, commits=commits, changes=changes, unplaced_xids=unplaced,
                   created_files=created)


def commits_in_segment_before(ctl: PgCtl, wal_dir: str, tli: int, seg_start: int, before: int,
                              seg_size: int) -> list[Commit]:
    """Commits in one segment whose record starts before ``before``."""
    r = waldump(ctl, wal_dir, tli, int_to_lsn(seg_start), seg_size, one_segment=True)
    commits = (_commit(m) for m in map(_RECORD.match, r.stdout.splitlines()) if m)
    return [c for c in commits if c is not None and lsn_to_int(c.lsn) < before]


def _commit(m: re.Match) -> Commit | None:
    """The commit a pg_waldump record line (matched by _RECORD) is, if it is one."""
    if m.group(1) != "Transaction" or m.group(4) != "COMMIT" or not (t := _COMMIT_AT.match(m.group(5).strip())):
        return None
    subs = _SUBXACTS.search(m.group(5))
    return Commit(xid=int(m.group(2)), subxids=tuple(int(x) for x in subs.group(1).split()) if subs else (),
                  at=datetime.strptime(t.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc),
                  lsn=m.group(3))
