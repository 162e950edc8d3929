"""pgBackRest on one region's node: its config files, its commands, its ``info``.

Every node has two repositories in one stanza: repo1 is its own region's bucket, repo2 the
other region's. The buckets' contents do not depend on which node wrote them (a repository is
addressed by bucket, path and stanza), so each node numbers them from where it stands; a
restore "from repo2" on a node is a restore from the other region's bucket.

Two files, written from the config by ``write_configs`` (idempotent, 0600, owned by the
data directory's owner, since PostgreSQL's archive_command reads them):

- ``pgbackrest.conf``: both repos; backups, restores, ``info``, ``expire``, ``archive-get``;
- ``archive-push.conf``: what ``archive_command`` uses; the same minus any repo dropped from
  archiving (``archive.py``: a repo that cannot be reached while WAL piles up on the primary).

and ``archive.pg.conf``, which postgresql.conf includes by a path relative to the data
directory (``include_if_exists = '../pgbackrest/archive.pg.conf'``), so a postgresql.conf that
pg_basebackup or pg_rewind copies to the other node names that node's own files.

Secrets (S3 keys, cipher passphrases) are resolved here and written only to these files; no
command line carries them (``ps`` shows command lines to every user).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import CancelledError

from eagle_dr.config import EagleConfig, RegionConfig, scrub, scrubbed_first_line

# pgBackRest's exit codes worth naming (src/common/error.auto.h).
LOCK_ACQUIRE = 50
FILE_MISSING = 55
DB_MISMATCH = 58  # e.g. "WAL timeline 2 does not match pg_control timeline 1"


OWNER_ENV = "EAGLE_DR_PGBACKREST_OWNER"


class PgBackRestError(RuntimeError):
    def __init__(self, command: str, code: int, message: str):
        self.command, self.code = command, code
        super().__init__(f"pgbackrest {command} failed ({code}): {message}")


def submit_in_activity(pool: concurrent.futures.Executor, fn, *args) -> concurrent.futures.Future:
    """``pool.submit`` carrying this activity's context into the pool's thread. The SDK keeps
    the context in a contextvar, which a pool thread does not inherit: there ``Stanza.run``
    never saw a cancel, and a cancelled restore waited out the other thread's pgBackRest call
    (up to a minute of ``repo-ls``) before its undo could begin. Only for a pool the activity
    joins before it returns: the context is the activity's, and means nothing after it."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


@dataclass(frozen=True)
class Repo:
    key: int  # 1 or 2, as this node numbers it
    region: str  # whose bucket


def repos_for(cfg: EagleConfig, region: str) -> list[Repo]:
    """repo1 the node's own region's bucket, repo2 the other's."""
    return [Repo(1, region), Repo(2, cfg.other(region).name)]


# How long a bucket's S3 endpoint gets to answer before it is called unreachable: pgBackRest
# itself retries a refused or silent one for about a minute per request, per bucket, and the
# bucket of a lost region is the one a DR run finds dead.
ENDPOINT_ANSWER_SECONDS = 3


