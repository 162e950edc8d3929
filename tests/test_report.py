"""``eagle-dr report``: the HTML evidence of a run, built from recorded histories (no lab),
and once through the CLI against a real run in the test lab."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timezone
from html.parser import HTMLParser

import pytest
from temporalio.api.history.v1 import History
from temporalio.client import WorkflowFailureError, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter

from eagle_dr.report.extract import build
from eagle_dr.report.html import render
from eagle_dr.report.text import render as render_text
from tests.histories import HISTORY_DIR

# Its tests name lab.cfg.primary as the primary (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("configured_topology")

UI = "http://127.0.0.1:8233"


def _history(name: str) -> WorkflowHistory:
    p = HISTORY_DIR / f"{name}.json"
    return WorkflowHistory.from_json(p.stem, p.read_text())


def _report(name: str):
    return build(_history(name), ui_url=UI)


class _Tags(HTMLParser):
    """Every start tag with its attributes, to check what the page loads."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(page)
    return p.tags


def _bars(page: str) -> list[str]:
    return re.findall(r'<rect class="bar [^"]*"', page)


def test_failover_report_has_one_bar_per_step_and_the_rto_phases():
    r = _report("failover-unplanned")
    page = render(r)
    assert len(_bars(page)) == len(r.bars) == 8  # preflight ... measure RTO/RPO
    assert [b.label for b in r.bars][0] == "preflight" and r.bars[-1].label == "measure RTO/RPO"
    (rto,) = r.rtos
    assert rto.detection_to_decision_s == pytest.approx(5.134901)
    assert rto.decision_to_writable_s == pytest.approx(0.115691)
    assert rto.writable_to_serving_s == pytest.approx(0.134518)
    assert rto.total_s == pytest.approx(5.38511) and rto.target_s == 300.0 and rto.met is True
    for phase in ("detection", "decision", "writable"):
        assert page.count(f'class="rto-phase phase-{phase}"') == 1
    assert "5.39 s" in page and "5.13 s" in page
    # The write gap as the app saw it, placed in time from the client_outage activity's result.
    assert rto.client_gap_start == datetime(2026, 11, 26, 5, 39, 3, 93844, tzinfo=timezone.utc)
    assert page.count('class="client-gap"') == 1 and "8.61 s" in page
    # The old primary was unreachable: lost WAL and the Redis gap are unknown, never 0.
    (rpo,) = r.rpos
    assert rpo.lost_wal_bytes is None and rpo.redis_offset_gap is None and rpo.acknowledged_writes_lost == 0
    rpo_table = page[page.index('<table class="rpo">'):]
    rpo_table = rpo_table[:rpo_table.index("</table>")]
    assert rpo_table.count(">unknown<") >= 2 and "0 B" not in rpo_table
    assert f'href="{UI}/namespaces/default/workflows/failover-unplanned/' in page


def test_drill_report_nests_the_runbooks_and_lists_approvals():
    r = _report("drill")
    page = render(r)
    assert len(_bars(page)) == len(r.bars)
    sub = [b for b in r.bars if b.depth == 1]
    # switchover (10 steps), failover (8), failback (6), each under its own child workflow bar.
    assert len(sub) == 24 and page.count('class="bar done sub"') == 24
    labels = [b.label for b in r.bars]
    assert labels.index("SwitchoverWorkflow dr-move-eagle-alert") < labels.index("stop writes on old primary")
    assert [x.title for x in r.rtos] == ["switchover eagle-alert us-west-2 -> us-east-1",
                                         "failover eagle-alert us-east-1 -> us-west-2"]
    assert r.rtos[1].total_s == pytest.approx(3.537883)
    # Only the durations reach the drill's result: no gap is drawn where its time is not known.
    assert r.rtos[1].client_outage_s == pytest.approx(3.529432) and r.rtos[1].client_gap_start is None
    assert 'class="client-gap"' not in page
    assert [(a.outcome, a.approver) for a in r.approvals] == [("auto-approved", "drill (auto-approved)")] * 2
    assert page.count("drill (auto-approved)") >= 2
    # The failback's audit query names the child run that applied the decisions.
    (q,) = r.audit_queries
    assert q.workflow_id == "dr-failback-eagle-alert" and "run_id = '01a2165d-d4eb-749a-8573-f316d5fa1bf0'" in q.sql
    assert "eagle_dr.conflict_audit" in page


