"""No secret of the lab in any workflow history: 0 hits, stored or decrypted.

Named to run last when pytest runs in one process (it takes files in name order): it then
scans the history of every run the session made on the test lab's dev server (each test
session starts with an empty one), plus the recorded histories in tests/histories. Under
pytest-xdist (`make test`) each process has a dev server of its own and this test runs
wherever it is scheduled, so the ``lab`` fixture's teardown (tests/conftest.py) scans each
process's dev server once its tests are done: every history is scanned either way. Run alone, it makes a run
of its own first (a failover preflight, which resolves the PostgreSQL and Redis passwords
inside its activities), so it always has a history that used the secrets.

Each history is checked in the form Temporal stores (what its database, a backup of it or
``temporal workflow show`` without the codec hold) and decrypted with the lab's codec (what
the UI shows through the codec server): secrets must not be in workflow inputs, results,
errors or details at all, encrypted or not.
"""

from __future__ import annotations

from temporalio.client import WorkflowFailureError, WorkflowHistory

from eagle_dr.codec import decode_in_place
from eagle_dr.launch import start_move
from tests.histories import recorded
from tests.secret_scan import _hits, _lab_secrets, _payloads, scan_histories
from tests.lab_helpers import _primary
from workflows.models import FailoverInput


async def test_no_lab_secret_in_any_history(lab, client):
    values = _lab_secrets(lab)
    handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=_primary(lab),
                                                             reason="secret scan"))
    try:
        await handle.result()
    except WorkflowFailureError:
        pass  # refused (the target is the primary): its preflight ran, which is what counts

    hits, runs = await scan_histories(client, values)
    assert any(w.id == handle.id for w in runs)
    for path in recorded():
        hits += _hits(WorkflowHistory.from_json(path.stem, path.read_text()), values)
    assert hits == [], f"{len(hits)} secret(s) found in {len(runs)} runs' and {len(recorded())} recorded histories"
    codec = client.data_converter.payload_codec
    # The scan looked at decrypted payloads, not only ciphertext: the run's input is there.
    history = await handle.fetch_history()
    await decode_in_place(codec, history.events)
    assert any(b"secret scan" in p.data for e in history.events for p in _payloads(e))
    # And it would see a leak: the password planted in that input is found.
    planted = history.events[0].workflow_execution_started_event_attributes.input.payloads[0]
    planted.data = planted.data.replace(b"secret scan", values["postgres-password"].encode())
    assert _hits(history, values) == [f"{handle.id}: postgres-password"]
