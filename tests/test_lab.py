"""The two-region lab on real servers: replication, Redis/Sentinel, S3, workers, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import botocore.exceptions
import psycopg
import pytest

from activities.postgres.status import pg_status
from activities.redis.status import client as redis_client
from activities.redis.status import redis_status, sentinel_view
from eagle_dr.status import collect, gather
from lab.processes import wait_for
from tests.histories import record

# Its tests name lab.cfg.primary as the primary (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("configured_topology")



def test_streaming_replication_carries_a_row(lab):
    a, b = lab.cfg.primary, lab.cfg.secondary
    marker = uuid.uuid4().hex
    row_id = int(uuid.uuid4().int % 10**12) + 10**13
    with psycopg.connect(a.postgres.dsn(), autocommit=True) as conn:
        conn.execute("insert into alerts (id, region, payload) values (%s, %s, %s)",
                     (row_id, a.name, json.dumps({"marker": marker})))

    def replicated():
        with psycopg.connect(b.postgres.dsn(), autocommit=True) as conn:
            return conn.execute("select payload->>'marker' from alerts where id = %s", (row_id,)).fetchone()

    assert wait_for(replicated, 15, "the row on the standby")[0] == marker
    with psycopg.connect(b.postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select pg_is_in_recovery()").fetchone()[0] is True
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("insert into alerts (id, region) values (%s, 'x')", (row_id + 1,))


def test_primary_reports_slot_and_lag(lab):
    st = pg_status(lab.cfg.primary.postgres)
    assert st.role == "primary"
    link = next(x for x in st.replicas if x.application_name == lab.cfg.secondary.name)
    assert link.state == "streaming"
    assert link.slot_name == lab.cfg.secondary.postgres.slot
    assert link.lag_bytes is not None and link.lag_bytes >= 0
    standby = pg_status(lab.cfg.secondary.postgres)
    assert standby.role == "standby" and standby.receiver_status == "streaming"
    assert standby.timeline == st.timeline


def test_postgres_settings_needed_by_runbooks(lab):
    with psycopg.connect(lab.cfg.primary.postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("show wal_log_hints").fetchone()[0] == "on"
        assert conn.execute("show wal_level").fetchone()[0] == "replica"


def test_postgres_asks_every_tcp_connection_for_its_password(lab):
    """No trust for TCP or replication: a client without the password is refused, and the
    standby streams with a password it reads from a passfile, not from the config copied
    from node to node (postgresql.auto.conf)."""
    for r in lab.cfg.regions:
        hba = [ln.split() for ln in (lab.postgres(r.name).data_dir / "pg_hba.conf").read_text().splitlines()
               if ln.strip() and not ln.lstrip().startswith("#")]
        assert hba and all(ln[-1] == "scram-sha-256" for ln in hba if ln[0].startswith("host")), hba
        assert not [ln for ln in hba if "trust" in ln and (ln[0] != "local" or ln[1] == "replication")], hba
        pg = r.postgres
        for kw in ({"dbname": pg.database, "user": pg.user}, {"user": pg.replication_user, "replication": "true"}):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(host=pg.host, port=pg.port, connect_timeout=3, **kw).close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.dsn(), password="not-" + pg.password.resolve(), connect_timeout=3).close()

    standby = lab.cfg.secondary.postgres
    data = lab.postgres(lab.cfg.secondary.name).data_dir
    auto = (data / "postgresql.auto.conf").read_text()
    secret = standby.replication_secret.resolve()
    assert "primary_conninfo" in auto and "passfile=" in auto and secret not in auto
    passfile = next(data.parent.glob("*.pgpass"))
    st = passfile.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == data.stat().st_uid
    assert passfile.read_text().rstrip("\n").endswith(":" + secret)
    assert pg_status(standby).receiver_status == "streaming"


def test_postgres_is_tls_only_and_replication_verifies_the_server(lab, tmp_path):
    """Issue 12: every TCP connection to the lab's PostgreSQL is TLS (a plain one is refused by
    pg_hba's hostssl, not merely not offered), the standby's stream is TLS with verify-full
    against the lab CA, and verify-full refuses a server the configured CA did not sign."""
    from lab.tls import LabTls

    for r in lab.cfg.regions:
        pg = r.postgres
        assert pg.sslmode == "verify-full" and pg.sslrootcert and os.path.exists(pg.sslrootcert)
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(pg.dsn(sslmode="disable"), connect_timeout=3).close()
        with psycopg.connect(pg.dsn(), connect_timeout=3) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)

    # A CA of another lab: verify-full must refuse the server's certificate.
    other = LabTls(tmp_path / "other-ca", lab.user)
    other.ensure()
    pg = lab.cfg.primary.postgres
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(pg.dsn(sslrootcert=str(other.ca)), connect_timeout=3).close()

    primary = _current_primary(lab)
    standby = lab.cfg.other(primary).name
    auto = (lab.postgres(standby).data_dir / "postgresql.auto.conf").read_text()
    assert "sslmode=verify-full" in auto and f"sslrootcert={pg.sslrootcert}" in auto, auto
    with psycopg.connect(lab.cfg.region(primary).postgres.dsn(), connect_timeout=3) as conn:
        rows = conn.execute("select s.ssl, s.version from pg_stat_replication r "
                            "join pg_stat_ssl s on s.pid = r.pid where r.application_name = %s", (standby,)).fetchall()
    assert rows and all(ssl and version.startswith("TLSv1.") for ssl, version in rows), rows


def _current_primary(lab) -> str:
    for r in lab.cfg.regions:
        if pg_status(r.postgres).role == "primary":
            return r.name
    raise AssertionError("no primary in the lab")


def test_redis_replica_sees_key_and_auth_is_required(lab):
    a, b = lab.cfg.primary, lab.cfg.secondary
    key, value = f"test:{uuid.uuid4().hex}", uuid.uuid4().hex
    redis_client(a.redis).set(key, value)
    assert wait_for(lambda: redis_client(b.redis).get(key) == value, 15, "the key on the replica")
    assert redis_status(a.redis).role == "master"
    assert redis_status(b.redis).role == "slave"
    import redis

    assert a.redis.tls and b.redis.tls
    # Plain text is refused outright (the plain port is closed: the TLS port answers a
    # cleartext PING with nothing a client can parse), and TLS without AUTH is refused too.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=a.redis.host, port=a.redis.port, socket_timeout=3, socket_connect_timeout=3).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=a.redis.host, port=a.redis.port, **a.redis.tls_kwargs).ping()
    # The certificate is verified: another CA's trust (the system's) does not accept it.
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis(host=a.redis.host, port=a.redis.port, password="x", ssl=True, socket_connect_timeout=3).ping()
    # The same through eagle-dr's own client (a shared TLS context): the system's CAs refuse it.
    from eagle_dr.redis_connect import connect

    system_only = {k: v for k, v in a.redis.tls_kwargs.items() if k != "ssl_ca_certs"}
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        connect(a.redis.host, a.redis.port, password="x", tls=system_only, socket_connect_timeout=3).ping()
    assert redis_client(a.redis).ping()
    # Replication runs over TLS: the master's replica link is up while only TLS is open.
    assert redis_status(b.redis).link_status == "up"


def test_sentinels_report_master_with_quorum(lab):
    a = lab.cfg.primary
    views = [sentinel_view(a.redis, ep) for ep in a.redis.sentinels]
    assert len(views) == 3
    for v in views:
        assert v.reachable, v.error
        assert v.master == f"{a.redis.host}:{a.redis.port}"
        assert v.other_sentinels == 2
        assert v.quorum_ok, v.quorum_message


def test_s3_per_region_over_verified_tls_with_signatures_checked(lab):
    """Each region's bucket on its own S3 server (one can go down alone), reached over HTTPS
    that a client without the lab's CA refuses, and SigV4 signatures checked."""
    for r in lab.cfg.regions:
        names = {b["Name"] for b in lab.s3(r.name).client().list_buckets()["Buckets"]}
        assert r.s3.bucket in names and lab.cfg.other(r.name).s3.bucket not in names
    s3 = lab.s3()
    assert s3.endpoint.startswith("https://localhost:")
    bucket = lab.cfg.primary.s3.bucket
    import boto3

    untrusting = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                              aws_secret_access_key=s3.secret_key, region_name="us-east-1")
    with pytest.raises(botocore.exceptions.SSLError):
        untrusting.list_objects_v2(Bucket=bucket)
    s3.client().put_object(Bucket=bucket, Key="probe.txt", Body=b"eagle")
    assert s3.client().get_object(Bucket=bucket, Key="probe.txt")["Body"].read() == b"eagle"
    import boto3

    wrong = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                         aws_secret_access_key="not-the-secret", region_name="us-east-1", verify=str(lab.tls.ca))
    with pytest.raises(botocore.exceptions.ClientError):
        wrong.list_objects_v2(Bucket=bucket)