def test_drill_with_its_own_steps_and_the_alert_latency():
    r = _report("drill-alert-latency")
    page = render(r)
    top = [b.label for b in r.bars if b.depth == 0]
    assert top == ["switchover us-west-2 -> us-east-1", "outage: kill region us-east-1",
                   "detect the outage of us-east-1", "alert -> incident workflow latency",
                   "failover us-east-1 -> us-west-2", "us-east-1 comes back; failback rebuilds it as a standby",
                   "backup, then a restore drill of it"]
    assert len(_bars(page)) == len(r.bars) == 7 + 10 + 9 + 6
    alert = next(b for b in r.bars if b.label.startswith("alert"))
    # Measured concurrently with detection: both start at the kill's end.
    assert alert.start == next(b for b in r.bars if b.label.startswith("detect")).start
    assert "Alertmanager -&gt; workflow signalled: 0.09 s (group_wait 0s" in page
    facts = {f.name: f.value for f in r.facts}
    assert facts["alert_latency.group_wait"] == "0s" and float(facts["alert_latency.seconds"]) < 1
    # The old primary was unreachable: the failover's RPO verdict and WAL loss are unknown.
    fo = next(v for v in r.rpos if v.title.startswith("failover"))
    assert fo.met is None and fo.lost_wal_bytes is None


def test_split_brain_report_shows_conflicts_by_strategy_and_the_approver():
    r = _report("split_brain-resolution")
    page = render(r)
    assert {c.strategy for c in r.conflicts} == {"last-write-wins", "merge-with-priority", "source-priority",
                                                 "immutable-append-only", "freshness-priority"}
    alerts = next(c for c in r.conflicts if c.table == "alerts")
    assert (alerts.conflicts, alerts.audit_rows) == (1, 8109)
    (a,) = r.approvals
    assert (a.approver, a.outcome, a.at) == ("dana", "approved", datetime(2026, 11, 26, 6, 55, 56, 401118,
                                                                           tzinfo=timezone.utc))
    assert "<td>dana</td>" in page and "2026-11-26 06:55:56.401 UTC" in page
    assert "from eagle_dr.conflict_audit" in page and not r.rtos  # a split brain has no RTO phases


def test_a_rejected_run_lists_the_decision_from_its_history():
    r = _report("switchover-rejected")
    assert r.status == "failed" and "rejected by bob" in r.failure
    (a,) = r.approvals
    assert a.approver == "bob" and a.comment == "not during peak" and a.source == "history"
    assert "not during peak" in render(r)


@pytest.mark.parametrize("name", ["restore-pitr", "backup-full-from-standby", "restore_drill-healthy",
                                  "monitor-auto-failover", "alert_incident-monitor-resolved", "expire"])
def test_runs_without_a_step_list_get_their_timeline_from_history(name):
    r = _report(name)
    page = render(r)
    assert r.bars and len(_bars(page)) == len(r.bars)
    assert not r.rtos or name.startswith("monitor")  # nothing invented: no RTO where the run measured none
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert render_text(r)


def test_restore_drill_figures_are_reported():
    page = render(_report("restore_drill-healthy"))
    assert "rto_seconds" in page and "12.619" in page and "20261202-010051F" in page


def _with_step_detail(name: str, detail: str) -> WorkflowHistory:
    """The recorded history with its first step's detail replaced (as a hostile database name would)."""
    h = _history(name)
    proto = History()
    proto.events.extend(h.events)
    done = proto.events[-1].workflow_execution_completed_event_attributes.result
    conv = pydantic_data_converter.payload_converter
    result = conv.from_payloads(list(done.payloads))[0]
    result["steps"][0]["detail"] = detail
    result["steps"][1]["name"] = "epoch & <b>bold</b>"
    done.payloads[0].CopyFrom(conv.to_payloads([result])[0])
    return WorkflowHistory(h.workflow_id, list(proto.events))


