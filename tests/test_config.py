"""Config validation: every class of bad input is refused with the file, field and reason."""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from activities.postgres.status import pg_status
from eagle_dr.config import DEFAULT_CONFIG, ConfigError, PostgresConfig, SecretRef, TableName, load_config, scrub


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
    # (In the lab's state dir: the checkout's .eagle-dr, or where root moves it when the lab
    # user cannot enter the checkout, as under /root.)
    assert cfg.primary.redis.password.file == f"{cfg.lab.state_dir}/secrets/redis-password"
    assert cfg.lab.state_dir.endswith("/.eagle-dr") or "/eagle-dr-lab/" in cfg.lab.state_dir


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


def test_unknown_region_in_lab_netns(tmp_path):
    doc = base()
    doc["lab"]["netns"] = {"us-east-1": "edr-a", "mars-1": "edr-m"}
    assert "lab.netns.mars-1: unknown region 'mars-1'" in problems(tmp_path, doc)


@pytest.mark.parametrize("value", ["0s", "-5s"])
def test_self_fence_after_must_be_positive_or_null(tmp_path, value):
    doc = base()
    doc["health"]["self_fence_after"] = value
    assert "health.self_fence_after" in problems(tmp_path, doc)
    doc["health"]["self_fence_after"] = None
    cfg = load_config(write(tmp_path, doc), env={})
    assert cfg.health.self_fence_wait_seconds() is None and cfg.health.self_fence_check_seconds() is None


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


@pytest.mark.parametrize("url,why", [
    ("http://s3.internal:9000", "is plain HTTP: pgBackRest, which keeps a repo in every region's bucket, speaks only "
                                "HTTPS to S3"),
    ("s3.internal:9000", "is not an https URL"),
])
def test_s3_endpoint_must_be_https(tmp_path, url, why):
    """pgBackRest (Debian's 2.45) speaks only HTTPS to S3: an http endpoint was accepted, and
    every backup and WAL push to it failed its TLS handshake after minutes of retries."""
    doc = base()
    doc["regions"][1]["s3"]["endpoint_url"] = url
    msg = problems(tmp_path, doc)
    assert "regions[1].s3.endpoint_url" in msg and why in msg, msg


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


# -- item 15: what PostgreSQL, the runbooks and the report cannot work with ------------------------


@pytest.mark.parametrize("table, why", [
    ("alerts; drop table alerts", "not a valid identifier"),
    ("Al erts", "not a valid identifier"),
    ("1alerts", "not a valid identifier"),
    ("a" * 64, "at most 63 bytes"),
    ("app.billing.invoices", "expected 'table' or 'schema.table'"),
    (".alerts", "schema '' is not a valid identifier"),
])
def test_conflict_table_must_be_an_identifier(tmp_path, table, why):
    doc = base()
    doc["conflicts"] = {table: {"strategy": "last-write-wins"}}
    msg = problems(tmp_path, doc)
    assert f"conflicts.{table}:" in msg and why in msg, msg


def test_catalog_names_parse_where_config_keys_must_be_identifiers():
    """A consistency check lists every table as the catalog names it; its sync, its follow-up
    check and recover-rows name them back, so a dash or a space parses there (always quoted).
    The config's conflicts: keys stay identifiers; '.' and '"' are refused everywhere."""
    t = TableName.parse("billing-eu.line items", catalog=True)
    assert (t.schema_name, t.name) == ("billing-eu", "line items")
    assert t.identifier == sql.Identifier("billing-eu", "line items")
    with pytest.raises(ValueError, match="not a valid identifier"):
        TableName.parse("billing-eu.line items")
    for bad in ('a.b.c', 'public.x"y', "public.", "a" * 64):
        with pytest.raises(ValueError):
            TableName.parse(bad, catalog=True)


@pytest.mark.parametrize("field, value", [
    ("key", ["id", "tenant id"]),
    ("timestamp_column", "updated_at\"; --"),
    ("field_priority", {"thres-hold": ["us-east-1"]}),
])
def test_conflict_columns_must_be_identifiers(tmp_path, field, value):
    doc = base()
    doc["conflicts"]["alert_rules"][field] = value
    msg = problems(tmp_path, doc)
    assert f"conflicts.alert_rules.{field}" in msg and "not a valid identifier" in msg, msg


