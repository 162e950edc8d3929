"""deploy/: the Kustomize manifests, rendered per region and checked against the Kubernetes API's
models (the pydantic models of the ``kubernetes`` client, which forbid unknown fields and require
the required ones), activities/rbac.md, the config they ship, and what each component needs."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from eagle_dr.config import load_config
from eagle_dr.kustomize import KustomizeError, render

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REGIONS = [r.name for r in load_config(ROOT / "config" / "eagle-dr.yaml").regions]
MODELS = {
    "ServiceAccount": client.V1ServiceAccount,
    "Role": client.V1Role,
    "RoleBinding": client.V1RoleBinding,
    "ConfigMap": client.V1ConfigMap,
    "Service": client.V1Service,
    "Deployment": client.V1Deployment,
    "NetworkPolicy": client.V1NetworkPolicy,
    "PodDisruptionBudget": client.V1PodDisruptionBudget,
}
COMPONENTS = {"eagle-dr-worker", "eagle-dr-control", "eagle-dr-alerts", "eagle-dr-codec"}


def _by_key(objs) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _of(objs, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _config_of(objs, tmp_path: Path):
    (cm,) = _of(objs, "ConfigMap").values()
    f = tmp_path / "eagle-dr.yaml"
    f.write_text(cm["data"]["eagle-dr.yaml"])
    return load_config(f, env={})


def _prune(x):
    if isinstance(x, dict):
        return {k: _prune(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_prune(v) for v in x]
    return x


def test_every_config_region_has_an_overlay():
    assert sorted(p.name for p in (DEPLOY / "overlays").iterdir()) == sorted(REGIONS)


@pytest.mark.parametrize("region", REGIONS)
def test_python_renderer_matches_kubectl_kustomize(region):
    # kubectl is on this project's machine image, so CI compares for real; the skip is for a
    # machine without it (eagle-dr deploy never needs it: it uses eagle_dr/kustomize.py).
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the Python renderer is checked by the other tests only")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / region)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    theirs = _by_key(o for o in yaml.safe_load_all(out) if o)
    mine = _by_key(render(DEPLOY / "overlays" / region))
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        assert mine[key] == theirs[key], key


@pytest.mark.parametrize("region", REGIONS)
def test_objects_are_valid_kubernetes_api_objects(region):
    api = client.ApiClient()
    objs = render(DEPLOY / "overlays" / region)
    assert {o["kind"] for o in objs} == set(MODELS)
    for o in objs:
        # Unknown (misspelt) fields are rejected and required ones enforced by the models; the
        # round trip also catches a value the model would coerce into something else.
        model = MODELS[o["kind"]].model_validate(o)
        assert _prune(api.sanitize_for_serialization(model)) == o, (o["kind"], o["metadata"]["name"])
        assert o["metadata"]["namespace"] == "eagle-alert"
        assert o["metadata"]["labels"]["eagle-dr.io/region"] == region


def test_the_model_check_catches_a_typo_and_a_missing_field():
    dep = copy.deepcopy(_of(render(DEPLOY / "overlays" / REGIONS[0]), "Deployment")["eagle-dr-worker"])
    typo = copy.deepcopy(dep)
    c = typo["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(Exception, match="readinesProbe"):
        client.V1Deployment.model_validate(typo)
    del dep["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(Exception, match="name"):
        client.V1Deployment.model_validate(dep)


@pytest.mark.parametrize("region", REGIONS)
def test_deployments_run_the_right_commands_with_probes_resources_and_ports_from_the_config(region, tmp_path):
    objs = render(DEPLOY / "overlays" / region)
    cfg = _config_of(objs, tmp_path)
    deps = _of(objs, "Deployment")
    assert set(deps) == COMPONENTS
    args = {name: d["spec"]["template"]["spec"]["containers"][0]["args"] for name, d in deps.items()}
    assert args["eagle-dr-worker"] == ["worker", "--region", region]
    assert args["eagle-dr-control"] == ["worker", "--control"]
    assert args["eagle-dr-alerts"] == ["alerts", "serve"]
    assert args["eagle-dr-codec"][0] == "codec-server"
    metrics_port = {
        "eagle-dr-worker": cfg.region(region).temporal.metrics_port,
        "eagle-dr-control": cfg.temporal.metrics_port,
        "eagle-dr-alerts": cfg.alerts.metrics_port,
    }
    assert cfg.temporal.metrics_host == "0.0.0.0" and cfg.alerts.listen.host == "0.0.0.0"
    for name, d in deps.items():
        pod = d["spec"]["template"]
        assert d["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert d["spec"]["replicas"] >= 2
        for c in pod["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] in ports, (name, probe)
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
            assert c["resources"]["limits"]["memory"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            if name in metrics_port:
                assert ports["metrics"] == metrics_port[name], name
                assert c["readinessProbe"]["httpGet"]["path"] == "/metrics"
                assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
                assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port[name])
        if name == "eagle-dr-alerts":
            assert ports["webhook"] == cfg.alerts.listen.port
    # Only the regional worker holds an API token; the others mount none.
    for name, d in deps.items():
        spec = d["spec"]["template"]["spec"]
        assert (spec["serviceAccountName"] == "eagle-dr-worker") == (name == "eagle-dr-worker")
        assert spec.get("automountServiceAccountToken", True) is (name == "eagle-dr-worker")


@pytest.mark.parametrize("region", REGIONS)
def test_the_deployed_config_encrypts_and_verifies_every_cross_region_link(region, tmp_path):
    """The seed: all cross-region communication encrypted, replication over TLS. PostgreSQL with
    verify-full and Redis (with its Sentinels) over TLS, each against the CA in the Secret."""
    cfg = _config_of(render(DEPLOY / "overlays" / region), tmp_path)
    for r in cfg.regions:
        assert r.postgres.sslmode == "verify-full" and r.postgres.sslrootcert == "/etc/eagle-dr/secrets/ca.crt", r.name
        assert r.redis.tls and r.redis.ca_file == "/etc/eagle-dr/secrets/ca.crt", r.name
        assert r.redis.tls_kwargs["ssl_check_hostname"] is True
        assert r.s3.ca_file is None and not (r.s3.endpoint_url or "https://").startswith("http://"), r.name


@pytest.mark.parametrize("region", REGIONS)
def test_secrets_are_mounted_files_never_inline(region, tmp_path):
    objs = render(DEPLOY / "overlays" / region)
    assert not [o for o in objs if o["kind"] == "Secret"]
    cfg = _config_of(objs, tmp_path)
    refs = re.findall(r"\{file: ([^}]+)\}", _of(objs, "ConfigMap").popitem()[1]["data"]["eagle-dr.yaml"])
    assert refs and all(r.startswith("/etc/eagle-dr/secrets/") for r in refs)
    assert "{env:" not in yaml.safe_dump(objs)
    assert cfg.alerts.token.file == "/etc/eagle-dr/secrets/alerts-token"
    for name, d in _of(objs, "Deployment").items():
        spec = d["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["secrets"]["secret"]["secretName"] == "eagle-dr-secrets"
        assert vols["secrets"]["secret"]["defaultMode"] == 0o400
        assert vols["config"]["configMap"]["name"] == _of(objs, "ConfigMap").popitem()[0]
        for c in spec["containers"]:
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["secrets"] == {"name": "secrets", "mountPath": "/etc/eagle-dr/secrets", "readOnly": True}
            for e in c["env"]:
                # Plain values only for non-secrets: every env value is a path, an address or a name.
                assert "valueFrom" not in e and not re.search(r"(?i)pass|token|key|secret", e["name"]), e


def _rbac_md() -> list[dict]:
    text = (ROOT / "activities" / "rbac.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return [o for o in yaml.safe_load_all(block) if o]


@pytest.mark.parametrize("region", REGIONS)
def test_rbac_is_exactly_activities_rbac_md(region):
    objs = _by_key(render(DEPLOY / "overlays" / region))
    for want in _rbac_md():
        got = copy.deepcopy(objs[(want["kind"], want["metadata"]["name"])])
        got["metadata"].pop("labels")
        assert got == want
    assert not [k for k in objs if k[0] in ("ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize("region", REGIONS)
def test_network_policies_allow_only_the_needed_flows(region):
    objs = render(DEPLOY / "overlays" / region)
    pols = _of(objs, "NetworkPolicy")
    deny = pols.pop("eagle-dr-default-deny")
    assert deny["spec"] == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "eagle-dr"}},
                            "policyTypes": ["Ingress", "Egress"]}
    assert set(pols) == COMPONENTS
    for name, p in pols.items():
        assert p["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
        assert p["spec"]["policyTypes"] == ["Ingress", "Egress"]

    def ports(rules):
        return {pt["port"] for r in rules for pt in r["ports"]}

    def peers(rules):
        return [(r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                 r["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], r["ports"][0]["port"])
                for r in rules]

    worker = pols["eagle-dr-worker"]["spec"]
    assert ports(worker["egress"]) == {53, 5432, 6379, 26379, 8432, 443, 6443, 7233}
    (stores,) = [r for r in worker["egress"] if 5432 in {pt["port"] for pt in r["ports"]}]
    # Both regions' data stores: fencing and promotion cross regions; nothing else may reach them.
    assert [t["ipBlock"]["cidr"] for t in stores["to"]] == ["10.1.0.0/16", "10.2.0.0/16"]
    assert peers(worker["ingress"]) == [("monitoring", "prometheus", "metrics")]
    assert ports(pols["eagle-dr-control"]["spec"]["egress"]) == {53, 7233}
    assert peers(pols["eagle-dr-alerts"]["spec"]["ingress"]) == [("monitoring", "alertmanager", "webhook"),
                                                                 ("monitoring", "prometheus", "metrics")]
    assert ports(pols["eagle-dr-alerts"]["spec"]["egress"]) == {53, 7233}
    assert peers(pols["eagle-dr-codec"]["spec"]["ingress"]) == [("temporal", "temporal-ui", "codec")]
    assert ports(pols["eagle-dr-codec"]["spec"]["egress"]) == {53}
    # Every named port a policy opens exists on the pods it selects.
    deps = _of(objs, "Deployment")
    for name, p in pols.items():
        named = {pt["name"] for c in deps[name]["spec"]["template"]["spec"]["containers"] for pt in c["ports"]}
        for r in p["spec"]["ingress"]:
            assert {pt["port"] for pt in r["ports"]} <= named, name


@pytest.mark.parametrize("region", REGIONS)
def test_a_disruption_budget_per_component(region):
    objs = render(DEPLOY / "overlays" / region)
    pdbs = _of(objs, "PodDisruptionBudget")
    deps = _of(objs, "Deployment")
    assert set(pdbs) == COMPONENTS
    for name, pdb in pdbs.items():
        assert pdb["spec"]["minAvailable"] == 1 < deps[name]["spec"]["replicas"]
        assert pdb["spec"]["selector"] == deps[name]["spec"]["selector"]


def test_prometheus_scrape_job(tmp_path):
    doc = yaml.safe_load((DEPLOY / "prometheus" / "scrape-eagle-dr.yml").read_text())
    (job,) = doc["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["eagle-alert"]}}]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    # Debian's Prometheus is built without Kubernetes service discovery, so promtool rejects
    # kubernetes_sd_configs; everything else (the relabelling and its regexes) it checks with
    # static targets in its place.
    job["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
    del job["kubernetes_sd_configs"]
    checked = tmp_path / "scrape.yml"
    checked.write_text(yaml.safe_dump(doc))
    res = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonLabels"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap, name: nope}\n    patch: '[]'\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(KustomizeError, match="matches no object"):
        render(tmp_path)
