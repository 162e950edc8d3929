"""Notifications out: runbooks run against the test lab on a control worker of this module's
own (the lab's config plus a ``notifications:`` section), sending to real local servers: a
stdlib HTTP server that records the Slack webhook's and PagerDuty's POSTs (and answers 500 on
one path), aiosmtpd for email, and a closed port for a channel that is down.

The runbooks are cheap and leave the lab as they found it: a switchover that waits at its
approval gate and is rejected, and a split-brain check that finds none.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from temporalio import workflow
from temporalio.client import WorkflowFailureError
from temporalio.worker import Worker

from activities.notify import pagerduty, slack
from activities.notify.event import NotifyEvent, body_lines
from eagle_dr.config import ConfigError, NotificationsConfig, parse_config
from tests.histories import decrypted_json, record
from tests.lab_helpers import _async, _awaiting, _left_as_found, _progress, _until
from workers.registry import control_activities
from workers.run import sandbox_runner
from workers.scrub import ScrubSecrets
from workflows.consistency import ConsistencyCheckWorkflow, ConsistencyResult
from workflows.models import ApprovalDecision, ApprovalPolicy, SwitchoverInput
from workflows.monitor import MonitorInput, MonitorWorkflow
from workflows.runbook import Runbook
from workflows.split_brain import SplitBrainInput, SplitBrainWorkflow
from workflows.switchover import SwitchoverWorkflow

# Its tests name lab.cfg.primary as the primary (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("configured_topology")

# Async tests run on the session loop (pytest.ini: asyncio_default_test_loop_scope), beside the lab.

SLACK_TOKEN = f"xoxb-{secrets.token_hex(12)}"
ROUTING_KEY = f"rk{secrets.token_hex(15)}"
SMTP_PASSWORD = f"pw-{secrets.token_hex(10)}"


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.posts: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.held, self.release = threading.Event(), threading.Event()

    def on(self, prefix: str) -> list[dict]:
        with self.lock:
            return [body for path, body in self.posts if path.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.startswith("/broken"):
            self.send_response(500)
            self.end_headers()
            return
        if self.path.startswith("/flaky") and "started: switchover" in body.get("text", ""):
            # Down for a switchover's first message only, up again for the rest of the run.
            self.send_response(500)
            self.end_headers()
            return
        if "notify-hold-" in body.get("text", "") and "finished:" in body.get("text", ""):
            # The run's end being announced, held until the test lets it land.
            self.server.held.set()
            self.server.release.wait(60)
        if self.path.startswith("/slow") and "started:" in body.get("text", ""):
            # A chat service that takes a while over the first message of a run: whatever is
            # sent after it must still arrive after it (workflows/notify.py sends in order).
            time.sleep(1.5)
        with self.server.lock:
            self.server.posts.append((self.path, body))
        # Slack answers 200 "ok", PagerDuty 202 with a status body.
        self.send_response(202 if self.path.startswith("/pd") else 200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class _Mailbox:
    def __init__(self):
        self.messages = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=auth_data.password.decode() == SMTP_PASSWORD)


def _free_port() -> int:
    """A port nothing listens on (the kernel's pick, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_recorder():
    server = _Recorder()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mailbox():
    box = _Mailbox()
    # A relay on this host without TLS: AUTH over the plain connection is what the channel's
    # allow_plaintext_auth is for (the config refuses it otherwise).
    # A port of its own: Controller.start() connects to the port it was given to check it is up.
    ctl = Controller(box, hostname="127.0.0.1", port=_free_port(), authenticator=box.authenticate,
                     auth_require_tls=False)
    ctl.start()
    yield box, ctl.port
    ctl.stop()


@pytest.fixture(scope="module")
def secrets_env():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def ncfg(lab_cfg, http_recorder, mailbox, secrets_env):
    port = http_recorder.server_address[1]
    secrets_env.setenv("EAGLE_DR_TEST_SLACK_URL", f"http://127.0.0.1:{port}/slack/services/T0/B0/{SLACK_TOKEN}")
    secrets_env.setenv("EAGLE_DR_TEST_PD_KEY", ROUTING_KEY)
    secrets_env.setenv("EAGLE_DR_TEST_SMTP_PW", SMTP_PASSWORD)
    secrets_env.setenv("EAGLE_DR_TEST_SLOW_URL", f"http://127.0.0.1:{port}/slow/{SLACK_TOKEN}")
    secrets_env.setenv("EAGLE_DR_TEST_FLAKY_URL", f"http://127.0.0.1:{port}/flaky/{SLACK_TOKEN}")
    secrets_env.setenv("EAGLE_DR_TEST_DOWN_URL", f"http://127.0.0.1:{_free_port()}/hook/{SLACK_TOKEN}")
    notifications = NotificationsConfig.model_validate({"channels": {
        "chat": {"type": "slack", "webhook_url": {"env": "EAGLE_DR_TEST_SLACK_URL"}},
        "pager": {"type": "pagerduty", "routing_key": {"env": "EAGLE_DR_TEST_PD_KEY"},
                  "url": f"http://127.0.0.1:{port}/pd/v2/enqueue"},
        "mail": {"type": "smtp", "host": "127.0.0.1", "port": mailbox[1], "starttls": False,
                 "allow_plaintext_auth": True, "username": "eagle", "password": {"env": "EAGLE_DR_TEST_SMTP_PW"},
                 "from": "eagle-dr@example.org", "to": ["oncall@example.org"]},
        # Down: nothing listens there; and a webhook that answers 500 every time.
        "down": {"type": "slack", "webhook_url": {"env": "EAGLE_DR_TEST_DOWN_URL"}, "timeout": "2s"},
        "slow": {"type": "slack", "webhook_url": {"env": "EAGLE_DR_TEST_SLOW_URL"}},
        "flaky": {"type": "slack", "webhook_url": {"env": "EAGLE_DR_TEST_FLAKY_URL"}},
        "pager-500": {"type": "pagerduty", "routing_key": {"env": "EAGLE_DR_TEST_PD_KEY"},
                      "url": f"http://127.0.0.1:{port}/broken/v2/enqueue"},
    }})
    queue = f"notify-test-{uuid.uuid4().hex[:8]}"
    return lab_cfg.model_copy(update={"notifications": notifications, "temporal": lab_cfg.temporal.model_copy(
        update={"control_task_queue": queue})})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(lab, client, ncfg):
    """The lab's control worker, but with notifications: the runbooks' regional steps still go
    to the lab's own regional workers."""
    with ThreadPoolExecutor(8) as executor:
        async with Worker(client, task_queue=ncfg.temporal.control_task_queue,
                          workflows=[SwitchoverWorkflow, SplitBrainWorkflow, MonitorWorkflow,
                                     ConsistencyCheckWorkflow], activities=control_activities(ncfg),
                          activity_executor=executor, workflow_runner=sandbox_runner(),
                          interceptors=[ScrubSecrets()]):
            yield ncfg.temporal.control_task_queue


def _slack_kinds(posts: list[dict], wid: str) -> list[str]:
    return [p["text"].splitlines()[0] for p in posts if wid in p["text"]]


def _tries(history: str) -> dict[tuple[str, str], int]:
    """(channel, event kind) -> the attempts its delivery was scheduled with."""
    tries = {}
    for e in json.loads(history)["events"]:
        a = e.get("activityTaskScheduledEventAttributes")
        if a and a["activityType"]["name"] == "send_notification":
            d = json.loads(base64.b64decode(a["input"]["payloads"][0]["data"]))
            tries[(d["channel"], d["event"]["kind"])] = a["retryPolicy"]["maximumAttempts"]
    return tries


def _history_has_no_secret(history: str) -> None:
    for secret in (SLACK_TOKEN, ROUTING_KEY, SMTP_PASSWORD):
        assert secret not in history


async def test_rejected_switchover_notifies_every_channel(lab, client, worker, ncfg, http_recorder, mailbox):
    _, b = lab.cfg.primary.name, lab.cfg.secondary.name
    wid = f"notify-switchover-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        SwitchoverWorkflow.run, SwitchoverInput(service=lab.cfg.service, target_region=b,
                                                approval=ApprovalPolicy(required=True, timeout_seconds=600)),
        id=wid, task_queue=worker)
    await _until(lambda: _awaiting(handle), 60, "the approval gate")
    ui = ncfg.temporal.ui_url.rstrip("/")
    link = f"{ui}/namespaces/default/workflows/{wid}/{handle.result_run_id}/history"

    async def approval_paged():
        return any(p.get("event_action") == "trigger" for p in http_recorder.on("/pd"))
    await _until(approval_paged, 30, "PagerDuty's trigger for the approval")
    await handle.execute_update(SwitchoverWorkflow.approve, ApprovalDecision(approver="bob", decision="reject",
                                                                             comment="not now"))
    with pytest.raises(WorkflowFailureError) as e:
        await handle.result()
    assert "approval rejected by bob" in e.value.cause.message
    # The run ended only after "finished" was delivered: everything is here already.

    # Slack: started, approval needed (UI link, approve command), its decision, finished (aborted).
    chat = [p for p in http_recorder.on("/slack/services/T0/B0/") if wid in p["text"]]
    heads = [p["text"].splitlines()[0] for p in chat]
    assert len(heads) == 4, heads
    assert "started: switchover" in heads[0]
    assert "APPROVAL NEEDED: switchover" in heads[1] and f"-> {b}" in heads[1]
    assert f"eagle-dr approve {wid}" in chat[1]["text"] and link in chat[1]["text"]
    assert any(link in json.dumps(block) for block in chat[1]["blocks"])
    assert "approval decided: switchover" in heads[2] and "rejected by bob: not now" in chat[2]["text"]
    assert "finished: switchover" in heads[3] and "outcome: aborted" in chat[3]["text"]

    # PagerDuty: the gate's own incident, triggered and resolved by the decision; the run's
    # end resolves the run's.
    pd = [p for p in http_recorder.on("/pd") if wid in p["dedup_key"]]
    run_key = f"eagle-dr/{wid}/{handle.result_run_id}"
    assert [(p["event_action"], p["dedup_key"]) for p in pd] == [
        ("trigger", f"{run_key}/approval-1"), ("resolve", f"{run_key}/approval-1"), ("resolve", run_key)], pd
    assert pd[0]["routing_key"] == ROUTING_KEY and pd[0]["payload"]["severity"] == "critical"
    assert pd[0]["payload"]["custom_details"]["approve_command"] == f"eagle-dr approve {wid}"
    assert pd[0]["links"][0]["href"] == link

    # Email: one per event, logged in with the referenced password.
    box, _ = mailbox
    mails = [m for rcpt, m in box.messages if wid in m.get_content()]
    assert [m["Subject"].split(": ")[1] for m in mails] == ["started", "APPROVAL NEEDED", "approval decided",
                                                             "finished"]
    approval_mail = mails[1]
    assert approval_mail["To"] == "oncall@example.org" and approval_mail["From"] == "eagle-dr@example.org"
    assert approval_mail["Subject"].startswith(f"[eagle-dr] {lab.cfg.service}: APPROVAL NEEDED: switchover")
    text = approval_mail.get_content()
    assert f"Approve: eagle-dr approve {wid}" in text and link in text
    assert ("eagle", SMTP_PASSWORD) in box.logins

    # No secret in history; the channels that were down are in it, by name.
    history = await decrypted_json(handle)
    _history_has_no_secret(history)
    assert "send_notification" in history and "HTTP 500" in history and "pager-500" in history
    # A channel that failed once and delivered again gets its full retries back: one failure
    # early in a long run (a monitor's) left every later page, the night's outage too, one try.
    tries = _tries(history)
    assert [tries[("flaky", k)] for k in ("runbook-started", "approval-needed", "approval-decided",
                                          "runbook-finished")] == [3, 1, 3, 3], tries
    # (switchover-notify-rejected-in-order: the same run before approvals had incidents of their own)
    await record(handle, "switchover-notify-approval-own-incident")
    assert lab.cfg.primary.name != b