def test_schema_qualified_and_mixed_case_tables(tmp_path):
    doc = base()
    doc["conflicts"] = {"Billing.Invoices": {"strategy": "last-write-wins", "key": ["InvoiceId"]},
                        "Alerts": {"strategy": "last-write-wins"}}
    cfg = load_config(write(tmp_path, doc), env={})
    t = cfg.conflict_table("Billing.Invoices")
    assert (t.schema_name, t.name, str(t)) == ("Billing", "Invoices", "Billing.Invoices")
    assert t.identifier == sql.Identifier("Billing", "Invoices")
    assert cfg.conflict_table("Alerts").identifier == sql.Identifier("Alerts")


@pytest.mark.parametrize("slot", ["Slot_A", "slot-a", "", "s" * 64, "slot a"])
def test_slot_names_postgres_rejects(tmp_path, slot):
    doc = base()
    doc["regions"][0]["postgres"]["slot"] = slot
    msg = problems(tmp_path, doc)
    assert "regions[0].postgres.slot" in msg and "replication slot name" in msg, msg


def test_derived_slot_name_is_one_postgres_accepts(tmp_path):
    doc = base()
    del doc["regions"][0]["postgres"]["slot"]
    doc["regions"][0]["postgres"]["host"] = "DB-1.us-east-1.example.com"
    slot = load_config(write(tmp_path, doc), env={}).region("us-east-1").postgres.slot_name
    assert re.fullmatch(r"[a-z0-9_]{1,63}", slot), slot


@pytest.mark.parametrize("system", ["postgres", "redis"])
def test_two_regions_on_one_server(tmp_path, system):
    doc = base()
    doc["regions"][1][system]["port"] = doc["regions"][0][system]["port"]
    doc["regions"][1][system]["host"] = doc["regions"][0][system]["host"].upper()
    msg = problems(tmp_path, doc)
    assert f"regions[1].{system}:" in msg and f"also us-east-1's {system}" in msg, msg


def test_more_than_two_regions(tmp_path):
    doc = base()
    third = copy.deepcopy(doc["regions"][1])
    third.update(name="eu-west-1")
    third["postgres"].update(port=15403, slot="slot_eu_west_1")
    third["redis"]["port"] = 16303
    third["temporal"]["task_queue"] = "eagle-dr-eu-west-1"
    doc["regions"].append(third)
    msg = problems(tmp_path, doc)
    assert "regions: 3 regions configured (us-east-1, us-west-2, eu-west-1)" in msg
    assert "support exactly two" in msg
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "config", "validate", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    assert r.returncode == 2 and "support exactly two" in r.stderr, r.stderr


@pytest.mark.parametrize("value", [0, "0s", -3600])
def test_retention_must_be_positive(tmp_path, value):
    doc = base()
    doc["backup"]["retention"] = value
    assert "backup.retention: must be greater than 0" in problems(tmp_path, doc)


DOCUMENTED = {"critical": (timedelta(minutes=5), timedelta(seconds=30)),
              "non_critical": (timedelta(minutes=15), timedelta(minutes=5)),
              "cache": (None, timedelta(minutes=15))}


@pytest.mark.parametrize("objectives", ["missing", None, {}, {"critical": None}, {"critical": {}}])
def test_missing_objectives_keep_the_documented_defaults(tmp_path, objectives):
    doc = base()
    if objectives == "missing":
        del doc["objectives"]
    else:
        doc["objectives"] = objectives
    for env in ({}, {"NAMESPACE": "x"}):
        cfg = load_config(write(tmp_path, doc), env=env)
        got = {k: (getattr(cfg.objectives, k).rto, getattr(cfg.objectives, k).rpo) for k in DOCUMENTED}
        assert got == DOCUMENTED
        assert cfg.objectives.full_recovery == timedelta(minutes=30)


def test_one_target_given_keeps_the_others(tmp_path):
    doc = base()
    doc["objectives"] = {"critical": {"rto": "2m"}}
    cfg = load_config(write(tmp_path, doc), env={"RPO_TARGET": "10s"})
    assert (cfg.objectives.critical.rto, cfg.objectives.critical.rpo) == (timedelta(minutes=2), timedelta(seconds=10))
    del doc["objectives"]
    cfg = load_config(write(tmp_path, doc), env={"RTO_TARGET": "1m"})
    assert (cfg.objectives.critical.rto, cfg.objectives.critical.rpo) == (timedelta(minutes=1), timedelta(seconds=30))


