"""Redis A (the master) vs B: key counts per database, replication offsets, and a sampled
compare of values and expiry times by digest (DUMP and PEXPIRETIME; a random sample).

When B replicates A (``follower``), a sampled key is compared only once B's offset has reached
A's offset read *after* A's DUMPs: B has then applied every write A's DUMP saw. A key that still
differs is DUMPed on A again; if A's value changed meanwhile it is a write in flight, not a
difference. B that is not A's replica (a Redis restored from an older RDB) is compared as is.
"""

from __future__ import annotations

import hashlib
import time

import redis as redislib

from activities.consistency.results import RedisDbCount, RedisResult

CAP = 100


def _offset(c: redislib.Redis) -> int | None:
    info = c.info("replication")
    if info.get("role") == "master":
        return int(info.get("master_repl_offset", 0))
    v = info.get("slave_repl_offset")
    return int(v) if v is not None else None


def _counts_and_offset(c: redislib.Redis) -> tuple[dict[int, int], int | None]:
    """Key counts and the replication offset read in one MULTI/EXEC, so that no write falls
    between them (two separate INFO calls on a master that is taking writes pair the counts
    of one moment with the offset of a later one)."""
    p = c.pipeline(transaction=True)
    p.info("keyspace")
    p.info("replication")
    keyspace, repl = p.execute()
    counts = {int(db[2:]): v["keys"] for db, v in keyspace.items() if db.startswith("db")}
    if repl.get("role") == "master":
        return counts, int(repl.get("master_repl_offset", 0))
    v = repl.get("slave_repl_offset")
    return counts, int(v) if v is not None else None


# How often the follower's counts are read again when a write landed between the two sides'
# reads (their offsets differ): the app writes every few tens of milliseconds, reads take one.
COUNT_TRIES = 20


def _digest(c: redislib.Redis, keys: list[bytes], expiry: bool) -> list[str | None]:
    """Each key's value (DUMP) and, with ``expiry``, its absolute expiry time (PEXPIRETIME):
    DUMP leaves the TTL out, and a key that lost its expiry (an older RDB, a PERSIST on one
    side) lives forever there. A replica holds the master's absolute expiry (PEXPIREAT)."""
    p = c.pipeline(transaction=False)
    for k in keys:
        p.dump(k)
        if expiry:
            p.pexpiretime(k)
    out = p.execute()
    step = 2 if expiry else 1
    return [None if out[i] is None else
            hashlib.sha1(out[i] + (b"|%d" % out[i + 1] if expiry else b"")).hexdigest()
            for i in range(0, len(out), step)]


def _has_pexpiretime(c: redislib.Redis) -> bool:
    try:
        c.execute_command("PEXPIRETIME", "eagle-dr:probe:no-such-key")
        return True
    except redislib.ResponseError:
        return False  # before Redis 7.0


def _sample(c: redislib.Redis, n: int) -> list[bytes]:
    """Up to ``n`` distinct keys: all of them when the database holds no more, else picked at
    random (RANDOMKEY). A SCAN's first ``n`` are the same keys in every run (hash-table order):
    an hourly check would never look at the rest."""
    if c.dbsize() <= n:
        return list(c.scan_iter(count=1000))
    p = c.pipeline(transaction=False)
    for _ in range(2 * n):
        p.randomkey()
    return list(dict.fromkeys(k for k in p.execute() if k is not None))[:n]


def _wait_offset(b: redislib.Redis, offset: int, bound: float) -> None:
    deadline = time.monotonic() + bound
    while (_offset(b) or 0) < offset:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replica did not reach the master's offset {offset} within {bound:.0f} s")
        time.sleep(0.02)


def compare_redis(a: redislib.Redis, b: redislib.Redis, *, name_a: str, name_b: str, follower: bool, sample: int,
                  bound: float = 60) -> RedisResult:
    res = RedisResult(a=name_a, b=name_b)
    ca, res.offset_a = _counts_and_offset(a)
    cb, res.offset_b = _counts_and_offset(b)
    comparable = True
    if follower and res.offset_a is not None:
        # Counts are only comparable at one offset: A's counts and offset at one instant, then
        # B's once B has reached exactly that offset. A write on A meanwhile moves B past it:
        # read both again. Counts never caught at one offset are not compared, and say so
        # (a write in flight is not a difference).
        for _ in range(COUNT_TRIES):
            _wait_offset(b, res.offset_a, bound)
            cb, res.offset_b = _counts_and_offset(b)
            if res.offset_b == res.offset_a:
                break
            ca, res.offset_a = _counts_and_offset(a)
        else:
            comparable = False
            res.notes.append(f"key counts not compared: the master took writes between every pair of reads "
                             f"({COUNT_TRIES} tries)")
    for db in sorted(ca.keys() | cb.keys()) if comparable else []:
        res.counts.append(RedisDbCount(db=db, keys_a=ca.get(db, 0), keys_b=cb.get(db, 0)))
        if follower and ca.get(db, 0) != cb.get(db, 0):
            res.notes.append(f"db{db}: counts differ at one offset")
    if sample <= 0:
        return res
    expiry = _has_pexpiretime(a) and _has_pexpiretime(b)
    if not expiry:
        res.notes.append("expiry times not compared (PEXPIRETIME needs Redis 7): values only")
    for db in sorted(ca):
        sa, sb = _select(a, db), _select(b, db)
        keys = _sample(sa, sample)
        if not keys:
            continue
        res.sampled += len(keys)
        da = _digest(sa, keys, expiry)
        if follower:
            _wait_offset(b, _offset(a) or 0, bound)
        db_ = _digest(sb, keys, expiry)
        diff = [i for i in range(len(keys)) if da[i] != db_[i]]
        if diff and follower:
            again = _digest(sa, [keys[i] for i in diff], expiry)
            settled = [i for i, v in zip(diff, again) if v == da[i]]
            res.in_flight += len(diff) - len(settled)
            diff = settled
        for i in diff:
            key = keys[i].decode(errors="replace")
            key = key if db == 0 else f"db{db}:{key}"
            if db_[i] is None:
                res.missing_count += 1
                if len(res.missing) < CAP:
                    res.missing.append(key)
            else:
                res.changed_count += 1
                if len(res.changed) < CAP:
                    res.changed.append(key)
        sa.close()
        sb.close()
    return res


def _select(c: redislib.Redis, db: int) -> redislib.Redis:
    # The same connection (TLS included) on another database: the pool's class and keywords.
    pool = c.connection_pool
    r = redislib.Redis(connection_pool=redislib.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, "db": db, "decode_responses": False}))
    r.auto_close_connection_pool = True  # its own pool: close() disconnects it
    return r
