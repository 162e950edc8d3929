"""The failback benchmark's references, run on the same lab and data as the workflow: a bare
``pg_rewind`` of the diverged old primary, and a bare ``pg_basebackup`` of the primary into a
scratch directory (what a rebuild without rewind would copy).

Both run as the data directory's owner, exactly as an operator would type them. Untimed set-up
is what pg_rewind needs to be right at all: the old primary stopped cleanly, and a CHECKPOINT
on the source (a freshly promoted primary's control file names its old timeline until then,
see activities/postgres/rewind.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from activities.postgres.credentials import tool_env
from lab.lab import Lab
from lab.osuser import make_dir


def _timed(ctl, argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = ctl.run(argv, timeout=3600, env=env)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return elapsed


def pg_wal_bytes(lab: Lab, region: str) -> int:
    """pg_rewind copies the source's whole pg_wal (lab notes, section 6): it explains its time."""
    with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True) as conn:
        return conn.execute("select coalesce(sum(size), 0) from pg_ls_waldir()").fetchone()[0]


def bare_rewind(lab: Lab, old: str, primary: str) -> dict:
    """Stop the old primary, CHECKPOINT the source, time pg_rewind; then (timed separately) make
    it a streaming standby again, which is what the workflow's rewind step ends with, and which
    leaves the lab in a sane topology for the teardown."""
    node, src = lab.postgres(old), lab.cfg.region(primary).postgres
    node.ctl.stop("fast")
    slot = lab.cfg.region(old).postgres.slot_name
    with psycopg.connect(src.dsn("postgres"), autocommit=True) as conn:
        if not conn.execute("select 1 from pg_replication_slots where slot_name = %s", (slot,)).fetchone():
            conn.execute("select pg_create_physical_replication_slot(%s)", (slot,))
        conn.execute("checkpoint")
    wal = pg_wal_bytes(lab, primary)
    # The password in the environment, never on the command line (as the runbook does).
    source = make_conninfo("", host=src.host, port=src.port, user=src.user, dbname="postgres")
    t0 = time.perf_counter()
    rewind_s = _timed(node.ctl, [node.ctl.tool("pg_rewind"), f"--target-pgdata={node.data_dir}",
                                 f"--source-server={source}"], tool_env(src.password, src))
    # The bare follow-up: standby.signal + primary_conninfo/slot, start, wait for streaming.
    node.ctl.write_standby_config(src, old, slot)
    node.ctl.start()
    deadline = time.monotonic() + 300
    while not _streaming(lab, old, src):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{old} did not stream after pg_rewind")
        time.sleep(0.05)
    return {"pg_rewind_s": rewind_s, "pg_rewind_to_streaming_s": time.perf_counter() - t0,
            "source_pg_wal_bytes": wal}


def _streaming(lab: Lab, region: str, src) -> bool:
    try:
        with psycopg.connect(lab.cfg.region(region).postgres.dsn(), autocommit=True, connect_timeout=2) as conn:
            row = conn.execute("select status, sender_port from pg_stat_wal_receiver").fetchone()
    except psycopg.Error:
        return False
    return row is not None and row[0] == "streaming" and row[1] == src.port


def bare_basebackup(lab: Lab, primary: str, scratch: Path) -> dict:
    """pg_basebackup -X stream -c fast of the primary into ``scratch`` (deleted afterwards)."""
    node, src = lab.postgres(primary), lab.cfg.region(primary).postgres
    make_dir(scratch.parent, lab.user, 0o755)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        s = _timed(node.ctl, [node.ctl.tool("pg_basebackup"), "-h", src.host, "-p", str(src.port),
                              "-U", src.replication_user, "-D", str(scratch), "-X", "stream", "-c", "fast"],
                   tool_env(src.replication_secret, src))
        size = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"pg_basebackup_s": s, "basebackup_bytes": size}
