"""No secret of the lab in any workflow history: 0 hits, stored or decrypted.

Named to run last in ``make test`` (pytest takes files in name order): it then scans the
history of every run the session made on the test lab's dev server (each test session starts
with an empty one), plus the recorded histories in tests/histories. Run alone, it makes a run
of its own first (a failover preflight, which resolves the PostgreSQL and Redis passwords
inside its activities), so it always has a history that used the secrets.

Each history is checked in the form Temporal stores (what its database, a backup of it or
``temporal workflow show`` without the codec hold) and decrypted with the lab's codec (what
the UI shows through the codec server): secrets must not be in workflow inputs, results,
errors or details at all, encrypted or not.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from temporalio.client import WorkflowFailureError, WorkflowHistory

from eagle_dr.codec import decode_in_place, payloads_in
from eagle_dr.launch import start_move
from tests.histories import recorded
from tests.lab_helpers import _primary
from workflows.models import FailoverInput


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


async def test_no_lab_secret_in_any_history(lab, client):
    values = _lab_secrets(lab)
    handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=_primary(lab),
                                                             reason="secret scan"))
    try:
        await handle.result()
    except WorkflowFailureError:
        pass  # refused (the target is the primary): its preflight ran, which is what counts

    codec = client.data_converter.payload_codec
    runs = [w async for w in client.list_workflows()]
    assert any(w.id == handle.id for w in runs)
    sem = asyncio.Semaphore(8)

    async def scan(w) -> list[str]:
        async with sem:
            history = await client.get_workflow_handle(w.id, run_id=w.run_id).fetch_history()
        hits = _hits(history, values)
        await decode_in_place(codec, history.events)
        return hits + [f"{h} (decrypted)" for h in _hits(history, values)]

    hits = [h for found in await asyncio.gather(*(scan(w) for w in runs)) for h in found]
    for path in recorded():
        hits += _hits(WorkflowHistory.from_json(path.stem, path.read_text()), values)
    assert hits == [], f"{len(hits)} secret(s) found in {len(runs)} runs' and {len(recorded())} recorded histories"
    # The scan looked at decrypted payloads, not only ciphertext: the run's input is there.
    history = await handle.fetch_history()
    await decode_in_place(codec, history.events)
    assert any(b"secret scan" in p.data for e in history.events for p in _payloads(e))
    # And it would see a leak: the password planted in that input is found.
    planted = history.events[0].workflow_execution_started_event_attributes.input.payloads[0]
    planted.data = planted.data.replace(b"secret scan", values["postgres-password"].encode())
    assert _hits(history, values) == [f"{handle.id}: postgres-password"]
