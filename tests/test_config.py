"""Config validation: every class of bad input is refused with the file, field and reason."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from eagle_dr.config import DEFAULT_CONFIG, ConfigError, load_config


def base() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def write(tmp_path: Path, doc) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def problems(tmp_path, doc, env=None) -> str:
    p = write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_config(p, env=env or {})
    msg = str(e.value)
    assert str(p) in msg, "the error must name the file"
    return msg


def test_default_config_is_valid():
    cfg = load_config(DEFAULT_CONFIG, env={})
    assert cfg.primary.name == "us-east-1"
    assert cfg.secondary.name == "us-west-2"
    assert cfg.health.timeout == timedelta(seconds=30)
    assert cfg.health.interval == timedelta(seconds=10)
    assert cfg.health.failure_threshold == 3
    assert cfg.objectives.critical.rto == timedelta(minutes=5)
    assert cfg.objectives.critical.rpo == timedelta(seconds=30)
    assert cfg.objectives.non_critical.rto == timedelta(minutes=15)
    assert cfg.objectives.cache.rpo == timedelta(minutes=15)
    assert cfg.objectives.full_recovery == timedelta(minutes=30)
    assert cfg.backup.every == timedelta(minutes=15)
    assert cfg.backup.retention == timedelta(days=30)
    assert cfg.conflicts["alerts"].strategy == "last-write-wins"
    # Secret references are resolved relative to the lab state dir, never stored as values.
    assert cfg.primary.redis.password.file.endswith("/.eagle-dr/secrets/redis-password")


def test_duplicate_region(tmp_path):
    doc = base()
    doc["regions"][1]["name"] = "us-east-1"
    msg = problems(tmp_path, doc)
    assert "regions[1].name" in msg and "duplicate region 'us-east-1'" in msg


def test_missing_primary(tmp_path):
    doc = base()
    doc["regions"][0]["role"] = "secondary"
    assert "no region has role 'primary'" in problems(tmp_path, doc)


def test_two_primaries(tmp_path):
    doc = base()
    doc["regions"][1]["role"] = "primary"
    assert "more than one primary: us-east-1, us-west-2" in problems(tmp_path, doc)


def test_unknown_region_referenced(tmp_path):
    doc = base()
    doc["conflicts"]["subscriptions"]["source_region"] = "eu-west-9"
    msg = problems(tmp_path, doc)
    assert "conflicts.subscriptions.source_region" in msg and "unknown region 'eu-west-9'" in msg


def test_unknown_region_in_field_priority(tmp_path):
    doc = base()
    doc["conflicts"]["alert_rules"]["field_priority"]["threshold"] = ["us-east-1", "mars-1"]
    assert "conflicts.alert_rules.field_priority.threshold: unknown region 'mars-1'" in problems(tmp_path, doc)


@pytest.mark.parametrize("value", [0, -1])
def test_threshold_must_be_positive(tmp_path, value):
    doc = base()
    doc["health"]["failure_threshold"] = value
    msg = problems(tmp_path, doc)
    assert "health.failure_threshold" in msg and "greater than 0" in msg


@pytest.mark.parametrize("value", ["15x", "fast", "", "5 minutes"])
def test_malformed_duration(tmp_path, value):
    doc = base()
    doc["backup"]["every"] = value
    msg = problems(tmp_path, doc)
    assert "backup.every" in msg and "malformed duration" in msg


def test_zero_health_timeout(tmp_path):
    doc = base()
    doc["health"]["timeout"] = "0s"
    assert "health.timeout: must be greater than 0" in problems(tmp_path, doc)


def test_unknown_field_is_refused(tmp_path):
    doc = base()
    doc["regions"][0]["postgres"]["prot"] = 5432
    assert "regions[0].postgres.prot: unknown field" in problems(tmp_path, doc)


def test_literal_secret_is_refused(tmp_path):
    doc = base()
    doc["regions"][0]["redis"]["password"] = "hunter2"
    msg = problems(tmp_path, doc)
    assert "regions[0].redis.password" in msg
    assert "hunter2" not in msg.split("password", 1)[1].split("\n")[0] or "valid dictionary" in msg


def test_strategy_needs_its_parameter(tmp_path):
    doc = base()
    del doc["conflicts"]["metrics_snapshots"]["ttl"]
    assert "conflicts.metrics_snapshots: strategy 'freshness-priority' needs 'ttl'" in problems(tmp_path, doc)


def test_bad_port(tmp_path):
    doc = base()
    doc["regions"][1]["postgres"]["port"] = 70000
    assert "regions[1].postgres.port" in problems(tmp_path, doc)


def test_malformed_yaml(tmp_path):
    msg = problems(tmp_path, "regions: [\n  - name: a\n    role: primary\n  bad")
    assert "malformed YAML" in msg and "line" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml", env={})
    assert "nope.yaml" in str(e.value) and "cannot read file" in str(e.value)


def test_env_overrides(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, env={"PRIMARY_REGION": "us-west-2", "SECONDARY_REGION": "us-east-1",
                                           "NAMESPACE": "eagle-prod", "RTO_TARGET": "2m", "RPO_TARGET": "10s"})
    assert cfg.primary.name == "us-west-2" and cfg.secondary.name == "us-east-1"
    assert {r.kubernetes.namespace for r in cfg.regions} == {"eagle-prod"}
    assert cfg.objectives.critical.rto == timedelta(minutes=2)
    assert cfg.objectives.critical.rpo == timedelta(seconds=10)


def test_env_unknown_region(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, env={"PRIMARY_REGION": "eu-central-1"})
    assert "env PRIMARY_REGION: unknown region 'eu-central-1'" in str(e.value)


def test_env_malformed_target(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, env={"RTO_TARGET": "15x"})
    assert "objectives.critical.rto" in str(e.value) and "malformed duration '15x'" in str(e.value)


def test_cli_validate_exit_code_and_message(tmp_path):
    doc = base()
    doc["health"]["interval"] = "10q"
    p = write(tmp_path, doc)
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "config", "validate", str(p)],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert r.returncode == 2
    assert str(p) in r.stderr and "health.interval" in r.stderr and "malformed duration '10q'" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "config", "validate", str(DEFAULT_CONFIG)],
                        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert ok.returncode == 0, ok.stderr
    assert "primary us-east-1" in ok.stdout


def test_nothing_starts_on_invalid_config(tmp_path):
    doc = base()
    doc["regions"][0]["role"] = "secondary"
    p = write(tmp_path, doc)
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(p), "lab", "up"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert r.returncode == 2
    assert "no region has role 'primary'" in r.stderr
    assert not (tmp_path / ".eagle-dr").exists()


def test_unknown_survivor_rule(tmp_path):
    doc = base()
    doc["split_brain"] = {"survivor_rule": "loudest"}
    msg = problems(tmp_path, doc)
    assert "split_brain.survivor_rule" in msg and "active-region" in msg
