"""Taking one pgBackRest backup to one repo, safely retried.

pgBackRest makes a backup valid only when it finishes: a killed one stays a partial that
``info`` never lists, and the next backup of the same type resumes it (``resume=y``, the
default). What a retry must add is the rest of idempotency:

- a backup this request already finished (the worker died after pgBackRest did, before the
  result reached Temporal) is returned, not taken twice;
- a pgBackRest still running from a dead worker's attempt holds the stanza's lock; it is
  stopped (SIGTERM: it releases the lock and leaves its partial to resume) rather than waited
  on for hours or raced;
- the first backup after a promotion needs a CHECKPOINT on the new primary: until the spread
  checkpoint the promotion started ends, pg_control still names the old timeline and
  pgBackRest refuses ("WAL timeline 2 does not match pg_control timeline 1").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from activities.backup.catalog import BackupRecord, read_catalog
from activities.backup.pgbackrest import LOCK_ACQUIRE, PgBackRestError, Stanza, _last_error, repo_key, stop_group
from activities.heartbeat import heartbeating
from activities.postgres.status import connect
from eagle_dr.config import scrub, scrubbed_first_line

_PROGRESS = re.compile(r"\((?:[0-9.]+[KMGT]?B|bundle[^,]*)?,?\s*([0-9.]+)%\)")


def running_backups(stanza: Stanza) -> dict[int, str]:
    """pid -> owner tag of the pgBackRest backups running from this node's config."""
    return stanza.processes("backup")


def orphans(stanza: Stanza, owner: str) -> list[int]:
    return [pid for pid, o in running_backups(stanza).items() if o == owner]


def stop_orphans(stanza: Stanza, owner: str, timeout: float = 60) -> list[int]:
    """Stop what an earlier attempt of this same activity left running (its worker died)."""
    pids = orphans(stanza, owner)
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while orphans(stanza, owner) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in orphans(stanza, owner):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


def checkpoint_if_timeline_changed(stanza: Stanza, primary_region: str) -> bool:
    """CHECKPOINT on the primary when pg_control still names an older timeline than its WAL."""
    pg = stanza.cfg.region(primary_region).postgres
    with connect(pg, 10) as conn:
        row = conn.execute(
            "select (select timeline_id from pg_control_checkpoint()),"
            " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int").fetchone()
        if row[0] != row[1]:
            conn.execute("checkpoint")
            return True
    return False


class StanzaMissing(PgBackRestError):
    """The repo lacks the stanza (a new bucket, or one lost and recreated empty): a
    ``stanza-create`` on the primary's node makes it, then the backup can be taken."""


class PrimaryRemoteUnreachable(PgBackRestError):
    """A backup from the standby could not reach the primary node's pgBackRest TLS server (down,
    refused, or a certificate it or we reject). pgBackRest itself then says only "unable to find
    primary cluster"; the reason is a warning in its log. ``code`` None: the handshake before
    it failed, and pgBackRest was not started."""

    def __init__(self, message: str, code: int | None = None):
        if code is None:
            self.command, self.code = "backup", None
            RuntimeError.__init__(self, f"pgbackrest backup not started: {message}")
        else:
            super().__init__("backup", code, message)


# pgBackRest's warning, in its log, when a pg it was given cannot be checked (src/command/
# backup/backup.c: "unable to check pg<n>: [<error type>] <message>").
_PG1_UNCHECKED = re.compile(r"unable to check pg1: (\[\w+\] .*)")

# What pgBackRest 2.45 says when backup.info or archive.info is missing in the repo
# (src/info/infoBackup.c, infoArchive.c).
_NO_STANZA = "has a stanza-create been performed"


# The annotation that names the step (workflow id / activity id, the same on every attempt)
# whose backup this is.
STEP_KEY = "eagle-dr-step"


def _finished_since(stanza: Stanza, repo_region: str, type_: str, not_before: float,
                    owner: str | None = None) -> BackupRecord | None:
    # That repo alone: ``info`` on both costs a second repo's round trips (and its timeouts
    # when that bucket is down) for backups this question never concerns.
    cat = read_catalog(stanza, f"--repo={repo_key(stanza.cfg, stanza.region.name, repo_region)}")
    # pgBackRest takes a full backup instead of an incr or diff when the repo has no full one to
    # build on (a bucket recreated empty) and says so only in its log: that full backup is this
    # run's, and missing it made the step fail and its retry take a second backup.
    # This step's own backup by its annotation: matched by start time alone (the server's clock
    # against the node's), a node clock more than a second behind made a retry miss the backup
    # its first attempt finished, and take a second one. Backups without the tag (taken before
    # it) are matched by time, as they were.
    def ours(b: BackupRecord) -> bool:
        if b.annotation.get(STEP_KEY):
            return owner is not None and b.annotation[STEP_KEY] == owner
        return b.started.timestamp() >= not_before - 1

    done = [b for b in cat.on(repo_region) if b.type in _AT_LEAST[type_] and ours(b)]
    return done[-1] if done else None


