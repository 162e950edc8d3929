"""A throwaway PostgreSQL for tests and benchmarks: initdb into a fixed temp dir, the lab's
settings and schema (lab.postgres does the bootstrap, so they meet the server the runbooks
meet), stopped and deleted on the way out, also on error.

The directory is fixed rather than random so that a run killed before its teardown is
cleaned up by the next one instead of leaving a server that holds the port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from eagle_dr.config import DEFAULT_CONFIG, PostgresConfig, load_config
from lab.osuser import ensure_lab_user
from lab.postgres import PostgresNode

# The project targets PostgreSQL 15 (Debian's layout); None lets PgCtl pick the newest installed.
PG15_BIN = "/usr/lib/postgresql/15/bin"


def _node(base: Path, port: int, name: str) -> PostgresNode:
    bin_dir = PG15_BIN if os.path.isdir(PG15_BIN) else None
    # Root cannot run PostgreSQL: the lab's unprivileged user does, as in `make lab`.
    user = ensure_lab_user(load_config(DEFAULT_CONFIG, env={}).lab.os_user)
    # Trust, not the lab's passwords: a single throwaway server on a temp port that lives for
    # one test or benchmark, with no secrets of its own and nothing a password would protect.
    return PostgresNode(PostgresConfig(port=port, bin_dir=bin_dir), base / "data", base / "run", user, name,
                        trust=True)


@contextmanager
def scratch_postgres(port: int, name: str, base: Path | None = None) -> Iterator[PostgresNode]:
    # The port in the name: two checkouts (or pytest-xdist processes) on their own ports must
    # not initdb into one directory.
    base = base or Path(tempfile.gettempdir()) / f"eagle-dr-scratch-{name}-{port}"
    node = _node(base, port, name)
    if node.running():
        node.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    # The server runs as the lab user when we are root: it must be able to enter the directory.
    os.chmod(base, 0o755)
    try:
        node.init_primary()
        yield node
    finally:
        try:
            node.stop("fast")
        except Exception:  # noqa: BLE001 - whatever failed, the server must not outlive the bench
            node.kill()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def scratch_pair(port: int, name_a: str, name_b: str) -> Iterator[tuple[PostgresNode, PostgresNode]]:
    """Two throwaway servers, on ``port`` and ``port + 1``: a primary and its restored copy,
    the two sides of a sync."""
    with scratch_postgres(port, name_a) as a, scratch_postgres(port + 1, name_b) as b:
        yield a, b


def scratch_connect(port: int, *, autocommit: bool = True, dbname: str = "postgres") -> psycopg.Connection:
    """The superuser over TCP: a scratch server trusts it."""
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, autocommit=autocommit)
