"""Recorded workflow histories for replay tests.

Histories are recorded from real runs against the lab (set EAGLE_DR_RECORD_HISTORIES=1 and
run the suite); the committed JSON files are then replayed by test_replay.py against the
current workflow code, so a change that breaks determinism for runs already in flight
fails the suite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HISTORY_DIR = Path(__file__).with_name("histories")
# The workflow id each history was recorded under, where it is not the file's name: child
# workflow ids are built from the parent's, and a replay under another id does not match them.
HISTORY_IDS = Path(__file__).with_name("history_ids.json")


async def record(handle, name: str) -> None:
    if os.environ.get("EAGLE_DR_RECORD_HISTORIES") != "1":
        return
    from eagle_dr.codec import decode_in_place

    history = await handle.fetch_history()
    # Stored decrypted: the lab's codec key is random per lab, and the replay test needs no key
    # (the codec passes plain payloads through, so these replay with or without one).
    await decode_in_place(handle._client.data_converter.payload_codec, history.events)
    HISTORY_DIR.mkdir(exist_ok=True)
    (HISTORY_DIR / f"{name}.json").write_text(history.to_json())
    ids = json.loads(HISTORY_IDS.read_text()) if HISTORY_IDS.exists() else {}
    ids[name] = handle.id
    HISTORY_IDS.write_text(json.dumps(dict(sorted(ids.items())), indent=1) + "\n")


def workflow_id(path: Path) -> str:
    """The id a recorded history replays under (its file name, unless recorded under another)."""
    ids = json.loads(HISTORY_IDS.read_text()) if HISTORY_IDS.exists() else {}
    return ids.get(path.stem, path.stem)


def recorded() -> list[Path]:
    return sorted(HISTORY_DIR.glob("*.json"))


async def decrypted_json(handle) -> str:
    """A run's history as JSON with its payloads decrypted (the lab's codec): what a check for
    leaked secrets must read, since the stored ciphertext would hide one."""
    from eagle_dr.codec import decode_in_place

    history = await handle.fetch_history()
    await decode_in_place(handle._client.data_converter.payload_codec, history.events)
    return history.to_json()
