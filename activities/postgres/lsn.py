"""PostgreSQL WAL positions (LSNs) as numbers, for lag and RPO arithmetic."""

from __future__ import annotations

import re

_LSN = re.compile(r"^([0-9A-Fa-f]+)/([0-9A-Fa-f]+)$")


def lsn_to_int(lsn: str) -> int:
    m = _LSN.match(lsn.strip())
    if not m:
        raise ValueError(f"not an LSN: {lsn!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def int_to_lsn(n: int) -> str:
    return f"{n >> 32:X}/{n & 0xFFFFFFFF:X}"


def lsn_diff(a: str | None, b: str | None) -> int | None:
    """Bytes from b to a (a - b); None when either is unknown."""
    if not a or not b:
        return None
    return lsn_to_int(a) - lsn_to_int(b)
