"""Restores a dead worker left running, and the lock that tells them from a live attempt's.

pgBackRest runs in a session of its own (activities/backup/pgbackrest.py), so it outlives a
worker killed alone (the OOM killer, a kill -9 of the worker's pid): a ``pgbackrest restore``
goes on writing into its directory with nobody waiting for it. A retry that restored into the
same directory beside it would get two writers there, the orphan's last files landing in a
copy already running; a cleanup that deleted the directory would see it filled again.

Each restore carries an owner tag naming its directory (pgbackrest.OWNER_ENV), and every
attempt for a directory holds that directory's lock (eagle_dr/locks.py): holding it, any restore
still tagged for the directory is a dead attempt's, and is stopped first. Used by the standby
rebuild (rebuild.py) and the scratch copies (restore.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from activities.backup.pgbackrest import Stanza


class OrphanRestore(RuntimeError):
    """An orphaned restore could not be stopped: nothing may be done to its directory."""


def owner_tag(kind: str, data: Path) -> str:
    """The tag a restore of ``kind`` ("rebuild", "scratch") into ``data`` carries: how a later
    attempt tells its dead predecessor's restore from any other (a restore started by hand, a
    copy into another directory), which it must never stop."""
    return f"{kind}:{data.absolute()}"


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] not in ("Z", "X") and int(stat[2]) == pgid:
            found.append(int(d))
    return found


def stop_orphan_restores(stanza: Stanza, data: Path, tag: str, grace: float = 30) -> list[int]:
    """Stop the restores tagged ``tag`` that an earlier attempt on ``data`` left running.
    Called holding the lock (eagle_dr/locks.py), so none is a live attempt's (or from a cleanup, when no
    attempt may go on). Each is its session's leader (the worker starts it so), and its whole
    group (its local workers) is stopped: SIGTERM and SIGCONT (pgBackRest stops its workers),
    SIGKILL after ``grace`` seconds, until no process of the group is left."""
    mine = os.getpgrp()
    groups = []
    for pid, owner in stanza.processes("restore").items():
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        # Only a group it leads (never the worker's own, whatever a reused pid says).
        if owner == tag and pgid == pid != mine:
            groups.append(pgid)

    def signal_all(sig: int) -> None:
        for g in groups:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                raise OrphanRestore(f"pgbackrest restore {g} left by an earlier attempt writes {data}, and this "
                                    f"worker may not stop it ({e}): nothing is done to the directory beside it") \
                    from None

    signal_all(signal.SIGTERM)
    signal_all(signal.SIGCONT)  # a frozen one acts on SIGTERM only once continued
    deadline = time.monotonic() + grace
    while any(_group_members(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    if any(_group_members(g) for g in groups):
        signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_group_members(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.05)
    if still := [g for g in groups if _group_members(g)]:
        raise OrphanRestore(f"pgbackrest restore {still} left by an earlier attempt still writes {data} and did "
                            "not stop: nothing is done to the directory beside it")
    return groups
