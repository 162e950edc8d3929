"""Secret references beyond env/file: ``{k8s: namespace/secret/key}`` (against kmock, the
Kubernetes API emulator the issue names) and ``{vault: path#key}`` (hvac against a recorded
Vault HTTP fake: see _VaultFake).

Every failure names the reference and never the value.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from pydantic import ValidationError

from eagle_dr import config as config_module
from eagle_dr.config import (ConfigError, SecretRef, SecretUnavailable, forget_network_secrets, parse_config,
                             scrub)
from tests.kmock_cluster import kmock_cluster


# -- Kubernetes Secrets ------------------------------------------------------------------------


def _add_secret(k8s, name: str, data: dict[str, str]) -> None:
    k8s.core.create_namespaced_secret(k8s.namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()}))


def test_k8s_reference_reads_the_secret_and_names_only_the_reference_on_errors(monkeypatch):
    forget_network_secrets()
    value = secrets.token_urlsafe(24)
    other = secrets.token_urlsafe(24)
    with kmock_cluster(controller=False) as k8s:
        _add_secret(k8s, "eagle-dr-codec", {"key-1": value, "key-2": other})
        ref = SecretRef(k8s=f"{k8s.namespace}/eagle-dr-codec/key-1", api_url=k8s.api_url)
        assert ref.resolve() == value
        # Resolved secrets are scrubbed from error text like env/file ones.
        assert scrub(f"auth failed for {value}") == "auth failed for ***"

        missing_key = SecretRef(k8s=f"{k8s.namespace}/eagle-dr-codec/key-9", api_url=k8s.api_url)
        with pytest.raises(SecretUnavailable) as e:
            missing_key.resolve()
        assert f"k8s secret {k8s.namespace}/eagle-dr-codec key 'key-9'" in str(e.value)
        assert "key-1" in str(e.value)  # which keys there are: names, not values
        assert value not in str(e.value) and other not in str(e.value)
        assert base64.b64encode(value.encode()).decode() not in str(e.value)

        with pytest.raises(SecretUnavailable, match=r"k8s secret .*/nope key 'k': Kubernetes API answered 404"):
            SecretRef(k8s=f"{k8s.namespace}/nope/k", api_url=k8s.api_url).resolve()
        url = k8s.api_url
        namespace = k8s.namespace
    # The API server gone: what was read is used (within the re-read interval, and after it
    # when the store does not answer: a probe must not find every server "down" because the
    # store is), and a reference never read is unreachable, said in one line.
    ref = SecretRef(k8s=f"{namespace}/eagle-dr-codec/key-1", api_url=url)
    assert ref.resolve() == value
    monkeypatch.setattr(config_module, "NETWORK_SECRET_TTL_S", 0.0)  # every use reads the store again
    assert ref.resolve() == value
    forget_network_secrets()
    with pytest.raises(SecretUnavailable, match="Kubernetes API unreachable"):
        ref.resolve()


def test_env_still_wins_over_a_k8s_reference(monkeypatch):
    monkeypatch.setenv("EAGLE_DR_TEST_K8S_OVERRIDE", "from-env")
    # No API server at all: the variable is used and the cluster never asked.
    ref = SecretRef(env="EAGLE_DR_TEST_K8S_OVERRIDE", k8s="ns/s/k", api_url="http://127.0.0.1:9")
    assert ref.resolve() == "from-env"


@pytest.mark.parametrize("ref, message", [
    ({"k8s": "ns/secret"}, "expected namespace/secret/key"),
    ({"vault": "secret/data/x"}, "expected path#key"),
    ({"file": "/x", "vault": "a#b"}, "one store, not file and vault"),
    ({"env": "X", "api_url": "http://127.0.0.1:1"}, "'context' and 'api_url' go with 'k8s'"),
])
def test_malformed_references_are_refused_at_load(ref, message):
    with pytest.raises(ValidationError, match=message):
        SecretRef(**ref)


def test_a_malformed_reference_in_the_config_names_the_field():
    from eagle_dr.config import DEFAULT_CONFIG
    import yaml

    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    doc["alerts"]["token"] = {"k8s": "just-a-name"}
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "cfg.yaml", env={})
    assert "alerts.token" in str(e.value) and "namespace/secret/key" in str(e.value)


# -- Vault -------------------------------------------------------------------------------------

# No Vault server runs offline here: Debian has no `vault` package (apt-cache policy vault: none)
# and PyPI ships only clients. So hvac talks to this recorded HTTP fake: the bodies below are
# Vault 1.x's answers to GET /v1/<path> as documented for KV v2 and v1 reads and for its
# 403/404 errors (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2#read-secret-version).
_TOKEN = "hvs.test-token-" + secrets.token_hex(8)


def _kv2(data: dict) -> dict:
    return {"request_id": "0f9a6a4c-7b5e-3c2a-9d1e-2a6b5f3c1d7e", "lease_id": "", "renewable": False,
            "lease_duration": 0, "data": {"data": data, "metadata": {
                "created_time": "2026-01-02T03:04:05.123456789Z", "custom_metadata": None, "deletion_time": "",
                "destroyed": False, "version": 3}}, "wrap_info": None, "warnings": None, "auth": None}


def _kv1(data: dict) -> dict:
    return {"request_id": "4b1c2d3e-5f60-7182-93a4-b5c6d7e8f901", "lease_id": "", "renewable": False,
            "lease_duration": 2764800, "data": data, "wrap_info": None, "warnings": None, "auth": None}


class _VaultFake:
    def __init__(self, secrets_by_path: dict[str, dict]):
        store = secrets_by_path
        self.seen: list[tuple[str, str | None]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                seen.append((self.path, self.headers.get("X-Vault-Token")))
                path = self.path.split("?")[0].removeprefix("/v1/")
                if self.headers.get("X-Vault-Token") != _TOKEN:
                    return self._answer(403, {"errors": ["permission denied"]})
                if path not in store:
                    return self._answer(404, {"errors": []})
                return self._answer(200, store[path])

            def _answer(self, status: int, body: dict):
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_vault_reference_reads_kv2_and_kv1_and_names_only_the_reference(monkeypatch):
    forget_network_secrets()
    value, v1_value = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with _VaultFake({"secret/data/eagle-dr": _kv2({"codec-key": value, "other": "x"}),
                     "kv/eagle-dr": _kv1({"token": v1_value})}) as vault:
        monkeypatch.setenv("VAULT_ADDR", vault.url)
        monkeypatch.setenv("VAULT_TOKEN", _TOKEN)
        assert SecretRef(vault="secret/data/eagle-dr#codec-key").resolve() == value
        assert SecretRef(vault="/kv/eagle-dr#token").resolve() == v1_value
        assert vault.seen[0] == ("/v1/secret/data/eagle-dr", _TOKEN)
        # Read once per interval, not at every use (a probe a second per region asked each time).
        asked = len(vault.seen)
        assert SecretRef(vault="secret/data/eagle-dr#codec-key").resolve() == value and len(vault.seen) == asked
        # Its interval over and the store refusing: the value held serves, and the store is
        # not asked again at the next use (each ask of a store that hangs costs 10 s).
        ref = SecretRef(vault="secret/data/eagle-dr#codec-key")
        key = ref._network_key()
        config_module._NETWORK_READS[key] = (value, config_module._NETWORK_READS[key][1] - 3600)
        monkeypatch.setenv("VAULT_TOKEN", "hvs.refused")
        assert ref.resolve() == value and len(vault.seen) == asked + 1
        assert ref.resolve() == value and len(vault.seen) == asked + 1
        # A login refused with it (a rotation) drops it: the next use asks the store.
        monkeypatch.setenv("VAULT_TOKEN", _TOKEN)
        assert ref.refresh() and ref.resolve() == value and len(vault.seen) == asked + 2
        assert not SecretRef(env="X", file="/nonexistent").refresh()  # nothing held for a file

        with pytest.raises(SecretUnavailable) as e:
            SecretRef(vault="secret/data/eagle-dr#nope").resolve()
        assert "vault secret/data/eagle-dr#nope: the secret has no such key" in str(e.value)
        assert value not in str(e.value)

        with pytest.raises(SecretUnavailable, match="vault secret/data/missing#k: .*InvalidPath|no secret"):
            SecretRef(vault="secret/data/missing#k").resolve()

        monkeypatch.setenv("VAULT_TOKEN", "hvs.wrong")
        forget_network_secrets()
        with pytest.raises(SecretUnavailable, match="vault secret/data/eagle-dr#codec-key: Vault answered "
                                                    "Forbidden: permission denied"):
            SecretRef(vault="secret/data/eagle-dr#codec-key").resolve()
        url = vault.url
    forget_network_secrets()
    with pytest.raises(SecretUnavailable, match=f"Vault unreachable at {url}"):
        SecretRef(vault="secret/data/eagle-dr#codec-key").resolve()
    monkeypatch.delenv("VAULT_ADDR")
    with pytest.raises(SecretUnavailable, match="VAULT_ADDR is not set"):
        SecretRef(vault="secret/data/eagle-dr#codec-key").resolve()
