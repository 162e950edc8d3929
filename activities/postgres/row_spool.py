"""The loser's changed rows on the worker's disk between reading them and applying them.

A failback reads the old primary's post-fork rows while that node runs isolated, then stops
it and applies the rows to the survivor, in rounds when a foreign key needs another pass
(conflicts/foreign_keys.py). Held as Python dicts, the rows made the worker's memory grow with
the divergence: a day-long outage's writes could take the worker down in the middle of the
one step that must not stop half-way. Spooled, the worker holds one row at a time however
large the divergence; the disk holds about their JSON size (under ``TMPDIR``), and only
while the reconcile runs.

One line per row: the commit time of the transaction that wrote it (empty when unknown), a
tab, then the row as the loser's ``row_to_json`` gave it. JSON escapes every control
character, so neither a tab nor a newline of a value can split a line. The row is parsed
and stamped (divergence._stamped) as it is read back, once per round.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO


class RowSpool:
    """Rows written once (``add``, then ``close``), read back any number of times."""

    def __init__(self, path: Path, stamp: Callable[[dict, datetime | None], dict]):
        self.path, self._stamp, self._count = path, stamp, 0
        self._out: IO[str] | None = path.open("w", encoding="utf-8")

    def add(self, row_json: str, committed_at: datetime | None) -> None:
        assert self._out is not None, "spool closed"
        self._out.write(f"{committed_at.isoformat() if committed_at is not None else ''}\t{row_json}\n")
        self._count += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict]:
        self.close()
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                at, _, raw = line.rstrip("\n").partition("\t")
                # numeric stays Decimal: a float would not go back into a numeric column exactly.
                yield self._stamp(json.loads(raw, parse_float=Decimal), datetime.fromisoformat(at) if at else None)


class SpoolDir:
    """Where one reconcile's spools live: named for the workflow run, so that an attempt
    retried on the same worker after a crash (no cleanup ran) removes its predecessor's
    files before writing its own; removed when the reconcile ends either way."""

    def __init__(self, run_id: str):
        self._prefix = f"eagle-dr-loser-{run_id}-"
        self.path: Path | None = None

    def __enter__(self) -> Path:
        for stale in Path(tempfile.gettempdir()).glob(f"{self._prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=self._prefix))
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