def test_null_or_zero_target_is_refused(tmp_path):
    doc = base()
    doc["objectives"]["critical"]["rpo"] = None
    assert "objectives.critical.rpo: must be a duration; leave it out for the default 30s" in problems(tmp_path, doc)
    doc["objectives"]["critical"]["rpo"] = "0s"
    assert "objectives.critical.rpo: must be greater than 0" in problems(tmp_path, doc)


@pytest.mark.parametrize("password", ["hunter2 oops", "it's", "back\\slash", "a=b host=evil.example", "x' y"])
def test_password_is_quoted_in_the_dsn(monkeypatch, password):
    monkeypatch.setenv("EAGLE_DR_TEST_PG_PASSWORD", password)
    cfg = load_config(DEFAULT_CONFIG, env={})
    pg = cfg.primary.postgres.model_copy(update={"password": SecretRef(env="EAGLE_DR_TEST_PG_PASSWORD")})
    parsed = conninfo_to_dict(pg.dsn())
    assert parsed["password"] == password
    assert (parsed["host"], parsed["port"], parsed["user"]) == (pg.host, str(pg.port), pg.user)


def test_libpq_errors_never_carry_the_password(monkeypatch):
    """pg_status's error goes into workflow history. With the password quoted, libpq never
    echoes a piece of it as a bad option; and any text that still holds it is scrubbed."""
    password = "hunter2 oops"
    monkeypatch.setenv("EAGLE_DR_TEST_PG_PASSWORD", password)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = PostgresConfig(port=port, password=SecretRef(env="EAGLE_DR_TEST_PG_PASSWORD"))
    st = pg_status(pg, timeout=2)
    assert not st.reachable and st.error
    assert "oops" not in st.error and "hunter2" not in st.error, st.error
    assert "refused" in st.error or "connect" in st.error, st.error
    assert scrub(f"FATAL: bad password {password!r} for postgres") == "FATAL: bad password '***' for postgres"


def test_archive_queue_max_defaults_above_the_guards_bound_and_must_stay_above_it(tmp_path):
    doc = base()
    doc["backup"] = {"archive_backlog_max": "64MiB"}
    cfg = load_config(write(tmp_path, doc), env={})
    assert cfg.backup.archive_queue_limit == 4 * (64 << 20)
    doc["backup"] = {"archive_backlog_max": "64MiB", "archive_queue_max": "32MiB"}
    assert "archive_queue_max must be larger than archive_backlog_max" in problems(tmp_path, doc)


def test_a_missing_required_option_is_a_usage_error_not_a_traceback():
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "failback"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "Missing option '--region'" in r.stderr and "Traceback" not in r.stderr


# -- alerts: the receiver's rules ------------------------------------------------------------------


def _with_rules(rules, **alerts) -> dict:
    doc = base()
    doc["alerts"] = {**doc["alerts"], "rules": rules, **alerts}
    return doc


@pytest.mark.parametrize("matcher, why", [
    ("alertname", "malformed matcher"),
    ("=x", "malformed matcher"),
    ('severity=~"(critical"', "bad regular expression"),
])
def test_alert_matchers_are_checked(tmp_path, matcher, why):
    msg = problems(tmp_path, _with_rules([{"name": "r", "matchers": [matcher], "action": "record"}]))
    assert "alerts.rules[0].matchers[0]" in msg and why in msg, msg


@pytest.mark.parametrize("rule, field, why", [
    ({"name": "r", "matchers": ["a=b"], "action": "failover", "target_region": "eu-west-9"},
     "alerts.rules[0].target_region", "unknown region 'eu-west-9'"),
    ({"name": "r", "matchers": ["a=b"], "action": "monitor", "target_region": "us-west-2"},
     "alerts.rules[0].target_region", "only a failover rule has a target"),
    ({"name": "r", "matchers": ["a=b"], "action": "page"}, "alerts.rules[0].action", "Input should be"),
    ({"name": "R!", "matchers": ["a=b"], "action": "record"}, "alerts.rules[0].name", "pattern"),
    ({"name": "r", "matchers": [], "action": "record"}, "alerts.rules[0].matchers", "at least 1"),
])
def test_alert_rules_are_checked(tmp_path, rule, field, why):
    msg = problems(tmp_path, _with_rules([rule]))
    assert f"{field}: " in msg and why in msg, msg


