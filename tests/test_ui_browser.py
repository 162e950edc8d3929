"""Drills from the Temporal UI: headless Debian Chromium drives the test lab's real Web UI.

What an operator does there, and nothing else: the Start Workflow form with a one-object JSON
input, the User Metadata tab for the runbook's current details, the "Send an Update" dialog for
the approval, the workflow page for the result, and the same form with bad input.

The runbook is a planned switchover with approval required, the cheapest run that waits for
an approval and then completes (a few seconds of real work); the full drill is covered by
test_runbooks.py::test_drill and takes minutes. The drill's own type is started from the form
with bad input. The switchover really moves the shared lab, so the test switches it back
through the client before it ends, as it found it.

Screenshots of every stage stay under the test's tmp_path (the path is printed).
"""

from __future__ import annotations

import json
import struct
import time
import uuid

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from eagle_dr.launch import start_move
from tests.lab_helpers import _primary
from workflows.models import RunbookResult, SwitchoverInput
from workflows.runbook import move_id

# Milliseconds, for Playwright. A deadline per UI wait, never a sleep: pages of a loaded 2-core
# machine took 10-25 s to render a workflow's metadata here.
T = 90_000
DETAILS = "iframe[title=output]"  # the UI renders current details (Markdown) in this iframe


async def _start_from_form(browser, ui: str, wid: str, queue: str, wf_type: str, inp: dict) -> str:
    """Fill the Start Workflow form and submit; returns the new run's page path (from the toast)."""
    pg = browser.page
    await pg.goto(f"{ui}/namespaces/default/workflows", wait_until="domcontentloaded")
    await pg.get_by_role("link", name="Start Workflow").click(timeout=T)
    heading = pg.get_by_test_id("start-workflow")
    await heading.wait_for(timeout=T)
    await pg.fill("#workflowId", wid)
    await pg.fill("#taskQueue", queue)
    await pg.fill("#workflowType", wf_type)
    await heading.click()  # the queue is checked on blur
    await pg.get_by_text("Task Queue is Active").wait_for(timeout=T)
    await pg.locator(".cm-content").first.fill(json.dumps(inp))
    # The first click after typing into the CodeMirror editor only blurs it (shared notes,
    # temporal.md "Browser pitfalls"): blur it first, so the click on Start starts.
    await pg.evaluate("document.activeElement && document.activeElement.blur()")
    await browser.shot(f"{wf_type}-form")
    await pg.get_by_test_id("start-workflow-button").click()
    toast = pg.get_by_role("link", name="Workflow started successfully")
    await toast.wait_for(timeout=T)
    href = await toast.get_attribute("href")
    assert href and f"/workflows/{wid}/" in href, href
    return href


