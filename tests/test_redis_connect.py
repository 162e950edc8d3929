"""The shared TLS context behind every Redis client (eagle_dr/redis_connect.py): built once
per CA file, rebuilt when the file changes (a rotated CA), verification as configured."""

from __future__ import annotations

import os
import ssl

from eagle_dr.config import DEFAULT_CONFIG, load_config
from eagle_dr.redis_connect import SharedContextSSLConnection, _context, connect


def test_one_context_per_ca_file_and_a_new_one_when_it_changes(tmp_path):
    ca = tmp_path / "ca.crt"
    # Any PEM bundle: the system's CA store.
    paths = ssl.get_default_verify_paths()
    bundle = next((p for p in (paths.cafile, paths.openssl_cafile) if p and os.path.exists(p)), None)
    assert bundle, f"no system CA bundle at {paths}"
    ca.write_bytes(open(bundle, "rb").read())
    first = _context(str(ca), True, ssl.CERT_REQUIRED)
    assert _context(str(ca), True, ssl.CERT_REQUIRED) is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    st = ca.stat()
    os.utime(ca, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rotated: the file changed
    second = _context(str(ca), True, ssl.CERT_REQUIRED)
    assert second is not first and _context(str(ca), True, ssl.CERT_REQUIRED) is second


def test_clients_use_the_shared_context_only_with_tls():
    cfg = load_config(DEFAULT_CONFIG, env={})
    r = cfg.primary.redis
    c = connect(r.host, r.port, password=None, tls=r.tls_kwargs)
    pool = c.connection_pool
    assert pool.connection_class is SharedContextSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == r.ca_file and pool.connection_kwargs["ssl_check_hostname"]
    plain = connect(r.host, r.port, password=None, tls={})
    assert plain.connection_pool.connection_class is not SharedContextSSLConnection