def endpoint_unreachable(cfg: EagleConfig, bucket_region: str,
                         timeout: float = ENDPOINT_ANSWER_SECONDS) -> str | None:
    """Why ``bucket_region``'s bucket cannot be reached, or None: where pgBackRest connects for
    it (the configured endpoint, or on AWS the bucket's host-style name) answers an HTTP
    request (any answer: an unsigned HEAD gets a 403 or a 400). Unreachable: it refuses a
    connection, or accepts one and sends nothing within ``timeout`` seconds (a host whose S3
    server hangs, a load balancer with no backend behind it that holds connections open). A
    connection alone proved nothing: the kernel accepts one for a process that never reads it."""
    s3 = cfg.region(bucket_region).s3
    where = s3.request_host_port
    name = f"its endpoint {where[0]}:{where[1]}"
    try:
        # ``timeout`` per address tried: a dead first address (an AAAA record routed nowhere)
        # costs its own bound, never the answer's below.
        sock = socket.create_connection(where, timeout=timeout)
    except TimeoutError:
        return (f"{name} answered no connection within {timeout:g} s per address (packets dropped: a firewall, a "
                "partition; or the host down)")
    except (OSError, ValueError) as e:  # ValueError: a name IDNA cannot encode
        return f"{name}: {scrubbed_first_line(e)}"
    try:
        # The answer gets its own ``timeout``, from the connection on.
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        # TLS, as pgBackRest speaks (config.py allows no http endpoint). Whether it answers,
        # not whom: pgBackRest checks the certificate itself and says precisely what is wrong
        # with it. Nothing secret is sent.
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=where[0])
        sock.settimeout(max(0.001, deadline - time.monotonic()))  # 0 would mean non-blocking
        sock.sendall(f"HEAD / HTTP/1.1\r\nHost: {where[0]}\r\nConnection: close\r\n\r\n".encode())
        if not sock.recv(1):
            return f"{name} closed the connection without an HTTP answer"
    except TimeoutError:
        return f"{name} accepted a connection but answered nothing within {timeout:g} s"
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        return f"{name}: {scrubbed_first_line(e)}"
    finally:
        sock.close()
    return None


def repo_key(cfg: EagleConfig, node_region: str, bucket_region: str) -> int:
    for r in repos_for(cfg, node_region):
        if r.region == bucket_region:
            return r.key
    raise KeyError(bucket_region)


