"""A RunReport as a plain-text summary for the terminal (``eagle-dr report`` without --html)."""

from __future__ import annotations

from eagle_dr.report.model import RunReport


def _s(v: float | None) -> str:
    return f"{v:.2f}s" if v is not None else "unknown"


def _n(v: int | None) -> str:
    return str(v) if v is not None else "unknown"


def _verdict(met: bool | None) -> str:
    return "unknown" if met is None else "met" if met else "MISSED"


def render(r: RunReport) -> str:
    lines = [f"{r.title}: {r.status.upper()}" + (f" ({r.outcome})" if r.outcome else "")
             + (" - partial report, the run is still going" if r.status == "running" else ""),
             f"  {r.workflow_type} {r.workflow_id} run {r.run_id}, started {r.started_at:%Y-%m-%d %H:%M:%S} UTC, "
             f"{((r.closed_at or r.now) - r.started_at).total_seconds():.1f}s"]
    if r.failure:
        lines.append(f"  failure: {r.failure}")
    for b in r.bars:
        secs = ((b.end or r.now) - b.start).total_seconds()
        lines.append(f"  {'  ' * b.depth}{b.label:<{48 - 2 * b.depth}} {b.status:<9} {secs:8.2f}s"
                     + (f"  {b.detail}" if b.detail else ""))
    for v in r.rtos:
        if v.serving_basis:
            lines.append(f"  RTO {v.title}: unknown ({v.serving_basis})")
            continue
        lines.append(f"  RTO {v.title}: {_s(v.total_s)} (target {_s(v.target_s)}: {_verdict(v.met)}) = detection->"
                     f"decision {_s(v.detection_to_decision_s)} + decision->writable {_s(v.decision_to_writable_s)} + "
                     f"writable->serving {_s(v.writable_to_serving_s)}; client write gap {_s(v.client_outage_s)}")
    for v in r.rpos:
        lines.append(f"  RPO {v.title}: WAL lost {_n(v.lost_wal_bytes)} bytes ({v.wal_basis or 'no basis given'}); "
                     f"Redis offset gap {_n(v.redis_offset_gap)}; acknowledged writes lost "
                     f"{_n(v.acknowledged_writes_lost)} (target {_s(v.target_s)}: {_verdict(v.met)})")
    for a in r.approvals:
        lines.append(f"  approval {a.runbook}: {a.outcome}" + (f" by {a.approver}" if a.approver else "")
                     + (f" at {a.at:%Y-%m-%d %H:%M:%S} UTC" if a.at else "") + (f" ({a.comment})" if a.comment else ""))
    for c in r.conflicts:
        lines.append(f"  conflicts {c.runbook} {c.table} ({c.strategy}): {_n(c.conflicts)} conflicts, "
                     f"{_n(c.audit_rows)} audited")
    for q in r.audit_queries:
        lines.append(f"  audit ({q.runbook}): " + " ".join(q.sql.split()))
    for f in r.facts:
        lines.append(f"  {f.section}: {f.name} = {f.value}")
    for n in r.notes:
        lines.append(f"  note: {n}")
    for link in r.links:
        lines.append(f"  UI: {link.url}")
    return "\n".join(lines)