_AT_LEAST = {"incr": ("incr", "diff", "full"), "diff": ("diff", "full"), "full": ("full",)}


def standby_options(stanza: Stanza, primary_region: str) -> list[str]:
    """A backup on the standby's node: pg1 is the primary (pg_backup_start/stop, pg_control),
    pg2 this node, whose data files are copied. The primary is on another host: pgBackRest
    reaches it through its TLS server there (pg1-host, mutual TLS with ``backup.tls_client``);
    its path and socket are on that host. Without one (a config that names no
    ``pgbackrest_host``) the primary's directory must be on this host."""
    p = stanza.cfg.region(primary_region).postgres
    me = stanza.region.postgres
    opts = [f"--pg1-path={Path(p.data_dir).absolute()}", f"--pg1-port={p.port}", f"--pg1-user={p.user}",
            f"--pg2-path={Path(me.data_dir).absolute()}", f"--pg2-port={me.port}", f"--pg2-user={me.user}",
            "--backup-standby"]
    if p.socket_dir:
        opts.append(f"--pg1-socket-path={Path(p.socket_dir).absolute()}")
    if me.socket_dir:
        opts.append(f"--pg2-socket-path={Path(me.socket_dir).absolute()}")
    client = stanza.cfg.backup.tls_client
    if p.pgbackrest_host and client is not None:
        opts += [f"--pg1-host={p.pgbackrest_host}", "--pg1-host-type=tls", f"--pg1-host-port={p.pgbackrest_port}",
                 f"--pg1-host-cert-file={client.cert_file}", f"--pg1-host-key-file={client.key_file}",
                 f"--pg1-host-ca-file={client.ca_file}",
                 # The primary node's own config there (its log and lock paths): the remote
                 # would otherwise read /etc/pgbackrest.conf.
                 f"--pg1-host-config={p.pgbackrest_conf}"]
    return opts


def primary_server_unreachable(cfg, primary_region: str, timeout: float, settle: float = 0.0) -> str | None:
    """Why a backup from the standby cannot reach the primary node's pgBackRest TLS server (a
    mutual-TLS handshake as the backup client: our certificate, its own checked against the CA
    and its name), or None when it answers or none is configured. A refused connection is tried
    again for ``settle`` seconds: a server being restarted is back within one."""
    import socket
    import ssl

    p, client = cfg.region(primary_region).postgres, cfg.backup.tls_client
    if not p.pgbackrest_host or client is None:
        return None
    give_up = time.monotonic() + settle
    while True:
        phase = "connect"
        try:
            ctx = ssl.create_default_context(cafile=client.ca_file)
            ctx.load_cert_chain(client.cert_file, client.key_file)
            with socket.create_connection((p.pgbackrest_host, p.pgbackrest_port), timeout=timeout) as raw:
                phase = "handshake"
                tls = ctx.wrap_socket(raw, server_hostname=p.pgbackrest_host)
                # Under TLS 1.3 our side of the handshake ends before the server has checked our
                # certificate: its refusal arrives as an alert, or a close, on the first read.
                # Silence for a second is taken as accepted. (Its tls-server-auth list, CN to
                # stanza, is checked per command, which this look does not send: a CN it does not
                # list is seen by pgBackRest itself only.)
                with tls:
                    tls.settimeout(1.0)
                    try:
                        if not tls.recv(1):
                            return "it closed the connection after the TLS handshake: our certificate refused"
                    except TimeoutError:
                        pass
                return None
        except TimeoutError:
            # Said in words a reader at 3 a.m. can act on: nothing answering at all (a host
            # down, a network dropping packets) is not a server that hangs after accepting.
            return (f"no answer to a connection within {timeout:g} s per address (packets dropped: a firewall, "
                    "a partition; or the host down)" if phase == "connect" else
                    f"it accepted a connection but did not complete a TLS handshake within {timeout:g} s")
        except ConnectionRefusedError as e:
            if time.monotonic() >= give_up:
                return scrubbed_first_line(e)
            time.sleep(0.5)
        except (OSError, ssl.SSLError) as e:
            return scrubbed_first_line(e)


