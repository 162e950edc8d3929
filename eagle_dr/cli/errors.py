"""One line a tired operator understands, instead of a trace, when a dependency is down.

Each explanation names what is down, its address where the error carries it, and the likely
fix. ``eagle-dr --debug`` shows the trace instead. Anything not recognised here is a bug and
keeps its trace.
"""

from __future__ import annotations

import os
import re

# tonic (the Temporal SDK's Rust core) and gRPC words for "nobody answered".
_TEMPORAL_DOWN = re.compile(r"Failed client connect|tonic::transport|tcp connect error|Connection refused"
                            r"|dns error|transport error|Server connection error", re.I)

_TEMPORAL_FIX = ("Start the lab's dev server with `eagle-dr dev-server up`, or point TEMPORAL_ADDRESS (or a "
                 "temporal profile) at your cluster.")


# TLS failures look like "not reachable" to tonic, but the server is up and the fix is in the
# client's TLS settings, so they get their own lines (rustls' words; checked against a TLS proxy).
_TLS_UNTRUSTED = re.compile(r"InvalidCertificate\((UnknownIssuer|BadSignature)|invalid peer certificate: UnknownIssuer")
_TLS_WRONG_NAME = re.compile(r"InvalidCertificate\(NotValidForName|certificate is not valid for")
# A server that wants a client certificate (mTLS) and got none or a bad one sends an alert after
# the TLS 1.3 handshake (Go's TLS, OpenSSL). The client's connection task can swallow that alert
# and fail the first call with a bare close or reset (seen ~1 in 5 against an OpenSSL server).
_TLS_CLIENT_REFUSED = re.compile(r"CertificateRequired|BadCertificate|UnknownCA|certificate required", re.I)
_CLOSED_AFTER_CONNECT = re.compile(r"call error after connection.*(connection closed|BrokenPipe|broken pipe"
                                   r"|ConnectionReset|close_notify)", re.I)


def _tls_explanation(text: str, address: str) -> str | None:
    if _TLS_UNTRUSTED.search(text):
        return (f"Temporal at {address} presented a TLS certificate this client does not trust (unknown issuer). "
                "Point TEMPORAL_TLS_SERVER_CA_CERT_PATH (or the profile's server_ca_cert_path) at the CA that "
                "signed it.")
    if _TLS_WRONG_NAME.search(text):
        return (f"Temporal at {address} presented a TLS certificate for another name. Set TEMPORAL_TLS_SERVER_NAME "
                "(or the profile's server_name) to a name the certificate carries.")
    if _TLS_CLIENT_REFUSED.search(text):
        return (f"Temporal at {address} refused the TLS connection: it requires a client certificate (mTLS) and "
                "none was sent or it was not accepted. Set TEMPORAL_TLS_CLIENT_CERT_PATH and "
                "TEMPORAL_TLS_CLIENT_KEY_PATH (or the profile's client_cert_path/client_key_path) to a "
                "certificate signed by the CA the server trusts.")
    if _CLOSED_AFTER_CONNECT.search(text):
        return (f"Temporal at {address} accepted the connection, then closed it before answering. A server that "
                "requires a client certificate (mTLS) does this when none is sent: set TEMPORAL_TLS_CLIENT_CERT_PATH "
                "and TEMPORAL_TLS_CLIENT_KEY_PATH (or the profile's client_cert_path/client_key_path); otherwise see "
                "the server's log.")
    return None


def _temporal_address(config_path: str | None) -> str:
    if os.environ.get("TEMPORAL_ADDRESS"):
        return os.environ["TEMPORAL_ADDRESS"]
    try:
        from eagle_dr.temporal import connect_config

        if address := connect_config().get("target_host"):  # a temporal.toml profile's address
            return address
    except Exception:  # noqa: BLE001 - an unreadable profile has its own error; the address is only a hint
        pass
    try:
        from eagle_dr.config import load_config

        return f"127.0.0.1:{load_config(config_path).lab.dev_server.grpc_port} (the lab's dev server)"
    except Exception:  # noqa: BLE001 - a bad config has its own error; the address is only a hint
        return "the configured address"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def explain(e: BaseException, config_path: str | None = None) -> str | None:
    """The one-line explanation of ``e``, or None when it is not a dependency being down."""
    from temporalio.service import RPCError, RPCStatusCode

    from eagle_dr.config import SecretUnavailable

    if isinstance(e, SecretUnavailable):
        return (f"a secret the config references cannot be read: {_first_line(e)}. Set it, or create it (the "
                "lab's are written by `eagle-dr lab up`).")

    if isinstance(e, (RuntimeError, RPCError)) and (tls := _tls_explanation(str(e), _temporal_address(config_path))):
        return tls
    if isinstance(e, RPCError) and e.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
        return f"Temporal is not answering at {_temporal_address(config_path)} ({_first_line(e)}). {_TEMPORAL_FIX}"
    if isinstance(e, RuntimeError) and _TEMPORAL_DOWN.search(str(e)):
        why = "connection refused" if "refused" in str(e).lower() else _first_line(e)
        return f"Temporal is not reachable at {_temporal_address(config_path)}: {why}. {_TEMPORAL_FIX}"
    try:
        import psycopg

        if isinstance(e, psycopg.OperationalError):
            return (f"PostgreSQL is not reachable: {_first_line(e)}. Check the region's postgres host/port in the "
                    "config, or bring the lab up (`eagle-dr lab up`).")
    except ImportError:
        pass
    try:
        import redis

        if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
            return (f"Redis is not reachable: {_first_line(e)}. Check the region's redis host/port in the config, "
                    "or bring the lab up (`eagle-dr lab up`).")
    except ImportError:
        pass
    try:
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            return f"S3 is not reachable: {_first_line(e)}. Check the region's s3 endpoint in the config."
    except ImportError:
        pass
    try:
        from urllib3.exceptions import MaxRetryError

        if isinstance(e, MaxRetryError):
            return (f"The Kubernetes API is not reachable: {_first_line(e)}. Check the region's kubernetes "
                    "context / api_url, or your kubeconfig.")
    except ImportError:
        pass
    try:
        from activities.backup.pgbackrest import PgBackRestError

        if isinstance(e, PgBackRestError):
            return (f"{_first_line(e)}. pgBackRest reads this host's node config: with --local, run on the "
                    "region's database host; otherwise leave --local out to ask that region's worker.")
    except ImportError:
        pass
    if isinstance(e, (ConnectionRefusedError, TimeoutError)):
        return f"a dependency is not reachable: {_first_line(e)}. Run `eagle-dr status` to see which."
    return None
