"""The runbooks' traffic activities against Kubernetes (kmock over HTTP, real client) and
Route 53 (moto server over HTTP, real boto3): what failover does to production routing."""

from __future__ import annotations

import pytest
import yaml
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.dns import Route53Failover
from activities.traffic import RouteRequest, TrafficActivities
from eagle_dr.config import DEFAULT_CONFIG, parse_config
from tests.kmock_cluster import kmock_cluster

SELECTOR_LABELS = {"app.kubernetes.io/component": "microservice"}


def _config(api_url: str, moto_url: str, state_dir: str):
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for r in doc["regions"]:
        r["kubernetes"]["api_url"] = api_url
    doc["routing"] = {"lab_file": False, "kubernetes": True, "dns": True, "dns_endpoint_url": moto_url}
    doc["lab"]["state_dir"] = state_dir
    return parse_config(doc, env={})


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)


def test_route_scale_and_epoch_guard(moto_url, aws_env, tmp_path):
    with kmock_cluster() as k8s:
        k8s.add_deployment("alert-api", labels=SELECTOR_LABELS, replicas=0)
        k8s.add_deployment("alert-worker", labels=SELECTOR_LABELS, replicas=0)
        k8s.add_deployment("unrelated", labels={"app": "other"}, replicas=1)
        k8s.add_config_map("multi-region-config", {"active.region": "us-east-1", "dr.epoch": "0", "keep": "me"})
        cfg = _config(k8s.api_url, moto_url, str(tmp_path))
        east, west = cfg.region("us-east-1"), cfg.region("us-west-2")
        dns = Route53Failover(moto_url, east.dns.zone)
        dns.ensure_zone()
        dns.upsert_failover_records(east.dns.record, east.dns.value, west.dns.value, 60, "us-east-1", "us-west-2")

        env, acts = ActivityEnvironment(), TrafficActivities(cfg)
        result = env.run(acts.route_traffic, RouteRequest(region="us-west-2", epoch=1,
                                                          replicas={"alert-api": 2, "alert-worker": 1}))
        assert result.previous_region == "us-east-1"
        assert set(result.changed) == {"configmap", "dns"}
        cm = k8s.core.read_namespaced_config_map("multi-region-config", k8s.namespace).data
        assert cm["active.region"] == "us-west-2" and cm["dr.epoch"] == "1" and cm["keep"] == "me"
        assert dns.current(east.dns.record)["primary"]["value"] == west.dns.value
        assert env.run(acts.wait_region_ready, "us-west-2") == {"alert-api": 2, "alert-worker": 1}

        # Running the same step again (a Temporal retry) changes nothing.
        again = env.run(acts.route_traffic, RouteRequest(region="us-west-2", epoch=1,
                                                         replicas={"alert-api": 2, "alert-worker": 1}))
        assert again.changed == []

        # A stale runbook (lower epoch) may not move routing back.
        with pytest.raises(ApplicationError) as e:
            env.run(acts.route_traffic, RouteRequest(region="us-east-1", epoch=0))
        assert e.value.type == "StaleEpoch" and e.value.non_retryable
        assert k8s.core.read_namespaced_config_map("multi-region-config", k8s.namespace).data["active.region"] == \
            "us-west-2"

        down = env.run(acts.scale_down_region, "us-west-2")
        assert down.reachable and down.previous == {"alert-api": 2, "alert-worker": 1}
        replicas = {d.metadata.name: d.spec.replicas for d in k8s.apps.list_namespaced_deployment(k8s.namespace).items}
        assert replicas == {"alert-api": 0, "alert-worker": 0, "unrelated": 1}


def test_scale_down_of_an_unreachable_cluster_is_a_result(tmp_path, moto_url):
    cfg = _config("http://127.0.0.1:9", moto_url, str(tmp_path))
    result = ActivityEnvironment().run(TrafficActivities(cfg).scale_down_region, "us-east-1")
    assert not result.reachable and result.error
