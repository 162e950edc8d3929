"""Route 53 failover routing for the service record: which region's address is PRIMARY.

The record is a Route 53 failover pair of A records, one per region, told apart by
SetIdentifier (the region name in eagle-dr's config). Failing over means: the target region's
record becomes PRIMARY and the region that held PRIMARY becomes SECONDARY, in one
transactional change batch, so the pair stays complete and a second ``point_to`` undoes the
first. Credentials come from boto3's normal chain, never from arguments.

The DR epoch travels with the change: a TXT record ``_eagle-dr-epoch.<record>`` holding
``"epoch=<n> region=<set identifier>"`` is replaced in the same change batch as the failover
pair, and ``point_to`` refuses an epoch lower than the one it holds (``StaleEpoch``). Why a TXT
record: Route 53 keeps no per-record metadata we could stamp (a change batch's comment cannot
be read back by record, and health-check tags need a health check per record), while a TXT
record is listable with the same API call, visible to ``dig`` for an operator, and part of the
transactional batch. Replacing it as DELETE (of the exact value read) + CREATE makes the batch
a compare-and-swap: if another runbook changed the token since we read it, Route 53 rejects the
whole batch, failover pair included, and we re-read and re-check.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any, Literal

import boto3
from botocore.exceptions import ClientError

from activities.routing import StaleEpoch

Role = Literal["PRIMARY", "SECONDARY"]
EPOCH_LABEL = "_eagle-dr-epoch"
_EPOCH_TTL = 60
_CAS_ATTEMPTS = 5


class ZoneMissing(LookupError):
    pass


class Route53Failover:
    def __init__(
        self,
        endpoint_url: str | None,
        hosted_zone_name: str,
        region_name: str = "us-east-1",
        *,
        change_timeout_s: float = 300.0,
        poll_s: float = 2.0,
    ) -> None:
        self.zone_name = _fqdn(hosted_zone_name)
        # Real changes usually reach INSYNC within a minute; get_change is rate limited per
        # account, so poll gently. botocore's waiter would poll every 30 s.
        self.change_timeout_s = change_timeout_s
        self.poll_s = poll_s
        # A private session: boto3's default session is not safe to share across threads.
        self._r53 = boto3.session.Session().client("route53", endpoint_url=endpoint_url, region_name=region_name)
        self._zone_id: str | None = None

    # -- zone ------------------------------------------------------------------------------

    def ensure_zone(self) -> str:
        """The hosted zone's id, creating a public zone if there is none (lab and tests)."""
        zone_id = self._find_zone()
        if zone_id is not None:
            return zone_id
        try:
            resp = self._r53.create_hosted_zone(Name=self.zone_name, CallerReference=f"eagle-dr-{uuid.uuid4()}")
        except ClientError as e:
            # Another caller created it between our lookup and our create.
            if _code(e) != "HostedZoneAlreadyExists" or (zone_id := self._find_zone()) is None:
                raise
            return zone_id
        self._zone_id = _short_id(resp["HostedZone"]["Id"])
        return self._zone_id

    # -- records ---------------------------------------------------------------------------

    def upsert_failover_records(
        self,
        record: str,
        primary_value: str,
        secondary_value: str,
        ttl: int,
        primary_id: str,
        secondary_id: str,
    ) -> None:
        """Make the failover pair exactly this (idempotent); waits until INSYNC."""
        if primary_id == secondary_id:
            raise ValueError(f"primary and secondary need different set identifiers, both are {primary_id!r}")
        name = self._name(record)
        existing = self._failover_records(name)
        desired = [
            _merge(existing.get(primary_id), name, primary_id, "PRIMARY", primary_value, ttl),
            _merge(existing.get(secondary_id), name, secondary_id, "SECONDARY", secondary_value, ttl),
        ]
        self._apply(name, existing, desired)

    def point_to(
        self, record: str, value: str, ttl: int, set_identifier: str, epoch: int | None = None
    ) -> str | None:
        """Make ``set_identifier``'s record PRIMARY with ``value``; returns the previous PRIMARY value.

        The record that held PRIMARY (if another region's) is demoted to SECONDARY, keeping
        its value, TTL and health check. Returns once Route 53 reports the change INSYNC.
        ``epoch`` is the runbook's fencing token, as for the ConfigMap: a lower one than the
        zone records is refused, and so is the same one naming another region. Without an
        epoch (manual use) the recorded token is left alone.
        """
        name = self._name(record)
        for attempt in range(_CAS_ATTEMPTS):
            existing = self._failover_records(name)
            token_changes = self._token_changes(name, set_identifier, epoch)
            old_primary = next((r for r in existing.values() if r.get("Failover") == "PRIMARY"), None)
            desired = [_merge(existing.get(set_identifier), name, set_identifier, "PRIMARY", value, ttl)]
            if old_primary is not None and old_primary["SetIdentifier"] != set_identifier:
                demoted = copy.deepcopy(old_primary)
                demoted["Failover"] = "SECONDARY"
                desired.append(demoted)
            else:
                # Same region, new value or TTL: the standby record stays as it is.
                desired += [
                    r for sid, r in existing.items() if r.get("Failover") == "SECONDARY" and sid != set_identifier
                ]
            try:
                self._apply(name, existing, desired, token_changes)
            except ClientError as e:
                # The token we deleted was no longer there as read: someone moved it meanwhile.
                if token_changes and _code(e) in ("InvalidChangeBatch", "InvalidInput") and \
                        attempt + 1 < _CAS_ATTEMPTS:
                    continue
                raise
            return _value(old_primary) if old_primary is not None else None
        raise AssertionError("unreachable")  # the loop returns or raises

    def check_epoch(self, record: str, set_identifier: str, epoch: int) -> None:
        """Raise ``StaleEpoch`` if ``point_to(..., set_identifier, epoch)`` would be refused."""
        self._token_changes(self._name(record), set_identifier, epoch)

    def epoch(self, record: str) -> tuple[int, str] | None:
        """The DR epoch and region recorded beside the failover pair, if any."""
        return _parse_token(self._token(self._name(record)))

    def current(self, record: str) -> dict[str, Any]:
        """``{"primary": {...} | None, "secondary": {...} | None}``, each with
        ``set_identifier``, ``value`` and ``ttl``."""
        records = self._failover_records(self._name(record)).values()
        out: dict[str, Any] = {"primary": None, "secondary": None}
        for r in records:
            role = r["Failover"].lower()
            out[role] = {"set_identifier": r["SetIdentifier"], "value": _value(r), "ttl": r.get("TTL")}
        return out

    # -- internals -------------------------------------------------------------------------

    def _find_zone(self) -> str | None:
        if self._zone_id is not None:
            return self._zone_id
        zones = self._r53.list_hosted_zones_by_name(DNSName=self.zone_name, MaxItems="1")["HostedZones"]
        if zones and zones[0]["Name"].lower() == self.zone_name:
            self._zone_id = _short_id(zones[0]["Id"])
        return self._zone_id

    def _zone(self) -> str:
        zone_id = self._find_zone()
        if zone_id is None:
            raise ZoneMissing(f"no Route 53 hosted zone named {self.zone_name!r}")
        return zone_id

    def _name(self, record: str) -> str:
        name = _fqdn(record)
        # A bare label ("api") is relative to the zone, as in a zone file.
        return name if name == self.zone_name or name.endswith("." + self.zone_name) else name + self.zone_name

    def _failover_records(self, name: str) -> dict[str, dict[str, Any]]:
        """The A failover records named ``name``, by SetIdentifier."""
        out: dict[str, dict[str, Any]] = {}
        kwargs: dict[str, Any] = {"HostedZoneId": self._zone(), "StartRecordName": name, "StartRecordType": "A"}
        while True:
            page = self._r53.list_resource_record_sets(**kwargs, MaxItems="100")
            sets = page["ResourceRecordSets"]
            for r in sets:
                if _fqdn(r["Name"]) == name and r["Type"] == "A" and r.get("Failover") and r.get("SetIdentifier"):
                    out[r["SetIdentifier"]] = r
            # Listings are sorted by name then type: once a page ends past our A records, stop.
            if not page.get("IsTruncated") or not sets or (_fqdn(sets[-1]["Name"]), sets[-1]["Type"]) != (name, "A"):
                return out
            kwargs.update(StartRecordName=page["NextRecordName"], StartRecordType=page["NextRecordType"])
            if "NextRecordIdentifier" in page:
                kwargs["StartRecordIdentifier"] = page["NextRecordIdentifier"]

    def _token(self, name: str) -> dict[str, Any] | None:
        token_name = f"{EPOCH_LABEL}.{name}"
        sets = self._r53.list_resource_record_sets(
            HostedZoneId=self._zone(), StartRecordName=token_name, StartRecordType="TXT", MaxItems="1"
        )["ResourceRecordSets"]
        return next((r for r in sets if _fqdn(r["Name"]) == token_name and r["Type"] == "TXT"), None)

    def _token_changes(self, name: str, set_identifier: str, epoch: int | None) -> list[dict[str, Any]]:
        """The changes that move the epoch token to ``(epoch, set_identifier)``; raises
        ``StaleEpoch`` if the zone already holds a newer token."""
        if epoch is None:
            return []
        token = self._token(name)
        stored = _parse_token(token)
        if stored is not None:
            stored_epoch, stored_region = stored
            if epoch < stored_epoch or (epoch == stored_epoch and set_identifier != stored_region):
                raise StaleEpoch(
                    f"refusing to make {set_identifier!r} PRIMARY for {name} with epoch {epoch}: Route 53 "
                    f"already records epoch {stored_epoch} (region {stored_region!r})"
                )
            if stored == (epoch, set_identifier):
                return []
        new = {
            "Name": f"{EPOCH_LABEL}.{name}",
            "Type": "TXT",
            "TTL": _EPOCH_TTL,
            "ResourceRecords": [{"Value": f'"epoch={epoch} region={set_identifier}"'}],
        }
        return ([{"Action": "DELETE", "ResourceRecordSet": token}] if token is not None else []) + [
            {"Action": "CREATE", "ResourceRecordSet": new}
        ]

    def _apply(
        self,
        name: str,
        existing: dict[str, dict[str, Any]],
        desired: list[dict[str, Any]],
        extra: list[dict[str, Any]] | None = None,
    ) -> None:
        wanted = {r["SetIdentifier"]: r for r in desired}
        # Anything else in the pair's name would make a second PRIMARY or SECONDARY.
        changes = [{"Action": "DELETE", "ResourceRecordSet": r} for sid, r in existing.items() if sid not in wanted]
        changes += [
            {"Action": "UPSERT", "ResourceRecordSet": r}
            for sid, r in wanted.items()
            if _comparable(existing.get(sid)) != _comparable(r)
        ]
        changes += extra or []
        if not changes:
            return  # already so: a retried activity must not even create a change
        resp = self._r53.change_resource_record_sets(
            HostedZoneId=self._zone(),
            ChangeBatch={"Comment": f"eagle-dr failover {name}", "Changes": changes},
        )
        self._wait_insync(resp["ChangeInfo"]["Id"])

    def _wait_insync(self, change_id: str) -> None:
        deadline = time.monotonic() + self.change_timeout_s
        while True:
            status = self._r53.get_change(Id=change_id)["ChangeInfo"]["Status"]
            if status == "INSYNC":
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Route 53 change {change_id} still {status} after {self.change_timeout_s:g}s")
            time.sleep(min(self.poll_s, remaining))


