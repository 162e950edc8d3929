"""pg_control read by this process, for the few fields a stop fence polls.

Why not pg_controldata: the stop fence polls pg_control every few milliseconds, inside the
write outage, for the moment the shutdown checkpoint is written (PgCtl.exiting). Each
pg_controldata is a process started as the server's user: 10-38 ms each in the lab under the
shutdown's own load, so the poll saw the checkpoint up to that late, and most of the 85-145 ms
"stop" phase of a switchover was the polling.

What is read: the state, the latest checkpoint and its REDO location and timeline. They sit at
the start of ControlFileData, at offsets unchanged since PostgreSQL 11 (system identifier,
two version numbers, state, time, checkPoint, then the checkpoint record's redo and timeline;
10 had prevCheckPoint between them, and its file is left to pg_controldata).
A read is believed only when its CRC-32C matches: the CRC is the struct's last field, found
as the first 4-byte-aligned offset whose running CRC equals the word stored there (so no
per-version struct size is written down here). A torn read (the server rewrites the file
while we read it), another byte order, or a file we may not read gives None, and the caller
falls back to pg_controldata.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from activities.postgres.lsn import int_to_lsn

# pg_controldata's words for DBState (src/bin/pg_controldata/pg_controldata.c, dbState()).
_STATES = ("starting up", "shut down", "shut down in recovery", "shutting down", "in crash recovery",
           "in archive recovery", "in production")
_HEAD = struct.Struct("=QIIi4xqQQI")  # sysid, control version, catalog version, state, time, checkPoint, redo, TLI
# The struct is a few hundred bytes; its CRC is searched for no further than this.
_MAX_STRUCT = 1024


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc_table()


def _crc_ok(buf: bytes) -> bool:
    c = 0xFFFFFFFF
    for i, b in enumerate(buf[:_MAX_STRUCT]):
        if i >= _HEAD.size and i % 4 == 0 and i + 4 <= len(buf) and \
                (c ^ 0xFFFFFFFF) == int.from_bytes(buf[i:i + 4], sys.byteorder):
            return True
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return False


def read_control(data_dir: Path) -> dict[str, str] | None:
    """The fields, labelled as pg_controldata labels them, or None (see the module doc)."""
    if sys.byteorder != "little":
        return None  # the offsets hold either way; only the tests have checked this one
    try:
        buf = (data_dir / "global" / "pg_control").read_bytes()[:_MAX_STRUCT + 4]
    except OSError:
        return None
    if len(buf) < _HEAD.size + 4 or not _crc_ok(buf):
        return None
    _sysid, version, _catalog, state, _time, checkpoint, redo, tli = _HEAD.unpack_from(buf)
    if version < 1100 or not 0 <= state < len(_STATES):
        return None
    return {"pg_control version number": str(version), "Database cluster state": _STATES[state],
            "Latest checkpoint location": int_to_lsn(checkpoint), "Latest checkpoint's REDO location": int_to_lsn(redo),
            "Latest checkpoint's TimeLineID": str(tli)}