async def test_health_workflow_runs_on_regional_workers(lab, client):
    from workflows.health import HealthCheckInput, HealthCheckWorkflow, RegionTarget

    inp = HealthCheckInput(regions=[RegionTarget(name=r.name, task_queue=r.temporal.task_queue)
                                    for r in lab.cfg.regions])
    handle = await client.start_workflow(HealthCheckWorkflow.run, inp, id=f"health-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    result = await handle.result()
    await record(handle, "health_check-healthy")
    by_region = {v.region: v for v in result.regions}
    for r in lab.cfg.regions:
        v = by_region[r.name]
        assert v.healthy, v.reason
        # The probe ran on that region's own worker.
        assert v.detail.worker.endswith(r.temporal.task_queue)
    assert by_region[lab.cfg.primary.name].detail.postgres.role == "primary"
    assert by_region[lab.cfg.secondary.name].detail.postgres.role == "standby"


def test_status_shows_topology(lab):
    st = collect(lab.cfg, temporal_address=f"127.0.0.1:{lab.cfg.lab.dev_server.grpc_port}")
    roles = {r.name: (r.postgres.role, r.redis.role) for r in st.regions}
    assert roles == {lab.cfg.primary.name: ("primary", "master"), lab.cfg.secondary.name: ("standby", "slave")}
    assert st.active_region == lab.cfg.primary.name
    assert all(s.quorum_ok for s in st.sentinels)
    polling = {w.region: w.polling for w in st.workers}
    assert polling == {lab.cfg.primary.name: True, lab.cfg.secondary.name: True, "control": True}
    assert st.temporal_ui_reachable


def test_status_cli_json(lab, lab_config_path):
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "status", "--json"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300",
                                                            "EAGLE_DR_STATE_DIR": lab.cfg.lab.state_dir})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [x["postgres"]["role"] for x in doc["regions"]] == ["primary", "standby"]
    assert doc["regions"][0]["postgres"]["replicas"][0]["state"] == "streaming"


