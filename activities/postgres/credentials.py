"""PostgreSQL passwords for what eagle-dr starts or writes: pg_rewind, pg_basebackup and a
standby's ``primary_conninfo``; and the check that a copy's source lets us in before any
copy begins.

Passwords are resolved here, inside activities, from the config's references, and never
put on a command line: a child's argv is world-readable in /proc/<pid>/cmdline, its
environment (/proc/<pid>/environ) only by its own user and root. So the client tools get
PGPASSWORD in their environment, and a standby reads its password from a passfile.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo
from temporalio.exceptions import ApplicationError

from eagle_dr.config import PostgresConfig, SecretRef

# libpq's words for "the server would not let us in" (auth.c, fe-auth.c): retrying with the
# same credentials cannot help, and someone has to fix a password or pg_hba.conf.
_AUTH_FAILED = ("password authentication failed", "no pg_hba.conf entry", "pg_hba.conf rejects",
                "no password supplied", "scram authentication", "must be superuser or replication role",
                "permission denied to start wal sender", "is not permitted to log in")
# And for "the server could not be reached" (or went away): a retry may succeed.
_UNREACHABLE = ("could not connect to server", "connection to server at", "connection refused",
                "could not translate host name", "timeout expired", "server closed the connection",
                "could not receive data from server", "could not send data to server", "the database system is")


def tool_env(secret: SecretRef | None, server: PostgresConfig | None = None) -> dict[str, str]:
    """The environment additions that give one libpq client tool its password and, for
    ``server``, its TLS settings (PGSSLMODE, PGSSLROOTCERT: libpq reads them as it reads the
    conninfo keywords, and they keep argv free of anything but host and port)."""
    env = {"PGPASSWORD": secret.resolve()} if secret is not None else {}
    if server is not None:
        env.update({f"PG{k.upper()}": v for k, v in server.ssl_params.items()})
    return env


def redact(text: str, *cfgs: PostgresConfig) -> str:
    """``text`` without any password of ``cfgs``: libpq error text may quote a connection
    string, and this text ends up in workflow history."""
    for cfg in cfgs:
        for ref in (cfg.password, cfg.replication_password):
            try:
                secret = ref.resolve() if ref is not None else ""
            except Exception:  # noqa: BLE001 - a secret we cannot resolve cannot be in the text either
                continue
            if secret:
                text = text.replace(secret, "***")
    return text


def source_failure(text: str, what: str, source: PostgresConfig, user: str) -> ApplicationError | None:
    """The error to stop with when ``text`` (a tool's or libpq's) says the source refused
    us or could not be reached; None when it is about something else."""
    low = text.lower()
    where = f"{source.host}:{source.port}"
    if any(m in low for m in _AUTH_FAILED):
        return ApplicationError(f"{what}: {where} refused {user!r} (authentication or pg_hba.conf): "
                                f"{_first_error(text)}. Fix the password or pg_hba.conf and run it again.",
                                type="PostgresAuthFailed", non_retryable=True)
    if any(m in low for m in _UNREACHABLE):
        return ApplicationError(f"{what}: cannot reach {where}: {_first_error(text)}",
                                type="PostgresSourceUnreachable")
    return None


def check_source(source: PostgresConfig, *, replication: bool, what: str) -> None:
    """Connect the way pg_rewind (a normal connection as ``user`` to database postgres) or
    pg_basebackup (a replication connection as ``replication_user``) will, and raise the
    error ``source_failure`` names when that is refused or unreachable."""
    if replication:
        user, secret = source.replication_user, source.replication_secret
        extra = {"replication": "true"}
    else:
        user, secret = source.user, source.password
        extra = {"dbname": "postgres"}
    params = {"host": source.host, "port": source.port, "user": user, "connect_timeout": 10, **extra,
              **source.ssl_params}
    if secret is not None:
        params["password"] = secret.resolve()
    try:
        with psycopg.connect(make_conninfo("", **params), autocommit=True) as conn:
            if replication:
                # A walsender that answers: the role may replicate, not only log in.
                res = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
                if res.error_message:
                    raise psycopg.OperationalError(res.error_message.decode(errors="replace"))
    except psycopg.Error as e:
        text = redact(str(e), source)
        raise source_failure(text, what, source, user) or ApplicationError(
            f"{what}: {source.host}:{source.port}: {_first_error(text)}", type="PostgresSourceUnreachable") from None


def write_passfile(path: Path, source: PostgresConfig, owner: tuple[int, int] | None) -> Path | None:
    """A libpq passfile with the replication password for ``source``, 0600 and owned by the
    server's OS user (libpq ignores a passfile that others can read); None when no password
    is configured. Written to a temp name and renamed, so no reader sees half of it."""
    secret = source.replication_secret
    if secret is None:
        return None
    line = ":".join(_passfile_field(v) for v in (source.host, str(source.port), "*", source.replication_user,
                                                 secret.resolve())) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner and os.geteuid() == 0:
            os.fchown(fd, *owner)
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def _passfile_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "fatal" in ln.lower() or "error" in ln.lower():
            return ln[:400]
    return (lines[0] if lines else "no error text")[:400]
