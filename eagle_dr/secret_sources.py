"""Where a secret reference can point besides an environment variable or a file: a Kubernetes
Secret (``{k8s: namespace/secret/key}``) or HashiCorp Vault (``{vault: path#key}``).

Both are read at the moment the secret is needed (inside activities, by the codec at connect),
never copied into config or history. Errors name the reference and what went wrong (status,
missing key), never a value: the Kubernetes client's and hvac's exception text can carry the
response body, so it is not passed on.
"""

from __future__ import annotations

import base64
import binascii
import os


class SecretSourceError(RuntimeError):
    """The referenced secret cannot be read. The message names the reference only."""


def read_k8s(ref: str, context: str | None = None, api_url: str | None = None) -> str:
    """``namespace/secret/key`` from the cluster of ``context`` (kubeconfig), in-cluster when
    running in a pod, or the plain-HTTP ``api_url`` (tests)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    namespace, name, key = parse_k8s(ref)
    where = f"k8s secret {namespace}/{name} key {key!r}"
    try:
        # A private ApiClient: the library's global default configuration stays untouched (one
        # process may talk to both regions' clusters).
        cfg = client.Configuration()
        if api_url:
            cfg.host = api_url
        elif context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(context=context, client_configuration=cfg, persist_config=False)
        # One try of _request_timeout: urllib3's three retries made an API server that accepts
        # and never answers cost 40 s, inside a monitor's probe round (the caller keeps the
        # value last read, and asks again later).
        cfg.retries = 0
        api = client.ApiClient(cfg)
    except Exception as e:  # noqa: BLE001 - no kubeconfig, unknown context: said without detail
        raise SecretSourceError(f"{where}: no Kubernetes client configuration ({type(e).__name__})") from None
    try:
        with api:
            secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace, _request_timeout=10)
    except ApiException as e:
        # e's text holds the response body; the status says what happened.
        raise SecretSourceError(f"{where}: Kubernetes API answered {e.status} {e.reason}") from None
    except Exception as e:  # noqa: BLE001 - connection refused, timeout, TLS
        raise SecretSourceError(f"{where}: Kubernetes API unreachable ({type(e).__name__})") from None
    data = secret.data or {}
    if key not in data:
        raise SecretSourceError(f"{where}: the secret has no such key (keys: {', '.join(sorted(data)) or 'none'})")
    try:
        return base64.b64decode(data[key], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise SecretSourceError(f"{where}: the value is not base64-encoded UTF-8 text") from None


def parse_k8s(ref: str) -> tuple[str, str, str]:
    parts = ref.strip().split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"k8s reference {ref!r}: expected namespace/secret/key")
    return parts[0], parts[1], parts[2]


def parse_vault(ref: str) -> tuple[str, str]:
    path, sep, key = ref.strip().partition("#")
    if not sep or not path.strip("/") or not key:
        raise ValueError(f"vault reference {ref!r}: expected path#key (e.g. secret/data/eagle-dr#codec-key)")
    return path.strip("/"), key


def read_vault(ref: str) -> str:
    """``path#key`` read with hvac from ``VAULT_ADDR`` with ``VAULT_TOKEN`` (and ``VAULT_CACERT``,
    ``VAULT_NAMESPACE``), the variables every Vault tool and agent sidecar uses. The path is the
    API path: a KV v2 secret is ``<mount>/data/<name>`` and its fields are under ``data.data``."""
    path, key = parse_vault(ref)
    where = f"vault {path}#{key}"
    try:
        import hvac
        from hvac import exceptions as hvac_errors
    except ImportError:
        raise SecretSourceError(f"{where}: the hvac package is not installed (pip install hvac)") from None
    if not os.environ.get("VAULT_ADDR"):
        raise SecretSourceError(f"{where}: VAULT_ADDR is not set")
    verify = os.environ.get("VAULT_CACERT") or True
    vault = hvac.Client(url=os.environ["VAULT_ADDR"], token=os.environ.get("VAULT_TOKEN"), verify=verify,
                        namespace=os.environ.get("VAULT_NAMESPACE"), timeout=10)
    try:
        answer = vault.read(path)
    except hvac_errors.VaultError as e:
        # The error's errors list is Vault's message ("permission denied"), never a secret.
        raise SecretSourceError(f"{where}: Vault answered {type(e).__name__}: {'; '.join(e.errors or []) or 'no detail'}") \
            from None
    except Exception as e:  # noqa: BLE001 - refused, timeout, TLS
        raise SecretSourceError(f"{where}: Vault unreachable at {os.environ['VAULT_ADDR']} ({type(e).__name__})") \
            from None
    if not answer:
        raise SecretSourceError(f"{where}: no secret at that path")
    data = answer.get("data") or {}
    if isinstance(data.get("data"), dict) and "metadata" in data:  # KV v2
        data = data["data"]
    if key not in data:
        raise SecretSourceError(f"{where}: the secret has no such key (keys: {', '.join(sorted(data)) or 'none'})")
    value = data[key]
    if not isinstance(value, str):
        raise SecretSourceError(f"{where}: the value is a {type(value).__name__}, not a string")
    return value
