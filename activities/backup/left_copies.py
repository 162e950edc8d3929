"""Scratch copies whose run has ended without dropping them, dropped before a restore makes
its own.

A restore's copy is dropped by the run's last step. A run that never gets there leaves it:
terminated from the UI or the CLI (a terminate runs no cleanup), or reset to a point before
its drop (the reset run restores under a name of its own). Such a copy is a writable
PostgreSQL holding production data, on a port, with its disk beside a standby, and no run
will ever drop it.

Each attempt records the copy's owner (namespace, workflow id, run) beside the node's
pgBackRest files before it makes the copy. A copy is left over when its owner's workflow has
no running execution, as Temporal itself says (a describe, not the eventually consistent
visibility listing), in this namespace; any running execution of that workflow id keeps it
(a run reset to a point after its copy was made reads the copy the run before it made).
Copies with no owner record (made by another service sharing the folder, another namespace,
or before owners were recorded), and copies younger than 10 minutes, are left alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog
from pydantic import BaseModel
from temporalio.exceptions import CancelledError

from activities.backup.pgbackrest import Stanza
from activities.backup.restore import drop_scratch, scratch_owner_file

log = structlog.get_logger(__name__)

# The workflow types that make scratch copies, and the prefix of their copies' names.
PREFIXES = {"RestoreWorkflow": "r-", "RestoreDrillWorkflow": "d-"}
_NAME = re.compile(r"^[rd]-[0-9a-f]{12}$")
# Younger copies are not judged: their owner record may be in the making, and the workflow's
# clock (when it looked) and the host's (the directory's time) may differ.
MIN_AGE = timedelta(minutes=10)
# A sweep starts no drop after this long (the rest wait for the next restore): it runs before
# the restore's own copy is made, and must not hold a 3 a.m. restore for long. A drop already
# started is bounded by the activity's timeout only.
DROP_BUDGET_S = 300


def copy_name(workflow_type: str, workflow_id: str, run_id: str) -> str:
    """The run's copy's directory name: short (a Unix socket path inside it must stay under
    108 bytes), one per run."""
    return PREFIXES[workflow_type] + hashlib.sha1(f"{workflow_id}/{run_id}".encode()).hexdigest()[:12]


class CopyOwner(BaseModel):
    namespace: str
    workflow_id: str
    run_id: str


def record_owner(stanza: Stanza, directory: Path, owner: CopyOwner) -> None:
    f = scratch_owner_file(stanza, directory)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(owner.model_dump_json())
    tmp.replace(f)


class LeftCopy(BaseModel):
    name: str
    made_at: datetime
    owner: CopyOwner


class FindLeftRequest(BaseModel):
    region: str
    looked_at: datetime  # the workflow's now: copies younger than MIN_AGE before it are left alone


class DropLeftRequest(BaseModel):
    region: str
    names: list[str]
    looked_at: datetime


class DropLeftResult(BaseModel):
    dropped: list[LeftCopy] = []
    failed: list[str] = []  # "name: why"
    not_reached: list[str] = []  # past the budget: the next restore drops them


def find_copies(stanza: Stanza, base: Path, looked_at: datetime) -> list[LeftCopy]:
    """The copies in ``base`` old enough to judge, with their owner records."""
    if not base.is_dir():
        return []
    found = []
    for d in sorted(base.iterdir()):
        if not _NAME.match(d.name):
            continue
        try:
            if not d.is_dir():
                continue
            made = datetime.fromtimestamp(d.stat().st_mtime, timezone.utc)
            owner = CopyOwner.model_validate(json.loads(scratch_owner_file(stanza, d).read_text()))
        except (OSError, ValueError):
            continue  # gone meanwhile, or no owner record: not ours to judge
        if made <= looked_at - MIN_AGE:
            found.append(LeftCopy(name=d.name, made_at=made, owner=owner))
    return found


def drop_copies(stanza: Stanza, base: Path, names: list[str], looked_at: datetime,
                budget_s: float = DROP_BUDGET_S) -> DropLeftResult:
    """Drop the named copies, as a run's own final drop would (an attempt still alive after it
    restores nothing); one that fails does not stop the others."""
    out, t0 = DropLeftResult(), time.monotonic()
    for c in find_copies(stanza, base, looked_at):
        if c.name not in names:
            continue
        if time.monotonic() - t0 > budget_s:
            out.not_reached.append(c.name)
            continue
        try:
            drop_scratch(stanza, base / c.name, 1024, last=True)  # any port: pg_ctl finds it by its directory
        except CancelledError:
            raise  # the restore was cancelled: the sweep stops with it
        except Exception as e:  # noqa: BLE001 - the next restore tries again
            log.warning("dropping a left scratch copy failed", copy=c.name, error=str(e)[:200])
            out.failed.append(f"{c.name}: {str(e)[:200]}")
            continue
        if (base / c.name).exists():
            # Files the worker's user cannot delete (an operator's, say): the owner record is
            # gone with the drop, so no later sweep looks at it again.
            out.failed.append(f"{c.name}: stopped, but its folder could not be removed whole: remove "
                              f"{base / c.name} by hand")
        else:
            out.dropped.append(c)
    return out