def _merge(
    base: dict[str, Any] | None, name: str, set_id: str, role: Role, value: str, ttl: int
) -> dict[str, Any]:
    # Start from the existing record so fields we do not manage (HealthCheckId) survive.
    r = copy.deepcopy(base) if base is not None else {}
    r.update(Name=name, Type="A", SetIdentifier=set_id, Failover=role, TTL=ttl, ResourceRecords=[{"Value": value}])
    return r


def _comparable(r: dict[str, Any] | None) -> tuple | None:
    if r is None:
        return None
    values = sorted(v["Value"] for v in r.get("ResourceRecords", []))
    return (r.get("Failover"), r.get("TTL"), tuple(values), r.get("HealthCheckId"))


def _parse_token(r: dict[str, Any] | None) -> tuple[int, str] | None:
    if r is None:
        return None
    raw = " ".join(v["Value"] for v in r.get("ResourceRecords", [])).strip('"')
    fields = dict(part.split("=", 1) for part in raw.split() if "=" in part)
    try:
        return int(fields["epoch"]), fields["region"]
    except (KeyError, ValueError):
        # A garbled token must stop the runbook, not silently switch fencing off.
        raise ValueError(f"unreadable DR epoch record {r.get('Name')}: {raw!r}") from None


def _value(r: dict[str, Any]) -> str:
    return ",".join(v["Value"] for v in r.get("ResourceRecords", []))


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _short_id(zone_id: str) -> str:
    return zone_id.rsplit("/", 1)[-1]


def _code(e: ClientError) -> str:
    return e.response.get("Error", {}).get("Code", "")
