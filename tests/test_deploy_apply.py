"""``eagle-dr deploy`` against a Kubernetes API (kmock, through the real client): server-side apply,
idempotent, a dry run that writes nothing, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client
from typer.testing import CliRunner

from eagle_dr.cli import app

from tests.kmock_cluster import kmock_cluster

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


@pytest.fixture
def k8s():
    with kmock_cluster(controller=False) as cluster:
        yield cluster


@pytest.fixture
def config_path(k8s, tmp_path, monkeypatch) -> Path:
    """The config deploy/ ships, with us-east-1's cluster at the emulator."""
    raw = yaml.safe_load((ROOT / "deploy" / "base" / "eagle-dr.yaml").read_text())
    for r in raw["regions"]:
        if r["name"] == REGION:
            r["kubernetes"] = {"api_url": k8s.api_url, "namespace": k8s.namespace}
    p = tmp_path / "eagle-dr.yaml"
    p.write_text(yaml.safe_dump(raw))
    # The CLI's -c exports EAGLE_DR_CONFIG for the processes it starts; in-process, that would
    # outlive the test. monkeypatch puts the original back.
    monkeypatch.setenv("EAGLE_DR_CONFIG", str(p))
    return p


def _deploy(config_path: Path, *args: str, ok: bool = True):
    """The command in-process (typer's runner): a subprocess pays the CLI's imports per call."""
    # rich wraps at the terminal's width; the diff lines are asserted whole.
    r = CliRunner().invoke(app, ["-c", str(config_path), "deploy", *args], env={"COLUMNS": "200"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    r.returncode = r.exit_code
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def _writes(k8s) -> list[tuple[str, str]]:
    return [r for r in k8s.requests() if r[0] in WRITES]


def test_apply_creates_everything_then_a_second_apply_changes_nothing(k8s, config_path):
    first = _deploy(config_path, "--region", REGION)
    assert f"{REGION}: 20 created, 0 updated, 0 unchanged" in first.stdout, first.stdout
    writes = _writes(k8s)
    # Every object went in as a server-side apply under eagle-dr's field manager.
    assert len(writes) == 20 and {m for m, _ in writes} == {"PATCH"}
    dep = k8s.apps.read_namespaced_deployment("eagle-dr-worker", k8s.namespace)
    assert dep.spec.template.spec.containers[0].args == ["worker", "--region", REGION]
    assert dep.metadata.labels["eagle-dr.io/region"] == REGION
    rules = client.RbacAuthorizationV1Api(k8s.api_client).read_namespaced_role("eagle-dr-worker", k8s.namespace).rules
    assert [(r.resources, r.verbs) for r in rules][1] == (["deployments/scale"], ["get", "patch"])

    again = _deploy(config_path, "--region", REGION)
    assert f"{REGION}: 0 created, 0 updated, 20 unchanged" in again.stdout, again.stdout
    assert _writes(k8s) == writes, "the second deploy wrote to the cluster"


def test_dry_run_prints_the_diff_and_changes_nothing(k8s, config_path):
    fresh = _deploy(config_path, "--region", REGION, "--dry-run")
    assert "would create: Deployment/eagle-dr-worker" in fresh.stdout
    assert "+++ deploy: Deployment/eagle-dr/eagle-dr-worker" not in fresh.stdout  # namespace is eagle-alert
    assert "+++ deploy: Deployment/eagle-alert/eagle-dr-worker" in fresh.stdout
    assert f"{REGION}: 20 to create, 0 to update, 0 unchanged (dry run: nothing changed)" in fresh.stdout
    assert _writes(k8s) == []

    _deploy(config_path, "--region", REGION)
    # A hand edit the next deploy will undo: the dry run shows it and leaves it.
    k8s.apps.patch_namespaced_deployment("eagle-dr-control", k8s.namespace, {"spec": {"replicas": 5}})
    before = _writes(k8s)
    dry = _deploy(config_path, "--region", REGION, "--dry-run")
    assert "would update: Deployment/eagle-dr-control" in dry.stdout, dry.stdout
    assert "-  replicas: 5\n+  replicas: 2\n" in dry.stdout, dry.stdout
    assert f"{REGION}: 0 to create, 1 to update, 19 unchanged" in dry.stdout
    assert _writes(k8s) == before
    assert k8s.apps.read_namespaced_deployment("eagle-dr-control", k8s.namespace).spec.replicas == 5

    fixed = _deploy(config_path, "--region", REGION)
    assert "updated: Deployment/eagle-dr-control" in fixed.stdout
    assert k8s.apps.read_namespaced_deployment("eagle-dr-control", k8s.namespace).spec.replicas == 2
    assert len(_writes(k8s)) == len(before) + 1


def test_a_bad_region_is_a_clear_error(k8s, config_path, tmp_path):
    r = _deploy(config_path, "--region", "eu-north-9", ok=False)
    assert r.returncode == 2
    assert "eu-north-9" in r.stderr and "us-east-1" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # A configured region whose overlay is missing names what is there.
    (tmp_path / "deploy" / "overlays" / "us-west-2").mkdir(parents=True)
    (tmp_path / "deploy" / "overlays" / "us-west-2" / "kustomization.yaml").write_text("resources: []\n")
    r = _deploy(config_path, "--region", REGION, "--dir", str(tmp_path / "deploy"), ok=False)
    assert r.returncode == 2
    assert "no overlay for region 'us-east-1'" in r.stderr and "have: us-west-2" in r.stderr, r.stderr
    assert _writes(k8s) == []


def test_an_unreachable_cluster_is_one_line(tmp_path, monkeypatch):
    raw = yaml.safe_load((ROOT / "deploy" / "base" / "eagle-dr.yaml").read_text())
    raw["regions"][0]["kubernetes"] = {"api_url": "http://127.0.0.1:9"}  # discard port: refused
    p = tmp_path / "eagle-dr.yaml"
    p.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("EAGLE_DR_CONFIG", str(p))
    r = _deploy(p, "--region", REGION, "--dry-run", ok=False)
    assert r.returncode == 1
    assert "Kubernetes API is not reachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
