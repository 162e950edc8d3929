"""Scratch copies that no running restore owns, dropped before a restore makes its own.

A restore's copy is dropped by the run's last step. A run that never gets there leaves it:
terminated from the UI or the CLI (a terminate runs no cleanup), or reset to a point before
its drop (the reset run restores under a name of its own). Such a copy is a writable
PostgreSQL holding production data, on a port, with its disk beside a standby, and no run
will ever drop it.

A copy's directory is named after the run that made it (``copy_name``), so the copies that
belong to a running restore are known from Temporal's visibility (activities/backup/readers.py
lists them). Any other copy on the host is left over, unless it is younger than the listing
(a restore listed just after it): those are left for the next restore to look at.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel

from activities.backup.pgbackrest import Stanza
from activities.backup.restore import drop_scratch

# The workflow types that make scratch copies, and the prefix of their copies' names
# (activities/backup/readers.py READER_TYPES lists the same types as running restores).
PREFIXES = {"RestoreWorkflow": "r-", "RestoreDrillWorkflow": "d-"}
_NAME = re.compile(r"^[rd]-[0-9a-f]{12}$")
# Younger copies are not judged: the listing may predate the run that made one, and the
# workflow's clock (when it listed) and the host's (the directory's time) may differ.
MIN_AGE = timedelta(minutes=10)


def copy_name(workflow_type: str, workflow_id: str, run_id: str) -> str:
    """The run's copy's directory name: short (a Unix socket path inside it must stay under
    108 bytes), one per run."""
    return PREFIXES[workflow_type] + hashlib.sha1(f"{workflow_id}/{run_id}".encode()).hexdigest()[:12]


class LeftCopiesRequest(BaseModel):
    region: str
    keep: list[str]  # the names of the running restores' copies
    listed_at: datetime  # when the running restores were listed (before the listing began)


class LeftCopy(BaseModel):
    name: str
    made_at: datetime


def drop_left_copies(stanza: Stanza, base: Path, keep: set[str], listed_at: datetime) -> list[LeftCopy]:
    """Drop each copy in ``base`` that is none of ``keep`` and older than the listing; as a
    run's own final drop would (an attempt still alive after it restores nothing)."""
    if not base.is_dir():
        return []
    dropped = []
    for d in sorted(base.iterdir()):
        if not _NAME.match(d.name) or d.name in keep or not d.is_dir():
            continue
        made = datetime.fromtimestamp(d.stat().st_mtime, timezone.utc)
        if made > listed_at - MIN_AGE:
            continue
        drop_scratch(stanza, d, 1024, last=True)  # any port: pg_ctl finds the server by its directory
        dropped.append(LeftCopy(name=d.name, made_at=made))
    return dropped