async def test_channels_down_do_not_fail_the_runbook_and_are_reported(lab, client, worker, http_recorder):
    wid = f"notify-split-{uuid.uuid4().hex[:8]}"
    # Approval required: should the lab hold a split brain after all, the run waits and aborts
    # instead of resolving it under the tests that follow.
    handle = await client.start_workflow(
        SplitBrainWorkflow.run, SplitBrainInput(service=lab.cfg.service,
                                                approval=ApprovalPolicy(required=True, timeout_seconds=5)),
        id=wid, task_queue=worker)
    result = await handle.result()
    assert result.outcome == "no-split-brain"
    failed = [n for n in result.notes if n.startswith("notifications failed: ")]
    assert len(failed) == 1, result.notes
    # Both broken channels, for each event they want; the working ones are not named.
    assert "down: runbook-started not delivered" in failed[0] and "down: runbook-finished" in failed[0]
    assert "pager-500: runbook-finished not delivered" in failed[0] and "HTTP 500" in failed[0]
    assert "chat:" not in failed[0] and "mail:" not in failed[0] and "pager:" not in failed[0]
    assert SLACK_TOKEN not in failed[0]
    heads = _slack_kinds(http_recorder.on("/slack/"), wid)
    assert len(heads) == 2 and "started: split-brain" in heads[0] and "finished: split-brain" in heads[1]
    # The run ends within milliseconds of starting; "started" is slow to land on this channel,
    # and "finished" still comes after it.
    slow = _slack_kinds(http_recorder.on("/slow/"), wid)
    assert len(slow) == 2 and "started: split-brain" in slow[0] and "finished: split-brain" in slow[1], slow
    pd = [p for p in http_recorder.on("/pd") if wid in p["dedup_key"]]
    assert [p["event_action"] for p in pd] == ["resolve"]
    history = await decrypted_json(handle)
    _history_has_no_secret(history)
    # A channel given up on gets one try per later event, not the full retries again: queued in
    # order, a hung channel would otherwise hold the run's end for minutes per event.
    tries = _tries(history)
    assert tries[("down", "runbook-started")] == 3 and tries[("down", "runbook-finished")] == 1, tries
    assert tries[("chat", "runbook-finished")] == 3, tries
    await record(handle, "split-brain-notify-in-order")


