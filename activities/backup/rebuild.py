"""Rebuilding a region's standby from a backup instead of pg_basebackup.

pg_basebackup copies the whole cluster from the primary over the network: from a primary far
away (another continent) that is hours of cross-region traffic and load on the primary, and
with the primary gone it is impossible. pgBackRest restores the newest backup from the
region's own bucket (next to the standby), replays the archived WAL since, and only the tail
the archive does not hold yet comes from the primary by streaming.

The old data directory is moved aside, never deleted, until the new one streams: a broken
standby can still hold the only copy of something (a region that was cut off, say), and a
failed restore (a bucket gone, a full disk) must leave it where it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import structlog
from pydantic import BaseModel

from activities.backup.orphans import OrphanRestore, owner_tag, stop_orphan_restores
from activities.backup.pgbackrest import Stanza, _last_error, _make_dir, repo_key
from activities.backup.restore import RestoreError, _budget, _plain, timeline_to_follow, wait_streaming
from activities.postgres.ctl import FENCE_MARKER, PgCtl, PgCtlError, _guc_string
from activities.postgres.rewind import rewind_marker
from activities.postgres.standby import _streaming_from, ensure_slot
from activities.postgres.status import connect, pg_status
from eagle_dr.config import PostgresConfig, scrub
from eagle_dr.locks import LockBusy, exclusive

log = structlog.get_logger(__name__)


class RebuiltStandby(BaseModel):
    region: str
    repo_region: str
    backup_label: str | None = None
    already_streaming: bool = False
    # None: not measured (a node found streaming already, by an attempt of before this record).
    restore_seconds: float | None = None
    catch_up_seconds: float | None = None  # start, archive replay, first streamed record
    upstream: str
    replay_lsn: str | None = None
    # pgbackrest restores an earlier attempt left writing into the data directory (its worker
    # died, they did not), stopped before this attempt touched it.
    stopped_restores: list[int] = []


def aside_dir(data: Path) -> Path:
    return data.with_name(f".{data.name}.eagle-dr-before-restore")


def _done_file(data: Path) -> Path:
    """The finished rebuild's result and whose (``attempt_of``: the run): an attempt of the same
    run whose predecessor finished and died before saying so finds it, instead of setting the
    healthy new standby aside and restoring again (hours, at scale, without a standby)."""
    return data.with_name(f".{data.name}.eagle-dr-rebuilt.json")


def _undone_file(data: Path) -> Path:
    """The runs whose rebuild the runbook's undo step has undone (or given up undoing): an
    attempt of such a run that outlived it (its worker cut off from Temporal, or frozen while
    it held the directory) rebuilds nothing afterwards (_refuse_if_undone)."""
    return data.with_name(f".{data.name}.eagle-dr-rebuild-undone.json")


# The last runs an undone list keeps: far more than can have an attempt still alive.
UNDONE_KEPT = 50
# The undo waits this long for a live attempt to let go of the directory (it stops that
# attempt's restore meanwhile), inside its activity's 600 s, which also holds the put-back
# (a server start); then it says the attempt is alive, and its retry waits again.
UNDO_WAIT_S = 300


def _undone_runs(data: Path) -> list[str]:
    try:
        runs = json.loads(_undone_file(data).read_text())
        return [r for r in runs if isinstance(r, str)] if isinstance(runs, list) else []
    except (OSError, ValueError):
        return []


def _mark_undone(data: Path, attempt_of: str) -> None:
    runs = [r for r in _undone_runs(data) if r != attempt_of][-(UNDONE_KEPT - 1):] + [attempt_of]
    f = _undone_file(data)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(runs))
    os.replace(tmp, f)


def _refuse_if_undone(data: Path, attempt_of: str | None) -> None:
    """Looked at when an attempt takes the directory and again before each step that changes
    it: an attempt frozen while it held the lock outlasts the undo's wait."""
    if attempt_of is not None and attempt_of in _undone_runs(data):
        raise RestoreError(f"this run's rebuild of {data} was undone: this attempt outlived its run and rebuilds "
                           "nothing", None, "RebuildUndone")


