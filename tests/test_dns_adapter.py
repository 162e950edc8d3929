"""Route53Failover against a real moto_server over HTTP (same boto3 code as production)."""

from __future__ import annotations


import boto3
import pytest
import requests

from activities.dns import Route53Failover, ZoneMissing
from activities.routing import StaleEpoch

ZONE = "eagle.example"
RECORD = "api"
EAST, WEST = "us-east-1", "us-west-2"
EAST_IP, WEST_IP = "192.0.2.10", "198.51.100.20"


@pytest.fixture
def endpoint(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    # Dummy credentials only: nothing here may ever find a real profile.
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    return moto_url


@pytest.fixture
def dns(endpoint: str) -> Route53Failover:
    r53 = Route53Failover(endpoint, ZONE, poll_s=0.05, change_timeout_s=10)
    r53.ensure_zone()
    r53.upsert_failover_records(RECORD, EAST_IP, WEST_IP, 60, EAST, WEST)
    return r53


def a_records(endpoint: str, name: str = f"{RECORD}.{ZONE}.") -> list[dict]:
    """Every A record set of the name, duplicates included (moto accepts duplicate CREATEs)."""
    r53 = boto3.session.Session().client("route53", endpoint_url=endpoint, region_name="us-east-1")
    zone_id = r53.list_hosted_zones_by_name(DNSName=ZONE)["HostedZones"][0]["Id"]
    sets = r53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return [s for s in sets if s["Name"] == name and s["Type"] == "A"]


def roles(endpoint: str) -> list[tuple[str, str, str]]:
    return sorted((r["Failover"], r["SetIdentifier"], r["ResourceRecords"][0]["Value"]) for r in a_records(endpoint))


def test_ensure_zone_creates_once(endpoint: str) -> None:
    r53 = Route53Failover(endpoint, ZONE)
    with pytest.raises(ZoneMissing):
        r53.current(RECORD)

    zone_id = r53.ensure_zone()

    assert Route53Failover(endpoint, ZONE + ".").ensure_zone() == zone_id
    client = boto3.session.Session().client("route53", endpoint_url=endpoint, region_name="us-east-1")
    assert [z["Name"] for z in client.list_hosted_zones()["HostedZones"]] == [ZONE + "."]


def test_failover_pair_upsert_is_idempotent(endpoint: str, dns: Route53Failover) -> None:
    dns.upsert_failover_records(RECORD, EAST_IP, WEST_IP, 60, EAST, WEST)

    assert roles(endpoint) == [("PRIMARY", EAST, EAST_IP), ("SECONDARY", WEST, WEST_IP)]
    assert dns.current(RECORD) == {
        "primary": {"set_identifier": EAST, "value": EAST_IP, "ttl": 60},
        "secondary": {"set_identifier": WEST, "value": WEST_IP, "ttl": 60},
    }


def test_point_to_flips_primary_and_returns_previous(endpoint: str, dns: Route53Failover) -> None:
    previous = dns.point_to(RECORD, WEST_IP, 60, WEST)

    assert previous == EAST_IP
    # Exactly one PRIMARY: the old one is demoted, not left beside the new one.
    assert roles(endpoint) == [("PRIMARY", WEST, WEST_IP), ("SECONDARY", EAST, EAST_IP)]


def test_point_to_again_changes_nothing(endpoint: str, dns: Route53Failover) -> None:
    dns.point_to(f"{RECORD}.{ZONE}.", WEST_IP, 60, WEST)
    before = a_records(endpoint)

    assert dns.point_to(RECORD, WEST_IP, 60, WEST) == WEST_IP

    assert a_records(endpoint) == before
    assert [r["Failover"] for r in a_records(endpoint)].count("PRIMARY") == 1


def test_point_back_restores_the_original_pair(endpoint: str, dns: Route53Failover) -> None:
    previous = dns.point_to(RECORD, WEST_IP, 60, WEST)

    assert dns.point_to(RECORD, previous, 60, EAST) == WEST_IP

    assert roles(endpoint) == [("PRIMARY", EAST, EAST_IP), ("SECONDARY", WEST, WEST_IP)]


def test_point_to_same_region_new_value_keeps_the_standby(endpoint: str, dns: Route53Failover) -> None:
    assert dns.point_to(RECORD, "192.0.2.99", 30, EAST) == EAST_IP

    assert roles(endpoint) == [("PRIMARY", EAST, "192.0.2.99"), ("SECONDARY", WEST, WEST_IP)]
    assert dns.current(RECORD)["primary"]["ttl"] == 30


def epoch_records(endpoint: str) -> list[tuple[str, str]]:
    r53 = boto3.session.Session().client("route53", endpoint_url=endpoint, region_name="us-east-1")
    zone_id = r53.list_hosted_zones_by_name(DNSName=ZONE)["HostedZones"][0]["Id"]
    sets = r53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return [(s["Name"], v["Value"]) for s in sets if s["Type"] == "TXT" for v in s["ResourceRecords"]]


def test_point_to_records_the_epoch_and_refuses_a_stale_one(endpoint: str, dns: Route53Failover) -> None:
    assert dns.epoch(RECORD) is None
    dns.point_to(RECORD, WEST_IP, 60, WEST, epoch=4)

    assert dns.epoch(RECORD) == (4, WEST)
    assert epoch_records(endpoint) == [(f"_eagle-dr-epoch.{RECORD}.{ZONE}.", f'"epoch=4 region={WEST}"')]

    with pytest.raises(StaleEpoch, match="epoch 4"):
        dns.point_to(RECORD, EAST_IP, 60, EAST, epoch=3)  # a superseded runbook
    with pytest.raises(StaleEpoch):
        dns.point_to(RECORD, EAST_IP, 60, EAST, epoch=4)  # the same token naming another region
    assert roles(endpoint) == [("PRIMARY", WEST, WEST_IP), ("SECONDARY", EAST, EAST_IP)]
    assert dns.epoch(RECORD) == (4, WEST)

    before = a_records(endpoint)
    assert dns.point_to(RECORD, WEST_IP, 60, WEST, epoch=4) == WEST_IP  # a retried activity
    assert a_records(endpoint) == before

    assert dns.point_to(RECORD, EAST_IP, 60, EAST, epoch=5) == WEST_IP
    assert roles(endpoint) == [("PRIMARY", EAST, EAST_IP), ("SECONDARY", WEST, WEST_IP)]
    # Replaced, never duplicated (moto would accept a second CREATE of the same name).
    assert epoch_records(endpoint) == [(f"_eagle-dr-epoch.{RECORD}.{ZONE}.", f'"epoch=5 region={EAST}"')]
