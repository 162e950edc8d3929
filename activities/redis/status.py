"""Reading Redis replication state and what the Sentinels believe."""

from __future__ import annotations

import redis
from pydantic import BaseModel
from redis.backoff import NoBackoff
from redis.retry import Retry

from eagle_dr.config import Endpoint, RedisConfig, scrub
from eagle_dr.redis_connect import connect


class RedisStatus(BaseModel):
    reachable: bool
    error: str | None = None
    role: str | None = None  # "master" | "slave"
    offset: int | None = None
    replid: str | None = None
    master: str | None = None
    link_status: str | None = None
    connected_replicas: int | None = None


class SentinelView(BaseModel):
    address: str
    reachable: bool
    error: str | None = None
    master: str | None = None
    other_sentinels: int | None = None
    quorum_ok: bool | None = None
    quorum_message: str | None = None


# redis-py retries 10 times by default: a dead region would take many timeouts to report.
NO_RETRY = Retry(NoBackoff(), 0)


def client(cfg: RedisConfig, timeout: float = 3.0, decode: bool = True) -> redis.Redis:
    return connect(cfg.host, cfg.port, password=cfg.password.resolve() if cfg.password else None,
                   tls=cfg.tls_kwargs, socket_timeout=timeout, socket_connect_timeout=timeout,
                   decode_responses=decode, retry=NO_RETRY)


def sentinel_client(cfg: RedisConfig, sentinel: Endpoint, timeout: float = 3.0) -> redis.Redis:
    # The lab's Sentinels share the data nodes' password; production may differ, which is
    # a config field to add when a deployment needs it.
    return connect(sentinel.host, sentinel.port, password=cfg.password.resolve() if cfg.password else None,
                   tls=cfg.tls_kwargs, socket_timeout=timeout, socket_connect_timeout=timeout,
                   decode_responses=True, retry=NO_RETRY)


def redis_status(cfg: RedisConfig, timeout: float = 3.0) -> RedisStatus:
    try:
        try:
            info = client(cfg, timeout).info("replication")
        except redis.AuthenticationError:
            # The password held from a secret store (read once a minute) was refused: a
            # rotation. Read it again and ask once more, rather than call the server down.
            if cfg.password is None or not cfg.password.refresh():
                raise
            info = client(cfg, timeout).info("replication")
    except (redis.RedisError, OSError) as e:
        return RedisStatus(reachable=False, error=scrub(str(e)) or type(e).__name__)
    role = info.get("role")
    master = f"{info['master_host']}:{info['master_port']}" if role == "slave" else None
    offset = info.get("master_repl_offset") if role == "master" else info.get("slave_repl_offset")
    return RedisStatus(reachable=True, role=role, offset=offset, replid=info.get("master_replid"), master=master,
                       link_status=info.get("master_link_status"), connected_replicas=info.get("connected_slaves"))


def fenced(cfg: RedisConfig, timeout: float = 3.0) -> bool:
    """Whether this node carries a runbook's fence: its default user may not take REPLICAOF
    (failover.fence holds replication while it pauses writes) or may not write at all.
    CLIENT PAUSE itself is invisible in INFO on Redis 7.0, so the ACL is the mark."""
    try:
        raw = client(cfg, timeout).execute_command("ACL", "GETUSER", "default")
    except (redis.RedisError, OSError):
        return False  # unknown: counted as a writer, the safe side for split-brain detection
    rules = raw.get("commands") if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2])).get("commands")
    rules = rules.split() if isinstance(rules, str) else list(rules or [])
    return any(r in ("-replicaof", "-slaveof", "-@write", "-@all") for r in rules)


def sentinel_view(cfg: RedisConfig, sentinel: Endpoint, timeout: float = 3.0) -> SentinelView:
    addr = str(sentinel)
    try:
        c = sentinel_client(cfg, sentinel, timeout)
        master = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", cfg.master_name)
        info = c.execute_command("SENTINEL", "MASTER", cfg.master_name)
        if isinstance(info, list):
            info = dict(zip(info[::2], info[1::2]))
        try:
            msg = c.execute_command("SENTINEL", "CKQUORUM", cfg.master_name)
            ok = True
        except redis.ResponseError as e:
            msg, ok = scrub(str(e)), False
    except (redis.RedisError, OSError) as e:
        return SentinelView(address=addr, reachable=False, error=scrub(str(e)) or type(e).__name__)
    return SentinelView(address=addr, reachable=True, master=f"{master[0]}:{master[1]}" if master else None,
                        other_sentinels=int(info.get("num-other-sentinels", 0)), quorum_ok=ok,
                        quorum_message=msg if isinstance(msg, str) else str(msg))