def _found_file(data: Path) -> Path:
    """How the rebuild found the node, kept beside the directory set aside until it is gone
    (an undo in a later attempt, or in the runbook's undo step, must put back what was there:
    a running standby runs again, a slot the rebuild made is dropped)."""
    return data.with_name(f".{data.name}.eagle-dr-before-restore.json")


def put_back_original(ctl: PgCtl, primary: PostgresConfig, slot: str) -> str:
    """Undo a rebuild that did not finish: the directory set aside goes back in place of the
    half-made restore, and the node is left as the rebuild found it (started again if it was
    running; the slot dropped if the rebuild created it and nothing streams through it).
    Idempotent: nothing aside, nothing to do. Returns what it did, for the report."""
    data = ctl.data_dir
    aside = aside_dir(data)
    found_file = _found_file(data)
    if not aside.exists():
        found_file.unlink(missing_ok=True)
        return "nothing to put back: no data directory was set aside"
    try:
        found = json.loads(found_file.read_text())
    except (OSError, ValueError):
        found = {}  # set aside before this record existed, or it was lost: start nothing, drop nothing
    if ctl.running():
        _stop_for_good(ctl)
    shutil.rmtree(data, ignore_errors=True)
    os.rename(aside, data)
    _fsync_dir(data.parent)
    done = [f"the original data directory is back in {data}"]
    if found.get("was_running"):
        try:
            ctl.start(timeout=120)
            done.append("started again, as it was running")
        except PgCtlError as e:
            # It may not have run well before either (a rebuild is for broken standbys).
            done.append(f"it did not start again ({_plain(scrub(str(e).strip()))[:200]}), though it was running")
    if found.get("slot_created"):
        try:
            with connect(primary, 5) as conn:
                dropped = conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                                       "where slot_name = %s and not active", (slot,)).fetchall()
            done.append(f"slot {slot} the rebuild made on the primary dropped" if dropped else
                        f"slot {slot} kept: the original streams through it")
        except Exception as e:  # noqa: BLE001 - reported, never hidden: it pins the primary's WAL
            done.append(f"slot {slot} the rebuild made on the primary could NOT be dropped "
                        f"({_plain(scrub(str(e).strip()))[:200]}): drop it, or it keeps WAL there")
    found_file.unlink(missing_ok=True)
    return "; ".join(done)


def _stop_for_good(ctl: PgCtl) -> None:
    """A broken standby may not stop cleanly (pg_control gone): immediate, then kill."""
    try:
        ctl.stop("immediate", timeout=60)
    except PgCtlError:
        ctl.kill()
    if ctl.running():
        ctl.kill()


def _owner_tag(data: Path) -> str:
    return owner_tag("rebuild", data)


def _lock(data: Path) -> Path:
    return data.parent / f".{data.name}.eagle-dr-rebuild.lock"


def _stop_orphans(stanza: Stanza, data: Path, grace: float = 30) -> list[int]:
    """The restores a dead attempt at rebuilding ``data`` left running, stopped (orphans.py)."""
    try:
        return stop_orphan_restores(stanza, data, _owner_tag(data), grace)
    except OrphanRestore as e:
        raise RestoreError(str(e), kind="OrphanRestore") from None


def _finished_by(data: Path, attempt_of: str | None) -> RebuiltStandby | None:
    """This run's finished rebuild, when its record is there. The record is written once the
    new standby streams, before the original is removed: from there on nothing puts the
    original back (half removed, it is no copy of anything), its removal is finished instead."""
    done = _read_done(data) if attempt_of is not None else None
    return done[1] if done is not None and done[0] == attempt_of else None


def _drop_original(data: Path) -> None:
    shutil.rmtree(aside_dir(data), ignore_errors=True)
    _found_file(data).unlink(missing_ok=True)


