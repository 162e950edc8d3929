"""What ``pgbackrest info --output=json`` says, as typed records.

``info`` exits 0 even when a repo is broken (a wrong passphrase, a deleted bucket): the
stanza's ``status.code`` and each ``repo[].status.code`` say so, and are kept here so a
caller can never read "no backups" where the truth is "repo unreadable".
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel

from activities.backup.pgbackrest import Stanza, endpoint_unreachable, repos_for


class BackupRecord(BaseModel):
    label: str
    type: str  # full | diff | incr
    repo_key: int  # as the reading node numbers it
    repo_region: str  # whose bucket
    prior: str | None = None
    size: int | None = None  # database bytes
    delta: int | None = None  # bytes copied by this backup
    repo_size: int | None = None  # bytes in the repo (compressed, encrypted)
    repo_delta: int | None = None
    wal_start: str | None = None
    wal_stop: str | None = None
    lsn_start: str | None = None
    lsn_stop: str | None = None
    started: datetime
    stopped: datetime
    error: bool = False  # pgBackRest found a page checksum error while copying
    # --annotation key/values (take.py tags each backup with the step that took it).
    annotation: dict[str, str] = {}
    # Whether pgBackRest expired after it (``expire-auto``), as the take step ran it; None: not
    # said (a record read from the catalog, or a worker older than the option).
    expire_auto: bool | None = None

    @property
    def duration_seconds(self) -> float:
        return (self.stopped - self.started).total_seconds()


class RepoState(BaseModel):
    key: int
    region: str
    ok: bool
    code: int | None = None
    message: str | None = None
    cipher: str | None = None


class ArchiveRange(BaseModel):
    repo_key: int
    repo_region: str
    min_wal: str | None = None
    max_wal: str | None = None


class Catalog(BaseModel):
    stanza: str
    read_from: str  # the region whose node read it (repo numbering is that node's)
    ok: bool
    code: int | None = None
    message: str | None = None
    cipher: str | None = None
    repos: list[RepoState] = []
    archive: list[ArchiveRange] = []
    backups: list[BackupRecord] = []
    backup_running: bool = False

    def on(self, repo_region: str) -> list[BackupRecord]:
        return sorted((b for b in self.backups if b.repo_region == repo_region), key=lambda b: b.stopped)

    def newest(self, repo_region: str | None = None) -> BackupRecord | None:
        bs = sorted((b for b in self.backups if repo_region is None or b.repo_region == repo_region),
                    key=lambda b: b.stopped)
        return bs[-1] if bs else None

    def repo(self, region: str) -> RepoState | None:
        return next((r for r in self.repos if r.region == region), None)


def _ts(v) -> datetime:
    return datetime.fromtimestamp(int(v), tz=timezone.utc)


def parse_info(doc: dict, stanza: Stanza) -> Catalog:
    by_key = {r.key: r.region for r in repos_for(stanza.cfg, stanza.region.name)}
    st = doc.get("status") or {}
    repos = []
    for r in doc.get("repo") or []:
        rs = r.get("status") or {}
        repos.append(RepoState(key=r["key"], region=by_key.get(r["key"], f"repo{r['key']}"), ok=rs.get("code") == 0,
                               code=rs.get("code"), message=rs.get("message"), cipher=r.get("cipher")))
    archive = []
    for a in doc.get("archive") or []:
        key = (a.get("database") or {}).get("repo-key")
        archive.append(ArchiveRange(repo_key=key, repo_region=by_key.get(key, f"repo{key}"), min_wal=a.get("min"),
                                    max_wal=a.get("max")))
    backups = []
    for b in doc.get("backup") or []:
        key = (b.get("database") or {}).get("repo-key", 1)
        info, arch, lsn, ts = b.get("info") or {}, b.get("archive") or {}, b.get("lsn") or {}, b.get("timestamp") or {}
        repo = info.get("repository") or {}
        backups.append(BackupRecord(
            label=b["label"], type=b["type"], repo_key=key, repo_region=by_key.get(key, f"repo{key}"),
            prior=b.get("prior"), size=info.get("size"), delta=info.get("delta"), repo_size=repo.get("size"),
            repo_delta=repo.get("delta"), wal_start=arch.get("start"), wal_stop=arch.get("stop"),
            lsn_start=lsn.get("start"), lsn_stop=lsn.get("stop"), started=_ts(ts["start"]), stopped=_ts(ts["stop"]),
            error=bool(b.get("error")), annotation={str(k): str(v) for k, v in (b.get("annotation") or {}).items()}))
    lock = ((st.get("lock") or {}).get("backup") or {})
    # "ok" only when the stanza and every repo say so; "no valid backups" (code 2) on a new
    # stanza is a state, not a broken repo, and shows in the repo's own status.
    return Catalog(stanza=stanza.name, read_from=stanza.region.name, ok=st.get("code") == 0, code=st.get("code"),
                   message=st.get("message"), cipher=doc.get("cipher"), repos=repos, archive=archive,
                   backups=backups, backup_running=bool(lock.get("held")))


def read_catalog(stanza: Stanza, *options: str) -> Catalog:
    """``options``: e.g. ``--repo=N`` for one repo's part only.

    Every repo (no ``--repo``): a bucket whose S3 endpoint does not answer (refuses, drops or
    holds a connection: pgbackrest.endpoint_unreachable) is not handed to pgBackRest, which
    retries it for about a minute, but listed as unreadable with why. A lost region's bucket
    cost every check that reads both (freshness, readiness, status) that minute, in the very
    outage they are read in. The stanza's status then has no code (pgBackRest's own would be
    4, "different across repos") and names the repos not read."""
    if any(o.startswith("--repo=") for o in options):
        return parse_info(stanza.info(*options), stanza)
    repos = repos_for(stanza.cfg, stanza.region.name)
    down = {r.key: why for r in repos if (why := endpoint_unreachable(stanza.cfg, r.region)) is not None}
    up = [r for r in repos if r.key not in down]
    if not down or len(up) > 1:  # pgBackRest takes one --repo or all of them
        return parse_info(stanza.info(*options), stanza)
    if up:
        cat = parse_info(stanza.info(*options, f"--repo={up[0].key}"), stanza)
    else:
        cat = Catalog(stanza=stanza.name, read_from=stanza.region.name, ok=False)
    unread = ", ".join(f"repo{r.key} ({r.region}'s bucket)" for r in repos if r.key in down)
    cat.code, cat.message = None, f"{unread} not read: S3 endpoint unreachable (see the repo)" + (
        f"; the rest: {cat.message}" if cat.message else "")
    cat.repos = sorted([*cat.repos, *(RepoState(key=r.key, region=r.region, ok=False, message=down[r.key],
                                                  cipher=stanza.cfg.backup.cipher)
                                      for r in repos if r.key in down)], key=lambda s: s.key)
    cat.ok = False
    return cat
