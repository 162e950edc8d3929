"""Alert -> workflow latency, measured for real in the lab's drill.

One alert is posted to the lab's Alertmanager (its v2 API, as Prometheus would), travels the
production path (Alertmanager -> ``eagle-dr alerts serve`` -> signal-with-start of the incident
workflow) and the time is taken when Temporal recorded the signal in the incident workflow's
history: that event is the moment a workflow "has" the alert, whatever the receiver logs.

Both ends are wall clocks of different processes (this worker, the Temporal server): on one
lab host they agree; across hosts the figure carries their skew, and the result says what
was measured between which two points. Alertmanager's ``group_wait`` is reported beside it,
because with a non-zero group_wait it alone dominates.

The alert carries no severity and an alertname no rule takes, so the lab's rules record it
(``unmatched: record``) and nothing is started or signalled by it: a drill must not have its
probe alert move the monitor. It is resolved again at the end.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import aiohttp
import yaml
from pydantic import BaseModel
from temporalio import activity
from temporalio.service import RPCError, RPCStatusCode

from alerts.plan import UNMATCHED, incident_id
from eagle_dr.codec import decode_in_place
from eagle_dr.config import EagleConfig

ALERTNAME = "EagleDrDrillAlertProbe"


class AlertProbeRequest(BaseModel):
    service: str
    # Alertmanager's group labels of the lab's route: alertname and region.
    region: str
    # Unique per drill run: finds this alert among the incident's signals.
    tag: str
    timeout_seconds: float = 20.0


class AlertLatency(BaseModel):
    measured: str = "Alertmanager POST /api/v2/alerts -> incident workflow signalled (Temporal history event)"
    incident_id: str | None = None
    posted_at: datetime | None = None
    signalled_at: datetime | None = None
    seconds: float | None = None
    group_wait: str | None = None
    error: str | None = None

    def summary(self) -> str:
        if self.seconds is None:
            return f"alert -> workflow latency not measured: {self.error or 'unknown'}"
        return (f"Alertmanager -> workflow signalled: {self.seconds:.2f} s (group_wait "
                f"{self.group_wait or 'unknown'}; incident {self.incident_id})")


class AlertProbeActivities:
    def __init__(self, cfg: EagleConfig):
        self.cfg = cfg

    @property
    def alertmanager(self) -> str:
        return f"http://127.0.0.1:{self.cfg.lab.alertmanager_port}"

    def _incident(self, labels: dict[str, str]) -> str | None:
        rule = self.cfg.alerts.rule_for(labels)
        if rule is None and self.cfg.alerts.unmatched == "ignore":
            return None
        # The lab's route groups by alertname and region (lab/alertmanager.py): Alertmanager's
        # group key is the route path, then the group labels.
        group_key = '{}:{alertname="%s", region="%s"}' % (labels["alertname"], labels["region"])
        return incident_id(self.cfg.service, rule.name if rule else UNMATCHED, group_key)

    @activity.defn
    async def measure_alert_latency(self, req: AlertProbeRequest) -> AlertLatency:
        """Post one alert, wait until its incident workflow's history holds it, resolve it.
        A measurement that cannot be made is returned with its reason, not raised: the drill
        reports it and goes on."""
        labels = {"alertname": ALERTNAME, "region": req.region, "service": req.service, "drill": req.tag}
        out = AlertLatency(incident_id=self._incident(labels))
        if out.incident_id is None:
            out.error = "alerts.unmatched is 'ignore': no incident records an unmatched alert"
            return out
        starts = datetime.now(timezone.utc)
        alert = {"labels": labels, "annotations": {"summary": "eagle-dr drill: alert -> workflow latency probe"},
                 "startsAt": starts.isoformat()}
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s:
                async with s.get(f"{self.alertmanager}/api/v2/status") as r:
                    route = (yaml.safe_load((await r.json())["config"]["original"]) or {}).get("route", {})
                    out.group_wait = str(route.get("group_wait", "30s (default)"))
                out.posted_at = datetime.now(timezone.utc)
                async with s.post(f"{self.alertmanager}/api/v2/alerts", json=[alert]) as r:
                    if r.status != 200:
                        out.error = f"Alertmanager answered {r.status}: {(await r.text())[:200]}"
                        return out
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as e:
            out.error = f"Alertmanager at {self.alertmanager} unreachable: {e or type(e).__name__}"
            return out
        try:
            out.signalled_at = await self._signalled(out.incident_id, req.tag, req.timeout_seconds)
        finally:
            await self._resolve(alert)
        if out.signalled_at is None:
            out.error = f"no signal with the alert in {out.incident_id} within {req.timeout_seconds:.0f}s"
        else:
            out.seconds = (out.signalled_at - out.posted_at).total_seconds()
        return out

    async def _signalled(self, wid: str, tag: str, timeout: float) -> datetime | None:
        client = activity.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            activity.heartbeat()
            try:
                async for e in client.get_workflow_handle(wid).fetch_history_events():
                    if e.HasField("workflow_execution_signaled_event_attributes"):
                        a = e.workflow_execution_signaled_event_attributes
                        # Encrypted payloads (temporal.codec) are searched decrypted.
                        await decode_in_place(client.data_converter.payload_codec, [a.input])
                        # The tag is unique to this drill run: a substring test on the payload is exact.
                        if any(tag.encode() in p.data for p in a.input.payloads):
                            return e.event_time.ToDatetime(tzinfo=timezone.utc)
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:
                    raise
            await asyncio.sleep(0.05)
        return None

    async def _resolve(self, alert: dict) -> None:
        """End the probe alert, so its incident closes as resolved (best effort)."""
        ended = dict(alert, endsAt=datetime.now(timezone.utc).isoformat())
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                async with s.post(f"{self.alertmanager}/api/v2/alerts", json=[ended]):
                    pass
        except (aiohttp.ClientError, asyncio.TimeoutError):
            activity.logger.warning("could not resolve the drill's probe alert; it expires by itself")

