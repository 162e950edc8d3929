"""What only the lab can do for a runbook: inject a real outage, and read the sample app's
own record of what it wrote, which turns RTO and RPO from estimates into counts.

Registered on the control worker only when the lab is the target (the drill).
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel
from temporalio import activity

from activities.postgres.status import connect
from eagle_dr.config import EagleConfig


class AckedWrites(BaseModel):
    region: str
    acknowledged: int
    missing: int
    missing_sample: list[int] = []
    last_acknowledged_id: int | None = None
    loss_window_s: float = 0.0


class ClientOutage(BaseModel):
    """The outage as the sample app saw it, from its durable write log."""

    last_ok_before: datetime | None = None
    first_failure: datetime | None = None
    first_ok_after: datetime | None = None
    failed_writes: int = 0
    outage_seconds: float | None = None
    recovered_region: str | None = None


class Outage(BaseModel):
    region: str
    killed: list[str]
    at: datetime


class AckedRequest(BaseModel):
    region: str
    # Only writes acknowledged from here on (None: all of them).
    since: datetime | None = None


class MarkRequest(BaseModel):
    since: datetime
    region: str


class LabHooks:
    def __init__(self, cfg: EagleConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path

    def _lab(self):
        from lab.lab import Lab

        return Lab(self.cfg, self.config_path)

    @activity.defn
    def kill_region(self, region: str) -> Outage:
        """A real outage: kill -9 the region's PostgreSQL, Redis, its Sentinel and its worker."""
        at = datetime.now(timezone.utc)
        return Outage(region=region, killed=self._lab().kill_region(region), at=at)

    @activity.defn
    def heal_region(self, region: str) -> list[str]:
        """The lost region's machines come back: its processes restart as they were (an old
        primary comes back writable, exactly the danger failback's fencing is there for)."""
        return self._lab().heal_region(region)

    @activity.defn
    def count_missing_acked_writes(self, req: AckedRequest) -> AckedWrites:
        """Acknowledged ids (the app's fsync'd log) absent from ``region``'s database."""
        from lab.app import write_log

        region = req.region
        since = req.since.timestamp() if req.since else 0.0
        entries = [w for w in write_log(self.cfg).entries() if w.ok and w.t >= since]
        acked = [w.id for w in entries]
        if not acked:
            return AckedWrites(region=region, acknowledged=0, missing=0)
        with connect(self.cfg.region(region).postgres, 5) as conn:
            rows = conn.execute(
                "select a.id from unnest(%s::bigint[]) as a(id) left join alerts using (id) where alerts.id is null "
                "order by a.id", (acked,)).fetchall()
        missing = [r[0] for r in rows]
        when = {w.id: w.t for w in entries}
        window = 0.0
        if missing:
            # From the newest write the new primary still has that came before the first lost
            # one, to the last write it lacks: writes acknowledged after the failover (by the
            # new primary) are not part of the loss.
            lost = set(missing)
            first_lost = min(when[i] for i in missing)
            kept_before = [t for i, t in when.items() if i not in lost and t < first_lost]
            window = max(when[i] for i in missing) - (max(kept_before) if kept_before else first_lost)
        return AckedWrites(region=region, acknowledged=len(acked), missing=len(missing), missing_sample=missing[:20],
                           last_acknowledged_id=max(acked), loss_window_s=window)

    @activity.defn
    def client_outage(self, req: MarkRequest) -> ClientOutage:
        """From ``since``: last good write, first failure, first good write in ``req.region``."""
        from lab.app import write_log

        t0 = req.since.timestamp()
        entries = write_log(self.cfg).entries()
        before = [w for w in entries if w.t < t0 and w.ok]
        after = [w for w in entries if w.t >= t0]
        first_fail = next((w for w in after if not w.ok), None)
        start = first_fail.t if first_fail else None
        recovered = next((w for w in after if w.ok and w.region == req.region and (start is None or w.t > start)), None)
        last_ok = max((w.t for w in before + [w for w in after if w.ok and (start is None or w.t < start)]),
                      default=None)
        ts = lambda x: datetime.fromtimestamp(x, timezone.utc) if x is not None else None  # noqa: E731
        outage = (recovered.t - last_ok) if (recovered and last_ok is not None and first_fail) else None
        return ClientOutage(last_ok_before=ts(last_ok), first_failure=ts(start),
                            first_ok_after=ts(recovered.t if recovered else None),
                            failed_writes=sum(1 for w in after if not w.ok and (recovered is None or w.t < recovered.t)),
                            outage_seconds=outage, recovered_region=recovered.region if recovered else None)
