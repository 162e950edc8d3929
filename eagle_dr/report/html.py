"""A RunReport as one self-contained HTML page: the evidence a DR test leaves behind.

One file, no script, no external resource (no CDN, no web font, no image URL): the timeline
is inline SVG and the styles are inline, so the page opens offline, from an archive or an
audit folder years later, and looks the same. Every value from the run (step names and
details, approvers' comments, hostnames) is escaped: workflow data is not trusted markup.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from html import escape

from eagle_dr.report.model import Bar, RpoView, RtoView, RunReport

WIDTH, LABEL_W, ROW_H, TOP = 1000, 340, 20, 30
CHART_W = WIDTH - LABEL_W - 20

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1060px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dce3}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #d8dce3;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f2f4f7} .num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 8px;border-radius:4px;color:#fff;font-weight:600}
.st-completed,.st-succeeded,.st-resolved{background:#2e7d32} .st-running{background:#b26a00}
.st-failed,.st-terminated,.st-timed-out,.st-cancelled,.st-aborted{background:#c62828}
.st-degraded,.st-continued-as-new{background:#8d6e00} .unknown{color:#c62828;font-weight:600}
.met{color:#2e7d32;font-weight:600} .missed{color:#c62828;font-weight:600}
pre{background:#f6f8fa;border:1px solid #d8dce3;padding:8px;white-space:pre-wrap}
svg text{font:11px system-ui,sans-serif;fill:#1d2330} .meta td:first-child{font-weight:600}
.bar.done{fill:#4a7fc1} .bar.running{fill:#e0a100} .bar.failed,.bar.timed-out{fill:#c62828}
.bar.skipped,.bar.pending,.bar.cancelled{fill:#9aa3ad} .bar.sub{opacity:.8}
.phase-detection{fill:#8e44ad} .phase-decision{fill:#d35400} .phase-writable{fill:#16a085}
.client-gap{fill:#c62828;fill-opacity:.35;stroke:#c62828} .rto-mark{stroke:#555;stroke-dasharray:4 3}
.grid{stroke:#e6e9ee} .legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;
vertical-align:middle}
"""


def e(v: object) -> str:
    return escape("" if v is None else str(v), quote=True)


def _t(d: datetime | None) -> str:
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC" if d else "unknown"


def _s(v: float | None, unit: str = "s") -> str:
    return f"{v:.2f} {unit}" if v is not None else '<span class="unknown">unknown</span>'


def _n(v: int | None, unit: str = "") -> str:
    return f"{v:,}{unit}" if v is not None else '<span class="unknown">unknown</span>'


def _verdict(met: bool | None) -> str:
    return '<span class="unknown">unknown</span>' if met is None else \
        '<span class="met">met</span>' if met else '<span class="missed">MISSED</span>'


# -- the timeline ---------------------------------------------------------------------------------


def _span(r: RunReport) -> tuple[datetime, datetime]:
    starts = [b.start for b in r.bars] + [r.started_at]
    ends = [b.end or r.now for b in r.bars] + [r.now]
    for rto in r.rtos:
        starts += [t for t in (rto.detected_at, rto.client_gap_start) if t]
        ends += [t for t in (rto.serving_at, rto.client_gap_end) if t]
    t0, t1 = min(starts), max(ends)
    return t0, max(t1, t0 + timedelta(seconds=1))


def _ticks(total: float) -> list[float]:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400):
        if total / step <= 10:
            return [i * step for i in range(int(total / step) + 1)]
    return [0.0, total]


def _fmt_offset(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:g}h"
    if s >= 120:
        return f"{s / 60:g}m"
    return f"{s:g}s"