@workflow.defn(name="NotifyTestBugInAStep")
class _BugInAStep(Runbook):
    """A runbook whose step has a bug until the test "deploys the fix" (unsandboxed: the flag is
    this module's class attribute, read again when the run is replayed)."""

    runbook = "bug-probe"
    fixed = False

    @workflow.run
    async def run(self, service: str) -> str:
        self.service = service
        await self.topology()
        async with self.step("a step with a bug"):
            if not _BugInAStep.fixed:
                _ = {}["a key nobody set"]  # the bug: a KeyError, not a failure of the runbook
        return "done"


def _sent_kinds(history: dict) -> list[str]:
    kinds = []
    for e in history["events"]:
        a = e.get("activityTaskScheduledEventAttributes")
        if a and a["activityType"]["name"] == "send_notification":
            kinds.append(json.loads(base64.b64decode(a["input"]["payloads"][0]["data"]))["event"]["kind"])
    return kinds


@asynccontextmanager
async def _probe(client, ncfg, probe, prefix: str, service: str):
    """A probe runbook started on a worker of its own (the control activities with this module's
    notifications; unsandboxed, so a class attribute it reads is the test's); yields its handle."""
    from temporalio.worker import UnsandboxedWorkflowRunner

    queue = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(4) as executor:
        async with Worker(client, task_queue=queue, workflows=[probe], activities=control_activities(ncfg),
                          activity_executor=executor, workflow_runner=UnsandboxedWorkflowRunner()):
            yield await client.start_workflow(probe.run, service, id=f"{prefix}-{uuid.uuid4().hex[:8]}",
                                              task_queue=queue)