def rebuild_standby(stanza: Stanza, primary: PostgresConfig, repo_region: str, application_name: str, slot: str,
                    beat=lambda d: None, timeout: float = 3600, attempt_of: str | None = None) -> RebuiltStandby:
    """Replace the node's data directory with a restore of the newest backup in
    ``repo_region``'s bucket, started as a standby of ``primary``. Idempotent: a retry finds
    the old directory already aside and restores again; a node already streaming is left as is,
    and one this run (``attempt_of``) already rebuilt is reported as that attempt found it."""
    node = stanza.region.postgres
    ctl = PgCtl(node)
    data = ctl.data_dir
    upstream = f"{primary.host}:{primary.port}"
    with exclusive(_lock(data)):
        stopped = _stop_orphans(stanza, data)
        if stopped:
            beat({"phase": "stopped a restore left by an earlier attempt", "pids": stopped})
        _refuse_if_undone(data, attempt_of)
        aside = aside_dir(data)
        done = _read_done(data)
        if attempt_of is not None and done is not None and done[0] == attempt_of and ctl.running() \
                and _streaming_from(node, primary):
            # What that attempt had left to do when it died (the original's removal, the
            # longest step, is the likeliest place): a later rebuild would take a half-deleted
            # directory left aside for the original, and put it back.
            shutil.rmtree(aside, ignore_errors=True)
            _found_file(data).unlink(missing_ok=True)
            rewind_marker(data).unlink(missing_ok=True)
            return done[1].model_copy(update={"stopped_restores": stopped})
        if _finished_by(data, attempt_of) is not None:
            # This run's rebuild finished, and its standby no longer streams: rebuilt again
            # below, with the half-removed original dropped first (it would be "put back").
            _drop_original(data)
        _done_file(data).unlink(missing_ok=True)  # another run's: this one's result replaces it
        if ctl.running():
            st = pg_status(node, 5)
            if st.role == "primary":
                # Checked again here, on the node, at the last moment: the workflow's view may be
                # minutes old, and restoring over a primary would throw the service's data away.
                raise RestoreError(f"{stanza.region.name} is a primary now: refusing to rebuild it as a standby",
                                   "region", "InvalidInput")
            if aside.exists() and _streaming_from(node, primary):
                # An earlier attempt finished and died before it said so.
                shutil.rmtree(aside, ignore_errors=True)
                _found_file(data).unlink(missing_ok=True)
                return RebuiltStandby(region=stanza.region.name, repo_region=repo_region, already_streaming=True,
                                      upstream=upstream, replay_lsn=st.lsn)
        if not aside.exists():
            _refuse_old_primary(stanza.region.name, ctl)
            # Recorded before anything changes; a retry (the original already aside) keeps the
            # first attempt's record, which is the one that saw the node as found.
            _found_file(data).write_text(json.dumps({"was_running": ctl.running(), "slot_created": False}))
        if ensure_slot(primary, slot):
            found_file = _found_file(data)
            found = json.loads(found_file.read_text()) if found_file.exists() else {}
            found_file.write_text(json.dumps({**found, "slot_created": True}))
        _stop_for_good(ctl)
        if aside.exists():
            # A retry: the original is already safe aside; what is in ``data`` is our own
            # half-made restore.
            shutil.rmtree(data, ignore_errors=True)
        elif data.exists():
            os.rename(data, aside)
            _fsync_dir(data.parent)
        try:
            rebuilt = _restore_and_start(stanza, ctl, primary, repo_region, application_name, slot, beat, timeout,
                                         attempt_of)
        except BaseException:
            if _finished_by(data, attempt_of) is not None:
                # Cancelled (or failed) while removing the original, after the new standby
                # streamed: putting the half-removed original back destroyed a healthy standby.
                _drop_original(data)
                raise
            # A failed or cancelled rebuild leaves the node as it found it: running if it ran.
            # An undo that fails here is left to the runbook's undo step (undo_rebuild), and
            # the restore's own error is the one raised.
            try:
                put_back_original(ctl, primary, slot)
            except Exception as undo:  # noqa: BLE001 - see above
                log.warning("putting the original data directory back failed", error=str(undo)[:200])
            raise
        _found_file(data).unlink(missing_ok=True)
        rebuilt.stopped_restores = stopped
        return rebuilt