def gantt(r: RunReport) -> str:
    """The steps as an SVG Gantt chart: one ``rect.bar`` per step, then one row of RTO phases
    per measured move and the clients' write gap, with the RTO instants as dashed lines."""
    t0, t1 = _span(r)
    total = (t1 - t0).total_seconds()

    def x(t: datetime) -> float:
        return LABEL_W + (t - t0).total_seconds() / total * CHART_W

    rows: list[str] = []
    y = TOP
    for b in r.bars:
        rows.append(_bar_row(b, y, x, r.now))
        y += ROW_H
    marks: list[str] = []
    for rto in r.rtos:
        row, mark = _rto_rows(rto, y, x)
        if row:
            rows.append(row)
            marks.append(mark)
            y += ROW_H * (2 if rto.client_gap_start and rto.client_gap_end else 1)
    height = y + 10
    axis = []
    for s in _ticks(total):
        xx = LABEL_W + s / total * CHART_W
        axis.append(f'<line class="grid" x1="{xx:.1f}" y1="{TOP - 4}" x2="{xx:.1f}" y2="{height - 10}"/>'
                    f'<text x="{xx:.1f}" y="{TOP - 10}" text-anchor="middle">+{e(_fmt_offset(s))}</text>')
    # No xmlns: inline SVG in HTML needs none, and the page names no http(s) address but its links.
    return (f'<svg width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="timeline of {e(r.title)}">'
            f'<title>{e(r.title)}: timeline from {e(_t(t0))}</title>'
            + "".join(axis) + "".join(rows) + "".join(marks) + "</svg>")


def _bar_row(b: Bar, y: int, x, now: datetime) -> str:
    end = b.end or now
    x0, x1 = x(b.start), x(end)
    w = max(x1 - x0, 2.0)
    seconds = (end - b.start).total_seconds()
    label = ("  " * b.depth) + b.label
    label = label if len(label) <= 52 else label[:50] + "…"
    indent = 6 + 14 * b.depth
    tip = f"{b.label}: {b.status}, {seconds:.2f}s" + (f" ({b.owner})" if b.owner else "") + \
        (f"\n{b.detail}" if b.detail else "")
    cls = f"bar {b.status}" + (" sub" if b.depth else "")
    return (f'<g class="row"><text x="{indent}" y="{y + 14}">{e(label)}</text>'
            f'<rect class="{e(cls)}" x="{x0:.1f}" y="{y + 3}" width="{w:.1f}" height="{ROW_H - 6}">'
            f'<title>{e(tip)}</title></rect>'
            + (f'<text x="{x0 + w + 4:.1f}" y="{y + 14}">{seconds:.2f}s</text></g>' if x0 + w + 50 < WIDTH else
               f'<text x="{x0 - 4:.1f}" y="{y + 14}" text-anchor="end">{seconds:.2f}s</text></g>'))


def _rto_rows(rto: RtoView, y: int, x) -> tuple[str, str]:
    """Phases between the RTO instants that were measured; nothing where an instant is missing."""
    points = [("detection", rto.detected_at, rto.decided_at), ("decision", rto.decided_at, rto.writable_at),
              ("writable", rto.writable_at, rto.serving_at)]
    names = {"detection": "detection → decision", "decision": "decision → writable", "writable": "writable → serving"}
    segs = []
    for name, a, b in points:
        if a and b:
            segs.append(f'<rect class="rto-phase phase-{name}" x="{x(a):.1f}" y="{y + 3}" '
                        f'width="{max(x(b) - x(a), 2.0):.1f}" height="{ROW_H - 6}">'
                        f'<title>{e(names[name])}: {(b - a).total_seconds():.2f}s</title></rect>')
    if not segs:
        return "", ""
    row = f'<g class="rto"><text x="6" y="{y + 14}" font-weight="bold">{e(("RTO: " + rto.title)[:52])}</text>' + \
        "".join(segs) + "</g>"
    if rto.client_gap_start and rto.client_gap_end:
        a, b = rto.client_gap_start, rto.client_gap_end
        row += (f'<g class="gap"><text x="6" y="{y + ROW_H + 14}">client write gap</text>'
                f'<rect class="client-gap" x="{x(a):.1f}" y="{y + ROW_H + 3}" width="{max(x(b) - x(a), 2.0):.1f}" '
                f'height="{ROW_H - 6}"><title>last good write {e(_t(a))} → first good write {e(_t(b))}: '
                f'{(b - a).total_seconds():.2f}s</title></rect></g>')
    marks = []
    for name, t in (("detected", rto.detected_at), ("decided", rto.decided_at), ("writable", rto.writable_at),
                    ("serving", rto.serving_at)):
        if t:
            marks.append(f'<line class="rto-mark" x1="{x(t):.1f}" y1="{TOP}" x2="{x(t):.1f}" y2="{y + ROW_H}">'
                         f'<title>{e(rto.title)}: {name} at {e(_t(t))}</title></line>')
    return row, "".join(marks)


