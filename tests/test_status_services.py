"""`eagle-dr status` finds services a stopped move left scaled to 0: the real lab for PostgreSQL
and Redis, one kmock API server per region (the real kubernetes client over HTTP) for the
clusters, the scale-down done by the runbooks' own adapter as a fence does it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from activities.kubernetes import KubernetesCluster
from eagle_dr.config import load_config
from eagle_dr.status import collect
from tests.kmock_cluster import kmock_cluster
from tests.lab_helpers import _names, _primary

LABELS = {"app.kubernetes.io/component": "microservice"}
CM = "multi-region-config"


def _config_file(lab_config_path: Path, tmp_path: Path, urls: dict[str, str]) -> Path:
    doc = yaml.safe_load(lab_config_path.read_text())
    for r in doc["regions"]:
        r.setdefault("kubernetes", {})["api_url"] = urls[r["name"]]
    doc["routing"]["kubernetes"] = True
    path = tmp_path / "eagle-dr.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _status_cli(lab, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(path), "status"],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "400", "EAGLE_DR_STATE_DIR": lab.cfg.lab.state_dir})


def test_status_names_services_left_scaled_to_0_in_the_serving_region(lab, lab_config_path, tmp_path):
    a, b = _names(lab)
    assert _primary(lab) == a
    with kmock_cluster() as east, kmock_cluster() as west:
        # a serves (alert-api 3, alert-worker 2); b is the standby region, at 0 as a fence leaves it.
        for k8s, (api, worker) in ((east, (3, 2)), (west, (0, 0))):
            k8s.add_deployment("alert-api", labels=LABELS, replicas=api)
            k8s.add_deployment("alert-worker", labels=LABELS, replicas=worker)
            k8s.add_deployment("unrelated", labels={"app": "other"}, replicas=0)
            k8s.add_config_map(CM, {"active.region": a, "dr.epoch": "0"})
        path = _config_file(lab_config_path, tmp_path, {a: east.api_url, b: west.api_url})
        cfg = load_config(path, env={})

        st = collect(cfg)
        assert st.move_running is False
        # By name: the regions are listed in config order, and a is whichever serves now.
        serving = next(r for r in st.regions if r.name == a)
        assert serving.services.replicas == {"alert-api": 3, "alert-worker": 2}  # the selector holds
        assert st.left_scaled_to_0 == [] and st.leftovers == []  # the standby region at 0 is normal
        r = _status_cli(lab, path)
        assert r.returncode == 0, r.stderr + r.stdout
        assert "LEFT SCALED TO 0" not in r.stdout

        # A move stopped right after fencing: a's services scaled to 0, counts remembered, nothing routed.
        with KubernetesCluster(cfg.region(a).kubernetes) as k8s:
            assert k8s.fence_scale_down(epoch=1) == {"alert-api": 3, "alert-worker": 2}
        st = collect(cfg)
        assert len(st.left_scaled_to_0) == 1, st.left_scaled_to_0
        left = st.left_scaled_to_0[0]
        assert left.startswith(f"{a}: services at 0 replicas") and "alert-api, alert-worker" in left
        assert "kubectl -n eagle-alert scale deployment/alert-api --replicas=3" in left
        assert "deployment/alert-worker --replicas=2" in left
        r = _status_cli(lab, path)
        # Degraded: exit 1, and the verdict line names what was left.
        assert r.returncode == 1, r.stderr + r.stdout
        assert f"DEGRADED: left scaled to 0: {a}: services at 0 replicas" in r.stdout, r.stdout
        assert f"LEFT SCALED TO 0: {a}: services at 0 replicas" in r.stdout

        # Restored (what routing back does): nothing is left.
        with KubernetesCluster(cfg.region(a).kubernetes) as k8s:
            k8s.restore_replicas()
        assert collect(cfg).left_scaled_to_0 == []
        assert _status_cli(lab, path).returncode == 0
