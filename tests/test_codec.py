"""Payload encryption (eagle_dr/codec.py) and the codec server the Temporal UI decrypts through.

Real servers: the lab's dev server, workers and `eagle-dr codec-server` process; the codec
server's HTTP tests call it as the UI's browser does (Origin, X-Namespace, CORS preflight).
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import uuid

import aiohttp
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import WorkflowFailureError

from eagle_dr.codec import ENCODING, KEY_ID, CodecKeyError, EncryptionCodec, payloads_in, decode_in_place
from eagle_dr.codec_server import start as start_codec_server
from eagle_dr.config import ConfigError, parse_config
from eagle_dr.launch import start_move
from eagle_dr.temporal import find_bin
from tests.lab_helpers import _names, _primary
from workflows.models import FailoverInput


def _plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


def _key() -> bytes:
    return secrets.token_bytes(32)


# -- the codec: rotation, pass-through, tampering --------------------------------------------


async def test_rotation_old_key_decrypts_new_key_encrypts():
    k1, k2 = _key(), _key()
    before = EncryptionCodec({"k1": k1}, "k1")
    [old] = await before.encode([_plain("written under k1")])
    assert old.metadata[KEY_ID] == b"k1" and b"written under k1" not in old.data

    rotated = EncryptionCodec({"k1": k1, "k2": k2}, "k2")
    assert (await rotated.decode([old]))[0] == _plain("written under k1")
    [new] = await rotated.encode([_plain("written under k2")])
    assert new.metadata[KEY_ID] == b"k2"
    # Only k2 can read what was written after the rotation.
    assert (await EncryptionCodec({"k2": k2}, "k2").decode([new]))[0] == _plain("written under k2")
    with pytest.raises(CodecKeyError, match="'k2'"):
        await before.decode([new])
    # And once k1 is dropped, its payloads name the missing key id (not a garbled value).
    with pytest.raises(CodecKeyError, match="key id 'k1'"):
        await EncryptionCodec({"k2": k2}, "k2").decode([old])


async def test_plain_payloads_pass_through_decode():
    """Histories from before encryption (tests/histories, the HTTP API) still read."""
    codec = EncryptionCodec({"k1": _key()}, "k1")
    plain = [_plain("old run"), Payload(metadata={"encoding": b"binary/null"})]
    assert await codec.decode(plain) == plain


async def test_a_key_id_swap_or_a_wrong_key_does_not_authenticate():
    k1 = _key()
    [p] = await EncryptionCodec({"k1": k1}, "k1").encode([_plain("x")])
    swapped = Payload(metadata={"encoding": ENCODING, KEY_ID: b"k2"}, data=p.data)
    with pytest.raises(CodecKeyError, match="does not authenticate"):
        await EncryptionCodec({"k1": k1, "k2": k1}, "k1").decode([swapped])
    with pytest.raises(CodecKeyError, match="does not authenticate"):
        await EncryptionCodec({"k1": _key()}, "k1").decode([p])


def test_config_active_key_must_be_listed(tmp_path):
    from eagle_dr.config import DEFAULT_CONFIG
    import yaml

    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    doc["temporal"]["codec"] = {"keys": {"k1": {"file": str(tmp_path / "k")}}, "active": "k2"}
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "cfg.yaml", env={})
    assert "temporal.codec.active" in str(e.value) and "'k2'" in str(e.value)
    doc["temporal"]["codec"] = {"keys": {}, "active": "k1"}
    with pytest.raises(ConfigError, match="temporal.codec.keys"):
        parse_config(doc, "cfg.yaml", env={})


# -- a real run: its stored history holds ciphertext only ----------------------------------------


async def _refused_failover(lab, client, marker: str):
    """A failover to the current primary: the preflight runs for real (activities on the
    regional workers), then the run refuses. Changes nothing in the lab."""
    handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=_primary(lab),
                                                             reason=marker))
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    return handle, e.value


async def test_stored_history_holds_no_plaintext_of_the_input(lab, client):
    marker = f"codec-marker-{uuid.uuid4().hex}"
    handle, failure = await _refused_failover(lab, client, marker)
    # The workers decrypted the input: the run got as far as judging its target.
    assert "target_region" in str(failure.cause) and "already the primary" in str(failure.cause)

    history = await handle.fetch_history()
    # In the JSON export payload data is base64: look in the payloads' bytes as well.
    assert marker not in history.to_json()
    assert not [p for p in _payloads(history) if marker.encode() in p.data]
    started = history.events[0].workflow_execution_started_event_attributes
    assert started.input.payloads[0].metadata["encoding"] == ENCODING
    assert started.input.payloads[0].metadata[KEY_ID] == lab.cfg.temporal.codec.active.encode()
    # The UI's Details (static_details, user metadata) are encrypted too.
    assert history.events[0].user_metadata.details.metadata["encoding"] == ENCODING

    # What the temporal CLI shows (without --codec-endpoint) is the stored form as well.
    shown = subprocess.run([find_bin("temporal"), "workflow", "show", "-w", handle.id, "--output", "json",
                            "--address", lab_address(lab)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert handle.id in shown.stdout and marker not in shown.stdout

    # With the codec, the same history reads back: the marker is in it, so the checks above
    # looked at the right place.
    await decode_in_place(client.data_converter.payload_codec, history.events)
    assert [p for p in _payloads(history) if marker.encode() in p.data]
    assert not [p for p in _payloads(history) if p.metadata.get("encoding") == ENCODING]


def _payloads(history) -> list[Payload]:
    found: list[Payload] = []
    for e in history.events:
        payloads_in(e, found)
    return found


def lab_address(lab) -> str:
    return f"127.0.0.1:{lab.cfg.lab.dev_server.grpc_port}"


# -- the codec server: as the UI's browser calls it ------------------------------------------------


async def test_codec_server_decodes_a_stored_payload_for_the_ui(lab, client):
    marker = f"codec-server-marker-{uuid.uuid4().hex}"
    handle, _ = await _refused_failover(lab, client, marker)
    history = await handle.fetch_history()
    stored = history.events[0].workflow_execution_started_event_attributes.input
    body = json_format.MessageToJson(stored)
    assert marker not in body

    server = lab.cfg.temporal.codec.server.listen
    url = f"http://{server.host}:{server.port}"
    ui = lab.cfg.temporal.ui_url
    localhost_ui = ui.replace("127.0.0.1", "localhost")
    async with aiohttp.ClientSession() as http:
        # The browser's CORS preflight, under both names of the UI's origin.
        for origin in (ui, localhost_ui):
            async with http.options(f"{url}/decode", headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type,x-namespace"}) as r:
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == origin
                assert "x-namespace" in r.headers["Access-Control-Allow-Headers"]
                assert r.headers["Access-Control-Allow-Credentials"] == "true"
        # Another site's page gets no CORS grant: its browser will not hand it the answer.
        async with http.options(f"{url}/decode", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        # The UI's own request: query string, X-Namespace, JSON Payloads.
        async with http.post(f"{url}/decode?preserveStorageRefs=true", data=body, headers={
                "Origin": ui, "X-Namespace": "default", "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Access-Control-Allow-Origin"] == ui
            decoded = json_format.Parse(await r.text(), Payloads())
        assert decoded.payloads[0].metadata["encoding"] == b"json/plain"
        assert json.loads(decoded.payloads[0].data)["reason"] == marker
        # /encode: what a user types into the UI is stored encrypted, and the workers read it.
        async with http.post(f"{url}/encode", data=json_format.MessageToJson(decoded), headers={
                "Origin": ui, "X-Namespace": "default", "Content-Type": "application/json"}) as r:
            assert r.status == 200
            encoded = json_format.Parse(await r.text(), Payloads())
        assert encoded.payloads[0].metadata["encoding"] == ENCODING
        assert marker.encode() not in encoded.payloads[0].data
        assert (await client.data_converter.payload_codec.decode(list(encoded.payloads)))[0] == decoded.payloads[0]
        # Not a Payloads document: 400, not a crash.
        async with http.post(f"{url}/decode", data="{nope", headers={"Origin": ui}) as r:
            assert r.status == 400
    # The temporal CLI decodes through it too (what the README tells operators to run).
    shown = subprocess.run([find_bin("temporal"), "workflow", "show", "-w", handle.id, "-r", handle.result_run_id,
                            "--output", "json", "--address", lab_address(lab), "--codec-endpoint", url],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert marker in base64.b64decode(_started_input(shown.stdout)).decode()


def _started_input(show_json: str) -> str:
    """The base64 data of the first event's input in `temporal workflow show --output json`."""
    doc = json.loads(show_json)
    events = doc["events"] if isinstance(doc, dict) else doc
    return events[0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"][0]["data"]


async def test_codec_server_token_is_required_when_configured(lab, client):
    codec = client.data_converter.payload_codec
    token = secrets.token_urlsafe(16)
    port = lab.cfg.temporal.codec.server.listen.port + 1
    ui = lab.cfg.temporal.ui_url
    runner = await start_codec_server(codec, [ui], token, "127.0.0.1", port)
    try:
        body = json_format.MessageToJson(Payloads(payloads=await codec.encode([_plain("secret-ish")])))
        async with aiohttp.ClientSession() as http:
            # The preflight carries no credentials and must pass, or the browser never sends the POST.
            async with http.options(f"http://127.0.0.1:{port}/decode", headers={
                    "Origin": ui, "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 200 and "authorization" in r.headers["Access-Control-Allow-Headers"]
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                async with http.post(f"http://127.0.0.1:{port}/decode", data=body,
                                     headers={"Origin": ui, **headers}) as r:
                    assert r.status == 401
                    # The 401 still carries CORS, so the UI can show why.
                    assert r.headers["Access-Control-Allow-Origin"] == ui
            async with http.post(f"http://127.0.0.1:{port}/decode", data=body,
                                 headers={"Origin": ui, "Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
                assert json_format.Parse(await r.text(), Payloads()).payloads[0] == _plain("secret-ish")
    finally:
        await runner.cleanup()


def test_dev_server_ui_points_at_the_codec_server(lab, dev_server):
    import urllib.request

    settings = json.loads(urllib.request.urlopen(f"{dev_server.ui_url}/api/v1/settings", timeout=5).read())
    listen = lab.cfg.temporal.codec.server.listen
    assert settings["Codec"]["Endpoint"] == f"http://{listen.host}:{listen.port}"
    assert _names(lab)  # the lab (and its codec server process) is up


def test_a_missing_key_is_named_by_its_setting(tmp_path):
    from eagle_dr.codec import codec_from_config
    from eagle_dr.config import CodecConfig, SecretRef, SecretUnavailable

    (tmp_path / "k1").write_text(base64.b64encode(_key()).decode() + "\n")
    cfg = CodecConfig(keys={"k1": SecretRef(file=str(tmp_path / "k1")), "k0": SecretRef(file=str(tmp_path / "gone"))},
                      active="k1")
    with pytest.raises(SecretUnavailable, match=r"temporal.codec.keys.k0: secret file .*/gone: No such file"):
        codec_from_config(cfg)
    (tmp_path / "gone").write_text("an old passphrase-style key\n")
    assert set(codec_from_config(cfg).key_ids) == {"k1", "k0"}