# -- the page -------------------------------------------------------------------------------------


def _rto_table(rtos: list[RtoView]) -> str:
    rows = []
    for v in rtos:
        gap = _s(v.client_outage_s) + (f" ({e(_t(v.client_gap_start))} → {e(_t(v.client_gap_end))})"
                                       if v.client_gap_start and v.client_gap_end else "")
        rows.append(f"<tr><td>{e(v.title)}</td><td>{e(_t(v.detected_at))}</td>"
                    f'<td class="num">{_s(v.detection_to_decision_s)}</td><td class="num">{_s(v.decision_to_writable_s)}</td>'
                    f'<td class="num">{_s(v.writable_to_serving_s)}</td>'
                    f'<td class="num">{"unknown: " + e(v.serving_basis) if v.serving_basis else _s(v.total_s)}</td>'
                    f'<td class="num">{_s(v.target_s)}</td><td>{_verdict(v.met)}</td><td>{gap}</td></tr>')
    return ("<table class=\"rto\"><tr><th>move</th><th>detected</th><th>detection → decision</th>"
            "<th>decision → writable</th><th>writable → serving</th><th>RTO</th><th>target</th><th>verdict</th>"
            "<th>client write gap</th></tr>" + "".join(rows) + "</table>")


def _rpo_table(rpos: list[RpoView]) -> str:
    rows = []
    for v in rpos:
        acked = _n(v.acknowledged_writes_lost) + (f" of {v.acknowledged_writes_total:,}"
                                                  if v.acknowledged_writes_total else "")
        rows.append(f"<tr><td>{e(v.title)}</td><td class=\"num\">{_n(v.lost_wal_bytes, ' B')}</td>"
                    f"<td>{e(v.wal_basis)}</td><td class=\"num\">{_n(v.lost_commits)}</td>"
                    f"<td class=\"num\">{_n(v.redis_offset_gap, ' B')}</td><td class=\"num\">{acked}</td>"
                    f"<td class=\"num\">{_s(v.loss_window_s)}</td><td class=\"num\">{_s(v.target_s)}</td>"
                    f"<td>{_verdict(v.met)}</td></tr>")
    return ("<table class=\"rpo\"><tr><th>move</th><th>WAL lost</th><th>basis</th><th>commits lost</th>"
            "<th>Redis offset gap</th><th>acknowledged writes lost</th><th>loss window</th><th>target</th>"
            "<th>verdict</th></tr>" + "".join(rows) + "</table>")


