"""The runbooks' traffic activities against two Kubernetes clusters (one kmock API server per
region, real client over HTTP) and Route 53 (moto server over HTTP, real boto3): what the
runbooks do to production routing, move after move."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import requests
import yaml
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment

from activities.dns import Route53Failover
from activities.traffic import RouteRequest, ScaleDownRequest, TrafficActivities
from eagle_dr.config import DEFAULT_CONFIG, parse_config
from lab.scratch_postgres import scratch_postgres
from tests.conftest import PORT_SHIFT
from tests.kmock_cluster import KmockCluster, kmock_cluster

EAST, WEST = "us-east-1", "us-west-2"
SELECTOR_LABELS = {"app.kubernetes.io/component": "microservice"}
CM = "multi-region-config"


def _config(api_urls: dict[str, str], moto_url: str, state_dir: str, west_postgres=None):
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for r in doc["regions"]:
        r["kubernetes"]["api_url"] = api_urls[r["name"]]
        if west_postgres is not None and r["name"] == WEST:
            # A trust-auth scratch server without TLS in place of the lab's node.
            for k in ("password", "replication_password", "sslmode", "sslrootcert"):
                r["postgres"].pop(k, None)
            r["postgres"].update(host=west_postgres.host, port=west_postgres.port, user=west_postgres.user,
                                 database=west_postgres.database)
    doc["routing"] = {"lab_file": False, "kubernetes": True, "dns": True, "dns_endpoint_url": moto_url}
    doc["lab"]["state_dir"] = state_dir
    return parse_config(doc, env={})


@pytest.fixture
def aws_env(moto_url, monkeypatch):
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                 "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def clusters() -> Iterator[dict[str, KmockCluster]]:
    """us-east-1 serving (alert-api 3, alert-worker 2), us-west-2 a cold standby at 0; both
    ConfigMaps say us-east-1 at epoch 0."""
    with kmock_cluster() as east, kmock_cluster() as west:
        for k8s, (api, worker) in ((east, (3, 2)), (west, (0, 0))):
            k8s.add_deployment("alert-api", labels=SELECTOR_LABELS, replicas=api)
            k8s.add_deployment("alert-worker", labels=SELECTOR_LABELS, replicas=worker)
            k8s.add_deployment("unrelated", labels={"app": "other"}, replicas=1)
            k8s.add_config_map(CM, {"active.region": EAST, "dr.epoch": "0", "keep": "me"})
        yield {EAST: east, WEST: west}
    assert east.server_errors() == [] and west.server_errors() == []


def _dns(cfg, moto_url) -> Route53Failover:
    east, west = cfg.region(EAST), cfg.region(WEST)
    dns = Route53Failover(moto_url, east.dns.zone, poll_s=0.05)
    dns.ensure_zone()
    dns.upsert_failover_records(east.dns.record, east.dns.value, west.dns.value, 60, EAST, WEST)
    return dns


def serving(k8s: KmockCluster) -> dict[str, tuple[int, int]]:
    """(desired, ready) per deployment."""
    return {d.metadata.name: (d.spec.replicas, (d.status.ready_replicas if d.status else 0) or 0)
            for d in k8s.apps.list_namespaced_deployment(k8s.namespace).items}


def settles(k8s: KmockCluster, expected: dict[str, tuple[int, int]], timeout_s: float = 10.0) -> bool:
    """Polls (with a deadline) until the fake controller has caught up with a scale."""
    deadline = time.monotonic() + timeout_s
    while (got := serving(k8s)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{got} != {expected} after {timeout_s}s")
        time.sleep(0.1)
    return True


def routing(k8s: KmockCluster) -> tuple[str, str, str]:
    data = k8s.core.read_namespaced_config_map(CM, k8s.namespace).data
    return data["active.region"], data["dr.epoch"], data["keep"]


def test_a_to_b_to_a_restores_services_and_every_cluster_names_the_active_region(
    clusters, moto_url, aws_env, tmp_path
):
    east, west = clusters[EAST], clusters[WEST]
    cfg = _config({EAST: east.api_url, WEST: west.api_url}, moto_url, str(tmp_path))
    dns = _dns(cfg, moto_url)
    record = cfg.region(EAST).dns.record
    env, acts = ActivityEnvironment(), TrafficActivities(cfg)

    # Failover to us-west-2 at epoch 1, in FailoverWorkflow's order: fence, then route.
    down = env.run(acts.scale_down_region, ScaleDownRequest(region=EAST, epoch=1))
    assert down.reachable and down.previous == {"alert-api": 3, "alert-worker": 2}
    route = env.run(acts.route_traffic, RouteRequest(region=WEST, epoch=1))
    assert route.previous_region == EAST and route.unreachable == {}
    assert set(route.changed) == {f"configmap@{WEST}", f"configmap@{EAST}", "dns"}
    # us-west-2 never ran them: it takes the size us-east-1 ran at.
    assert route.scaled_up == {"alert-api": 3, "alert-worker": 2}
    assert set(route.scaled_from.values()) == {"from the other region"}
    assert env.run(acts.wait_region_ready, WEST) == {"alert-api": 3, "alert-worker": 2}
    assert serving(west) == {"alert-api": (3, 3), "alert-worker": (2, 2), "unrelated": (1, 1)}
    assert settles(east, {"alert-api": (0, 0), "alert-worker": (0, 0), "unrelated": (1, 1)})
    assert routing(east) == routing(west) == (WEST, "1", "me")
    assert dns.current(record)["primary"]["set_identifier"] == WEST and dns.epoch(record) == (1, WEST)

    # us-west-2 grows while it serves.
    west.apps.patch_namespaced_deployment_scale("alert-api", west.namespace, {"spec": {"replicas": 4}})

    # Switchover back at epoch 2, in SwitchoverWorkflow's order: route, then scale the source down.
    route = env.run(acts.route_traffic, RouteRequest(region=EAST, epoch=2))
    assert route.scaled_up == {"alert-api": 3, "alert-worker": 2}
    assert set(route.scaled_from.values()) == {"remembered at fence"}
    down = env.run(acts.scale_down_region, ScaleDownRequest(region=WEST, epoch=2))
    assert down.previous == {"alert-api": 4, "alert-worker": 2}
    assert env.run(acts.wait_region_ready, EAST) == {"alert-api": 3, "alert-worker": 2}
    assert serving(east) == {"alert-api": (3, 3), "alert-worker": (2, 2), "unrelated": (1, 1)}
    assert settles(west, {"alert-api": (0, 0), "alert-worker": (0, 0), "unrelated": (1, 1)})
    assert routing(east) == routing(west) == (EAST, "2", "me")
    assert dns.current(record)["primary"]["set_identifier"] == EAST and dns.epoch(record) == (2, EAST)

    # And once more: us-west-2 comes back at the size it had, remembered in its own cluster.
    env.run(acts.scale_down_region, ScaleDownRequest(region=EAST, epoch=3))
    route = env.run(acts.route_traffic, RouteRequest(region=WEST, epoch=3))
    assert route.scaled_up == {"alert-api": 4, "alert-worker": 2}
    assert env.run(acts.wait_region_ready, WEST) == {"alert-api": 4, "alert-worker": 2}
    assert settles(east, {"alert-api": (0, 0), "alert-worker": (0, 0), "unrelated": (1, 1)})
    assert routing(east) == routing(west) == (WEST, "3", "me")

    # Running the same steps again (Temporal retries) changes nothing.
    patches = len(east.requests("PATCH")) + len(west.requests("PATCH"))
    again = env.run(acts.route_traffic, RouteRequest(region=WEST, epoch=3))
    assert again.changed == [] and again.scaled_up == {}
    assert env.run(acts.scale_down_region, ScaleDownRequest(region=EAST, epoch=3)).previous == \
        {"alert-api": 0, "alert-worker": 0}
    assert len(east.requests("PATCH")) + len(west.requests("PATCH")) == patches
    # The second fence kept the count the first one remembered.
    env.run(acts.route_traffic, RouteRequest(region=EAST, epoch=4))
    assert env.run(acts.wait_region_ready, EAST) == {"alert-api": 3, "alert-worker": 2}


def test_a_stale_epoch_is_refused_by_configmaps_route53_and_scaling(clusters, moto_url, aws_env, tmp_path):
    east, west = clusters[EAST], clusters[WEST]
    cfg = _config({EAST: east.api_url, WEST: west.api_url}, moto_url, str(tmp_path))
    dns = _dns(cfg, moto_url)
    record = cfg.region(EAST).dns.record
    env, acts = ActivityEnvironment(), TrafficActivities(cfg)
    env.run(acts.scale_down_region, ScaleDownRequest(region=EAST, epoch=5))
    env.run(acts.route_traffic, RouteRequest(region=WEST, epoch=5))
    env.run(acts.wait_region_ready, WEST)

    def refused(fn, arg) -> None:
        with pytest.raises(ApplicationError) as e:
            env.run(fn, arg)
        assert e.value.type == "StaleEpoch" and e.value.non_retryable

    # A superseded runbook (epoch 4) may neither route back nor scale down the region serving.
    refused(acts.route_traffic, RouteRequest(region=EAST, epoch=4))
    refused(acts.scale_down_region, ScaleDownRequest(region=WEST, epoch=4))
    # The same token naming another region is as stale.
    refused(acts.route_traffic, RouteRequest(region=EAST, epoch=5))

    # Route 53 alone holding the newer epoch (a runbook that reached only DNS) is enough.
    dns.point_to(record, cfg.region(WEST).dns.value, 60, WEST, epoch=7)
    refused(acts.route_traffic, RouteRequest(region=EAST, epoch=6))

    # One cluster alone holding it is enough too, and the check precedes every write.
    west.core.patch_namespaced_config_map(CM, west.namespace, {"data": {"dr.epoch": "9"}})
    refused(acts.route_traffic, RouteRequest(region=EAST, epoch=8))

    assert routing(east) == (WEST, "5", "me") and routing(west) == (WEST, "9", "me")
    assert dns.current(record)["primary"]["set_identifier"] == WEST and dns.epoch(record) == (7, WEST)
    assert settles(west, {"alert-api": (3, 3), "alert-worker": (2, 2), "unrelated": (1, 1)})
    assert settles(east, {"alert-api": (0, 0), "alert-worker": (0, 0), "unrelated": (1, 1)})


def test_an_unreachable_cluster_is_reported_not_fatal(moto_url, aws_env, tmp_path):
    with kmock_cluster() as west:
        west.add_deployment("alert-api", labels=SELECTOR_LABELS, replicas=0)
        west.add_config_map(CM, {"active.region": EAST, "dr.epoch": "0", "keep": "me"})
        cfg = _config({EAST: "http://127.0.0.1:9", WEST: west.api_url}, moto_url, str(tmp_path))
        _dns(cfg, moto_url)
        env, acts = ActivityEnvironment(), TrafficActivities(cfg)

        down = env.run(acts.scale_down_region, ScaleDownRequest(region=EAST, epoch=1))
        assert not down.reachable and down.error
        route = env.run(acts.route_traffic, RouteRequest(region=WEST, epoch=1))

        assert list(route.unreachable) == [EAST]
        # Nothing remembered anywhere: one pod serves rather than none, and the result says why.
        assert route.scaled_up == {"alert-api": 1} and route.scaled_from == {"alert-api": "no recorded count"}
        assert env.run(acts.wait_region_ready, WEST) == {"alert-api": 1}
        assert routing(west) == (WEST, "1", "me")


def test_a_cluster_without_the_configmap_is_still_fenced(moto_url, tmp_path):
    with kmock_cluster() as east:
        east.add_deployment("alert-api", labels=SELECTOR_LABELS, replicas=2)
        cfg = _config({EAST: east.api_url, WEST: "http://127.0.0.1:9"}, moto_url, str(tmp_path))

        down = ActivityEnvironment().run(TrafficActivities(cfg).scale_down_region,
                                         ScaleDownRequest(region=EAST, epoch=1))

        assert down.reachable and down.previous == {"alert-api": 2} and CM in down.note
        assert east.deployment("alert-api").spec.replicas == 0


def test_a_bare_region_name_is_still_accepted(tmp_path, moto_url):
    """Histories recorded before the epoch reached the scale step pass a bare string."""
    cfg = _config({EAST: "http://127.0.0.1:9", WEST: "http://127.0.0.1:9"}, moto_url, str(tmp_path))
    result = ActivityEnvironment().run(TrafficActivities(cfg).scale_down_region, EAST)
    assert result.region == EAST and not result.reachable and result.error


ROUTE_PG_PORT = 17993 + PORT_SHIFT - 2000


@pytest.fixture
def standby_node():
    """A real PostgreSQL in recovery with nothing to follow (standby.signal, no upstream): it
    stays read-only until pg_promote()."""
    with scratch_postgres(ROUTE_PG_PORT, "route-writable") as node:
        node.stop("fast")
        (node.data_dir / "standby.signal").touch()
        node.start()
        yield node


def _in_recovery(node) -> bool:
    with node.connect() as c:
        return c.execute("select pg_is_in_recovery()").fetchone()[0]


def test_routing_asked_with_the_promotion_waits_until_the_node_takes_writes(
    clusters, moto_url, aws_env, tmp_path, standby_node
):
    """A switchover asks for routing together with the promotion (after_writable): nothing is
    routed while the target is still a standby, not after a timeout and not after a cancel (the
    promotion failed); once it is promoted, routing follows at once."""
    east, west = clusters[EAST], clusters[WEST]
    cfg = _config({EAST: east.api_url, WEST: west.api_url}, moto_url, str(tmp_path),
                  west_postgres=standby_node.cfg)
    dns = _dns(cfg, moto_url)
    record = cfg.region(EAST).dns.record
    acts = TrafficActivities(cfg)
    assert _in_recovery(standby_node)

    def unchanged():
        assert routing(east) == routing(west) == (EAST, "0", "me")
        assert dns.current(record)["primary"]["set_identifier"] == EAST

    # The promotion never comes: a bounded wait, non-retryable, routing untouched.
    with pytest.raises(ApplicationError) as e:
        ActivityEnvironment().run(acts.route_traffic, RouteRequest(region=WEST, epoch=1, after_writable=True,
                                                                   after_writable_timeout_seconds=0.3))
    assert e.value.type == "NotWritable" and e.value.non_retryable and "in recovery" in str(e.value)
    unchanged()

    # A retried attempt's wait ends at the first attempt's deadline, not one of its own: worker
    # restarts do not stretch it (beside, so that a wait started again fails instead of hanging).
    retried = ActivityEnvironment()
    retried.info = dataclasses.replace(retried.info, attempt=2,
                                       scheduled_time=datetime.now(timezone.utc) - timedelta(seconds=601))
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(retried.run, acts.route_traffic, RouteRequest(
        region=WEST, epoch=1, after_writable=True, after_writable_timeout_seconds=600))
    pool.shutdown(wait=False)
    with pytest.raises(ApplicationError) as e:
        fut.result(timeout=30)
    assert e.value.type == "NotWritable" and "within 600 s" in str(e.value), e.value
    unchanged()

    def waiting(env):
        beats: list = []
        env.on_heartbeat = lambda *d: beats.append(d)
        pool = ThreadPoolExecutor(1)
        fut = pool.submit(env.run, acts.route_traffic, RouteRequest(region=WEST, epoch=1, after_writable=True))
        deadline = time.monotonic() + 15
        while not beats:
            assert time.monotonic() < deadline and not fut.done(), fut.exception() if fut.done() else "no heartbeat"
            time.sleep(0.01)
        pool.shutdown(wait=False)
        return fut

    # The runbook's promotion failed: it cancels the wait, and nothing is routed.
    env = ActivityEnvironment()
    fut = waiting(env)
    unchanged()
    env.cancel()
    with pytest.raises(CancelledError):
        fut.result(timeout=15)
    unchanged()

    # The promotion succeeds while routing waits: routing follows.
    fut = waiting(ActivityEnvironment())
    unchanged()
    with standby_node.connect() as c:
        c.execute("select pg_promote(wait => false)")
    route = fut.result(timeout=60)
    assert not _in_recovery(standby_node)
    assert route.waited_writable_s is not None and route.waited_writable_s > 0
    assert routing(east) == routing(west) == (WEST, "1", "me")
    assert dns.current(record)["primary"]["set_identifier"] == WEST
