"""The secret scan of workflow histories (tests/test_zz_secret_scan.py and the ``lab``
fixture's teardown): which of the lab's secrets appear in a history, stored or decrypted."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from temporalio.client import WorkflowHistory

from eagle_dr.codec import decode_in_place, payloads_in


def _lab_secrets(lab) -> dict[str, str]:
    d = Path(lab.cfg.lab.state_dir) / "secrets"
    found = {p.name: p.read_text().strip() for p in sorted(d.iterdir()) if p.is_file()}
    assert {"postgres-password", "redis-password", "codec-key-1"} <= set(found), found.keys()
    return {k: v for k, v in found.items() if len(v) >= 8}


def _hits(history: WorkflowHistory, values: dict[str, str]) -> list[str]:
    """Which secrets appear in the history's JSON (texts: errors, names) or in any payload's
    bytes (payload data is base64 in the JSON, so it is searched decoded)."""
    text = history.to_json()
    blobs = [p.data for e in history.events for p in _payloads(e)]
    out = []
    for name, value in values.items():
        raw = value.encode()
        if value in text or base64.b64encode(raw).decode() in text or any(raw in b for b in blobs):
            out.append(f"{history.workflow_id}: {name}")
    return out


def _payloads(event):
    found = []
    payloads_in(event, found)
    return found


async def scan_histories(client, values: dict[str, str]) -> tuple[list[str], list]:
    """Every run on ``client``'s server, each history as stored and decrypted with the client's
    codec: (hits, runs)."""
    codec = client.data_converter.payload_codec
    runs = [w async for w in client.list_workflows()]
    sem = asyncio.Semaphore(8)

    async def scan(w) -> list[str]:
        async with sem:
            history = await client.get_workflow_handle(w.id, run_id=w.run_id).fetch_history()
        hits = _hits(history, values)
        await decode_in_place(codec, history.events)
        return hits + [f"{h} (decrypted)" for h in _hits(history, values)]

    hits = [h for found in await asyncio.gather(*(scan(w) for w in runs)) for h in found]
    return hits, runs
