"""Rows on the worker's disk between reading them and applying them: a failback's (the old
primary's changed rows) and a row recovery's (the restored copy's selected rows, and their
keys beside them, backup/recover.py).

A failback reads the old primary's post-fork rows while that node runs isolated, then stops
it and applies the rows to the survivor, in rounds when a foreign key needs another pass
(conflicts/foreign_keys.py). Held as Python dicts, the rows made the worker's memory grow with
the divergence: a day-long outage's writes could take the worker down in the middle of the
one step that must not stop half-way. Spooled, the worker holds one row at a time however
large the divergence; the disk holds about their JSON size (under ``TMPDIR``), and only
while the reconcile runs.

Each line is already a line of ``COPY ... FROM STDIN`` (text format) for the apply's JSON
table (conflicts/apply.py ``_load_as_json``: columns j, d, o), so the apply sends the file
as it is and no row is parsed in Python on the way:
- j: the row as the loser's ``row_to_json`` gave it (JSON escapes every control character,
  so only its backslashes need COPY's escaping);
- d: false (a changed row, not a deleted key);
- o: what to set over it, as a JSON object, or NULL. A row written after the fork is at
  least as new as its commit: a stamp older than that (an UPDATE that bypassed the trigger, a
  client-supplied time) would make the conflict engine read the change as pre-fork and drop
  it, so the commit time goes over the timestamp column. The commit time is the truth there.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import tempfile
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO

import psycopg

_NULL = "\\N"


# COPY's text format: the backslash escapes, and a raw tab, newline or carriage return would
# end a field or a line. JSON strings never hold those raw, but a json column keeps its text as
# stored, and pretty-printed JSON has them between its tokens.
_UNESCAPE = {"t": "\t", "n": "\n", "r": "\r"}
_ESCAPED = re.compile(r"\\(.)")


def copy_text(s: str) -> str:
    # Chained replaces: each is one C-level scan, a no-op on the usual row (str.translate
    # with a mapping goes through Python per character).
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _from_copy_text(s: str) -> str:
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m[1], m[1]), s)


def stale(stamp_json: str | None, committed: datetime) -> bool:
    """Whether the timestamp column's value (its JSON text form: ISO 8601 for any date or time
    type) is older than the commit that wrote the row, or cannot be read as a moment at all
    (NULL, no time zone, not a date): then the commit time replaces it."""
    try:
        stamp = datetime.fromisoformat(stamp_json) if stamp_json is not None else None
    except ValueError:
        return True
    return stamp is None or stamp.tzinfo is None or stamp < committed


class RowSpool:
    """Rows written once (``add``, then ``close``), read back any number of times: as dicts
    (iteration) or as COPY data (``copy_into``)."""

    def __init__(self, path: Path, ts_column: str, settings: dict[str, str] | None = None):
        self.path, self.ts_column, self._count = path, ts_column, 0
        # The writing session's settings that change how its text forms read back (DateStyle:
        # a daterange's days; IntervalStyle): the apply sets them while it parses the rows.
        self.settings = dict(settings or {})
        # The keys of the rows' JSON: every row of one table has the same (its columns).
        self.columns: frozenset[str] | None = None
        self._broken = False
        # newline="\n": lines end at a newline only (every raw one in a row is escaped), and the
        # file is written and read back as it is on every platform.
        self._out: IO[str] | None = path.open("w", encoding="utf-8", newline="\n")

    def add(self, row_json: str, stamp_json: str | None, committed_at: datetime | None) -> None:
        """One row (``row_to_json`` text), its timestamp column's value (JSON text form) and the
        commit time of the transaction that wrote it (None: unknown, the row stays as it is)."""
        assert self._out is not None, "spool closed"
        if self.columns is None:
            self.columns = frozenset(json.loads(row_json))
        over = _NULL
        if committed_at is not None and stale(stamp_json, committed_at):
            over = copy_text(json.dumps({self.ts_column: committed_at.isoformat()}))
        self._out.write(f"{copy_text(row_json)}\tf\t{over}\n")
        self._count += 1

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            try:
                out.close()
            except OSError:
                # The last rows may not be on disk (ENOSPC at the flush): never read it as whole.
                self._broken = True
                raise

    def _open(self) -> IO[str]:
        self.close()
        if self._broken:
            raise RuntimeError(f"{self.path} was not written in full")
        return self.path.open(encoding="utf-8", newline="\n")

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict]:
        with self._open() as f:
            for line in f:
                j, _, over = line.rstrip("\n").split("\t")
                # numeric stays Decimal: a float would not go back into a numeric column exactly.
                row = json.loads(_from_copy_text(j), parse_float=Decimal)
                if over != _NULL:
                    row.update(json.loads(_from_copy_text(over)))
                yield row

    def copy_into(self, copy: psycopg.Copy, block: int = 1 << 20) -> None:
        """Every row into ``copy`` (``COPY ... (j, d, o) FROM STDIN``), the file as it is."""
        # As text: the COPY encodes it in the connection's client encoding, which need not be UTF-8.
        with self._open() as f:
            while data := f.read(block):
                copy.write(data)


# A spool left by a worker that died (SIGKILL, OOM: no cleanup ran) holds production rows in
# the clear; whichever reconcile runs next on the machine removes it once it is this old.
LEFT_BEHIND_S = 24 * 3600


class SpoolDir:
    """Where one reconcile's (or row recovery's) spools live, under ``TMPDIR`` (give the worker a disk-backed one
    with room for the divergence: a tmpfs /tmp puts the rows back in memory). Named for the
    workflow run, so that an attempt retried on the same worker after a crash removes its
    predecessor's files before writing its own; removed when the reconcile ends either way,
    and any run's left behind after ``LEFT_BEHIND_S``."""

    def __init__(self, run_id: str, root: Path | None = None):
        self._prefix = f"eagle-dr-loser-{run_id}-"
        self.root = root if root is not None else Path(tempfile.gettempdir())
        self.path: Path | None = None

    def __enter__(self) -> Path:
        old = time.time() - LEFT_BEHIND_S
        for left in self.root.glob("eagle-dr-loser-*"):
            try:
                if left.name.startswith(self._prefix) or left.stat().st_mtime < old:
                    shutil.rmtree(left, ignore_errors=True)
            except FileNotFoundError:
                pass  # another worker's cleanup got there first
        self.path = Path(tempfile.mkdtemp(prefix=self._prefix, dir=self.root))
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
