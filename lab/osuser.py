"""The unprivileged OS user the lab's servers run as.

PostgreSQL refuses to run as root, and a DR lab should not run its databases as root
anyway. When eagle-dr is invoked as root (CI, a fresh VM) it creates a dedicated user and
starts every server as that user; as a normal user it simply runs them as itself.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Where root puts the lab's state when the lab user cannot reach the checkout (see
# reachable_state_dir). /var/lib is the place for a service's state; one directory per
# checkout, so two clones never share servers.
RELOCATED_STATE_ROOT = Path("/var/lib/eagle-dr-lab")


@dataclass(frozen=True)
class LabUser:
    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict:
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return {}
        # cwd "/": the caller's directory (a checkout under /root, say) may be one the lab user
        # cannot enter, and initdb, for one, changes back to its starting directory and fails.
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "cwd": "/"}

    def can_reach(self, path: Path) -> bool:
        return can_reach(path, self.uid, self.gid, self.name)

    def reachable_binary(self, binary: str, into: Path) -> str:
        """``binary`` itself when this user can reach it; else a hard link (a copy across file
        systems) in ``into``, which must be a directory the user can reach. The '-bin' wheels put
        their executables in the checkout's .venv, which under /root the lab user cannot reach."""
        if self.can_reach(Path(binary)):
            return binary
        into.mkdir(parents=True, exist_ok=True)
        os.chmod(into, 0o755)
        target = into / Path(binary).name
        src = os.stat(binary)
        if target.exists():
            t = target.stat()
            if (t.st_ino, t.st_dev) == (src.st_ino, src.st_dev) or (t.st_size, t.st_mtime) == (src.st_size, src.st_mtime):
                return str(target)
            target.unlink()
        try:
            os.link(binary, target)
        except OSError:
            shutil.copy2(binary, target)
        os.chmod(target, 0o755)
        return str(target)

    def own(self, *paths: Path) -> None:
        """Hand paths (created by root) over to the lab user."""
        if os.geteuid() != 0:
            return
        for p in paths:
            if p.exists():
                os.chown(p, self.uid, self.gid)


def ensure_lab_user(name: str) -> LabUser:
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return LabUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )
        pw = pwd.getpwnam(name)
    grp.getgrgid(pw.pw_gid)
    return LabUser(name, pw.pw_uid, pw.pw_gid)


def can_reach(path: Path, uid: int | None, gid: int | None, name: str) -> bool:
    """Whether the user could reach ``path``: search permission on every existing directory on
    the way to it, by mode bits (the lab does not use ACLs). A user that does not exist yet
    (created later as a system user with its own group) has only the 'other' bits."""
    if uid == 0:
        return True
    groups = set() if gid is None else {gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    target = Path(os.path.abspath(path))
    for d in reversed(target.parents):
        try:
            st = d.stat()
        except FileNotFoundError:
            break  # created later by the lab, with modes it chooses
        if uid is not None and st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def reachable_state_dir(configured: Path, user_name: str) -> Path:
    """Where the lab's state goes: ``configured`` (the checkout's .eagle-dr), unless root runs the
    lab and the lab user cannot reach it, as in a clone under /root (mode 700).

    The servers run as the lab user and must enter their data directories. Rather than
    loosen the permissions of the directories above the checkout (root's home is private for a
    reason, and chmod o+x /root would be a change the operator never asked for), the state
    moves to /var/lib/eagle-dr-lab/<checkout>-<hash of the configured path>: the same place on
    every call, so `lab up`, `status`, `lab down` and the workers all find it."""
    if os.geteuid() != 0:
        return configured
    try:
        pw = pwd.getpwnam(user_name)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        uid = gid = None
    if can_reach(configured, uid, gid, user_name):
        return configured
    digest = hashlib.sha256(str(configured).encode()).hexdigest()[:12]
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{configured.parent.name.lstrip('.')}-{configured.name.lstrip('.')}")
    RELOCATED_STATE_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(RELOCATED_STATE_ROOT, 0o755)
    return RELOCATED_STATE_ROOT / f"{label}-{digest}"


def make_dir(path: Path, user: LabUser, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    user.own(path)
    return path
