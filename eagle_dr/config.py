"""The region configuration: one pydantic model, validated in one place.

Everything eagle-dr does is driven by this file (``config/eagle-dr.yaml`` in the lab).
A bad file is refused as a whole with an error naming the file, the field path and the
problem, so nothing starts on a half-understood topology.

Secrets never appear here as values: only as references (an environment variable name or
a file path) that activities resolve at the moment they connect.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Literal

import structlog
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "eagle-dr.yaml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    """'500ms', '30s', '5m', '1h', '30d', or a bare number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"malformed duration {value!r}")
    if isinstance(value, (int, float)):
        return timedelta(seconds=value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"malformed duration {value!r} (expected a number and one of ms, s, m, h, d, e.g. '30s')")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_size(value: Any) -> int:
    """'256MiB', '1GiB', or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"malformed size {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"malformed size {value!r} (expected bytes or a number and one of KiB, MiB, GiB, TiB)")


Size = Annotated[int, BeforeValidator(parse_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Strict):
    """Where a secret lives. Resolved inside activities, never carried in Temporal history.

    ``env`` (a variable, used when set), and at most one of ``file``, ``k8s``
    (``namespace/secret/key``: a Kubernetes Secret, read from ``context``'s cluster, in-cluster
    in a pod, or ``api_url``) and ``vault`` (``path#key``, read with VAULT_ADDR/VAULT_TOKEN):
    ``{env: X, file: Y}`` lets a variable override the file, as before."""

    env: str | None = None
    file: str | None = None
    k8s: str | None = None
    vault: str | None = None
    # Only with k8s: the kubeconfig context, or a plain-HTTP API server (tests).
    context: str | None = None
    api_url: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SecretRef":
        stores = [k for k in ("file", "k8s", "vault") if getattr(self, k)]
        if not self.env and not stores:
            raise ValueError("a secret reference needs 'env', 'file', 'k8s' or 'vault'")
        if len(stores) > 1:
            raise ValueError(f"a secret reference reads one store, not {' and '.join(stores)}")
        if (self.context or self.api_url) and not self.k8s:
            raise ValueError("'context' and 'api_url' go with 'k8s'")
        from eagle_dr.secret_sources import parse_k8s, parse_vault

        if self.k8s:
            parse_k8s(self.k8s)
        if self.vault:
            parse_vault(self.vault)
        return self

    def __str__(self) -> str:
        """The reference, as errors name it (never the value)."""
        return ", ".join(f"{k}: {v}" for k, v in (("env", self.env), ("file", self.file), ("k8s", self.k8s),
                                                  ("vault", self.vault)) if v)

    def resolve(self) -> str:
        if self.env and os.environ.get(self.env):
            return _remember(os.environ[self.env])
        if self.file:
            try:
                return _remember(Path(self.file).read_text().strip())
            except OSError as e:
                raise SecretUnavailable(f"secret file {self.file}: {e.strerror}") from e
        if self.k8s or self.vault:
            from eagle_dr.secret_sources import SecretSourceError, read_k8s, read_vault

            key = self._network_key()
            now = time.monotonic()
            with _NETWORK_LOCK:
                hit = _NETWORK_READS.get(key)
            if hit is not None and now - hit[1] < NETWORK_SECRET_TTL_S:
                return hit[0]
            try:
                value = read_k8s(self.k8s, self.context, self.api_url) if self.k8s else read_vault(self.vault)
            except SecretSourceError as e:
                if hit is not None:
                    # Used for another interval, not asked again at every use: each ask of a
                    # store that hangs waits out its client's timeout (10 s). A rotated secret
                    # fails its login with the old value, and the caller refreshes (below).
                    with _NETWORK_LOCK:
                        _NETWORK_READS[key] = (hit[0], now)
                    _log.warning("secret store unreachable: using the value last read", reference=str(self),
                                 error=str(e))
                    return hit[0]
                raise SecretUnavailable(str(e)) from None
            value = _remember(value.strip())
            with _NETWORK_LOCK:
                _NETWORK_READS[key] = (value, now)
            return value
        raise SecretUnavailable(f"environment variable {self.env} is not set")

    def _network_key(self) -> tuple:
        # The store behind it (Vault's address, the kubeconfig) is part of the reference.
        return self.k8s, self.context, self.api_url, self.vault, self.vault and os.environ.get("VAULT_ADDR")

    def refresh(self) -> bool:
        """Read a network secret again at its next use (a login refused with the value held:
        a rotation). True when a held value was dropped; files and variables are read at every
        use anyway."""
        if not (self.k8s or self.vault):
            return False
        with _NETWORK_LOCK:
            return _NETWORK_READS.pop(self._network_key(), None) is not None


class SecretUnavailable(RuntimeError):
    pass


# A secret read from a store over the network (Kubernetes, Vault) is read again at most this
# often per reference. Workers probe every region every second or so: each probe asked the
# store, and a store slower than the probe's bound made every server look down from every
# vantage point at once. A failed re-read uses the value last read; only a reference never
# read fails (SecretUnavailable).
NETWORK_SECRET_TTL_S = 60.0
_NETWORK_READS: dict[tuple, tuple[str, float]] = {}
_NETWORK_LOCK = threading.Lock()
_log = structlog.get_logger(__name__)


def forget_network_secrets() -> None:
    """Read every store again at the next use (tests; a process told a secret rotated)."""
    with _NETWORK_LOCK:
        _NETWORK_READS.clear()


# Every secret this process has resolved, so that scrub() can take it out of error text.
_RESOLVED: set[str] = set()


def _remember(secret: str) -> str:
    if secret:
        _RESOLVED.add(secret)
    return secret


def scrub(text: str) -> str:
    """``text`` with every secret this process resolved replaced by ``***``.

    Error text from libpq, redis-py or boto may quote a connection string or a rejected
    argument; anything that goes into an activity result or exception message lands in
    workflow history, which the UI shows to everyone. Secrets are matched by value, longest
    first, so a password that contains another secret is not half-replaced. Row values that
    PostgreSQL quotes in an error (a key that collides, a failing row, a COPY line) are
    withheld too: production data belongs in history no more than a password does."""
    for secret in sorted(_RESOLVED, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return _without_row_values(text) if any(w in text for w in _ROW_WORDS) else text


_WITHHELD = "(row values withheld)"
# PostgreSQL's words around row values in its errors' DETAIL and CONTEXT lines:
# "Key (email)=(a@b) already exists.", "Failing row contains (1, x, ...).", and a COPY's
# "COPY alerts, line 5, column payload: ..." or "COPY alerts, line 5: ...". Greedy to the
# line's last parenthesis: a value may hold one.
_KEY = re.compile(r"(Key \([^)\n]*\)=)\(.*\)")
_ROW = re.compile(r"(row contains )\(.*\)")
_COPY = re.compile(r"(COPY [^,\n]+, line \d+)(, column [^:\n]+)?: .*")
# A value its type refuses: 'invalid input syntax for type integer: "zz"', 'malformed array
# literal: "..."', 'invalid input value for enum level: "..."'.
_INPUT = re.compile(r"((?:invalid input (?:syntax|value) for|malformed) [^:\n]+: )\".*\"")
_ROW_WORDS = (")=(", "row contains (", "COPY ", "invalid input ", "malformed ")


def _without_row_values(text: str) -> str:
    text = _KEY.sub(lambda m: m.group(1) + _WITHHELD, text)
    text = _ROW.sub(lambda m: m.group(1) + _WITHHELD, text)
    text = _INPUT.sub(lambda m: m.group(1) + _WITHHELD, text)
    return _COPY.sub(lambda m: m.group(1) + (m.group(2) or "") + ": " + _WITHHELD, text)


def scrubbed_first_line(e: BaseException, limit: int = 200) -> str:
    """A reason fit for a result, a step's detail or a table cell: the error's first line
    (libpq adds a hint on a second), secrets scrubbed, bounded; the type's name when the error
    has no text."""
    text = scrub(str(e).strip())
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class Endpoint(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


# What PostgreSQL accepts as a replication slot name (ReplicationSlotValidateName):
# lower-case letters, digits and underscores, at most NAMEDATALEN-1 bytes.
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")

# An identifier named in the config: letters, digits, _ and $, not starting with a digit, at
# most 63 bytes (longer ones PostgreSQL truncates, silently naming another object). It is
# used exactly as written, quoted: ``Alerts`` is the table "Alerts", not alerts. Names that
# need more than this (spaces, dots, quotes) are refused rather than guessed at.
_IDENT = re.compile(r"^[^\W\d][\w$]*$")


def _check_ident(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name) or len(name.encode()) > 63:
        raise ValueError(f"{what} {name!r} is not a valid identifier (letters, digits, _ and $, "
                         "not starting with a digit, at most 63 bytes; used exactly as written)")
    return name


def _check_relation_name(name: Any, what: str) -> str:
    """A schema or table name as the catalog holds it: always quoted (sql.Identifier), so a dash
    or a space is no risk. Only '.' (the separator) and '"' are refused."""
    if not isinstance(name, str) or not name or len(name.encode()) > 63 or any(c in name for c in '."\0'):
        raise ValueError(f"{what} {name!r} is not a valid name (at most 63 bytes, no '.' or '\"'; used exactly "
                         "as written, case included)")
    return name


class TableName(BaseModel):
    """A table named in ``conflicts:``: ``table`` or ``schema.table``, case as written."""

    model_config = ConfigDict(frozen=True)
    schema_name: str | None = None
    name: str

    @classmethod
    def parse(cls, text: str, *, catalog: bool = False) -> "TableName":
        """``catalog``: a name as the catalog holds it (a dash, a space), not only an identifier.
        The config's ``conflicts:`` keeps to identifiers (a space there is likelier a typo); a
        consistency check lists every table as the catalog names it, and its sync, its follow-up
        check and a restore's recover-rows must name the same tables back."""
        parts = text.split(".") if isinstance(text, str) else [text]
        if len(parts) > 2:
            raise ValueError(f"table {text!r}: expected 'table' or 'schema.table'"
                             + (" (a name holding a '.' cannot be named here)" if catalog else ""))
        check = _check_relation_name if catalog else _check_ident
        for i, part in enumerate(parts):
            check(part, "table" if i == len(parts) - 1 else "schema")
        return cls(schema_name=parts[0], name=parts[1]) if len(parts) == 2 else cls(name=parts[0])

    @property
    def identifier(self) -> sql.Identifier:
        """Quoted for SQL: ``sql.Identifier(schema, table)`` or ``sql.Identifier(table)``."""
        return sql.Identifier(self.schema_name, self.name) if self.schema_name else sql.Identifier(self.name)

    def __str__(self) -> str:
        return f"{self.schema_name}.{self.name}" if self.schema_name else self.name


class PostgresConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    database: str = "eagle"
    user: str = "postgres"
    password: SecretRef | None = None
    replication_user: str = "replicator"
    # The replication user's password: pg_basebackup and a standby's primary_conninfo use it.
    # Unset means the same secret as ``password`` (one shared credential, as in a small setup).
    replication_password: SecretRef | None = None
    # Physical slot this region's node uses when it streams from the other region.
    slot: str | None = None
    # Local to the region's worker: what pg_ctl, pg_rewind and friends act on.
    data_dir: str | None = None
    socket_dir: str | None = None
    bin_dir: str | None = None
    # The OS user that owns data_dir; server commands run as this user when the worker is root.
    os_user: str | None = None
    # This node's pgBackRest config (activities/backup/pgbackrest.py writes it: repos, stanza,
    # pg1 = this node). Unset: pgbackrest/pgbackrest.conf beside data_dir, which is where the
    # lab's archive_command looks (relative to the data directory, so a config file that
    # pg_basebackup or pg_rewind copies to the other node still names that node's own file).
    pgbackrest_config: str | None = None
    # TLS for every TCP connection eagle-dr and the tools it runs make to this server, and for
    # the standby's replication stream (primary_conninfo). ``verify-full`` checks the server's
    # certificate against ``sslrootcert`` and its name against ``host``: the only mode that
    # stops a man in the middle on a cross-region link. The lab uses it; libpq's default
    # ``prefer`` is kept only for a server that has no TLS at all.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    sslrootcert: str | None = None
    # This node's pgBackRest TLS server (``pgbackrest server``, run beside PostgreSQL as its
    # OS user), through which a backup on the other region's node reaches this node's data
    # directory and socket when this node is the primary (pg1-host, type tls). A DNS name in
    # the server's certificate: pgBackRest 2.45 matches DNS names only, never an IP SAN.
    # Unset: the other node's backups expect this data directory on their own host (the
    # lab's old one-host layout) and ``backup.read_from: standby`` is refused.
    pgbackrest_host: str | None = None
    pgbackrest_port: int = Field(default=8432, ge=1, le=65535)
    # A TCP proxy or load balancer between eagle-dr and this server (HAProxy, an NLB, a
    # Kubernetes Service reached from another cluster). A refused connection then proves only
    # that the proxy answered, not that the server is gone: with this set, the failover treats
    # it as a timeout and waits for the old primary to fence itself, and the monitor never
    # confirms a refused region fast (it waits for its failure threshold).
    behind_proxy: bool = False

    @property
    def ssl_params(self) -> dict[str, str]:
        """The libpq keywords for this server's TLS (for a conninfo or, as PGSSL*, a tool's env)."""
        params = {"sslmode": self.sslmode}
        if self.sslrootcert:
            params["sslrootcert"] = self.sslrootcert
        return params

    @property
    def pgbackrest_conf(self) -> str | None:
        if self.pgbackrest_config:
            return self.pgbackrest_config
        if self.data_dir:
            return str(Path(self.data_dir).absolute().parent / "pgbackrest" / "pgbackrest.conf")
        return None

    @field_validator("slot")
    @classmethod
    def _slot(cls, v: str | None) -> str | None:
        if v is not None and not _SLOT.match(v):
            raise ValueError(f"{v!r} is not a replication slot name PostgreSQL accepts "
                             "(lower-case letters, digits and _, 1 to 63 characters)")
        return v

    @property
    def slot_name(self) -> str:
        if self.slot:
            return self.slot
        # Derived from host and port, so it must be made acceptable the same way (a host name
        # like db-1.example.com has '-' and '.'), and stay within 63 characters.
        derived = re.sub(r"[^a-z0-9_]", "_", f"slot_{self.host.lower()}_{self.port}")
        return derived[:63]

    def dsn(self, dbname: str | None = None, **overrides: Any) -> str:
        """A libpq connection string, every value quoted (make_conninfo): a password with a
        space, a quote or a backslash must not end the value and start another option, nor
        break the string in a way whose error text would quote the password. ``overrides``
        replace or add libpq keywords (user=..., application_name=...)."""
        params: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": dbname or self.database,
                                  "user": self.user, **self.ssl_params}
        if self.password is not None:
            params["password"] = self.password.resolve()
        params.update(overrides)
        return make_conninfo("", **params)

    @property
    def replication_secret(self) -> SecretRef | None:
        return self.replication_password or self.password


class RedisConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    password: SecretRef | None = None
    master_name: str = "eagle-cache"
    sentinels: list[Endpoint] = Field(default_factory=list)
    # TLS to the data node and to the Sentinels (one setting: a Sentinel set serves one TLS
    # deployment), the certificate verified against ``ca_file`` (the system's CAs when unset)
    # and its name against ``host``. Without it the AUTH password and every key cross regions
    # in clear. Verification is never turned off.
    tls: bool = False
    ca_file: str | None = None

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> "RedisConfig":
        if self.ca_file and not self.tls:
            raise ValueError("ca_file is set but tls is off: turn tls on (or drop ca_file)")
        return self

    @property
    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's connection keywords for this deployment's TLS (empty without it)."""
        if not self.tls:
            return {}
        # Without ca_file redis-py's default context loads the system's CAs.
        ca = {"ssl_ca_certs": self.ca_file} if self.ca_file else {}
        return {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True, **ca}


class RedisReconcileConfig(_Strict):
    """What failback copies from an old Redis master before it rejoins as a replica (the full
    resync then discards its dataset, which is always snapshotted to S3 first).

    Only keys the primary lacks are candidates; a key both hold keeps the primary's value.
    Redis keeps no tombstones: a key the primary lacks was never written there, or was deleted
    there on purpose (a cache invalidation), and nothing tells which. Copying it back can
    serve data the application invalidated, so by default (`none`, right for a cache) nothing
    is copied: the keys stay in the snapshot and are reported. `copy-missing` copies them all.
    Patterns are shell-style globs (*, ?, [abc]): `include` keys are copied even under `none`
    (data nobody can regenerate, e.g. sessions), `exclude` keys never, even under copy-missing."""

    strategy: Literal["none", "copy-missing"] = "none"
    include: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)


class S3Config(_Strict):
    bucket: str = Field(min_length=3, max_length=63)
    endpoint_url: str | None = None
    region_name: str = "us-east-1"
    access_key: SecretRef | None = None
    secret_key: SecretRef | None = None
    # CA bundle that signed the endpoint's certificate (a private CA, the lab's own); unset
    # means the system's. Verification is never turned off: backups cross regions over it.
    ca_file: str | None = None
    # Passphrase of the pgBackRest repository in this bucket (aes-256-cbc at rest). It belongs
    # to the bucket, not to a node: both regions' nodes write the same repo with it.
    cipher_pass: SecretRef | None = None
    # Server-side encryption with a customer key (SSE-C) for the Redis snapshots put here.
    sse_customer_key: SecretRef | None = None

    @property
    def endpoint_host_port(self) -> tuple[str, int] | None:
        if not self.endpoint_url:
            return None
        u = urlsplit(self.endpoint_url)
        return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)

    @property
    def service_host_port(self) -> tuple[str, int]:
        """The S3 endpoint pgBackRest's config names: the configured one, or AWS's regional one
        (HTTPS; the China partition's domain for cn- regions)."""
        domain = "amazonaws.com.cn" if self.region_name.startswith("cn-") else "amazonaws.com"
        return self.endpoint_host_port or (f"s3.{self.region_name}.{domain}", 443)

    @property
    def request_host_port(self) -> tuple[str, int]:
        """Where pgBackRest's requests for this bucket connect: the configured endpoint (path
        style), or on AWS the bucket's own name under the regional endpoint (host style, its
        default), which an egress allow-list may name alone."""
        if self.endpoint_host_port:
            return self.endpoint_host_port
        host, port = self.service_host_port
        return f"{self.bucket}.{host}", port

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        # Every region's bucket holds a pgBackRest repo, and pgBackRest before 2.58 speaks only
        # HTTPS to S3 (Debian's is older): against a plain-HTTP endpoint each backup and WAL
        # push fails its TLS handshake after minutes of retries. SSE-C keys need TLS too.
        scheme = urlsplit(v).scheme if v is not None else "https"
        if scheme == "http":
            raise ValueError(f"{v!r} is plain HTTP: pgBackRest, which keeps a repo in every region's bucket, speaks "
                             "only HTTPS to S3; give the endpoint TLS (a private CA goes in s3.ca_file)")
        if scheme != "https":
            raise ValueError(f"{v!r} is not an https URL")
        return v


class KubernetesConfig(_Strict):
    context: str | None = None
    # Plain HTTP API server (kmock in tests); unset means kubeconfig/in-cluster.
    api_url: str | None = None
    namespace: str = "eagle-alert"
    selector: str = "app.kubernetes.io/component=microservice"
    config_map: str = "multi-region-config"


class DnsConfig(_Strict):
    zone: str
    record: str
    value: str
    ttl: int = Field(default=60, ge=1)
    set_identifier: str | None = None


class TemporalRegionConfig(_Strict):
    task_queue: str
    # This region's worker serves Prometheus metrics here (temporal.metrics_host); none: no endpoint.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)


class RegionConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    role: Literal["primary", "secondary"]
    priority: int = Field(default=100, ge=0)
    postgres: PostgresConfig
    redis: RedisConfig
    s3: S3Config
    kubernetes: KubernetesConfig = KubernetesConfig()
    dns: DnsConfig | None = None
    temporal: TemporalRegionConfig


class HealthConfig(_Strict):
    """The always-on monitor (``eagle-dr monitor``, started by ``lab up`` and ``schedules apply``)."""

    timeout: Duration = timedelta(seconds=30)
    interval: Duration = timedelta(seconds=10)
    failure_threshold: int = 3
    # Off by default: an automatic failover is a decision with a data-loss bound (the lag
    # guard), and a service owner opts into it knowingly.
    auto_failover: bool = False
    # No second automatic move within this long of the monitor's last one. After a failover
    # the old primary is fenced and rebuilt; a flapping network must not bounce the service
    # back and forth (each move costs an RPO and an RTO). A human can always move it.
    auto_failover_cooldown: Duration = timedelta(minutes=30)
    # The lag guard an automatic failover passes to the runbook (no force: past it, a human decides).
    max_lag_bytes: Size = Field(default=16 << 20, ge=0)
    # Automatic failovers wait at the approval gate (the pager gets the approve command) instead.
    require_approval: bool = False
    watch_split_brain: bool = True
    auto_resolve_split_brain: bool = False
    # Fast confirmation: when a majority of all vantage points find the primary's PostgreSQL
    # and Redis ports refusing connections (the servers are gone; a stalled one would still
    # accept and time out), re-probe every confirm_interval and declare it down after
    # confirm_rounds such rounds, instead of failure_threshold rounds at interval. A local
    # supervisor that restarts a crashed server within confirm_interval x (confirm_rounds - 1)
    # keeps it; a slower restart is treated as dead. null turns it off.
    confirm_interval: Duration | None = timedelta(seconds=1)
    confirm_rounds: int = Field(default=3, ge=1, le=100)
    # A regional worker that hears from neither Temporal nor any other region's PostgreSQL for
    # this long puts the read-only fence on its own primary (workers/self_fence.py), and a
    # failover that could not fence an old primary it found unreachable by timeout waits this
    # long (plus a check interval) before promoting. null turns both off: a partitioned primary
    # then stays writable for the clients inside its partition until the partition heals.
    self_fence_after: Duration | None = timedelta(seconds=20)

    def self_fence_check_seconds(self) -> float | None:
        """How often a regional worker checks its contacts: often enough that its fence lands
        within a quarter of the bound after it, never more often than every second."""
        if self.self_fence_after is None:
            return None
        return max(1.0, min(self.interval.total_seconds(), self.self_fence_after.total_seconds() / 4))

    def self_fence_wait_seconds(self) -> float | None:
        """By when, after its last contact, a cut-off region has surely fenced its own primary,
        at worst: the bound, one check interval (the first round past it), that round's checks
        (3 s: each bounded at 2 s + 1), reading the local server (3 s) and the fence taking
        effect (3 s to connect, up to 5 s for sessions to be refused)."""
        if self.self_fence_after is None:
            return None
        return self.self_fence_after.total_seconds() + self.self_fence_check_seconds() + 14.0

    @field_validator("timeout", "interval", "auto_failover_cooldown", "confirm_interval", "self_fence_after")
    @classmethod
    def _positive(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and v <= timedelta(0):
            raise ValueError("must be greater than 0")
        return v

    @field_validator("failure_threshold")
    @classmethod
    def _threshold(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be greater than 0, got {v}")
        return v


class ReadinessConfig(_Strict):
    """Continuous readiness checks (activities/readiness.py): ``eagle-dr status``, the
    monitor's state and the ``eagle_dr_readiness`` gauges. The lag guard they compare with is
    ``health.max_lag_bytes``, the one an automatic failover passes to the runbook."""

    # How often the monitor runs them (on the primary's worker, beside its probe rounds).
    every: Duration = timedelta(minutes=1)
    # WAL not yet received past this fraction of health.max_lag_bytes warns (past all of it fails).
    lag_warn_fraction: float = Field(default=0.5, gt=0, le=1)
    # Replay lag past this warns: a promotion replays it first, so it is RTO.
    max_replay_lag: Duration = timedelta(seconds=30)
    # The service record's TTL past this warns: clients keep the old address that long.
    max_dns_ttl: Duration = timedelta(seconds=60)
    # Free space on the primary's pg_wal filesystem: below wal_free_fail fails (unset: the
    # node's max_wal_size), below wal_free_warn warns (unset: max_wal_size plus the WAL the
    # archive guard lets wait for a dead bucket, backup.archive_queue_limit).
    wal_free_fail: Size | None = Field(default=None, ge=0)
    wal_free_warn: Size | None = Field(default=None, ge=0)

    @field_validator("every", "max_replay_lag", "max_dns_ttl")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be greater than 0")
        return v

    @model_validator(mode="after")
    def _warn_above_fail(self) -> "ReadinessConfig":
        if self.wal_free_fail is not None and self.wal_free_warn is not None and \
                self.wal_free_warn < self.wal_free_fail:
            raise ValueError("wal_free_warn must not be less than wal_free_fail")
        return self


class Objective(_Strict):
    rto: Duration | None = None
    rpo: Duration | None = None

    @field_validator("rto", "rpo")
    @classmethod
    def _positive(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and v <= timedelta(0):
            raise ValueError("must be greater than 0")
        return v


# The documented targets. A file that leaves out objectives:, a class, or one of its
# targets keeps these: a None target would crash the report after a successful move.
_OBJECTIVE_DEFAULTS: dict[str, dict[str, str]] = {
    "critical": {"rto": "5m", "rpo": "30s"},
    "non_critical": {"rto": "15m", "rpo": "5m"},
    "cache": {"rpo": "15m"},
}


class ObjectivesConfig(_Strict):
    critical: Objective = Objective(rto=timedelta(minutes=5), rpo=timedelta(seconds=30))
    non_critical: Objective = Objective(rto=timedelta(minutes=15), rpo=timedelta(minutes=5))
    cache: Objective = Objective(rpo=timedelta(minutes=15))
    full_recovery: Duration = timedelta(minutes=30)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if data is None:  # `objectives:` with nothing under it
            return {}
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for klass, targets in _OBJECTIVE_DEFAULTS.items():
            given = out.get(klass)
            if given is None:
                out.pop(klass, None)
                continue
            if not isinstance(given, dict):
                continue
            for target in targets:
                if target in given and given[target] is None:
                    raise _FieldError(("objectives", klass, target),
                                      f"must be a duration; leave it out for the default {targets[target]}")
            out[klass] = {**targets, **given}
        return out


ConflictStrategy = Literal[
    "last-write-wins",
    "merge-with-priority",
    "source-priority",
    "immutable-append-only",
    "freshness-priority",
]


class TableConflictConfig(_Strict):
    strategy: ConflictStrategy
    key: list[str] = Field(default_factory=lambda: ["id"], min_length=1)
    timestamp_column: str = "updated_at"
    # merge-with-priority: field -> regions in order of preference.
    field_priority: dict[str, list[str]] = Field(default_factory=dict)
    # source-priority: the region whose version wins.
    source_region: str | None = None
    # freshness-priority: versions older than this are stale.
    ttl: Duration | None = None
    # When each row was inserted (timestamptz, never changed by updates): what tells an
    # insert-insert key collision and a row the survivor deleted from ordinary updates.
    # Unset: `created_at` when the table has such a column, else neither can be told.
    created_column: str | None = None

    @field_validator("key")
    @classmethod
    def _key_columns(cls, v: list[str]) -> list[str]:
        for col in v:
            _check_ident(col, "column")
        if len(set(v)) != len(v):
            raise ValueError(f"a key column is listed twice: {v}")
        return v

    @field_validator("timestamp_column")
    @classmethod
    def _ts_column(cls, v: str) -> str:
        return _check_ident(v, "column")

    @field_validator("field_priority")
    @classmethod
    def _priority_columns(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for col in v:
            _check_ident(col, "column")
        return v

    @model_validator(mode="after")
    def _strategy_needs(self) -> "TableConflictConfig":
        if self.strategy == "source-priority" and not self.source_region:
            raise ValueError("strategy 'source-priority' needs 'source_region'")
        if self.strategy == "merge-with-priority" and not self.field_priority:
            raise ValueError("strategy 'merge-with-priority' needs 'field_priority'")
        if self.strategy == "freshness-priority" and self.ttl is None:
            raise ValueError("strategy 'freshness-priority' needs 'ttl'")
        return self

    @model_validator(mode="after")
    def _created_column_is_its_own(self) -> "TableConflictConfig":
        if self.created_column is not None and self.created_column in (self.timestamp_column, *self.key):
            raise ValueError("'created_column' must be a column of its own: not the timestamp_column (updates "
                             "change it) nor a key column")
        return self


class BackupSchedulesConfig(_Strict):
    """How the Temporal Schedules behind `backup` fire (schedules/specs.py)."""

    # Each run starts up to this much later than its slot (never more than a tenth of the
    # schedule's interval): many services' backups on one S3 endpoint do not start together.
    jitter: Duration = timedelta(minutes=1)
    # A run missed while Temporal was down is made up when it returns, if it is no older than
    # this (and than one interval: older ones are superseded by the next regular run).
    catchup_window: Duration = timedelta(days=1)
    # Create new schedules paused (test labs; an operator unpauses them). `schedules apply`
    # never changes the paused state of a schedule that exists: pausing is an operator's act.
    paused: bool = False

    @field_validator("jitter")
    @classmethod
    def _not_negative(cls, v: timedelta) -> timedelta:
        if v < timedelta(0):
            raise ValueError("must not be negative")
        return v

    @field_validator("catchup_window")
    @classmethod
    def _catchup(cls, v: timedelta) -> timedelta:
        # Temporal's own minimum.
        if v < timedelta(seconds=10):
            raise ValueError("must be at least 10s")
        return v


class PgBackRestClientTls(_Strict):
    cert_file: str
    key_file: str
    ca_file: str


class BackupConfig(_Strict):
    """pgBackRest: one stanza, two repos on every node (repo1 its own region's bucket, repo2
    the other region's), WAL archived to both, backups to each."""

    stanza: str = Field(default="eagle", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Path of the repository inside each bucket.
    repo_path: str = Field(default="/pgbackrest", pattern=r"^/[A-Za-z0-9_./-]*$")
    # Incremental backups this often, a full one every `full_every`.
    every: Duration = timedelta(minutes=15)
    full_every: Duration = timedelta(days=1)
    retention: Duration = timedelta(days=30)
    # aes-256-cbc at rest with each bucket's `s3.cipher_pass`; `none` only for a test repo.
    cipher: Literal["aes-256-cbc", "none"] = "aes-256-cbc"
    compress: Literal["lz4", "zst", "gz", "none"] = "lz4"
    process_max: int = Field(default=2, ge=1, le=32)
    # Give up on one S3 request after this long (pgBackRest io-timeout).
    io_timeout: Duration = timedelta(seconds=15)
    # WAL the primary may hold for a repo it cannot reach before that repo is dropped from
    # archiving (the other keeps PITR continuous) and an alert says so: the primary's disk
    # never fills because the other region is down.
    archive_backlog_max: Size = Field(default=256 << 20, ge=16 << 20)
    # Where a backup reads the data files: "standby" (a streaming standby's node, pgBackRest's
    # backup-standby: the primary only starts and stops the backup) or "primary". pgBackRest
    # on the standby's node reaches the primary (pg1) through the primary node's TLS server:
    # "standby" needs every region's ``postgres.pgbackrest_host`` and ``backup.tls_client``.
    read_from: Literal["standby", "primary"] = "primary"
    # The client side of pgBackRest's TLS servers: this worker's certificate and key (the
    # certificate's CN must be in each server's ``tls-server-auth`` for the stanza) and the CA
    # that signed the servers' certificates. Files on the worker, never their contents here.
    tls_client: PgBackRestClientTls | None = None
    # A WAL segment is archived at least this often under writes: the newest point a restore
    # from the buckets reaches lags the primary by at most about this much.
    archive_timeout: Duration = timedelta(seconds=60)
    # Scratch instances (point-in-time restores, restore drills): where, and the first port
    # tried (the next 50 are tried too). Unset dir: scratch/ beside the node's data directory.
    scratch_dir: str | None = None
    scratch_port: int = Field(default=15450, ge=1024, le=65000)
    # An RDB snapshot of the Redis master to both buckets this often (null: none). A cache is
    # rebuilt from PostgreSQL, and replication covers a region loss; the snapshot is for
    # losing (or corrupting) both copies, so hourly is plenty.
    redis_every: Duration | None = timedelta(hours=1)
    # `pgbackrest expire` per repo by the retention. Each backup expires too; this one also runs
    # when backups fail for days (no backup, no expiry) and reports what it removed.
    expire_every: Duration | None = timedelta(days=1)
    # ArchiveGuardWorkflow this often (null: none): drops an unreachable bucket from archiving
    # once archive_backlog_max of WAL waits for it, takes it back with a full backup.
    archive_guard_every: Duration | None = timedelta(minutes=1)
    # RestoreDrillWorkflow with its defaults this often (null: no drill schedule).
    restore_drill_every: Duration | None = timedelta(days=1)
    schedules: BackupSchedulesConfig = BackupSchedulesConfig()
    # The last resort when the guard cannot act (both buckets down, or Temporal/the workers
    # down): pgBackRest's archive-push-queue-max. Past it pgBackRest tells PostgreSQL a segment
    # is archived and drops it, for every repo: a PITR gap in both, reported by the guard, but
    # the primary's disk does not fill. Unset: 4 x archive_backlog_max, so the guard (which
    # runs every minute) drops a dead repo long before pgBackRest drops WAL the live one needs.
    # Size it below the free space of the primary's pg_wal volume.
    archive_queue_max: Size | None = None

    @field_validator("every", "full_every", "retention", "io_timeout", "archive_timeout")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        # A zero retention would let the expiry delete every backup, the newest included.
        if v <= timedelta(0):
            raise ValueError("must be greater than 0")
        return v

    @field_validator("redis_every", "expire_every", "restore_drill_every", "archive_guard_every")
    @classmethod
    def _positive_or_off(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and v < timedelta(seconds=1):
            raise ValueError("must be at least 1s (or null: no schedule)")
        return v
    @property
    def archive_queue_limit(self) -> int:
        return self.archive_queue_max or 4 * self.archive_backlog_max

    @model_validator(mode="after")
    def _queue_above_backlog(self) -> "BackupConfig":
        if self.archive_queue_max is not None and self.archive_queue_max <= self.archive_backlog_max:
            # Below the guard's bound, pgBackRest would drop WAL (a gap in the live repo too)
            # before the guard drops the dead repo alone.
            raise ValueError("archive_queue_max must be larger than archive_backlog_max")
        return self

    @field_validator("retention")
    @classmethod
    def _whole_days(cls, v: timedelta) -> timedelta:
        # pgBackRest's time retention counts whole days.
        if v < timedelta(days=1) or v % timedelta(days=1):
            raise ValueError(f"must be a whole number of days (pgBackRest's time retention), got {v}")
        return v


class ConsistencyConfig(_Strict):
    """ConsistencyCheckWorkflow (activities/consistency/): what it compares and how hard it may push."""

    # Tables to compare, ``table`` or ``schema.table``; empty: every permanent user table.
    tables: list[str] = Field(default_factory=list)
    # Rows per primary-key range hashed in one statement: big enough that a range's round trip
    # is small beside its scan, small enough that a differing range bisects in few rounds.
    chunk_rows: int = Field(default=100_000, ge=100, le=10_000_000)
    # Ranges hashed at once (each holds one connection to each side).
    parallel: int = Field(default=4, ge=1, le=32)
    # Past this replay lag the check pauses (throttles) before hashing the standby again.
    max_lag_seconds: float = Field(default=30, gt=0, le=3600)
    # Differing keys kept per table in the result (the counts are always exact): a huge
    # difference must not push the workflow's history past Temporal's limits.
    sample_cap: int = Field(default=100, ge=1, le=10_000)
    # The check's schedule (schedules apply); null: no schedule.
    every: Duration | None = timedelta(hours=1)
    # Redis keys sampled per database for the value compare (0: counts and offsets only).
    redis_sample: int = Field(default=1000, ge=0, le=1_000_000)

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: list[str]) -> list[str]:
        for t in v:
            TableName.parse(t)
        if len(set(v)) != len(v):
            raise ValueError("a table is listed twice")
        return v

    @field_validator("every")
    @classmethod
    def _every(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and v < timedelta(minutes=1):
            raise ValueError("must be at least 1m (or null: no schedule)")
        return v


class RoutingConfig(_Strict):
    """Which routing mechanisms a runbook moves. The lab's file is what the sample app follows."""

    lab_file: bool = False
    kubernetes: bool = False
    dns: bool = False
    # Route 53 API endpoint (a moto server in tests); unset means AWS.
    dns_endpoint_url: str | None = None


SurvivorRule = Literal["active-region", "priority", "highest-epoch"]


class SplitBrainConfig(_Strict):
    """Which of two writable primaries survives. The rule decides first; when it cannot (the
    routing sources disagree, the epochs tie) the highest DR epoch, then region priority."""

    survivor_rule: SurvivorRule = "active-region"


# An Alertmanager-style label matcher: name, one of = != =~ !~, value (optionally quoted).
_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|(.*?))\s*$')


def _unquote(text: str) -> str:
    # Alertmanager's escapes in a quoted value: \\, \" and \n; any other backslash is kept, so a
    # regex's \d stays \d.
    return re.sub(r'\\(.)', lambda m: {"n": "\n", '"': '"', "\\": "\\"}.get(m.group(1), m.group(0)), text)


class LabelMatcher(BaseModel):
    """One matcher of an alert rule, written as Alertmanager writes them
    (``alertname="PrimaryRegionDown"``, ``severity=~"critical|page"``, ``env!=staging``).
    Regular expressions are anchored at both ends, as Alertmanager's are."""

    model_config = ConfigDict(frozen=True)
    label: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str

    @classmethod
    def parse(cls, text: Any) -> "LabelMatcher":
        m = _MATCHER.match(text) if isinstance(text, str) else None
        if not m:
            raise ValueError(f"malformed matcher {text!r} (expected label=value, label!=value, label=~regex "
                             "or label!~regex)")
        value = _unquote(m.group(3)) if m.group(3) is not None else m.group(4)
        if m.group(2) in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"matcher {text!r}: bad regular expression: {e}") from None
        return cls(label=m.group(1), op=m.group(2), value=value)

    def matches(self, labels: dict[str, str]) -> bool:
        # A missing label is the empty string, as in Alertmanager.
        v = labels.get(self.label, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        hit = re.fullmatch(self.value, v) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f'{self.label}{self.op}"{self.value}"'


class AlertRule(_Strict):
    """Alerts whose labels match every matcher get ``action``; the first matching rule wins.

    - monitor: start the service's MonitorWorkflow (or signal the running one): an immediate
      quorum probe round, the alert recorded in its findings.
    - failover: start FailoverWorkflow with approval required (an alert alone never moves a
      region): to ``target_region``, or away from the region the ``region_label`` label names.
    - split-brain: start SplitBrainWorkflow (detection; resolution waits for approval).
    - record: only record the alert in its incident workflow."""

    # Part of the incident's workflow id: keep it short and id-safe.
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    matchers: list[Annotated[LabelMatcher, BeforeValidator(LabelMatcher.parse)]] = Field(min_length=1)
    action: Literal["monitor", "failover", "split-brain", "record"]
    target_region: str | None = None
    region_label: str = "region"
    approval_timeout: Duration = timedelta(minutes=15)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


class AlertsConfig(_Strict):
    """``eagle-dr alerts serve``: the Alertmanager webhook receiver."""

    listen: Endpoint = Endpoint(host="127.0.0.1", port=19094)
    # Prometheus endpoint of the receiver (Temporal SDK client metrics and its request counts),
    # on the listen host; none: no endpoint.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Bearer token Alertmanager sends (http_config.authorization). Required to serve: an
    # unauthenticated endpoint that can start a failover is not offered.
    token: SecretRef | None = None
    # Larger bodies get 413 before they are parsed, and Alertmanager does not retry a 4xx: that
    # notification is lost. It sends every alert of a group in one body (max_alerts: 0); a real
    # alert (ten labels, a summary, a description, a runbook link) is about 1 KB, so 32 MiB
    # holds a storm of ~35,000 (4 MiB, the old default, held ~4,000). Parsing one costs a few
    # times its size in memory, for the moment it is parsed.
    max_body: Size = 32 << 20
    # Inline rules, or a YAML file holding a list of them (or {rules: [...]}); not both.
    rules: list[AlertRule] = Field(default_factory=list)
    rules_file: str | None = None
    # Alerts no rule matches: recorded in an incident workflow of their own, or only logged.
    unmatched: Literal["record", "ignore"] = "record"
    # How long one Temporal call may take before the receiver answers 503 (Alertmanager retries).
    temporal_timeout: Duration = timedelta(seconds=5)

    @model_validator(mode="before")
    @classmethod
    def _load_rules_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("rules_file"):
            return data
        if data.get("rules"):
            raise _FieldError(("alerts", "rules_file"), "give rules or rules_file, not both")
        path = data["rules_file"]
        try:
            doc = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise _FieldError(("alerts", "rules_file"), f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise _FieldError(("alerts", "rules_file"), f"{path}: malformed YAML: {e}") from None
        rules = doc.get("rules") if isinstance(doc, dict) else doc
        if not isinstance(rules, list):
            raise _FieldError(("alerts", "rules_file"), f"{path}: expected a list of rules (or rules: [...])")
        return {**data, "rules": rules}

    @model_validator(mode="after")
    def _unique(self) -> "AlertsConfig":
        seen: set[str] = set()
        for i, r in enumerate(self.rules):
            if r.name in seen or r.name == "unmatched":
                raise _FieldError(("alerts", "rules", i, "name"), f"rule name {r.name!r} is used twice or reserved")
            seen.add(r.name)
            if r.target_region and r.action != "failover":
                raise _FieldError(("alerts", "rules", i, "target_region"), "only a failover rule has a target")
        return self

    def rule_for(self, labels: dict[str, str]) -> AlertRule | None:
        return next((r for r in self.rules if r.matches(labels)), None)


# What a notification channel can be sent. A channel that asks for an event that opens an
# incident also gets the event that closes it (NOTIFY_CLOSERS): a PagerDuty incident opened
# by "outage" must be resolved by "outage-resolved", even when the filter names only "outage".
NotifyEventKind = Literal["runbook-started", "approval-needed", "approval-decided", "step-failed", "runbook-finished",
                          "outage", "outage-resolved", "readiness-degraded", "readiness-restored"]
NOTIFY_EVENTS: tuple[str, ...] = NotifyEventKind.__args__  # type: ignore[attr-defined]
# An approval's incident is its own (a second gate in one run must page again, even while the
# first's incident is acknowledged), closed by its decision; older runs closed it at their end.
NOTIFY_CLOSERS = {"approval-needed": ("approval-decided", "runbook-finished"), "step-failed": ("runbook-finished",),
                  "outage": ("outage-resolved",), "readiness-degraded": ("readiness-restored",)}


class _Channel(_Strict):
    # "all", or the events this channel gets (plus the events that close them).
    events: Literal["all"] | list[NotifyEventKind] = "all"
    # Seconds one delivery attempt may take: a slow channel must not hold the runbook up.
    timeout: Duration = timedelta(seconds=5)

    def wanted(self) -> list[str]:
        if self.events == "all":
            return list(NOTIFY_EVENTS)
        want = set(self.events) | {c for e in self.events for c in NOTIFY_CLOSERS.get(e, ())}
        return [e for e in NOTIFY_EVENTS if e in want]

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: timedelta) -> timedelta:
        if not timedelta(0) < v <= timedelta(seconds=60):
            raise ValueError("must be more than 0 and at most 60s")
        return v


class SlackChannel(_Channel):
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat). The URL carries
    its own token, so the whole URL is the secret: by reference only."""

    type: Literal["slack"]
    webhook_url: SecretRef


class PagerDutyChannel(_Channel):
    """PagerDuty Events API v2: trigger and resolve, one dedup key per incident."""

    type: Literal["pagerduty"]
    routing_key: SecretRef
    url: str = "https://events.pagerduty.com/v2/enqueue"
    events: Literal["all"] | list[NotifyEventKind] = Field(
        default_factory=lambda: ["approval-needed", "step-failed", "outage"])

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("http", "https"):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class SmtpChannel(_Channel):
    """A plain-text email over SMTP. ``starttls`` upgrades a plain connection (port 587),
    ``tls`` connects over TLS from the start (port 465); a password is never sent in clear:
    with ``username`` one of them must be on."""

    type: Literal["smtp"]
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    tls: bool = False
    username: str | None = None
    password: SecretRef | None = None
    from_addr: str = Field(alias="from", min_length=3)
    to: list[Annotated[str, Field(min_length=3)]] = Field(min_length=1)
    # Only for a relay on the same host (the lab's): AUTH over a plain connection.
    allow_plaintext_auth: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _auth(self) -> "SmtpChannel":
        if self.starttls and self.tls:
            raise ValueError("starttls and tls exclude each other (tls: TLS from the start, port 465)")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username and not (self.starttls or self.tls or self.allow_plaintext_auth):
            raise ValueError("a password over a plain connection: turn starttls or tls on")
        for addr in (self.from_addr, *self.to):
            if "@" not in addr:
                raise ValueError(f"{addr!r} is not an email address")
        return self


NotifyChannel = Annotated[SlackChannel | PagerDutyChannel | SmtpChannel, Field(discriminator="type")]


class NotificationsConfig(_Strict):
    """Where runbook and monitor events go. No channel: no notification activity at all."""

    channels: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")], NotifyChannel] = Field(
        default_factory=dict)

    def routing(self) -> dict[str, list[str]]:
        """Channel name -> the events it gets: what the workflows need to know (no secrets)."""
        return {name: ch.wanted() for name, ch in self.channels.items()}


class CodecServerConfig(_Strict):
    """``eagle-dr codec-server``: decodes (and encodes) payloads for the Temporal UI and CLI."""

    listen: Endpoint = Endpoint(host="127.0.0.1", port=19095)
    # Origins whose pages may call it (the browser calls the codec server directly). Unset: the
    # UI of temporal.ui_url, under both its 127.0.0.1 and localhost names.
    cors_origins: list[str] | None = None
    # Bearer token the caller must send. Without one, anyone who reaches the port can decrypt
    # every payload: bind it to the UI's network only.
    token: SecretRef | None = None


class CodecConfig(_Strict):
    """Payload encryption (eagle_dr/codec.py): AES-256-GCM, ``active`` encrypts, every key in
    ``keys`` decrypts. Rotate: add a key, make it active, drop the old one after the namespace's
    retention. Absent: payloads are stored in plain JSON."""

    keys: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")], SecretRef] = Field(min_length=1)
    active: str
    server: CodecServerConfig = CodecServerConfig()

    @model_validator(mode="after")
    def _active_known(self) -> "CodecConfig":
        if self.active not in self.keys:
            raise _FieldError(("temporal", "codec", "active"),
                              f"key id {self.active!r} is not in keys ({', '.join(self.keys)})")
        return self


class TemporalConfig(_Strict):
    control_task_queue: str = "eagle-dr-control"
    ui_url: str = "http://127.0.0.1:8233"
    codec: CodecConfig | None = None
    # The control worker's Prometheus endpoint (none: no endpoint); regional workers have theirs
    # in regions[].temporal.metrics_port. Production binds 0.0.0.0 (or the pod IP) to be scraped.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # Worker Versioning: the control worker (it runs the runbooks) polls as version
    # <deployment_name>.<EAGLE_DR_BUILD_ID> (the deploy sets the build id, from the image tag),
    # and runs are AUTO_UPGRADE: a runbook waiting at a gate through a deploy moves to the new
    # build at its next task (workflow changes are patched, so the new build replays it). The
    # deploy makes a version current once its workers poll (`temporal worker deployment
    # set-current-version`). None: unversioned, as in the lab.
    deployment_name: str | None = Field(default=None, min_length=1, max_length=200)


class DevServerConfig(_Strict):
    grpc_port: int = 7233
    ui_port: int = 8233
    http_port: int = 7243
    metrics_port: int = 7244


class LabConfig(_Strict):
    """Ports and places of the local two-region lab. Ignored outside the lab."""

    state_dir: str = ".eagle-dr"
    os_user: str = "eagle-dr"
    s3_port: int = 18333
    s3_base_port: int = 18320
    # Where each Sentinel runs: a region name, or 'witness' for the tie-breaker that
    # survives the loss of either region.
    sentinel_placement: list[str] = Field(default_factory=lambda: ["us-east-1", "us-west-2", "witness"])
    app_writes_per_second: float = Field(default=20, gt=0)
    # The lab's Alertmanager (Debian prometheus-alertmanager), sending to alerts.listen.
    alertmanager_port: int = Field(default=19093, ge=1, le=65535)
    dev_server: DevServerConfig = DevServerConfig()
    # region -> the network namespace its PostgreSQL and worker run in (lab/netns.py): the
    # partition tests' labs. Empty: everything in the root namespace, as `make lab` runs it.
    netns: dict[str, str] = Field(default_factory=dict)


class EagleConfig(_Strict):
    # Workflow ids (locks, the move, the monitor) and visibility queries are built from it.
    service: str = Field(default="eagle-alert", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    regions: list[RegionConfig] = Field(min_length=2)
    health: HealthConfig = HealthConfig()
    readiness: ReadinessConfig = ReadinessConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    conflicts: dict[str, TableConflictConfig] = Field(default_factory=dict)
    # A table the loser changed after the fork that `conflicts:` does not list: stop before
    # pg_rewind erases it (refuse), or reconcile it last-write-wins on its primary key and
    # its `updated_at` column (a table without both is refused all the same).
    unlisted_tables: Literal["refuse", "last-write-wins"] = "refuse"
    redis_reconcile: RedisReconcileConfig = RedisReconcileConfig()
    split_brain: SplitBrainConfig = SplitBrainConfig()
    backup: BackupConfig = BackupConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    routing: RoutingConfig = RoutingConfig()
    alerts: AlertsConfig = AlertsConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    temporal: TemporalConfig = TemporalConfig()
    lab: LabConfig = LabConfig()

    @model_validator(mode="after")
    def _topology(self) -> "EagleConfig":
        names = [r.name for r in self.regions]
        if len(names) > 2:
            # Every runbook moves between a primary and its one standby (topology.other()):
            # a third region would be neither fenced nor re-pointed, a second primary waiting.
            raise _FieldError(("regions",), f"{len(names)} regions configured ({', '.join(names)}); the runbooks "
                                            "support exactly two, a primary and its standby")
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                raise _FieldError(("regions", i, "name"), f"duplicate region {n!r}")
            seen.add(n)
        for system in ("postgres", "redis"):
            # Two regions on one server would make every runbook fence, promote and rewind
            # the same node twice, as two different ones. Compared as written: no DNS lookup.
            where: dict[tuple[str, int], str] = {}
            for i, r in enumerate(self.regions):
                ep = getattr(r, system)
                addr = (ep.host.lower(), ep.port)
                if addr in where:
                    raise _FieldError(("regions", i, system), f"{ep.host}:{ep.port} is also {where[addr]}'s "
                                                              f"{system}: each region needs its own server")
                where[addr] = r.name
        slots: dict[str, str] = {}
        for i, r in enumerate(self.regions):
            slot = r.postgres.slot_name
            if slot in slots:
                raise _FieldError(("regions", i, "postgres", "slot"), f"slot {slot!r} is also {slots[slot]}'s")
            slots[slot] = r.name
        if self.backup.read_from == "standby":
            # A backup on the standby's node must reach the primary's node: across hosts only
            # through pgBackRest's TLS server there (the data directory is not on this host).
            for i, r in enumerate(self.regions):
                if not r.postgres.pgbackrest_host:
                    raise _FieldError(("regions", i, "postgres", "pgbackrest_host"),
                                      "backup.read_from 'standby' needs each node's pgBackRest TLS server "
                                      "(pgbackrest_host), or read_from 'primary'")
            if self.backup.tls_client is None:
                raise _FieldError(("backup", "tls_client"), "backup.read_from 'standby' reaches the primary's "
                                                           "pgBackRest server: its client certificate, key and CA "
                                                           "are needed")
        primaries = [r.name for r in self.regions if r.role == "primary"]
        if not primaries:
            raise _FieldError(("regions",), "no region has role 'primary'")
        if len(primaries) > 1:
            raise _FieldError(("regions",), f"more than one primary: {', '.join(primaries)}")
        queues: dict[str, str] = {}
        for i, r in enumerate(self.regions):
            q = r.temporal.task_queue
            if q in queues or q == self.temporal.control_task_queue:
                raise _FieldError(("regions", i, "temporal", "task_queue"), f"task queue {q!r} is used twice")
            queues[q] = r.name
        ports: dict[int, str] = {}
        for i, (where, port) in enumerate([("temporal", self.temporal.metrics_port),
                                           *((f"regions[{j}]", r.temporal.metrics_port)
                                             for j, r in enumerate(self.regions))]):
            if port is None:
                continue
            if port in ports:
                # Workers share a host in the lab: a second bind would stop that worker at start.
                path = ("temporal", "metrics_port") if i == 0 else ("regions", i - 1, "temporal", "metrics_port")
                raise _FieldError(path, f"metrics port {port} is also {ports[port]}'s")
            ports[port] = where
        for table, t in self.conflicts.items():
            try:
                TableName.parse(table)
            except ValueError as e:
                raise _FieldError(("conflicts", table), str(e)) from None
            if t.source_region and t.source_region not in seen:
                raise _FieldError(("conflicts", table, "source_region"), f"unknown region {t.source_region!r}")
            for fld, order in t.field_priority.items():
                for reg in order:
                    if reg not in seen:
                        raise _FieldError(("conflicts", table, "field_priority", fld), f"unknown region {reg!r}")
        for i, rule in enumerate(self.alerts.rules):
            if rule.target_region and rule.target_region not in seen:
                raise _FieldError(("alerts", "rules", i, "target_region"), f"unknown region {rule.target_region!r}")
        for region in self.lab.netns:
            if region not in seen:
                raise _FieldError(("lab", "netns", region), f"unknown region {region!r}")
        for i, place in enumerate(self.lab.sentinel_placement):
            if place != "witness" and place not in seen:
                raise _FieldError(("lab", "sentinel_placement", i), f"unknown region {place!r}")
        return self

    # -- lookups used everywhere -------------------------------------------------------------

    @property
    def primary(self) -> RegionConfig:
        return next(r for r in self.regions if r.role == "primary")

    @property
    def secondary(self) -> RegionConfig:
        return next(r for r in self.regions if r.role != "primary")

    def region(self, name: str) -> RegionConfig:
        for r in self.regions:
            if r.name == name:
                return r
        raise UnknownRegion(name, [r.name for r in self.regions])

    def other(self, name: str) -> RegionConfig:
        self.region(name)
        return next(r for r in self.regions if r.name != name)

    @property
    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    def conflict_table(self, name: str) -> TableName:
        """A ``conflicts:`` entry's table, parsed (validated at load): ``.identifier`` is the
        quoted ``sql.Identifier(schema, table)`` every query must use, never an f-string."""
        return TableName.parse(name)


class UnknownRegion(ValueError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown region {name!r} (known: {', '.join(known)})")
        self.name = name


class _FieldError(ValueError):
    """Raised from model validators so the error can name the exact field path."""

    def __init__(self, loc: tuple, msg: str):
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


class ConfigError(Exception):
    """A config file that cannot be used. ``problems`` is a list of (field path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {path}: {msg}" if path else f"{source}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_ENV_OVERRIDES = ("PRIMARY_REGION", "SECONDARY_REGION", "NAMESPACE", "RTO_TARGET", "RPO_TARGET")


def _apply_env(raw: dict, env: dict[str, str], source: str) -> dict:
    """The seed's environment overrides, applied to the raw document before validation."""
    regions = raw.get("regions")
    if not isinstance(regions, list):
        return raw
    names = [r.get("name") for r in regions if isinstance(r, dict)]
    primary, secondary = env.get("PRIMARY_REGION"), env.get("SECONDARY_REGION")
    for var, val in (("PRIMARY_REGION", primary), ("SECONDARY_REGION", secondary)):
        if val and val not in names:
            raise ConfigError(source, [(f"env {var}", f"unknown region {val!r} (known: {', '.join(map(str, names))})")])
    if primary and secondary and primary == secondary:
        raise ConfigError(source, [("env SECONDARY_REGION", f"same region as PRIMARY_REGION ({primary!r})")])
    if primary or secondary:
        for r in regions:
            if not isinstance(r, dict):
                continue
            if primary:
                r["role"] = "primary" if r.get("name") == primary else "secondary"
            elif r.get("name") == secondary:
                r["role"] = "secondary"
    if env.get("NAMESPACE"):
        for r in regions:
            if isinstance(r, dict):
                r.setdefault("kubernetes", {})["namespace"] = env["NAMESPACE"]
    if not (env.get("RTO_TARGET") or env.get("RPO_TARGET")):
        return raw
    objectives = raw.get("objectives")
    if objectives is None:
        objectives = raw["objectives"] = {}
    if not isinstance(objectives, dict):
        return raw  # validation names the problem
    crit = objectives.get("critical")
    if crit is None:
        crit = objectives["critical"] = {}
    if isinstance(crit, dict):
        if env.get("RTO_TARGET"):
            crit["rto"] = env["RTO_TARGET"]
        if env.get("RPO_TARGET"):
            crit["rpo"] = env["RPO_TARGET"]
    return raw


def parse_config(raw: Any, source: str = "<config>", env: dict[str, str] | None = None) -> EagleConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", "the document must be a mapping")])
    env = dict(os.environ) if env is None else env
    raw = _apply_env(raw, {k: env[k] for k in _ENV_OVERRIDES if k in env}, source)
    try:
        return EagleConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _FieldError):
                problems.append((_path(ctx_err.loc), ctx_err.msg))
                continue
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append((_path(loc), msg))
        raise ConfigError(source, problems) from None


def _resolve_paths(raw: Any, base: Path, state_dir: str) -> Any:
    """Relative secret-file paths are relative to the config file; ``{state_dir}`` names the
    lab's state directory, so the lab's secrets and data directories follow it wherever it is put."""
    if isinstance(raw, dict):
        out = {}
        for k, v in raw.items():
            if k in ("file", "ca_file", "cert_file", "key_file", "rules_file", "sslrootcert") and isinstance(v, str):
                v = v.replace("{state_dir}", state_dir)
                out[k] = v if os.path.isabs(v) else str((base / v).resolve())
            elif k in ("data_dir", "socket_dir", "pgbackrest_config", "scratch_dir") and isinstance(v, str):
                out[k] = v.replace("{state_dir}", state_dir)
            else:
                out[k] = _resolve_paths(v, base, state_dir)
        return out
    if isinstance(raw, list):
        return [_resolve_paths(v, base, state_dir) for v in raw]
    return raw


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> EagleConfig:
    """Load, apply env overrides, validate. ``EAGLE_DR_CONFIG`` names the file when ``path`` is None."""
    env_map = dict(os.environ) if env is None else env
    p = Path(path or env_map.get("EAGLE_DR_CONFIG") or DEFAULT_CONFIG)
    source = str(p)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(source, [("", f"cannot read file: {e.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [("", f"{where}malformed YAML: {getattr(e, 'problem', e)}")]) from None
    base = p.resolve().parent
    if isinstance(raw, dict):
        lab = raw.setdefault("lab", {})
        if isinstance(lab, dict):
            state = env_map.get("EAGLE_DR_STATE_DIR") or lab.get("state_dir") or LabConfig().state_dir
            state = str((base / state).resolve()) if not os.path.isabs(state) else state
            from lab.osuser import reachable_state_dir

            os_user = lab.get("os_user") if isinstance(lab.get("os_user"), str) else LabConfig().os_user
            state = str(reachable_state_dir(Path(state), os_user))
            lab["state_dir"] = state
            raw = _resolve_paths(raw, base, lab["state_dir"])
    return parse_config(raw, source, env_map)
