"""The lab's own certificate authority and its servers' certificates (S3, PostgreSQL, Redis,
pgBackRest's TLS servers).

pgBackRest talks to S3 only over TLS and matches DNS names only (2.45 rejects an IP SAN:
"unable to find hostname '127.0.0.1' in certificate"), so the certificate names
``localhost`` and every S3 endpoint in the lab is ``https://localhost:<port>``. Clients verify
against ``ca.crt`` (``s3.ca_file``); nothing in the lab turns verification off.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lab import binaries
from lab.osuser import LabUser, make_dir


class LabTls:
    def __init__(self, directory: Path, user: LabUser):
        self.dir, self.user = directory, user

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def key(self) -> Path:
        return self.dir / "server.key"

    def ensure(self) -> None:
        """Idempotent: an existing CA and certificate are kept (clients already trust them)."""
        if self.ca.exists() and self.cert.exists() and self.key.exists():
            return
        make_dir(self.dir, self.user, 0o755)
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                      "-days", "3650", "-subj", "/CN=eagle-dr lab CA")
        self._sign("server", "/CN=localhost", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
        for name in ("ca.key", "server.key"):
            os.chmod(self.dir / name, 0o600)
        for name in ("ca.crt", "server.crt"):
            os.chmod(self.dir / name, 0o644)
        # The S3 servers run as the lab user and read the key.
        self.user.own(self.key, self.cert)

    @property
    def postgres_cert(self) -> Path:
        return self.dir / "postgres.crt"

    @property
    def postgres_key(self) -> Path:
        return self.dir / "postgres.key"

    def ensure_postgres(self) -> None:
        """The PostgreSQL servers' certificate: libpq's verify-full matches the name the client
        connected to, and the lab's runbooks connect to ``127.0.0.1`` (an IP SAN, which libpq
        matches since PostgreSQL 14); ``localhost`` is there for people typing psql. A separate
        certificate from S3's, whose client (pgBackRest) must not see the IP SAN change. Owned
        by the lab user, key 0600: the server refuses a key others can read."""
        self._server_cert("postgres", "/CN=eagle-dr lab postgres", "serverAuth")

    @property
    def redis_cert(self) -> Path:
        return self.dir / "redis.crt"

    @property
    def redis_key(self) -> Path:
        return self.dir / "redis.key"

    def ensure_redis(self) -> None:
        """The Redis nodes' and Sentinels' certificate: redis-py checks the name it connected to
        (``127.0.0.1``, an IP SAN). The nodes also present it as TLS clients when they replicate
        and when the Sentinels call each other. Owned by the lab user, key 0600."""
        self._server_cert("redis", "/CN=eagle-dr lab redis", "serverAuth,clientAuth")

    @property
    def pgbackrest_cert(self) -> Path:
        return self.dir / "pgbackrest-server.crt"

    @property
    def pgbackrest_key(self) -> Path:
        return self.dir / "pgbackrest-server.key"

    def ensure_pgbackrest(self, client_cert: Path, client_key: Path) -> None:
        """The pgBackRest TLS servers' certificate (DNS ``localhost`` only: pgBackRest 2.45
        checks DNS names, as for S3) and the backup client's, at the paths the config names
        (``backup.tls_client``); CN ``pgbackrest-client`` is what the servers authorize. Both
        owned by the lab user: the servers and ``pgbackrest backup`` run as it."""
        self._server_cert("pgbackrest-server", "/CN=localhost", "serverAuth", san="DNS:localhost")
        if not (client_cert.exists() and client_key.exists()):
            if client_cert.parent != self.dir or client_key.parent != self.dir:
                raise ValueError(f"the lab makes backup.tls_client's files in {self.dir} only")
            crt, key = self.client_cert("pgbackrest-client")
            if crt != client_cert:
                crt.rename(client_cert)
            if key != client_key:
                key.rename(client_key)
            self.user.own(client_key, client_cert)

    def _server_cert(self, name: str, subject: str, usage: str, san: str = "DNS:localhost,IP:127.0.0.1") -> None:
        """``<name>.crt``/``<name>.key`` naming ``san`` (``127.0.0.1`` and ``localhost``), made
        once; owned by the lab user (its server runs as it), key 0600 (servers refuse others)."""
        self.ensure()
        crt, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if crt.exists() and key.exists():
            return
        self._sign(name, subject, f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        os.chmod(key, 0o600)
        os.chmod(crt, 0o644)
        self.user.own(key, crt)

    def client_cert(self, name: str) -> tuple[Path, Path]:
        """A client certificate (``<name>.crt``, ``<name>.key``) signed by the lab CA, for mTLS.

        X.509 v3 with ``extendedKeyUsage=clientAuth`` (the -extfile makes it v3): rustls, in the
        Temporal SDK's core, rejects v1 certificates outright. Idempotent like ``ensure``."""
        self.ensure()
        crt, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if crt.exists() and key.exists():
            return crt, key
        self._sign(name, f"/CN={name}", "extendedKeyUsage=clientAuth\n")
        os.chmod(key, 0o600)
        return crt, key

    def _openssl(self, *argv: str) -> None:
        openssl = binaries.ensure("openssl")["openssl"]
        r = subprocess.run([openssl, *argv], cwd=self.dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {argv[0]} failed: {r.stderr.strip()}")

    def _sign(self, name: str, subject: str, extensions: str) -> None:
        """``<name>.key`` and ``<name>.crt`` signed by the lab CA for 10 years, with ``extensions``
        (an -extfile, which also makes the certificate X.509 v3)."""
        extfile = f"{name}.ext"
        (self.dir / extfile).write_text(extensions)
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                      "-subj", subject)
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                      "-out", f"{name}.crt", "-days", "3650", "-extfile", extfile)