def _pages(http_recorder, wid: str) -> list[tuple[str, str]]:
    """PagerDuty's (action, last part of the dedup key) for one run: approval-N or the run id."""
    return [(p["event_action"], p["dedup_key"].rsplit("/", 1)[-1]) for p in http_recorder.on("/pd")
            if wid in p["dedup_key"]]


async def test_a_bug_in_a_step_pages_nothing_and_the_fixed_code_goes_on(lab, client, worker, ncfg, http_recorder):
    """A bug in workflow code (a KeyError) fails the workflow *task*: the run stays alive until a
    fixed worker replays it. No "step failed" or "finished: failed" page may go out then: it
    would be untrue, and its activities, recorded in the history, made the fixed code's replay
    nondeterministic, so the run could never go on (a manual reset was the only way out)."""
    from temporalio.api.enums.v1 import EventType, WorkflowExecutionStatus

    _BugInAStep.fixed = False
    async with _probe(client, ncfg, _BugInAStep, "notify-bug", lab.cfg.service) as handle:

        async def task_failed():
            async for e in handle.fetch_history_events():
                if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                    return "a key nobody set" in e.workflow_task_failed_event_attributes.failure.message
            return False
        await _until(task_failed, 60, "the workflow task failing on the bug")
        assert (await handle.describe()).status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
        history = json.loads(await decrypted_json(handle))
        assert "step-failed" not in _sent_kinds(history) and "runbook-finished" not in _sent_kinds(history)

        _BugInAStep.fixed = True  # the fix, deployed: the next attempt replays the run with it
        assert await asyncio.wait_for(handle.result(), 90) == "done"
    history = json.loads(await decrypted_json(handle))
    wanted = sum("runbook-finished" in kinds for kinds in ncfg.notifications.routing().values())
    assert wanted and _sent_kinds(history).count("runbook-finished") == wanted, _sent_kinds(history)
    heads = _slack_kinds(http_recorder.on("/slack/"), handle.id)
    assert len(heads) == 2 and "started: bug-probe" in heads[0] and "finished: bug-probe" in heads[1], heads


