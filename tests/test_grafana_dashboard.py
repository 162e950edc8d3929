"""The shipped Grafana dashboard queries only metrics eagle-dr exports (or its recording rules):
a renamed metric must not leave a panel silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _exported() -> set[str]:
    src = (ROOT / "eagle_dr" / "metrics.py").read_text()
    names = {f"eagle_dr_{n}" for n in re.findall(r'"([a-z_]+)"', src)}
    names |= {f"eagle_dr_last_{w}_{k}" for w in ("rto", "rpo") for k in ("met", "unknown")}
    # Histograms are exported as _bucket, _sum and _count series.
    names |= {f"{n}_{s}" for n in set(names) for s in ("bucket", "sum", "count")}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    names |= {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    return names


def test_every_panel_queries_an_exported_metric():
    dash = json.loads((ROOT / "deploy" / "grafana" / "eagle-dr.json").read_text())
    exported = _exported()
    queried = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            used = set(re.findall(r"eagle_dr[_:][a-z_:]+", t["expr"]))
            assert used, (panel["title"], t["expr"])
            queried |= used
    assert not queried - exported, sorted(queried - exported)
    # The seed's metrics each have a panel: lag, cross-region latency, availability, moves, conflicts.
    for needed in ("eagle_dr_replication_lag_bytes", "eagle_dr_probe_latency_seconds", "eagle_dr_region_available",
                   "eagle_dr_runbook_runs_total", "eagle_dr_conflicts_total", "eagle_dr_readiness"):
        assert needed in queried, needed
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
