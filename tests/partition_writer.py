"""A client of one PostgreSQL for the partition tests: an insert every 50 ms, each
acknowledged one logged as "<unix time> <id>" after its commit returned. Run inside a region's
namespace it is a client the partition cannot cut off from its primary. The DSN comes in the
environment (WRITER_DSN), never on the command line."""

import os
import sys
import time

import psycopg

# Keepalives and tcp_user_timeout: a connection the network stalls fails in about a second
# instead of hanging, so the log shows when writes stopped.
OPTS = "connect_timeout=1 keepalives=1 keepalives_idle=1 keepalives_interval=1 keepalives_count=1 tcp_user_timeout=1000"


def main(log_path: str, first_id: int, region: str) -> None:
    dsn = os.environ["WRITER_DSN"] + " " + OPTS
    conn, i = None, first_id
    with open(log_path, "a") as log:
        while True:
            try:
                if conn is None:
                    conn = psycopg.connect(dsn, autocommit=True)
                conn.execute("insert into alerts (id, region, payload) values (%s, %s, '{}')", (i, region))
                log.write(f"{time.time():.6f} {i}\n")
                log.flush()
                i += 1
            except psycopg.errors.UniqueViolation:
                i += 1  # committed, but its acknowledgement was lost: not logged, not retried
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