class Stanza:
    """pgBackRest for the node of ``region``, run on that region's worker."""

    def __init__(self, cfg: EagleConfig, region: str):
        self.cfg, self.region = cfg, cfg.region(region)
        pg = self.region.postgres
        conf = pg.pgbackrest_conf
        if not conf:
            raise PgBackRestError("config", 2, f"{region}: postgres.data_dir or postgres.pgbackrest_config is needed")
        self.conf = Path(conf)
        self.dir = self.conf.parent
        self.archive_conf = self.dir / "archive-push.conf"
        self.pg_include = self.dir / "archive.pg.conf"
        self.dropped_file = self.dir / "archive-dropped.json"
        # WAL gaps per repo (archive.py): what a restore from that repo must not cross.
        self.gaps_file = self.dir / "archive-gaps.json"
        self._secrets_known = False  # know_secrets(): once per object (a secret store is a network call)

    @property
    def name(self) -> str:
        return self.cfg.backup.stanza

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    # -- config files --------------------------------------------------------------------------

    def dropped(self) -> list[str]:
        """Regions whose bucket is dropped from archiving (archive.py)."""
        try:
            return list(json.loads(self.dropped_file.read_text()).get("dropped", []))
        except (OSError, ValueError):
            return []

    def _repo_lines(self, index: int, bucket_region: RegionConfig) -> list[str]:
        s3, b = bucket_region.s3, self.cfg.backup
        p = f"repo{index}-"
        lines = [f"{p}type=s3", f"{p}path={b.repo_path}", f"{p}s3-bucket={s3.bucket}",
                 f"{p}s3-region={s3.region_name}"]
        hp = s3.endpoint_host_port
        if hp:
            lines += [f"{p}s3-endpoint={hp[0]}", f"{p}storage-port={hp[1]}", f"{p}s3-uri-style=path"]
        else:
            lines += [f"{p}s3-endpoint={s3.service_host_port[0]}"]
        if s3.ca_file:
            lines.append(f"{p}storage-ca-file={s3.ca_file}")
        if s3.access_key and s3.secret_key:
            lines += [f"{p}s3-key={s3.access_key.resolve()}", f"{p}s3-key-secret={s3.secret_key.resolve()}"]
        else:
            # No keys configured: the instance's role (IRSA / instance profile) signs requests.
            lines.append(f"{p}s3-key-type=auto")
        if b.cipher != "none":
            if s3.cipher_pass is None:
                raise PgBackRestError("config", 2, f"regions[{bucket_region.name}].s3.cipher_pass is not set and "
                                                   f"backup.cipher is {b.cipher}")
            lines += [f"{p}cipher-type={b.cipher}", f"{p}cipher-pass={s3.cipher_pass.resolve()}"]
        days = max(1, int(b.retention.total_seconds() // 86400))
        lines += [f"{p}retention-full-type=time", f"{p}retention-full={days}"]
        return lines

    def render(self, for_archive_push: bool = False) -> str:
        b, pg = self.cfg.backup, self.region.postgres
        regions = [self.region, self.cfg.other(self.region.name)]
        if for_archive_push:
            dropped = set(self.dropped())
            regions = [r for r in regions if r.name not in dropped]
        lines = ["# Written by eagle-dr (activities/backup/pgbackrest.py); edits are overwritten.", "[global]"]
        for i, r in enumerate(regions, start=1):
            lines += self._repo_lines(i, r)
        lines += [
            # Async: WAL is pushed in parallel and to every repo the push can reach, so one repo
            # down does not hold back the other by more than one segment (pgBackRest multi-repo docs).
            "archive-async=y",
            f"spool-path={self.dir / 'spool'}",
            f"lock-path={self.dir / 'lock'}",
            f"log-path={self.log_dir}",
            "log-level-file=detail",
            "log-level-console=warn",
            "log-level-stderr=error",
            "start-fast=y",
            f"io-timeout={max(1, int(b.io_timeout.total_seconds()))}",
            f"process-max={b.process_max}",
            f"compress-type={b.compress}",
        ]
        if for_archive_push:
            # The last resort, for when the archive guard cannot act (archive.py): the primary
            # keeps running and drops WAL rather than fill its disk.
            lines.append(f"archive-push-queue-max={b.archive_queue_limit}")
            # How long one archive_command waits for the async push (default 60 s). PostgreSQL's
            # shutdown gives each waiting segment three tries: with a bucket down, the default
            # held a fast shutdown (a switchover's fence) for minutes per segment. Short: the
            # archiver retries anyway, and a push that works takes well under a second.
            lines.append("archive-timeout=10")
        lines += [
            "",
            f"[{b.stanza}]",
            f"pg1-path={Path(pg.data_dir).absolute()}",
            f"pg1-port={pg.port}",
            f"pg1-user={pg.user}",
        ]
        if pg.socket_dir:
            lines.append(f"pg1-socket-path={Path(pg.socket_dir).absolute()}")
        return "\n".join(lines) + "\n"

    def render_pg_include(self) -> str:
        cmd = f"pgbackrest --config={self.archive_conf} --stanza={self.name} archive-push %p"
        return ("# Written by eagle-dr: WAL archiving to this node's pgBackRest stanza.\n"
                "archive_mode = on\n"
                f"archive_command = '{cmd}'\n"
                # A segment at least every minute even when idle: the archive, and so the
                # newest point PITR reaches, never lags the primary by more than this.
                f"archive_timeout = {max(1, int(self.cfg.backup.archive_timeout.total_seconds()))}\n")

    def write_configs(self) -> bool:
        """Write the files when they differ; True when something changed."""
        changed = False
        _make_dir(self.dir, self.region.postgres)
        for sub in ("spool", "lock", "log"):
            _make_dir(self.dir / sub, self.region.postgres)
        for path, text in ((self.conf, self.render()), (self.archive_conf, self.render(for_archive_push=True)),
                           (self.pg_include, self.render_pg_include())):
            if path.exists() and path.read_text() == text:
                continue
            _write_owned(path, text, self.region.postgres)
            changed = True
        return changed

    def set_dropped(self, regions: list[str]) -> bool:
        """Record which buckets archiving skips and rewrite archive-push.conf; True if changed."""
        if sorted(regions) == sorted(self.dropped()):
            return False
        _write_owned(self.dropped_file, json.dumps({"dropped": sorted(regions)}), self.region.postgres)
        self.write_configs()
        return True

    # -- commands --------------------------------------------------------------------------------

    def argv(self, command: str, *options: str, archive: bool = False, args: tuple[str, ...] = ()) -> list[str]:
        """``args``: the command's own parameters (a path), which pgBackRest takes after it."""
        conf = self.archive_conf if archive else self.conf
        return ["pgbackrest", f"--config={conf}", f"--stanza={self.name}", *options, command, *args]

    def popen(self, command: str, *options: str, owner: str = "") -> subprocess.Popen:
        """Started in a session of its own and tagged with ``owner`` (in its environment, as
        OWNER_ENV): a retry of the same activity can find the process its dead predecessor
        left, and tell it from another run's backup, which it must not touch."""
        kw = _as_owner(self.region.postgres)
        env = {**os.environ, OWNER_ENV: owner}
        return subprocess.Popen(self.argv(command, *options), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
                                env=env, **kw)

    def know_secrets(self) -> None:
        """Resolve the repos' secrets, as writing the config does, so that scrub() knows them.
        A worker that only reads (``pgbackrest info``, a restore's checks) never wrote the
        config this life, and its scrub() had nothing to take out of pgBackRest's text, which
        quotes options back in some errors. Best effort: one that cannot be resolved here is
        not in this process's hands to leak."""
        if self._secrets_known:
            return
        self._secrets_known = True
        try:
            self.render()
        except Exception:  # noqa: BLE001 - SecretUnavailable, a cipher not set: see above
            pass

    def run(self, command: str, *options: str, timeout: float = 600, check: bool = True,
            archive: bool = False, args: tuple[str, ...] = (), owner: str = "") -> subprocess.CompletedProcess:
        """Run a command to its end, in a session of its own, waited on in half-second slices.

        Not subprocess.run: it blocks on the pipes, where an activity's cancel (the SDK raises
        it in this thread between bytecodes) is not delivered until pgBackRest writes or ends,
        which for a quiet or stalled restore of a big database is never; then it SIGKILLs the
        main process only, leaving its local workers writing into the directory the undo is
        about to put the original back into. Here a cancel or the timeout stops the whole
        process group (SIGTERM, which pgBackRest handles by stopping its workers; SIGKILL
        after a grace period) before the exception goes on. ``owner``: as popen's."""
        argv = self.argv(command, *options, archive=archive, args=args)
        # errors="replace": with a wrong passphrase pgBackRest quotes the garbage it decrypted.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True, env={**os.environ, OWNER_ENV: owner} if owner else None,
                                **_as_owner(self.region.postgres))
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if activity.in_activity() and activity.is_cancelled():
                    raise CancelledError(f"cancelled while pgbackrest {command} ran")
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
        except BaseException:
            stop_group(proc)
            raise
        # Scrubbed here, once: every message, detail and result field made from this text
        # (a catalog's, a restore check's) would otherwise have to remember to.
        self.know_secrets()
        r = subprocess.CompletedProcess(argv, proc.returncode, scrub(out or ""), scrub(err or ""))
        if check and r.returncode != 0:
            raise PgBackRestError(command, r.returncode, scrub(_last_error(r.stderr or r.stdout)))
        return r

    def has_history(self, repo: int, timeline: int, timeout: float = 60) -> bool | None:
        """Whether repo ``repo`` holds timeline ``timeline``'s history file (None: could not
        tell). A history file is archived once, at the promotion that made the timeline: a
        bucket wiped or lost after that never gets it back."""
        name = f"{timeline:08X}.history"
        # History files sit at the top of each archive id's directory (archive/<stanza>/16-1/),
        # beside one directory per 4 GiB of WAL: two one-level listings, never a recursive
        # one, which lists every archived segment (30 days of WAL: tens of thousands, pages
        # of S3 listings) and ran beside the restore it serves.
        deadline = time.monotonic() + timeout
        try:
            top = self.run("repo-ls", f"--repo={repo}", args=(f"archive/{self.name}",), timeout=timeout,
                           check=False)
            if top.returncode != 0:
                return None
            for archive_id in (x.strip() for x in top.stdout.splitlines()):
                if not re.fullmatch(r"\d+-\d+", archive_id):
                    continue  # archive.info and its copy
                r = self.run("repo-ls", f"--repo={repo}", f"--filter=^{re.escape(name)}$",
                             args=(f"archive/{self.name}/{archive_id}",),
                             timeout=max(1.0, deadline - time.monotonic()), check=False)
                if r.returncode != 0:
                    return None
                if any(line.strip() == name for line in r.stdout.splitlines()):
                    return True
        except subprocess.TimeoutExpired:
            return None  # pgBackRest still retrying an endpoint: could not tell (it failed the restore)
        return False

    def processes(self, *commands: str, archive: bool = False) -> dict[int, str]:
        """pid -> owner tag (popen's OWNER_ENV, "" when untagged) of the pgBackRest processes
        running one of ``commands`` from this node's config (the archive-push one with
        ``archive``): what a retry or the archive guard must find, whichever process started them."""
        needle = f"--config={self.archive_conf if archive else self.conf}".encode()
        wanted = {c.encode() for c in commands}
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if not (argv and argv[0].endswith(b"pgbackrest") and needle in argv and wanted & set(argv)):
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                env = {}  # gone meanwhile, or another user's: its command line still names it
            out[int(d)] = env.get(OWNER_ENV.encode(), b"").decode()
        return out

    def info(self, *options: str, timeout: float = 120) -> dict:
        """``info --output=json`` for this stanza. It exits 0 even when a repo is broken: read
        ``status.code`` and each ``repo[].status`` (see StanzaInfo)."""
        r = subprocess.run(self.argv("info", "--output=json", *options), capture_output=True,
                           timeout=timeout, **_as_owner(self.region.postgres))
        self.know_secrets()  # its status messages become a catalog's, in workflow history (run())
        if r.returncode != 0:
            raise PgBackRestError("info", r.returncode, scrub(_last_error(r.stderr.decode("utf-8", "replace"))))
        # A wrong passphrase puts decrypted garbage (control characters) in the messages.
        doc = json.loads(scrub(r.stdout.decode("utf-8", "replace")), strict=False)
        for st in doc:
            if st.get("name") == self.name:
                return st
        return {"name": self.name, "status": {"code": 1, "message": "missing stanza path"}, "backup": [], "repo": []}


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR:" in ln]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:2000]


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a command started in a session of its own, and every process it started: SIGTERM
    (and SIGCONT, so a stopped one acts on it), SIGKILL after ``grace`` seconds. Returns once
    the whole group is gone (or ``grace`` more seconds passed): pgBackRest's local processes
    (a backup's copy workers) outlive the main one for a moment, holding the stanza's lock,
    and whoever looked next (a cancelled run's catalog read, the next backup) took the stopped
    command for one still running."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        # Read what it still writes: one blocked on a full pipe would never see its own end.
        proc.communicate(timeout=grace)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _as_owner(pg) -> dict:
    """Run as the data directory's owner when the worker is root (the files are hers, and
    pgBackRest refuses a data directory it does not own)."""
    if os.geteuid() == 0 and pg.os_user:
        return {"user": pg.os_user, "extra_groups": [], "cwd": "/"}
    return {}


def _owner_ids(pg) -> tuple[int, int] | None:
    if os.geteuid() != 0 or not pg.os_user:
        return None
    import pwd

    e = pwd.getpwnam(pg.os_user)
    return e.pw_uid, e.pw_gid


def _make_dir(path: Path, pg) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    ids = _owner_ids(pg)
    if ids:
        os.chown(path, *ids)


def _write_owned(path: Path, text: str, pg) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    ids = _owner_ids(pg)
    if ids:
        os.chown(tmp, *ids)
    os.replace(tmp, path)