async def _details_show(browser, text: str) -> None:
    """Wait until the User Metadata tab's Current Details show ``text``. The tab reads them once
    (a metadata query) and again on its "R" shortcut, so press R each second until the deadline."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    found = browser.page.frame_locator(DETAILS).get_by_text(text).first
    deadline = time.monotonic() + T / 1000
    while time.monotonic() < deadline:
        try:
            await found.wait_for(timeout=1000)
            return
        except PlaywrightTimeout:
            await browser.page.keyboard.press("r")
    await browser.shot("details-missing")
    raise AssertionError(f"the UI's current details never showed {text!r}")


async def test_switchover_started_and_approved_from_the_ui(lab, client, dev_server, browser):
    a = _primary(lab)
    b = lab.cfg.other(a).name
    ui, queue, wid = dev_server.ui_url, lab.cfg.temporal.control_task_queue, move_id(lab.cfg.service)
    pg = browser.page
    try:
        # What an operator types (README, "Drills from the Temporal UI"): the move's fixed id
        # (one move per service), the control queue, the type, one JSON object.
        href = await _start_from_form(browser, ui, wid, queue, "SwitchoverWorkflow", {
            "target_region": b, "reason": "UI drill (browser test)",
            "approval": {"required": True, "timeout_seconds": 600}})
        run_id = href.rstrip("/").split("/")[-2]
        handle = client.get_workflow_handle(wid, run_id=run_id, result_type=RunbookResult)

        # Follow the toast's link as a user would: the UI navigates without reloading the app.
        await pg.get_by_role("link", name="Workflow started successfully").click()
        await pg.get_by_test_id("user-metadata-tab").click(timeout=T)
        await _details_show(browser, "WAITING FOR APPROVAL")
        # The gate says, in the UI, what to send there.
        await _details_show(browser, '"decision": "approve"')
        await browser.shot("waiting-for-approval")

        await pg.get_by_role("button", name="More Actions").click(timeout=T)
        await pg.get_by_role("menuitem", name="Update").click(timeout=T)
        dialog = pg.get_by_role("dialog", name="Send an Update")
        await dialog.get_by_test_id("update-select-button").click(timeout=T)
        # The list comes from the worker's metadata query: the runbook's approve update is there.
        await pg.get_by_role("option", name="approve", exact=True).click(timeout=T)
        await dialog.get_by_role("textbox", name="Data").fill(json.dumps(
            {"approver": "alice (via Web UI)", "decision": "approve", "comment": "browser test"}))
        await pg.evaluate("document.activeElement && document.activeElement.blur()")
        await browser.shot("approve-update")
        await dialog.get_by_role("button", name="Submit").click()
        await pg.get_by_text("Update successful").first.wait_for(timeout=T)

        await pg.get_by_test_id("execution-status").get_by_text("COMPLETED").wait_for(timeout=T)
        await _details_show(browser, "finished: succeeded")
        await _details_show(browser, "approval: approved by alice (via Web UI)")
        await browser.shot("completed-details")
        await pg.get_by_test_id("timeline-tab").click(timeout=T)
        shown = pg.get_by_test_id("input-and-result")
        await shown.get_by_text('"outcome": "succeeded"').wait_for(timeout=T)
        await shown.get_by_text('"approver": "alice (via Web UI)"').wait_for(timeout=T)
        await browser.shot("completed-result")

        # The same run, seen from outside the browser: approved through an update (not a signal),
        # by the name typed in the dialog, and the lab really moved.
        result = await handle.result()
        assert result.outcome == "succeeded", result
        assert result.approval.outcome == "approved" and result.approval.approver == "alice (via Web UI)"
        events = [e.event_type async for e in handle.fetch_history_events()]
        assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED in events
        assert _primary(lab) == b
    finally:
        await _put_back(client, lab, wid, a)


async def _put_back(client, lab, wid: str, primary: str) -> None:
    """Leave the shared lab as found: a run left waiting is cancelled (before its point of no
    return that undoes it), and a moved primary is switched back."""
    try:
        desc = await client.get_workflow_handle(wid).describe()
    except RPCError:  # never started
        desc = None
    if desc is not None and desc.status == WorkflowExecutionStatus.RUNNING:
        h = client.get_workflow_handle(wid, run_id=desc.run_id)
        await h.cancel()
        try:
            await h.result()
        except WorkflowFailureError:
            pass
    if _primary(lab) != primary:
        back = await (await start_move(client, lab.cfg, SwitchoverInput(
            service=lab.cfg.service, target_region=primary, reason="browser test: back"))).result()
        assert back.outcome == "succeeded", back
    assert _primary(lab) == primary


async def test_bad_drill_input_from_the_ui_fails_naming_the_field(lab, client, dev_server, browser):
    """DrillWorkflow from the form with a mistyped value: the run fails at once, non-retryably,
    and the UI's result names the field; nothing of the drill happened."""
    ui, queue = dev_server.ui_url, lab.cfg.temporal.control_task_queue
    primary = _primary(lab)
    wid = f"ui-drill-{uuid.uuid4().hex[:8]}"
    pg = browser.page
    await _start_from_form(browser, ui, wid, queue, "DrillWorkflow", {"probe_interval_seconds": "fast"})
    await pg.get_by_role("link", name="Workflow started successfully").click()
    await pg.get_by_test_id("execution-status").get_by_text("FAILED").wait_for(timeout=T)
    result = pg.get_by_test_id("input-and-result")
    await result.get_by_text("invalid input: probe_interval_seconds").wait_for(timeout=T)
    await browser.shot("bad-input-failed")

    with pytest.raises(WorkflowFailureError) as e:
        await client.get_workflow_handle(wid).result()
    cause = e.value.cause
    assert isinstance(cause, ApplicationError) and cause.non_retryable and cause.type == "InvalidInput", cause
    assert cause.message.startswith("invalid input: probe_interval_seconds: "), cause.message
    assert _primary(lab) == primary


