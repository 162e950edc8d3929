"""A client of one region for the partition tests: every 50 ms an insert into its PostgreSQL,
and, when WRITER_REDIS_PORT is set, a SET on its Redis; each acknowledged one is logged as
"<unix time> <id>" (PostgreSQL) or "redis <unix time> <id>" after the server answered. Run
inside a region's namespace it is a client the partition cannot cut off from its primary. The
DSN and the Redis password come in the environment (WRITER_DSN, WRITER_REDIS_PASSWORD, and
WRITER_REDIS_CA for TLS), never on the command line."""

import os
import sys
import time

import psycopg
import redis

# Keepalives and tcp_user_timeout: a connection the network stalls fails in about a second
# instead of hanging, so the log shows when writes stopped.
OPTS = "connect_timeout=1 keepalives=1 keepalives_idle=1 keepalives_interval=1 keepalives_count=1 tcp_user_timeout=1000"


def _redis() -> redis.Redis | None:
    port = os.environ.get("WRITER_REDIS_PORT")
    if not port:
        return None
    ca = os.environ.get("WRITER_REDIS_CA")
    tls = {"ssl": True, "ssl_ca_certs": ca} if ca else {}
    return redis.Redis(host="127.0.0.1", port=int(port), password=os.environ.get("WRITER_REDIS_PASSWORD"),
                       socket_timeout=1, socket_connect_timeout=1, **tls)


def main(log_path: str, first_id: int, region: str) -> None:
    dsn = os.environ["WRITER_DSN"] + " " + OPTS
    conn, i = None, first_id
    cache = _redis()
    with open(log_path, "a") as log:
        while True:
            try:
                if conn is None:
                    conn = psycopg.connect(dsn, autocommit=True)
                conn.execute("insert into alerts (id, region, payload) values (%s, %s, '{}')", (i, region))
                log.write(f"{time.time():.6f} {i}\n")
                log.flush()
            except psycopg.errors.UniqueViolation:
                pass  # committed, but its acknowledgement was lost: not logged, not retried
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            if cache is not None:
                try:
                    cache.set(f"partition:{region}:{i}", i)
                    log.write(f"redis {time.time():.6f} {i}\n")
                    log.flush()
                except redis.RedisError:
                    pass  # refused (fenced, a replica) or cut off: not acknowledged
            i += 1
            time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
