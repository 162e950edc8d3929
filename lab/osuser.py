"""The unprivileged OS user the lab's servers run as.

PostgreSQL refuses to run as root, and a DR lab should not run its databases as root
anyway. When eagle-dr is invoked as root (CI, a fresh VM) it creates a dedicated user and
starts every server as that user; as a normal user it simply runs them as itself.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabUser:
    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict:
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

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


def make_dir(path: Path, user: LabUser, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    user.own(path)
    return path
