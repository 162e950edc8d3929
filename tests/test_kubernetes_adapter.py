"""KubernetesCluster against the real client over HTTP, with kmock as the API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from activities.kubernetes import REPLICAS_KEY_PREFIX, KubernetesCluster, ResourceMissing, StaleEpochError
from eagle_dr.config import KubernetesConfig
from tests.kmock_cluster import KmockCluster, kmock_cluster

WEB = "tier=web"


@pytest.fixture
def k8s() -> Iterator[KmockCluster]:
    with kmock_cluster() as cluster:
        service = {"tier": "web", "app.kubernetes.io/component": "microservice"}
        cluster.add_deployment("web-a", labels=service, replicas=2)
        cluster.add_deployment("web-b", labels=service, replicas=1)
        cluster.add_deployment("db", labels={"tier": "db"}, replicas=3)
        yield cluster
    assert cluster.server_errors() == []


@pytest.fixture
def adapter(k8s: KmockCluster) -> Iterator[KubernetesCluster]:
    settings = KubernetesConfig(api_url=k8s.api_url, namespace=k8s.namespace, config_map="multi-region-config")
    with KubernetesCluster(settings) as cluster:
        yield cluster


def replicas(k8s: KmockCluster, name: str) -> int:
    return k8s.deployment(name).spec.replicas


def test_list_uses_configured_selector_by_default(adapter: KubernetesCluster) -> None:
    assert [d.name for d in adapter.list_deployments()] == ["web-a", "web-b"]
    assert [d.name for d in adapter.list_deployments("tier!=web")] == ["db"]
    assert [d.name for d in adapter.list_deployments("")] == ["db", "web-a", "web-b"]
    web_a = adapter.list_deployments("tier=web,app.kubernetes.io/component=microservice")[0]
    assert (web_a.name, web_a.replicas, web_a.ready_replicas, web_a.ready) == ("web-a", 2, 2, True)


def test_scale_touches_only_matching_deployments(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    previous = adapter.scale(WEB, 0)

    assert previous == {"web-a": 2, "web-b": 1}
    assert (replicas(k8s, "web-a"), replicas(k8s, "web-b"), replicas(k8s, "db")) == (0, 0, 3)


def test_scale_twice_is_a_no_op_and_a_mapping_restores(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    previous = adapter.scale(WEB, 4)
    # The fake controller PATCHes status too, so count only the scale subresource.
    scale_patches = len([path for _, path in k8s.requests("PATCH") if path.endswith("/scale")])

    assert adapter.scale(WEB, 4) == {"web-a": 4, "web-b": 4}
    assert len([path for _, path in k8s.requests("PATCH") if path.endswith("/scale")]) == scale_patches == 2

    assert adapter.scale(WEB, previous) == {"web-a": 4, "web-b": 4}
    assert (replicas(k8s, "web-a"), replicas(k8s, "web-b"), replicas(k8s, "db")) == (2, 1, 3)


def test_scale_mapping_with_unknown_name_changes_nothing(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    with pytest.raises(ResourceMissing, match="gone"):
        adapter.scale(WEB, {"web-a": 0, "gone": 0})
    assert replicas(k8s, "web-a") == 2


def test_wait_ready_follows_the_controller(adapter: KubernetesCluster) -> None:
    adapter.scale(WEB, 3)

    assert adapter.wait_ready(WEB, timeout_s=15, poll_s=0.1) == {"web-a": 3, "web-b": 3}


def test_wait_ready_never_passes_on_0_of_0(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    adapter.scale(WEB, 0)
    # The controller agrees at once (ready 0 = desired 0): still nobody serves.
    with pytest.raises(TimeoutError, match=r"web-a \(0/0 ready, scaled to 0\)"):
        adapter.wait_ready(WEB, timeout_s=1.0, poll_s=0.2)
    with pytest.raises(TimeoutError, match="no deployment matches"):
        adapter.wait_ready("tier=nothing", timeout_s=0.2, poll_s=0.1)


def test_wait_ready_times_out_naming_what_is_not_ready(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    k8s.controller.stop()
    adapter.scale("tier=web", 5)
    beats: list[dict] = []

    with pytest.raises(TimeoutError) as err:
        adapter.wait_ready(WEB, timeout_s=0.3, poll_s=0.1, heartbeat=beats.append)

    message = str(err.value)
    assert "web-a (2/5 ready)" in message and "web-b (1/5 ready)" in message
    assert "db" not in message and "tier=web" in message
    assert beats and beats[-1] == {"pending": {"web-a": "2/5", "web-b": "1/5"}}


def test_active_region_patch_keeps_other_keys_and_fences_epochs(
    k8s: KmockCluster, adapter: KubernetesCluster
) -> None:
    k8s.add_config_map("multi-region-config", {"active.region": "us-east-1", "dr.epoch": "3", "log.level": "info"})
    assert adapter.get_active_region() == "us-east-1"

    assert adapter.set_active_region("us-west-2", epoch=4) is True
    assert adapter.set_active_region("us-west-2", epoch=4) is False  # a retried activity

    with pytest.raises(StaleEpochError, match="epoch 4"):
        adapter.set_active_region("us-east-1", epoch=3)  # a stale runbook
    with pytest.raises(StaleEpochError):
        adapter.set_active_region("us-east-1", epoch=4)  # same token, other region

    data = k8s.core.read_namespaced_config_map("multi-region-config", k8s.namespace).data
    assert data == {"active.region": "us-west-2", "dr.epoch": "4", "log.level": "info"}

    assert adapter.set_active_region("us-east-1", epoch=5) is True
    assert adapter.get_active_region() == "us-east-1"


def test_missing_config_map_is_a_clear_error(adapter: KubernetesCluster) -> None:
    with pytest.raises(ResourceMissing, match="multi-region-config"):
        adapter.get_active_region()


def test_job_from_cronjob_is_created_once(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    uid = k8s.add_cron_job("pg-backup")

    assert adapter.create_job_from_cronjob("pg-backup", "pg-backup-dr-1") == "pg-backup-dr-1"
    assert adapter.create_job_from_cronjob("pg-backup", "pg-backup-dr-1") == "pg-backup-dr-1"

    jobs = k8s.batch.list_namespaced_job(k8s.namespace).items
    assert [j.metadata.name for j in jobs] == ["pg-backup-dr-1"]
    job = jobs[0]
    assert job.metadata.annotations["cronjob.kubernetes.io/instantiate"] == "manual"
    [owner] = job.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid, owner.controller) == ("CronJob", "pg-backup", uid, True)
    assert job.spec.template.spec.containers[0].args == ["run", "pg-backup"]
    assert job.spec.template.spec.restart_policy == "Never"


def test_job_status_reads_conditions(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    k8s.add_cron_job("pg-backup")
    adapter.create_job_from_cronjob("pg-backup", "ok")
    adapter.create_job_from_cronjob("pg-backup", "bad")
    assert adapter.job_status("ok") == "running"

    def finish(name: str, condition: str) -> None:
        status = {"conditions": [{"type": condition, "status": "True"}]}
        k8s.batch.patch_namespaced_job_status(name, k8s.namespace, {"status": status})

    finish("ok", "Complete")
    finish("bad", "Failed")
    assert (adapter.job_status("ok"), adapter.job_status("bad")) == ("succeeded", "failed")
    with pytest.raises(ResourceMissing):
        adapter.job_status("never-created")


def config_map(k8s: KmockCluster) -> dict[str, str]:
    return k8s.core.read_namespaced_config_map("multi-region-config", k8s.namespace).data


def test_fence_remembers_replicas_and_a_second_fence_keeps_them(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    k8s.add_config_map("multi-region-config", {"active.region": "us-east-1", "dr.epoch": "3"})

    assert adapter.fence_scale_down(epoch=3) == {"web-a": 2, "web-b": 1}
    # A retried activity, or a worker restarted after the scale: the count must not become 0.
    assert adapter.fence_scale_down(epoch=3) == {"web-a": 0, "web-b": 0}

    assert (replicas(k8s, "web-a"), replicas(k8s, "web-b"), replicas(k8s, "db")) == (0, 0, 3)
    assert adapter.remembered_replicas() == {"web-a": 2, "web-b": 1}
    assert config_map(k8s)[REPLICAS_KEY_PREFIX + "web-a"] == "2"


def test_fence_with_a_lower_epoch_changes_nothing(k8s: KmockCluster, adapter: KubernetesCluster) -> None:
    k8s.add_config_map("multi-region-config", {"active.region": "us-east-1", "dr.epoch": "5"})

    with pytest.raises(StaleEpochError, match="epoch 5"):
        adapter.fence_scale_down(epoch=4)

    assert (replicas(k8s, "web-a"), replicas(k8s, "web-b")) == (2, 1)
    assert adapter.remembered_replicas() == {}


def test_restore_prefers_requested_then_remembered_then_fallback_then_one(
    k8s: KmockCluster, adapter: KubernetesCluster
) -> None:
    k8s.add_deployment("web-c", labels={"app.kubernetes.io/component": "microservice"}, replicas=4)
    k8s.add_deployment("web-d", labels={"app.kubernetes.io/component": "microservice"}, replicas=1)
    k8s.add_config_map("multi-region-config", {"active.region": "us-east-1", "dr.epoch": "1"})
    adapter.fence_scale_down(epoch=1)
    # Forget two of them, as if they were never fenced here.
    k8s.core.patch_namespaced_config_map("multi-region-config", k8s.namespace, {"data": {
        REPLICAS_KEY_PREFIX + "web-b": None, REPLICAS_KEY_PREFIX + "web-d": None}})

    restored = adapter.restore_replicas(fallback={"web-b": 5, "web-a": 9}, explicit={"web-c": 3})

    assert restored == {"web-a": (2, "remembered at fence"), "web-b": (5, "from the other region"),
                        "web-c": (3, "requested"), "web-d": (1, "no recorded count")}
    assert [replicas(k8s, n) for n in ("web-a", "web-b", "web-c", "web-d", "db")] == [2, 5, 3, 1, 3]
    # Used counts are forgotten; a second call (a retry) changes nothing.
    assert adapter.remembered_replicas() == {}
    assert adapter.restore_replicas(fallback={"web-b": 5}) == {}
    # Ready counts can run ahead of a scale-down for a moment (pods still terminating): at least
    # what each deployment asks for is what "ready" means.
    want = {"web-a": 2, "web-b": 5, "web-c": 3, "web-d": 1}
    ready = adapter.wait_ready(None, timeout_s=15, poll_s=0.2)
    assert set(ready) == set(want) and all(ready[n] >= want[n] for n in want), ready