def render(r: RunReport) -> str:
    status = r.outcome if r.status == "completed" and r.outcome else r.status
    running = r.status == "running"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(r.title)} — {e(r.workflow_id)}{' (RUNNING)' if running else ''}</title>",
           f"<style>{_CSS}</style></head><body>",
           f'<h1>{e(r.title)} <span class="badge st-{e(status)}">{e(status.upper())}</span></h1>']
    if running:
        out.append(f'<p class="running"><strong>RUNNING</strong>: a partial report, as of {e(_t(r.now))}.</p>')
    meta = [("workflow", f"{r.workflow_type} {r.workflow_id}"), ("run", r.run_id), ("status", r.status),
            ("outcome", r.outcome), ("started", _t(r.started_at)), ("closed", _t(r.closed_at) if r.closed_at else None),
            ("duration", f"{((r.closed_at or r.now) - r.started_at).total_seconds():.2f} s")]
    out.append('<table class="meta">' + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in meta
                                                if v is not None) + "</table>")
    if r.failure:
        out.append(f'<p class="missed">failure: {e(r.failure)}</p>')
    if r.bars:
        out.append("<h2>Timeline</h2>" + gantt(r))
        legend = [("#4a7fc1", "step"), ("#e0a100", "running"), ("#c62828", "failed"),
                  ("#9aa3ad", "skipped or cancelled")]
        if r.rtos:
            legend += [("#8e44ad", "detection → decision"), ("#d35400", "decision → writable"),
                       ("#16a085", "writable → serving"), ("rgba(198,40,40,.35)", "client write gap")]
        out.append('<p class="legend">' + "".join(f'<span style="background:{c}"></span>{e(n)}' for c, n in legend)
                   + "</p>")
        out.append("<table class=\"steps\"><tr><th>step</th><th>status</th><th>started</th><th>seconds</th>"
                   "<th>detail</th></tr>" + "".join(
                       f"<tr><td>{'&nbsp;' * 4 * b.depth}{e(b.label)}</td><td>{e(b.status)}</td><td>{e(_t(b.start))}"
                       f"</td><td class=\"num\">{((b.end or r.now) - b.start).total_seconds():.2f}</td>"
                       f"<td>{e(b.detail)}</td></tr>" for b in r.bars) + "</table>")
    if r.rtos:
        out.append("<h2>RTO</h2>" + _rto_table(r.rtos))
    if r.rpos:
        out.append("<h2>RPO</h2>" + _rpo_table(r.rpos))
    if r.approvals:
        out.append("<h2>Approvals</h2><table class=\"approvals\"><tr><th>runbook</th><th>outcome</th>"
                   "<th>approver</th><th>at</th><th>comment</th></tr>" + "".join(
                       f"<tr><td>{e(a.runbook)}</td><td>{e(a.outcome)}</td><td>{e(a.approver or '—')}</td>"
                       f"<td>{e(_t(a.at) if a.at else '—')}</td><td>{e(a.comment or '')}</td></tr>"
                       for a in r.approvals) + "</table>")
    if r.conflicts or r.audit_queries:
        out.append("<h2>Conflicts by strategy</h2>")
        if r.conflicts:
            cols = ("loser_rows", "inserted", "updated", "deleted", "conflicts", "flagged", "audit_rows")
            out.append("<table class=\"conflicts\"><tr><th>runbook</th><th>table</th><th>strategy</th>"
                       + "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols) + "</tr>" + "".join(
                           f"<tr><td>{e(c.runbook)}</td><td>{e(c.table)}</td><td>{e(c.strategy)}</td>"
                           + "".join(f'<td class="num">{_n(getattr(c, k))}</td>' for k in cols) + "</tr>"
                           for c in r.conflicts) + "</table>")
        for q in r.audit_queries:
            out.append(f"<p>Every decision of {e(q.runbook)}, key by key, with both versions "
                       f"(run on the primary):</p><pre class=\"audit-sql\">{e(q.sql)}</pre>")
    if r.facts:
        out.append("<h2>Figures</h2><table class=\"facts\"><tr><th>part</th><th>what</th><th>value</th></tr>"
                   + "".join(f"<tr><td>{e(f.section)}</td><td>{e(f.name)}</td><td>{e(f.value)}</td></tr>"
                             for f in r.facts) + "</table>")
    if r.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in r.notes) + "</ul>")
    if r.links:
        out.append("<h2>Temporal UI</h2><ul>" + "".join(f'<li><a href="{e(link.url)}">{e(link.label)}</a></li>'
                                                         for link in r.links) + "</ul>")
    out.append(f"<p><small>eagle-dr report, built from the run's Temporal history.</small></p></body></html>")
    return "\n".join(out)