def test_workflow_data_is_escaped():
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    page = render(build(_with_step_detail("failover-unplanned", evil), ui_url=UI))
    assert "<script" not in page and "<img" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "epoch &amp; &lt;b&gt;" in page


@pytest.mark.parametrize("name", ["drill", "failover-unplanned", "split_brain-resolution", "restore-pitr"])
def test_page_is_one_self_contained_file(name):
    page = render(_report(name))
    tags = _tags(page)
    names = {t for t, _ in tags}
    # Nothing to fetch: no script, stylesheet link, image, frame, object or font; no url() or @import.
    assert not names & {"script", "link", "img", "iframe", "object", "embed", "source", "video", "audio"}
    assert not any("src" in attrs for _, attrs in tags)
    assert "url(" not in page and "@import" not in page
    # The only http(s) addresses are the Temporal UI links an operator clicks.
    hrefs = [a["href"] for t, a in tags if t == "a"]
    assert hrefs and all(h.startswith(UI + "/") for h in hrefs)
    assert len(re.findall(r"https?://", page)) == len(hrefs)
    assert "<svg" in page


def test_a_running_run_gives_a_partial_report_marked_running():
    h = _history("failover-unplanned")
    events = list(h.events)
    # Cut the history in the middle of the run: after the promote activity was scheduled.
    cut = next(i for i, e in enumerate(events) if e.HasField("activity_task_scheduled_event_attributes")
               and e.activity_task_scheduled_event_attributes.activity_type.name == "promote_postgres")
    running = WorkflowHistory(h.workflow_id, events[:cut + 1])
    progress = {"runbook": "failover", "service": "eagle-alert", "source_region": "us-east-1",
                "target_region": "us-west-2", "epoch": 3, "steps": [
                    {"name": "preflight", "status": "done", "started_at": "2026-11-26T05:39:06.321334Z",
                     "finished_at": "2026-11-26T05:39:11.428205Z", "detail": "ok"},
                    {"name": "promote", "status": "running", "started_at": "2026-11-26T05:39:11.486319Z"}]}
    r = build(running, progress=progress, ui_url=UI)
    page = render(r)
    assert r.status == "running" and r.closed_at is None
    assert "RUNNING" in page and "partial report" in page
    assert len(_bars(page)) == 2 and page.count('class="bar running"') == 1
    assert not r.rtos  # not measured yet: not shown



# -- against the test lab -------------------------------------------------------------------------


