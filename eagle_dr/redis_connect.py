"""One way to open a Redis client, with or without TLS (``RedisConfig.tls_kwargs``).

redis-py builds a new ``SSLContext`` for every TLS connection, and ``create_default_context``
loads the system's CA store each time: 34 ms measured here, where the handshake itself takes
1.5 ms. A runbook's Redis steps open a dozen short-lived connections (stale-epoch reads, the
move, the epoch record, every Sentinel), so TLS made each step hundreds of milliseconds slower
on the write path of a switchover. The context is built once per CA file (and rebuilt when
the file changes: a rotated CA is picked up without a restart) and shared; verification and
the host-name check are exactly redis-py's.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

import redis

_lock = threading.Lock()
_contexts: dict[tuple, ssl.SSLContext] = {}


def _context(ca_certs: str | None, check_hostname: bool, cert_reqs: ssl.VerifyMode) -> ssl.SSLContext:
    stamp = None
    if ca_certs:
        st = os.stat(ca_certs)
        stamp = (st.st_mtime_ns, st.st_size)
    key = (ca_certs, stamp, check_hostname, cert_reqs)
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = check_hostname
            ctx.verify_mode = cert_reqs
            if ca_certs:
                ctx.load_verify_locations(cafile=ca_certs)
            # An old entry for the same file (a rotated CA) is dropped, not kept forever.
            for old in [k for k in _contexts if k[0] == ca_certs]:
                del _contexts[old]
            _contexts[key] = ctx
        return ctx


class SharedContextSSLConnection(redis.SSLConnection):
    """redis-py's TLS connection with a shared context (only the options eagle-dr sets:
    CA file, certificate required, host name checked)."""

    def _wrap_socket_with_ssl(self, sock):
        return _context(self.ca_certs, self.check_hostname, self.cert_reqs).wrap_socket(sock, server_hostname=self.host)


def connect(host: str, port: int, *, password: str | None, tls: dict[str, Any], **kw: Any) -> redis.Redis:
    """A client for ``host:port``; ``tls`` is ``RedisConfig.tls_kwargs`` (empty: plain text).
    ``kw`` are connection options (timeouts, ``retry``, ``decode_responses``, ``db``)."""
    if not tls:
        return redis.Redis(host=host, port=port, password=password, **kw)
    opts = {k: v for k, v in tls.items() if k != "ssl"}
    pool = redis.ConnectionPool(connection_class=SharedContextSSLConnection, host=host, port=port, password=password,
                                **opts, **kw)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # its own pool: close() disconnects it, as without TLS
    return client