def undo_rebuild(stanza: Stanza, primary: PostgresConfig, slot: str, attempt_of: str | None = None) -> str:
    """The runbook's undo of a rebuild that failed or was cancelled: what ``put_back_original``
    does, if the rebuild's own cleanup did not (its worker died), then where the node stands.
    A rebuild of this run (``attempt_of``) that had finished when the cancel came (the two
    crossed) is said so: its original directory is gone, and the new standby stays."""
    node = stanza.region.postgres
    ctl = PgCtl(node)
    stopped: list[int] = []
    if attempt_of is not None:
        # First: an attempt of this run still alive (its worker cut off, or frozen) would
        # otherwise rebuild after the undo, or over the original it puts back.
        _mark_undone(ctl.data_dir, attempt_of)
    try:
        # Waiting, its restore is stopped: the attempt's undo on failure then runs, and it lets go.
        with exclusive(_lock(ctl.data_dir), meanwhile=lambda: stopped.extend(_stop_orphans(stanza, ctl.data_dir, 5)),
                       timeout=UNDO_WAIT_S):
            # The original goes back where an orphan of the dead attempt would go on writing.
            stopped += _stop_orphans(stanza, ctl.data_dir)
            if (finished := _finished_by(ctl.data_dir, attempt_of)) is not None:
                # Past the point of no return: the original (maybe half removed) goes, whatever
                # is left of it, and the rebuilt standby stays.
                _drop_original(ctl.data_dir)
                done = (f"NOT undone: the rebuild had finished (backup {finished.backup_label}, streaming from "
                        f"{finished.upstream}) and was dropping the original directory; the rebuilt standby stays")
            else:
                done = put_back_original(ctl, primary, slot)
    except LockBusy as e:
        raise RestoreError(f"an attempt of this rebuild is still alive and holds {ctl.data_dir} ({e}): it may be "
                           "writing there, so nothing was moved; it rebuilds nothing more (this run is marked "
                           "undone), and the undo is tried again", None, "AttemptAlive") from None
    if stopped:
        done = f"stopped pgbackrest restore {stopped} left by the failed attempt; {done}"
    st = pg_status(node, 5)
    if not st.reachable:
        now = "its PostgreSQL is not running" if not ctl.running() else f"its PostgreSQL does not answer ({st.error})"
    elif st.role == "standby":
        now = f"a standby, {st.receiver_status or 'not streaming'}" + (f" from {st.upstream}" if st.upstream else "")
    else:
        now = f"answering as {st.role}"
    return f"{done}; {stanza.region.name} now: {now}"


def _refuse_old_primary(region: str, ctl: PgCtl) -> None:
    """A stopped old primary may hold writes nobody else has (those after a failover): failback
    keeps them (measure, reconcile, rewind); a restore from backup would drop them with the
    directory set aside. So it is refused: a fenced old primary, or a directory that pg_control
    says was last a primary (not a standby) and has no standby.signal."""
    data = ctl.data_dir
    why = None
    if (data / FENCE_MARKER).exists():
        why = "it is a fenced old primary"
    elif data.exists() and not (data / "standby.signal").exists():
        try:
            state = ctl.controldata().get("Database cluster state", "")
        except PgCtlError:
            state = ""  # pg_control unreadable: a broken directory, nothing to tell from it
        if state in ("in production", "shut down", "shutting down"):
            why = f"its data directory was last a primary (pg_control: {state!r}) and is no standby"
    if why:
        raise RestoreError(f"not rebuilding {region}: {why}, whose writes after the failover would be lost; "
                           f"run failback (eagle-dr failback --region {region}), which keeps them", "region",
                           "InvalidInput")


def _read_done(data: Path) -> tuple[str | None, RebuiltStandby] | None:
    try:
        doc = json.loads(_done_file(data).read_text())
        return doc.get("attempt_of"), RebuiltStandby.model_validate(doc["result"])
    except (OSError, ValueError, KeyError):
        return None