@workflow.defn(name="NotifyTestTwoGates")
class _TwoGates(Runbook):
    runbook = "gates-probe"

    @workflow.run
    async def run(self, service: str) -> list[str]:
        self.service = service
        await self.topology()
        policy = ApprovalPolicy(required=True, timeout_seconds=600)
        return [(await self.gate(policy, f"take step {i}")).outcome for i in (1, 2)]


async def test_a_second_approval_in_one_run_pages_again(lab, client, worker, ncfg, http_recorder):
    """Failback asks twice (go, then the reconcile's review). Under one incident per run, the
    second trigger joined the first's incident: acknowledged by the on-call who answered the
    first, PagerDuty notified nobody, and the run waited out its timeout. Each gate is now an
    incident of its own, resolved by its decision."""
    async with _probe(client, ncfg, _TwoGates, "notify-gates", lab.cfg.service) as handle:
        for i in (1, 2):
            await _until(_async(lambda i=i: ("trigger", f"approval-{i}") in _pages(http_recorder, handle.id)), 60,
                         f"the page for approval {i}")
            await handle.execute_update("approve", ApprovalDecision(approver="dana", decision="approve"))
        assert await asyncio.wait_for(handle.result(), 60) == ["approved", "approved"]
    pd = _pages(http_recorder, handle.id)
    assert pd == [("trigger", "approval-1"), ("resolve", "approval-1"), ("trigger", "approval-2"),
                  ("resolve", "approval-2"), ("resolve", handle.result_run_id)], pd


async def test_an_approval_cancelled_while_it_waits_resolves_its_page(lab, client, worker, ncfg, http_recorder):
    """A gate's page is an incident of its own: cancelled while it waits, the run resolves it
    (its end resolves only the run's incident, so it would stay open for nobody to answer)."""
    async with _probe(client, ncfg, _TwoGates, "notify-gates", lab.cfg.service) as handle:
        await _until(_async(lambda: ("trigger", "approval-1") in _pages(http_recorder, handle.id)), 60,
                     "the page for the approval")
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 60)
    pd = _pages(http_recorder, handle.id)
    assert ("resolve", "approval-1") in pd, pd


@workflow.defn(name="NotifyTestUndoIncomplete")
class _UndoIncomplete(Runbook):
    """Cancelled, it undoes; ``leave`` (this module's, read when the cancel lands) is what its
    undo could not put back."""

    runbook = "undo-probe"
    leave: list[str] = []

    @workflow.run
    async def run(self, service: str) -> str:
        self.service = service
        await self.topology()
        try:
            async with self.step("hold a fence"):
                await workflow.wait_condition(lambda: False)
        except asyncio.CancelledError:
            raise self.cancelled([self.undo_failed(u) for u in _UndoIncomplete.leave] or ["all put back"]) from None
        return "done"


async def test_a_cancel_whose_undo_left_a_fence_on_pages_instead_of_resolving(lab, client, worker, ncfg,
                                                                             http_recorder):
    """A cancel is a decision, and its end resolves the run's incident; but one whose undo could
    not lift a fence leaves the service down (fenced, scaled to 0): that end pages, with what is
    left, instead of ending quietly as "cancelled"."""
    runs = {}
    for leave in ([], ["us-east-1's Redis could NOT be unfenced (no answer)"]):
        _UndoIncomplete.leave = leave
        async with _probe(client, ncfg, _UndoIncomplete, "notify-undo", lab.cfg.service) as handle:

            async def holding():
                p = await _progress(handle)
                return p is not None and any(s.name == "hold a fence" for s in p.steps)

            await _until(holding, 60, "the probe's step")
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(handle.result(), 60)
        runs[bool(leave)] = handle
    clean, left = runs[False], runs[True]
    assert not any(a == "trigger" for a, _ in _pages(http_recorder, clean.id)), _pages(http_recorder, clean.id)
    assert ("trigger", left.result_run_id) in _pages(http_recorder, left.id), _pages(http_recorder, left.id)
    said = [p["text"] for p in http_recorder.on("/slack/") if left.id in p["text"]]
    assert any("NOT undone: us-east-1's Redis could NOT be unfenced" in t for t in said), said