def _cli(lab_config_path, lab, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "EAGLE_DR_STATE_DIR": lab.cfg.lab.state_dir}
    return subprocess.run([sys.executable, "-m", "eagle_dr.cli", "--config", str(lab_config_path), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.asyncio(loop_scope="session")
async def test_cli_reports_a_real_run_while_it_runs_and_after(lab, client, lab_config_path, tmp_path):
    """A switchover held at its approval gate (nothing moves): the CLI's report of it running,
    then rejected by a named approver, as HTML."""
    from eagle_dr.launch import start_move
    from tests.lab_helpers import _until
    from workflows.models import ApprovalDecision, ApprovalPolicy, SwitchoverInput

    target = lab.cfg.secondary.name
    handle = await start_move(client, lab.cfg, SwitchoverInput(
        service=lab.cfg.service, target_region=target, reason="report test",
        approval=ApprovalPolicy(required=True, timeout_seconds=120)))

    async def awaiting():
        try:
            return (await handle.query("progress")).get("awaiting_approval")
        except Exception:  # noqa: BLE001 - its first task not run yet
            return False

    try:
        await _until(awaiting, 60, "the switchover to wait at its gate", interval=0.2)
        running = _cli(lab_config_path, lab, "report", handle.id)
        assert running.returncode == 0, running.stderr
        assert "RUNNING" in running.stdout and "partial report" in running.stdout
        assert "approval" in running.stdout and "preflight" in running.stdout
    finally:
        await handle.execute_update("approve", ApprovalDecision(approver="erin <ops>", decision="reject",
                                                                comment="report test"))
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    page_path = tmp_path / "switchover.html"
    done = _cli(lab_config_path, lab, "report", handle.id, "--run-id", handle.result_run_id or handle.run_id,
                "--html", str(page_path))
    assert done.returncode == 0, done.stderr
    assert str(page_path) in done.stdout.replace("\n", "")
    page = page_path.read_text()
    assert "FAILED" in page and "erin &lt;ops&gt;" in page and "erin <ops>" not in page
    assert f"{lab.cfg.temporal.ui_url}/namespaces/default/workflows/{handle.id}/" in page
    assert len(_bars(page)) >= 4  # describe_topology, probes, read_epoch, the gate's timer
    # What `eagle-dr drill` (make drill) leaves at its end: the HTML and its text beside it, in the lab's state.
    from eagle_dr.cli import _drill_files

    before = set((lab.state / "reports").glob("drill-*.html"))
    await _drill_files(client, lab.cfg, handle, None)
    (written,) = set((lab.state / "reports").glob("drill-*.html")) - before
    assert "erin &lt;ops&gt;" in written.read_text() and "erin <ops>" in written.with_suffix(".txt").read_text()
    missing = _cli(lab_config_path, lab, "report", "no-such-workflow-here")
    assert missing.returncode == 1 and "no such workflow" in missing.stderr


@pytest.mark.asyncio(loop_scope="session")
async def test_alert_latency_through_the_labs_alertmanager(lab, client):
    """The drill's measurement: a real alert into the lab's Alertmanager, to the receiver, to
    the incident workflow's history; recorded only (no rule takes it), then resolved."""
    import uuid

    from temporalio.testing import ActivityEnvironment

    from activities.alert_probe import AlertProbeActivities, AlertProbeRequest
    from tests.lab_helpers import _until

    lab.start_receiver()
    lab.start_alertmanager()
    probe = AlertProbeActivities(lab.cfg)
    tag = f"report-test-{uuid.uuid4().hex[:8]}"
    res = await ActivityEnvironment(client=client).run(
        probe.measure_alert_latency, AlertProbeRequest(service=lab.cfg.service, region="us-east-1", tag=tag))
    assert res.error is None, res.error
    assert res.group_wait == "0s"
    assert res.posted_at < res.signalled_at and 0 < res.seconds < 10
    assert res.seconds == pytest.approx((res.signalled_at - res.posted_at).total_seconds())
    assert "Alertmanager -> workflow signalled" in res.summary() and "group_wait 0s" in res.summary()
    # The probe resolved its alert: the incident closes as resolved, having only recorded it.
    inc = client.get_workflow_handle(res.incident_id)
    summary = await _until(lambda: _closed(inc), 30, "the probe's incident to resolve")
    assert summary["outcome"] == "resolved" and summary["action"] == "recorded"


async def _closed(handle):
    from temporalio.client import WorkflowExecutionStatus

    if (await handle.describe()).status != WorkflowExecutionStatus.COMPLETED:
        return None
    return await handle.result()


def test_a_move_whose_routing_failed_reports_its_rto_unknown_with_why():
    """The run's result says why its RTO is unknown (workflows/failover.py finish_measurement):
    the report shows that, never the steps' time as an RTO."""
    import json

    from eagle_dr.report import text
    from eagle_dr.report.extract import _rto
    from eagle_dr.report.html import _rto_table

    r = _report("failover-unplanned")
    d = json.loads(r.rtos[0].model_dump_json())
    d.update(met=None, serving_basis="routing failed: clients were not sent to the new primary by the end of the run")
    (rto,) = r.rtos[:] = [_rto("failover", d, None)]
    assert rto.serving_basis.startswith("routing failed")
    assert "unknown: routing failed" in _rto_table([rto])
    assert "RTO failover: unknown (routing failed" in text.render(r) and "5.39" not in text.render(r).split("RTO ")[1]