def _restore_and_start(stanza: Stanza, ctl: PgCtl, primary: PostgresConfig, repo_region: str, application_name: str,
                       slot: str, beat, timeout: float, attempt_of: str | None = None) -> RebuiltStandby:
    left = _budget(timeout)  # one bound for restore, start and catch-up together (restore.py)
    node = stanza.region.postgres
    data = ctl.data_dir
    _make_dir(data, node)
    key = repo_key(stanza.cfg, stanza.region.name, repo_region)
    beat({"phase": "pgbackrest restore", "repo": repo_region})
    _refuse_if_undone(data, attempt_of)
    t0 = time.monotonic()
    # --type=standby: restore_command and standby.signal, recovery to the end of the archive
    # on the latest timeline. The repo is named (restore.py: the fallback race in 2.45).
    # Along the primary's timeline, not "latest": a split brain's promoted loser leaves a history
    # file of a dead branch in the shared stanza, and "latest" would follow it (restore.py).
    follow = timeline_to_follow(stanza, repo_region, pg_status(primary, 5).timeline)
    r = stanza.run("restore", f"--repo={key}", "--type=standby", "--log-level-console=info",
                   *([f"--target-timeline={follow}"] if follow else []), timeout=left(), check=False,
                   owner=_owner_tag(data))
    if r.returncode != 0:
        raise RestoreError(f"pgbackrest restore failed ({r.returncode}): "
                           f"{_plain(scrub(_last_error(r.stderr + r.stdout)))}")
    restore_s = time.monotonic() - t0
    m = re.search(r"restore backup set (\d{8}-\d{6}F(?:_\d{8}-\d{6}[DI])?)", r.stdout + r.stderr)
    # The backup's postgresql.auto.conf is the primary's (a standby backup takes config files
    # from the primary): its recovery settings and any fence are replaced by a standby's, the
    # way failback writes them (passfile, the region's slot; its other settings kept), plus
    # the archive as a WAL source for what the primary has recycled since the backup. The restore_command names this node's own config, not the restore's
    # --pg1-path, so it stays right whatever directory the data lives in.
    ctl.write_standby_config(primary, application_name, slot)
    restore_command = (f"pgbackrest --config={stanza.conf} --stanza={stanza.name} --repo={key} "
                       'archive-get %f "%p"')
    auto = data / "postgresql.auto.conf"
    # The timeline stays pinned in the standby's own settings too: at every later start
    # PostgreSQL would otherwise look for the newest history file in the archive again.
    pin = f"recovery_target_timeline = {_guc_string(follow)}\n" if follow else ""
    ctl.write_file(auto, auto.read_text() + f"restore_command = {_guc_string(restore_command)}\n" + pin)
    beat({"phase": "starting, replaying the archive", "backup": m.group(1) if m else None})
    t1 = time.monotonic()
    _refuse_if_undone(data, attempt_of)
    ctl.start(timeout=int(min(left(), 600)))
    wait_streaming(ctl, node, primary, time.monotonic() + left(), timeout, "restored standby",
                   lambda: beat({"phase": "waiting to stream", "backup": m.group(1) if m else None}))
    rebuilt = RebuiltStandby(region=stanza.region.name, repo_region=repo_region,
                             backup_label=m.group(1) if m else None, restore_seconds=restore_s,
                             catch_up_seconds=time.monotonic() - t1, upstream=f"{primary.host}:{primary.port}",
                             replay_lsn=pg_status(node, 5).lsn)
    # Before the original goes: from here on a retry of this run finds the rebuild done, and an
    # undo asked meanwhile says so (both look under the lock, the undo after this attempt).
    _refuse_if_undone(data, attempt_of)
    _done_file(data).write_text(json.dumps({"attempt_of": attempt_of, "result": rebuilt.model_dump(mode="json")}))
    shutil.rmtree(aside_dir(data), ignore_errors=True)
    # A rewind interrupted on the old directory left its marker: the directory is replaced
    # whole now, and the marker would make the next failback re-clone a healthy standby.
    rewind_marker(data).unlink(missing_ok=True)
    return rebuilt


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