@workflow.defn(name="NotifyTestQuickEnd")
class _QuickEnd(Runbook):
    runbook = "end-probe"

    @workflow.run
    async def run(self, service: str) -> str:
        self.service = service
        await self.topology()
        return "done"


async def test_a_cancel_while_the_end_is_announced_does_not_turn_the_outcome_into_cancelled(
        lab, client, worker, ncfg, http_recorder):
    """The run is over (a move made, say) and its "finished" message is on its way when a cancel
    arrives. The run must end as it did: the cancel came too late to change anything, and
    "cancelled" would report a move that was made as one that was not (nor may it cut the
    message short)."""
    from temporalio.api.enums.v1 import EventType

    http_recorder.held.clear()
    http_recorder.release.clear()
    try:
        # (the recorder holds "finished" for runs whose id starts notify-hold-)
        async with _probe(client, ncfg, _QuickEnd, "notify-hold", lab.cfg.service) as handle:
            await _until(_async(http_recorder.held.is_set), 60, "the finished message to reach the chat")
            await handle.cancel()

            async def cancel_seen():
                asked = False
                async for e in handle.fetch_history_events():
                    if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED:
                        asked = True
                    elif asked and e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                        return True
                return False
            await _until(cancel_seen, 60, "the run to have taken the cancel request")
            http_recorder.release.set()
            assert await asyncio.wait_for(handle.result(), 60) == "done"
    finally:
        http_recorder.release.set()
    heads = _slack_kinds(http_recorder.on("/slack/"), handle.id)
    assert len(heads) == 2 and "finished: end-probe" in heads[1], heads


async def test_monitor_pages_an_outage_and_resolves_it_when_the_primary_answers(lab, client, worker,
                                                                               http_recorder):
    """The primary's postmaster stopped (SIGSTOP: no query answered) past the threshold: one
    trigger however many rounds it stays down; answering again resolves the same incident."""
    a = lab.cfg.primary.name
    wid = f"notify-monitor-{uuid.uuid4().hex[:8]}"
    key = f"eagle-dr/{lab.cfg.service}/outage/{a}"
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=2,
                                          auto_failover=False, watch_split_brain=False),
        id=wid, task_queue=worker)
    postmaster = lab.postgres(a).pid

    def pages():
        return [p for p in http_recorder.on("/pd") if p["dedup_key"] == key]

    async def rounds(n):
        st = await handle.query(MonitorWorkflow.monitor_state)
        return st if st.rounds >= n else None

    async with _left_as_found(handle, postmaster):
        st = await _until(lambda: rounds(1), 60, "a first round")
        os.kill(postmaster, signal.SIGSTOP)
        try:
            await _until(_async_of(lambda: pages()), 60, "the outage to be paged")
            later = await _until(lambda: rounds(st.rounds + 5), 60, "more rounds while down")
            assert later.failures >= 4
        finally:
            os.kill(postmaster, signal.SIGCONT)
        await _until(_async_of(lambda: len(pages()) >= 2), 60, "the outage to be resolved")
        await handle.signal(MonitorWorkflow.stop, "test over")
        await handle.result()
    trigger, resolve = pages()
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["payload"]["severity"] == "critical" and f"{a} is DOWN" in trigger["payload"]["summary"]
    assert "automatic failover is off" in trigger["payload"]["custom_details"]["details"]
    chat = [p["text"] for p in http_recorder.on("/slack/") if f"/workflows/{wid}" in p["text"]]
    assert len(chat) == 2 and "OUTAGE" in chat[0] and f"{a} answers again" in chat[1]
    await record(handle, "monitor-notify-outage-in-order")