def test_alert_rule_names_are_unique(tmp_path):
    rule = {"name": "r", "matchers": ["a=b"], "action": "record"}
    msg = problems(tmp_path, _with_rules([rule, rule]))
    assert "alerts.rules[1].name" in msg and "used twice" in msg, msg


def test_alert_rules_from_a_file_and_matching(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"rules": [
        {"name": "down", "matchers": ['alertname="PrimaryRegionDown"', "env!=staging"], "action": "failover"},
        {"name": "page", "matchers": ['severity=~"critical|page"'], "action": "monitor"}]}))
    doc = base()
    doc["alerts"] = {**doc["alerts"], "rules_file": "rules.yaml"}
    doc["alerts"].pop("rules")
    p = tmp_path / "eagle-dr.yaml"
    p.write_text(yaml.safe_dump(doc))
    cfg = load_config(p, env={})
    rule = cfg.alerts.rule_for
    assert rule({"alertname": "PrimaryRegionDown", "severity": "critical"}).name == "down"
    assert rule({"alertname": "PrimaryRegionDown", "env": "staging", "severity": "page"}).name == "page"
    # Anchored, as Alertmanager's: "critical-ish" is not "critical".
    assert rule({"severity": "critical-ish"}) is None
    doc["alerts"]["rules_file"] = "missing.yaml"
    msg = problems(tmp_path, doc)
    assert "alerts.rules_file: cannot read" in msg, msg


def test_readiness_thresholds_are_validated(tmp_path):
    doc = base()
    doc["readiness"] = {"max_dns_ttl": "0s"}
    msg = problems(tmp_path, doc)
    assert "readiness.max_dns_ttl" in msg and "must be greater than 0" in msg
    doc["readiness"] = {"wal_free_fail": "2GiB", "wal_free_warn": "1GiB"}
    msg = problems(tmp_path, doc)
    assert "readiness" in msg and "wal_free_warn must not be less than wal_free_fail" in msg
    doc["readiness"] = {"every": "30s", "max_dns_ttl": "5m", "lag_warn_fraction": 0.8}
    cfg = load_config(write(tmp_path, doc), env={})
    assert cfg.readiness.every == timedelta(seconds=30) and cfg.readiness.max_dns_ttl == timedelta(minutes=5)


def test_redis_tls_is_verified_and_a_ca_without_tls_is_refused(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, env={})
    kw = cfg.primary.redis.tls_kwargs
    # The lab's: TLS on, its CA, the certificate and the host name checked.
    assert kw == {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True,
                  "ssl_ca_certs": f"{cfg.lab.state_dir}/tls/ca.crt"}
    doc = base()
    del doc["regions"][0]["redis"]["ca_file"]
    # No ca_file: the system's CAs (redis-py's default context), still verified.
    assert load_config(write(tmp_path, doc), env={}).primary.redis.tls_kwargs == \
        {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    doc["regions"][0]["redis"]["tls"] = False
    assert load_config(write(tmp_path, doc), env={}).primary.redis.tls_kwargs == {}
    doc = base()
    doc["regions"][1]["redis"]["tls"] = False
    msg = problems(tmp_path, doc)
    assert "regions[1].redis" in msg and "ca_file is set but tls is off" in msg, msg


def test_backups_from_the_standby_need_each_nodes_pgbackrest_server_and_a_client_certificate(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, env={})
    # The lab's: read from the standby, through each node's TLS server, with its client files.
    assert cfg.backup.read_from == "standby" and cfg.backup.tls_client is not None
    assert cfg.backup.tls_client.cert_file == f"{cfg.lab.state_dir}/tls/pgbackrest-client.crt"
    assert all(r.postgres.pgbackrest_host == "localhost" for r in cfg.regions)
    doc = base()
    del doc["regions"][1]["postgres"]["pgbackrest_host"]
    msg = problems(tmp_path, doc)
    assert "regions[1].postgres.pgbackrest_host" in msg and "read_from 'standby'" in msg, msg
    doc["backup"]["read_from"] = "primary"
    assert load_config(write(tmp_path, doc), env={}).backup.read_from == "primary"
    doc = base()
    del doc["backup"]["tls_client"]
    msg = problems(tmp_path, doc)
    assert "backup.tls_client" in msg and "client certificate" in msg, msg
