"""An RDB file of a Redis node, fresh: BGSAVE and wait for it (the worker runs beside this
Redis, on the same disk, as the lab's and a VM deployment's do)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from activities.redis.status import client as redis_client
from eagle_dr.config import RedisConfig


def bgsave(cfg: RedisConfig, timeout_s: float = 120) -> Path:
    """BGSAVE, wait until it is written, and return the RDB file's path."""
    c = redis_client(cfg, 10)
    # Counted, not timed: LASTSAVE has one-second resolution, so a second BGSAVE within the
    # same second as the one before would look as if it never finished.
    saves = int(c.info("persistence")["rdb_saves"])
    try:
        # SCHEDULE: a replica sync or AOF rewrite in progress delays the save instead of failing it.
        c.bgsave(schedule=True)
    except redis.ResponseError as e:
        if "already in progress" not in str(e):
            raise
    deadline = time.monotonic() + timeout_s
    while True:
        info = c.info("persistence")
        if int(info["rdb_saves"]) > saves and not int(info["rdb_bgsave_in_progress"]):
            if info.get("rdb_last_bgsave_status") != "ok":
                raise RuntimeError(f"BGSAVE failed on {cfg.host}:{cfg.port}: see its log")
            break
        if time.monotonic() > deadline:
            raise TimeoutError("BGSAVE did not finish")
        time.sleep(0.05)
    directory = c.config_get("dir")["dir"]
    name = c.config_get("dbfilename")["dbfilename"]
    return Path(directory) / name
