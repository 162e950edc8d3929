"""``pgbackrest expire`` on one repo, and what it says it removed.

The policy is the config's (``repoN-retention-full-type=time``, ``retention`` whole days,
written into pgbackrest.conf): pgBackRest keeps the newest full backup older than the
retention and everything newer, never the last full, and expires the archived WAL older than
the oldest backup it keeps (so PITR from every kept backup stays possible). ``keep_fulls`` is
the operator's lever for a bucket running out of space: a count policy for this one run.

The result is parsed from pgBackRest's own INFO lines, e.g.::

    P00   INFO: repo1: expire full backup set 20261201-210150F, 20261201-210150F_20261201-210320I
    P00   INFO: repo1: remove expired backup 20261201-210150F_20261201-210320I
    P00   INFO: repo1: 15-1 remove archive, start = 000000010000000000000001, stop = 000000010000000000000004
    P00   INFO: repo1: time-based archive retention not met - archive logs will not be expired
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from activities.backup.pgbackrest import Stanza, repo_key

_SET = re.compile(r"repo\d+: expire (?:[a-z-]+ )*backup set:? (?P<labels>.+)$")
_REMOVED = re.compile(r"repo\d+: remove expired backup (?P<label>\S+)")
_ARCHIVE = re.compile(r"repo\d+: (?P<id>\S+) remove archive, start = (?P<start>\S+), stop = (?P<stop>\S+)")
_NOTE = re.compile(r"repo\d+: (?P<note>.*retention.*)$")


class ArchiveRemoved(BaseModel):
    archive_id: str  # e.g. 15-1 (PostgreSQL version - stanza history id)
    start: str
    stop: str


class RepoExpiry(BaseModel):
    repo_region: str  # whose bucket
    repo_key: int  # as the node that ran it numbers it
    dry_run: bool
    policy: str  # e.g. "time 30 days" or "count 1 full"
    # Backup sets pgBackRest expired (a full and the diffs/incrs that depend on it).
    expired_sets: list[list[str]] = []
    removed_backups: list[str] = []
    archive_removed: list[ArchiveRemoved] = []
    notes: list[str] = []


def parse(output: str) -> tuple[list[list[str]], list[str], list[ArchiveRemoved], list[str]]:
    sets, removed, archive, notes = [], [], [], []
    for line in output.splitlines():
        text = line.split("INFO: ", 1)[-1].split("WARN: ", 1)[-1].strip().removeprefix("[DRY-RUN] ").strip()
        if m := _SET.search(text):
            sets.append([x.strip() for x in m["labels"].split(",") if x.strip()])
        elif m := _REMOVED.search(text):
            removed.append(m["label"])
        elif m := _ARCHIVE.search(text):
            archive.append(ArchiveRemoved(archive_id=m["id"], start=m["start"], stop=m["stop"]))
        elif m := _NOTE.search(text):
            notes.append(m["note"])
    return sets, removed, archive, notes


def expire(stanza: Stanza, repo_region: str, dry_run: bool = False, keep_fulls: int | None = None,
           timeout: float = 1800) -> RepoExpiry:
    key = repo_key(stanza.cfg, stanza.region.name, repo_region)
    options = [f"--repo={key}", "--log-level-console=info"]
    if dry_run:
        options.append("--dry-run")
    if keep_fulls is not None:
        # On the command line, these override pgbackrest.conf's time policy for this run only.
        options += [f"--repo{key}-retention-full-type=count", f"--repo{key}-retention-full={keep_fulls}"]
        policy = f"count {keep_fulls} full"
    else:
        policy = f"time {int(stanza.cfg.backup.retention.total_seconds() // 86400)} days"
    r = stanza.run("expire", *options, timeout=timeout)
    sets, removed, archive, notes = parse(r.stdout + "\n" + r.stderr)
    return RepoExpiry(repo_region=repo_region, repo_key=key, dry_run=dry_run, policy=policy, expired_sets=sets,
                      removed_backups=removed, archive_removed=archive, notes=notes)