async def test_browser_opens_a_local_html_file_and_shows_its_chart(browser, tmp_path):
    """The helper a report test uses (``eagle-dr report --html``): a file opened offline, the page
    screenshotted, a chart asserted rendered and screenshotted alone; a hidden one is refused."""
    html = tmp_path / "report.html"
    html.write_text('<!doctype html><meta charset="utf-8"><title>drill</title><h1>Drill</h1>'
                    '<svg id="gantt" width="600" height="120" style="display:block">'
                    '<rect x="10" y="10" width="300" height="30" fill="#c33"/></svg>'
                    '<svg id="hidden" width="50" height="50" style="display:none"></svg>')
    page = await browser.open_file(html)
    assert page.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chart = await browser.shows(browser.page.locator("#gantt"), "gantt")
    # The element's own screenshot: the PNG header's width and height are the chart's (a pixel
    # more where the heading above leaves it at a fractional y).
    w, h = struct.unpack(">II", chart.read_bytes()[16:24])
    assert 600 <= w <= 601 and 120 <= h <= 121, (w, h)
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    with pytest.raises(PlaywrightTimeout):
        await browser.shows(browser.page.locator("#hidden"), "hidden", timeout=500)


async def test_the_html_report_of_a_drill_shows_its_timeline_in_chromium(browser, tmp_path):
    """`eagle-dr report --html` of a recorded drill, opened offline in Chromium: the timeline
    chart renders with one bar per step and the RTO marks, and its screenshot is kept."""
    from tests.test_report import _report
    from eagle_dr.report.html import render

    r = _report("drill-alert-latency")
    html = tmp_path / "drill-report.html"
    html.write_text(render(r))
    await browser.open_file(html)
    chart = browser.page.locator('svg[aria-label^="timeline of"]').first
    shot = await browser.shows(chart, "drill-timeline")
    w, h = struct.unpack(">II", shot.read_bytes()[16:24])
    assert w > 300 and h > 100, (w, h)
    bars = await chart.locator("rect").count()
    assert bars >= len(r.bars), (bars, len(r.bars))
    print(f"report screenshot: {shot}")


async def test_the_ui_shows_encrypted_payloads_decoded_through_the_codec_server(lab, client, dev_server, browser):
    """A run's input is ciphertext in Temporal (tests/test_codec.py checks the stored history);
    the UI, pointed at `eagle-dr codec-server` (--ui-codec-endpoint), shows it in clear. The
    marker can only reach the page through the codec server: the server stores no plaintext."""
    marker = f"ui-codec-marker-{uuid.uuid4().hex[:12]}"
    from workflows.models import FailoverInput

    # A failover to the current primary: preflight, then refused; the lab does not move.
    handle = await start_move(client, lab.cfg, FailoverInput(service=lab.cfg.service, target_region=_primary(lab),
                                                             reason=marker))
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    started = (await handle.fetch_history()).events[0].workflow_execution_started_event_attributes
    assert started.input.payloads[0].metadata["encoding"] == b"binary/encrypted"
    assert marker.encode() not in started.input.payloads[0].data

    pg = browser.page
    await pg.goto(f"{dev_server.ui_url}/namespaces/default/workflows/{handle.id}/{handle.result_run_id}/history",
                  wait_until="domcontentloaded")
    shown = pg.get_by_test_id("input-and-result")
    await shown.get_by_text(marker).first.wait_for(timeout=T)
    await browser.shot("decoded-input")