def take_backup(stanza: Stanza, primary_region: str, repo_region: str, type_: str, not_before: float,
                from_standby: bool, beat: Callable[[dict], None], cancelled: Callable[[], bool],
                owner: str, timeout: float = 6 * 3600, first_attempt: bool = False,
                expire_auto: bool = True) -> BackupRecord:
    # Only a retry can find a backup its own earlier attempt finished: the first attempt skips
    # the look (an ``info`` of the repo, about half a second of S3 round trips and decryption).
    # The blocking steps around the backup (an ``info`` of up to 120 s, stopping an orphan for
    # up to 60 s, a CHECKPOINT) beat from a side thread: the step's heartbeat timeout is 60 s,
    # and without beats the server gave the attempt up and started a second one beside it.
    if not first_attempt:
        with heartbeating(10.0, {"phase": "looking for this run's backup"}):
            if (done := _finished_since(stanza, repo_region, type_, not_before, owner)):
                return done
    with heartbeating(10.0, {"phase": "stopping a backup left by an earlier attempt"}):
        stopped = stop_orphans(stanza, owner)
    if stopped:
        beat({"phase": "stopped a backup left by an earlier attempt", "pids": stopped})
    # Another run's backup (a manual one beside the schedule's) holds the stanza's lock: wait
    # for it rather than fail or, worse, stop it.
    wait_from = time.monotonic()
    while (others := running_backups(stanza)):
        if cancelled():
            raise PgBackRestError("backup", -15, "cancelled while waiting for another backup")
        if time.monotonic() - wait_from > timeout:
            raise PgBackRestError("backup", LOCK_ACQUIRE, f"another backup ({sorted(set(others.values()))}) "
                                                          f"still runs after {timeout:.0f}s")
        beat({"phase": "waiting for another backup", "owners": sorted(set(others.values()))})
        time.sleep(2)
    with heartbeating(10.0, {"phase": "checkpoint after a promotion"}):
        checkpoint_if_timeline_changed(stanza, primary_region)
    if from_standby and (why := primary_server_unreachable(stanza.cfg, primary_region, 5.0, settle=5.0)):
        # pgBackRest itself retries the connection for its io-timeout, once per pg it checks:
        # 30 s lost before it fails, per bucket, at 3 a.m. A handshake says it in a second, and
        # a scheduled backup reads the primary instead at once.
        raise _unreachable(stanza, primary_region, why)
    key = repo_key(stanza.cfg, stanza.region.name, repo_region)
    opts = [f"--repo={key}", f"--type={type_}"] + ([f"--annotation={STEP_KEY}={owner}"] if owner else [])
    if from_standby:
        opts += standby_options(stanza, primary_region)
    if not expire_auto:
        opts.append("--no-expire-auto")
    log = stanza.log_dir / f"{stanza.name}-backup.log"
    offset = log.stat().st_size if log.exists() else 0
    run_offset = offset
    for attempt in (1, 2):
        proc = stanza.popen("backup", *opts, owner=owner)
        started = time.monotonic()
        percent = 0.0
        try:
            while proc.poll() is None:
                if cancelled():
                    stop_group(proc, 60)
                    raise PgBackRestError("backup", -15, "cancelled; the partial backup is resumed by the next one")
                if time.monotonic() - started > timeout:
                    stop_group(proc, 60)
                    raise PgBackRestError("backup", -15, f"did not finish in {timeout:.0f}s")
                percent, offset = _progress(log, offset, percent)
                beat({"phase": "copying", "percent": percent, "repo": repo_region, "type": type_,
                      "elapsed_s": round(time.monotonic() - started, 1)})
                # Wakes as soon as pgBackRest exits (a plain sleep lost half a second on average).
                try:
                    proc.wait(1)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode == 0:
            break
        if attempt == 1 and "does not match pg_control timeline" in err:
            # The promotion's checkpoint had not ended when we looked.
            checkpoint_if_timeline_changed(stanza, primary_region)
            continue
        if _NO_STANZA in err:
            raise StanzaMissing("backup", proc.returncode, scrub(_last_error(err)))
        if from_standby and (why := _pg1_unchecked(log, run_offset)):
            raise _unreachable(stanza, primary_region, why, proc.returncode)
        raise PgBackRestError("backup", proc.returncode, scrub(_last_error(err)))
    with heartbeating(10.0, {"phase": "reading the backup's record"}):
        done = _finished_since(stanza, repo_region, type_, not_before, owner)
    if done is None:
        raise PgBackRestError("backup", 0, "finished, but info lists no backup from this run")
    return done


def _unreachable(stanza: Stanza, primary_region: str, why: str, code: int | None = None) -> PrimaryRemoteUnreachable:
    p = stanza.cfg.region(primary_region).postgres
    where = f"{p.pgbackrest_host}:{p.pgbackrest_port}" if p.pgbackrest_host else p.data_dir
    return PrimaryRemoteUnreachable(scrub(f"the primary's ({primary_region}) pgBackRest server {where} could not "
                                          f"be reached from {stanza.region.name}: {why}"), code)


def _progress(log: Path, offset: int, percent: float) -> tuple[float, int]:
    """The newest "(x%)" pgBackRest logged for a copied file (log-level-file=detail)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return percent, offset
    for m in _PROGRESS.finditer(chunk.decode("utf-8", "replace")):
        percent = float(m.group(1))
    return percent, offset + len(chunk)


def now() -> float:
    return datetime.now(timezone.utc).timestamp()


def _pg1_unchecked(log: Path, offset: int) -> str | None:
    """This run's "unable to check pg1" warning, from its part of the log."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = _PG1_UNCHECKED.findall(text)
    return found[-1].strip()[:500] if found else None


__all__ = ["LOCK_ACQUIRE", "PrimaryRemoteUnreachable", "StanzaMissing", "take_backup", "stop_orphans", "checkpoint_if_timeline_changed"]