def test_cli_rejects_unknown_region(lab, lab_config_path):
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), "lab",
                        "kill-region", "eu-north-7"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "COLUMNS": "300", "EAGLE_DR_STATE_DIR": lab.cfg.lab.state_dir})
    assert r.returncode == 2
    assert "unknown region 'eu-north-7'" in r.stderr
    assert lab.postgres(lab.cfg.primary.name).running()


def test_sample_app_writes_to_the_active_region_and_follows_it(lab):
    from lab.app import SampleApp

    app = SampleApp(lab.cfg)
    a, b = lab.cfg.primary.name, lab.cfg.secondary.name
    first = app.write_one(app.log.next_id())
    app.log.append(first)
    assert first.ok and first.region == a
    lab.router.set_active_region(b)
    try:
        # B is a read-only standby: the app follows routing there and its write is refused.
        moved = app.write_one(app.log.next_id())
        app.log.append(moved)
        assert not moved.ok and moved.region == b and "read-only" in moved.error
    finally:
        lab.router.set_active_region(a)
    back = app.write_one(app.log.next_id())
    app.log.append(back)
    assert back.ok and back.region == a
    assert {first.id, back.id} <= set(app.log.acknowledged())
    assert moved.id not in app.log.acknowledged()
    with psycopg.connect(lab.cfg.primary.postgres.dsn(), autocommit=True) as conn:
        assert conn.execute("select count(*) from alerts where id = any(%s)", ([first.id, back.id],)).fetchone()[0] == 2


async def test_zz_kill_region_then_status_then_heal(lab, client):
    """Last in the module: a real outage of the primary region, and the lab's own recovery."""
    from workflows.health import HealthCheckInput, HealthCheckWorkflow, RegionTarget

    a, b = lab.cfg.primary, lab.cfg.secondary
    killed = lab.kill_region(a.name)
    assert {"postgres", "redis", "worker"} <= set(killed)
    st = await gather(lab.cfg)
    view = {r.name: r for r in st.regions}
    assert not view[a.name].postgres.reachable and not view[a.name].redis.reachable
    # Nothing was promoted by the lab: B is still a standby, its Redis still a replica.
    assert view[b.name].postgres.role == "standby"
    assert view[b.name].redis.role == "slave"
    # Everything of the region is down but its bucket (kill_region keeps S3 unless asked).
    assert [p for p in lab.status().processes if p.region == a.name and p.running and p.name != "s3"] == []

    # A's worker is gone, so a probe bound to A's queue times out on schedule-to-start
    # and the check reports A instead of hanging.
    inp = HealthCheckInput(regions=[RegionTarget(name=r.name, task_queue=r.temporal.task_queue)
                                    for r in lab.cfg.regions], probe_timeout_seconds=3)
    handle = await client.start_workflow(HealthCheckWorkflow.run, inp, id=f"health-{uuid.uuid4()}",
                                         task_queue=lab.cfg.temporal.control_task_queue)
    result = await handle.result()
    await record(handle, "health_check-region_down")
    verdicts = {v.region: v for v in result.regions}
    assert not verdicts[a.name].healthy and "worker did not answer" in verdicts[a.name].reason
    assert verdicts[b.name].healthy

    started = lab.heal_region(a.name)
    assert {"postgres", "redis", "worker"} <= set(started)
    lab.wait_replication()
    assert pg_status(a.postgres).role == "primary"