def test_cli_notify_test_reaches_each_channel_and_names_the_one_that_is_down(lab_cfg, lab_config_path, tmp_path,
                                                                              http_recorder):
    import yaml

    port = http_recorder.server_address[1]
    doc = yaml.safe_load(lab_config_path.read_text())
    doc["notifications"] = {"channels": {
        "chat": {"type": "slack", "webhook_url": {"env": "T_SLACK"}},
        "pager": {"type": "pagerduty", "routing_key": {"env": "T_PD"}, "url": f"http://127.0.0.1:{port}/pd/x"},
        "down": {"type": "slack", "webhook_url": {"env": "T_DOWN"}, "timeout": "2s"}}}
    config = tmp_path / "eagle-dr.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "EAGLE_DR_STATE_DIR": lab_cfg.lab.state_dir,
           "T_SLACK": f"http://127.0.0.1:{port}/slack/cli/{SLACK_TOKEN}", "T_PD": ROUTING_KEY,
           "T_DOWN": f"http://127.0.0.1:{_free_port()}/{SLACK_TOKEN}"}
    r = subprocess.run([sys.executable, "-m", "eagle_dr.cli", "-c", str(config), "notify", "test"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "chat: sent" in r.stdout and "pager: sent" in r.stdout and "down: FAILED" in r.stdout, r.stdout
    assert "Connection refused" in r.stdout and SLACK_TOKEN not in r.stdout + r.stderr
    assert any("test notification" in p["text"] for p in http_recorder.on("/slack/cli/"))
    key = f"eagle-dr/{lab_cfg.service}/notify-test"
    assert [p["event_action"] for p in http_recorder.on("/pd/x") if p["dedup_key"] == key] == ["trigger", "resolve"]


def _async_of(fn):
    async def run():
        return fn()
    return run


# -- without the lab: config and message formatting ----------------------------------------------


def _event(**more) -> NotifyEvent:
    return NotifyEvent(kind="approval-needed", service="svc", summary="failover svc: a -> b", action="trigger",
                       severity="critical", dedup_key="eagle-dr/dr-move-svc/r1", at=datetime(2026, 1, 2, 3, 4, 5,
                                                                                              tzinfo=timezone.utc),
                       runbook="failover", workflow_id="dr-move-svc", run_id="r1",
                       lines=["waiting for approval to fail over"], approve_command="eagle-dr approve dr-move-svc",
                       **more)


def test_message_formats():
    ev = _event()
    lines = body_lines(ev, "http://ui:8233/")
    assert lines[0] == "[eagle-dr] svc: APPROVAL NEEDED: failover svc: a -> b"
    assert "Approve: eagle-dr approve dr-move-svc" in lines
    assert "Temporal UI: http://ui:8233/namespaces/default/workflows/dr-move-svc/r1/history" in lines
    msg = slack.message(ev, "http://ui:8233")
    assert msg["text"].startswith("[eagle-dr] svc: APPROVAL NEEDED")
    assert "`eagle-dr approve dr-move-svc`" in json.dumps(msg["blocks"])
    resolve = pagerduty.payload("KEY", ev.model_copy(update={"action": "resolve"}), "http://ui:8233")
    assert resolve == {"routing_key": "KEY", "event_action": "resolve", "dedup_key": "eagle-dr/dr-move-svc/r1"}
    # A step's error of any length: Slack refuses a section past 3,000 characters (HTTP 400), so
    # the page was never delivered; cut, with the approve command kept whole.
    long = slack.message(ev.model_copy(update={"lines": ["error: " + "x" * 50_000]}), "http://ui:8233")
    texts = [b["text"]["text"] for b in long["blocks"] if b["type"] == "section"]
    assert all(len(t) <= slack.SECTION_MAX for t in texts) and len(long["text"]) <= slack.TEXT_MAX
    assert "… (cut:" in texts[1] and texts[1].endswith("Approve: `eagle-dr approve dr-move-svc`"), texts[1][-200:]


def _cfg_with(channels: dict, lab_config_path) -> None:
    import yaml

    raw = yaml.safe_load(lab_config_path.read_text())
    raw["notifications"] = {"channels": channels}
    parse_config(raw, "test.yaml", env={})


def test_config_takes_secrets_by_reference_only(lab_config_path):
    with pytest.raises(ConfigError) as e:
        _cfg_with({"pd": {"type": "pagerduty", "routing_key": "plain-key"}}, lab_config_path)
    assert "notifications.channels.pd" in str(e.value) and "routing_key" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _cfg_with({"m": {"type": "smtp", "host": "h", "starttls": False, "username": "u", "password": {"env": "P"},
                         "from": "a@b.c", "to": ["d@e.f"]}}, lab_config_path)
    assert "plain connection" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _cfg_with({"s": {"type": "slack", "webhook_url": {"env": "W"}, "events": ["runbook-exploded"]}},
                  lab_config_path)
    assert "notifications.channels.s" in str(e.value)


def test_a_pager_filter_gets_the_events_that_close_its_incidents():
    cfg = NotificationsConfig.model_validate({"channels": {
        "pager": {"type": "pagerduty", "routing_key": {"env": "K"}},
        "chat": {"type": "slack", "webhook_url": {"env": "W"}, "events": ["readiness-degraded"]}}})
    assert cfg.routing() == {"pager": ["approval-needed", "approval-decided", "step-failed", "runbook-finished",
                                       "outage", "outage-resolved"],
                             "chat": ["readiness-degraded", "readiness-restored"]}


async def test_a_readiness_check_that_degrades_is_notified_once_and_restored(lab, client, worker, http_recorder):
    """A Sentinel stopped: the monitor's readiness round sees CKQUORUM short (warn), which the
    chat channel hears of once however many rounds it lasts; the Sentinel back, once more."""
    wid = f"notify-readiness-{uuid.uuid4().hex[:8]}"
    handle = await client.start_workflow(
        MonitorWorkflow.run, MonitorInput(service=lab.cfg.service, interval_seconds=1, failure_threshold=100,
                                          auto_failover=False, watch_split_brain=False, readiness_every_seconds=1),
        id=wid, task_queue=worker)
    sentinel = lab.sentinels()[-1][1]

    def posts():
        return [p["text"] for p in http_recorder.on("/slack/")
                if f"/workflows/{wid}" in p["text"] and "sentinel_quorum" in p["text"]]

    async def assessed(n):
        st = await handle.query(MonitorWorkflow.monitor_state)
        return st if st.readiness is not None and st.rounds >= n else None

    try:
        st = await _until(lambda: assessed(1), 90, "a first readiness report")
        assert sentinel.kill()
        try:
            await _until(_async_of(lambda: posts()), 90, "the degraded check to be notified")
            await _until(lambda: assessed(st.rounds + 4), 60, "more rounds while degraded")
        finally:
            sentinel.start()
        await _until(_async_of(lambda: len(posts()) >= 2), 90, "the check's recovery to be notified")
        await handle.signal(MonitorWorkflow.stop, "test over")
        await handle.result()
    finally:
        try:
            await handle.terminate("test over")
        except Exception:  # noqa: BLE001 - already ended
            pass
    degraded, restored = posts()
    assert "warn" in degraded and "ok" in restored, (degraded, restored)


async def test_a_consistency_check_that_finds_differences_pages(lab, client, worker, http_recorder):
    """Differences end the check "degraded": the finished event triggers, naming the table and keys."""
    import psycopg

    from tests.lab_helpers import _primary

    primary = _primary(lab)
    pg = lab.cfg.region(primary).postgres
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute("create table if not exists notify_cc (id int primary key, v text)")
        c.execute("insert into notify_cc select g, 'v' from generate_series(1, 50) g on conflict do nothing")
        c.execute("drop database if exists notify_cc_copy")
        c.execute("create database notify_cc_copy")
    with psycopg.connect(pg.dsn("notify_cc_copy"), autocommit=True) as c:
        c.execute("create table notify_cc (id int primary key, v text)")
        c.execute("insert into notify_cc select g, 'v' from generate_series(1, 50) g where g <> 7")
    other = lab.cfg.other(primary).name
    wid = f"notify-check-{uuid.uuid4().hex[:8]}"
    res = await client.execute_workflow(
        ConsistencyCheckWorkflow.run, {"tables": ["notify_cc"], "regions": [primary, other],
                                       "database_b": "notify_cc_copy"},
        id=wid, task_queue=worker, result_type=ConsistencyResult)
    assert res.outcome == "degraded" and res.tables[0].diff.deleted_keys == [["7"]]
    pd = [p for p in http_recorder.on("/pd") if wid in p["dedup_key"]]
    assert [p["event_action"] for p in pd] == ["trigger"], pd
    chat = [p["text"] for p in http_recorder.on("/slack/services/T0/B0/") if wid in p["text"]]
    assert len(chat) == 1 and "outcome: degraded" in chat[0] and "public.notify_cc: 1 differing keys" in chat[0], chat
