"""Alerts in: the real Debian Alertmanager sends to ``eagle-dr alerts serve`` (in-process here),
which signals-with-start AlertIncidentWorkflow on the test lab's Temporal dev server.

The incident workflows and the runbooks they start run on a worker of this module's own task
queue with no activities: a started monitor or failover waits at its first activity and
touches no server, and each is terminated at the end, so nothing here can move the lab.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import uuid
import urllib.request
import urllib.error
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest
import pytest_asyncio
from temporalio import workflow
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.worker import Worker

from alerts.dispatch import Dispatcher
from alerts.plan import incident_id
from alerts.server import PATH, start
from eagle_dr.codec import decode_in_place
from eagle_dr.config import AlertsConfig, TemporalConfig
from eagle_dr.temporal import DR_TARGET_REGION, DR_TRIGGER
from lab.alertmanager import Alertmanager, Webhook
from eagle_dr.monitor import monitor_input
from tests.histories import decrypted_json, record
from tests.lab_helpers import _scrape, _value, _until
from workers.run import sandbox_runner
from workflows.alert_incident import AlertIncidentWorkflow, IncidentSummary
from workflows.failover import FailoverWorkflow
from workflows.monitor import MonitorInput, MonitorState, MonitorWorkflow
from workflows.runbook import monitor_id, move_id
from workflows.split_brain import SplitBrainWorkflow

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_BODY = 1 << 20
RULES = [
    {"name": "region-down", "matchers": ['alertname="PrimaryRegionDown"'], "action": "failover"},
    {"name": "health", "matchers": ['severity=~"critical|page"'], "action": "monitor"},
    {"name": "storm", "matchers": ['alertname="DiskStorm"'], "action": "record"},
    {"name": "split", "matchers": ['alertname="TwoWritablePrimaries"'], "action": "split-brain"},
]


@pytest.fixture(scope="module")
def queue() -> str:
    return f"alerts-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def acfg(lab_cfg, queue):
    # Ports beside the lab's own receiver and Alertmanager (test_lab_runs_...), not on them.
    listen = {"host": "127.0.0.1", "port": lab_cfg.alerts.listen.port + 10}
    alerts = AlertsConfig.model_validate({"listen": listen, "max_body": MAX_BODY,
                                          "rules": RULES, "temporal_timeout": "2s"})
    # A service of its own: its monitor's and incidents' ids are this module's alone (a monitor
    # stopped by another test in the session stays stopped, and no alert here would start it).
    return lab_cfg.model_copy(update={"alerts": alerts, "temporal": TemporalConfig(control_task_queue=queue),
                                      "service": f"eagle-alert-{queue[-8:]}"})


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> tuple[str, str]:
    value = secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("alerts") / "token"
    path.write_text(value + "\n")
    return value, str(path)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(client, queue):
    async with Worker(client, task_queue=queue, workflow_runner=sandbox_runner(),
                      workflows=[AlertIncidentWorkflow, MonitorWorkflow, FailoverWorkflow, SplitBrainWorkflow]):
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def receiver(acfg, token, client, worker, queue):
    host, port = acfg.alerts.listen.host, acfg.alerts.listen.port
    runner = await start(acfg, token[0], Dispatcher(None, queue, acfg.alerts.temporal_timeout, client=client),
                         host, port)
    yield f"http://{host}:{port}{PATH}"
    await runner.cleanup()


class _Proxy:
    """A TCP relay in front of the dev server's gRPC port: stopped, Temporal is unreachable
    for whoever connects through it (the shared dev server itself stays up)."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.server: asyncio.AbstractServer | None = None

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _relay(self, reader, writer):
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, w2), self._pipe(r2, writer))

    async def start(self):
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stop(self):
        if self.server:
            self.server.close()


class _CountingDispatcher(Dispatcher):
    unavailable = 0

    async def client(self):
        try:
            return await super().client()
        except Exception:
            self.unavailable += 1
            raise


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proxied(acfg, token, worker, queue, dev_server):
    """A second receiver that reaches Temporal only through a relay, not started yet."""
    port = acfg.alerts.listen.port + 1
    proxy = _Proxy(acfg.alerts.listen.port + 2, acfg.lab.dev_server.grpc_port)
    dispatcher = _CountingDispatcher(f"127.0.0.1:{proxy.port}", queue, acfg.alerts.temporal_timeout, config=acfg)
    runner = await start(acfg, token[0], dispatcher, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}{PATH}", proxy, dispatcher
    await proxy.stop()
    await runner.cleanup()


@pytest.fixture(scope="module")
def alertmanager(acfg, token, receiver, proxied, tmp_path_factory):
    # +20: +10 is the lab receiver's metrics port (alerts.metrics_port, 19103 before the shift).
    am = Alertmanager(tmp_path_factory.mktemp("alertmanager"), acfg.lab.alertmanager_port + 20)
    am.start([Webhook("eagle-dr", receiver, token[1]),
              Webhook("eagle-dr-proxied", proxied[0], token[1], matchers=('via="proxy"',))])
    yield am
    am.stop()


async def _post_alerts(am: Alertmanager, alerts: list[dict]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{am.url}/api/v2/alerts", json=alerts) as r:
            assert r.status == 200, await r.text()


def _alert(labels: dict, starts: datetime, ends: datetime | None = None) -> dict:
    a = {"labels": labels, "annotations": {"summary": "test"}, "startsAt": starts.isoformat(),
         "generatorURL": "http://prometheus.invalid/graph"}
    if ends:
        a["endsAt"] = ends.isoformat()
    return a


def _group_key(labels: dict, route: str = "{}") -> str:
    # Alertmanager's group key: the route's path, then the group labels (alertname, region).
    return '%s:{alertname="%s", region="%s"}' % (route, labels["alertname"], labels["region"])


async def _incident(client, wid: str) -> IncidentSummary | None:
    try:
        return await client.get_workflow_handle(wid).query(AlertIncidentWorkflow.incident)
    except Exception:  # noqa: BLE001 - not started yet, or closed (then the result says)
        return None


async def _acted(client, wid: str) -> IncidentSummary | None:
    inc = await _incident(client, wid)
    return inc if inc and inc.action else None


async def _terminate(client, wid: str) -> None:
    try:
        await client.get_workflow_handle(wid).terminate("alerts test cleanup")
    except Exception:  # noqa: BLE001 - already closed
        pass


async def test_alertmanager_starts_and_signals_the_monitor_then_resolves(client, acfg, alertmanager):
    """A firing alert through the real Alertmanager starts the service's monitor (fixed id) and
    signals it; the resolved alert is signalled too and closes the incident."""
    now = datetime.now(timezone.utc)
    labels = {"alertname": f"DbSlow{uuid.uuid4().hex[:6]}", "region": "us-east-1", "severity": "critical"}
    wid = incident_id(acfg.service, "health", _group_key(labels))
    mon = client.get_workflow_handle(monitor_id(acfg.service))
    try:
        await _post_alerts(alertmanager, [_alert(labels, now)])
        inc = await _until(lambda: _acted(client, wid), 20, "the incident workflow to record the alert and act")
        assert inc.alerts == 1 and inc.firing == 1 and inc.action and "MonitorWorkflow" in inc.action

        async def alerted() -> MonitorState | None:
            st = await mon.query(MonitorWorkflow.monitor_state)
            return st if any("alert (health): 1 firing" in f for f in st.findings) else None

        await _until(alerted, 20, "the monitor to record the alert")
        # Started with the config's whole health section, as `eagle-dr monitor start` starts it.
        started = json.loads(await decrypted_json(mon))["events"][0]["workflowExecutionStartedEventAttributes"]
        got = MonitorInput.model_validate_json(base64.b64decode(started["input"]["payloads"][0]["data"]))
        assert got == monitor_input(acfg), got
        desc = await client.get_workflow_handle(wid).describe()
        assert desc.typed_search_attributes.get(DR_TRIGGER) == "alert"

        await _post_alerts(alertmanager, [_alert(labels, now, datetime.now(timezone.utc))])
        result = await _until(lambda: _closed_result(client, wid), 20, "the incident to close on resolve")
        assert result.outcome == "resolved" and result.resolved == 1 and result.firing == 0
        await record(client.get_workflow_handle(wid), "alert_incident-monitor-resolved")
        st = await _until(lambda: _finding(mon, "0 firing, 1 resolved"), 20, "the monitor to hear the resolve")
        assert st
    finally:
        await _terminate(client, mon.id)
        await _terminate(client, wid)


async def test_an_open_incident_restarts_a_monitor_that_ended(client, acfg, receiver):
    """The monitor an alert started ends (terminated by hand, failed on a bug) while its alerts
    still fire: the next notice used to fail and be noted, and nothing watched the service
    until another incident opened. The incident starts it again and tells it."""
    now = datetime.now(timezone.utc)
    group = {"alertname": f"DbSlow{uuid.uuid4().hex[:6]}", "region": "us-east-1", "severity": "critical"}
    key = _group_key(group)
    wid = incident_id(acfg.service, "health", key)
    other = {**group, "alertname": f"DbDown{uuid.uuid4().hex[:6]}"}  # a later incident's group
    wid2 = incident_id(acfg.service, "health", _group_key(other))
    mon = client.get_workflow_handle(monitor_id(acfg.service))
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
            assert await _post(s, receiver, _notification(group, [_alert(group, now)], key)) == 200
            await _until(lambda: _acted(client, wid), 20, "the incident to start the monitor")
            first = (await mon.describe()).run_id
            await mon.terminate("the monitor ended while its alerts fire")
            again = [_alert(group, now), _alert({**group, "instance": "db-2"}, now)]
            assert await _post(s, receiver, _notification(group, again, key)) == 200

        async def restarted():
            d = await mon.describe()
            return d if d.status == WorkflowExecutionStatus.RUNNING and d.run_id != first else None
        await _until(restarted, 30, "the incident to start the monitor again")
        # (the notice counts the alerts new in it: the second one)
        await _until(lambda: _finding(mon, "alert (health): 1 firing"), 30, "the restarted monitor to hear it")
        inc = await _incident(client, wid)
        assert inc.monitor_restarts == 1 and inc.alerts == 2, inc
        await record(client.get_workflow_handle(wid), "alert_incident-restarts-monitor")

        # Stopped on purpose (`eagle-dr monitor stop`: its run completes): a human's decision,
        # which the next notice must not undo. (This module's worker runs no activities, so the
        # monitor cannot finish a round to stop: a run under its id that completes stands in.)
        await mon.terminate("replaced by a run that completes")
        from temporalio.worker import UnsandboxedWorkflowRunner

        done_queue = f"alerts-done-{uuid.uuid4().hex[:6]}"
        async with Worker(client, task_queue=done_queue, workflows=[_Completes],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            stopped = await client.start_workflow(_Completes.run, id=mon.id, task_queue=done_queue)
            await stopped.result()
        third = again + [_alert({**group, "instance": "db-3"}, now)]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
            assert await _post(s, receiver, _notification(group, third, key)) == 200
        inc = await _until(lambda: _with_alerts(client, wid, 3), 20, "the incident to take the third alert")
        # Its signal fails (the run completed), then its restart is refused: only after that
        # refusal does the monitor's state below prove anything.
        await _until(lambda: _child_start_refused(client, wid), 20, "the incident's restart of the monitor refused")
        inc = await _incident(client, wid)
        assert inc.monitor_restarts == 1, inc
        d = await client.get_workflow_handle(mon.id).describe()
        assert d.status == WorkflowExecutionStatus.COMPLETED and d.run_id == stopped.result_run_id, d.status
        # Nor does the next incident's first alert (a stop before maintenance, whose own alerts
        # open a new group): its first start used to take the id of a completed run.
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
            assert await _post(s, receiver, _notification(other, [_alert(other, now)], _group_key(other))) == 200
        inc = await _until(lambda: _acted(client, wid2), 20, "the second incident to act")
        assert "not started" in inc.action and inc.monitor_restarts == 0, inc
        d = await client.get_workflow_handle(mon.id).describe()
        assert d.status == WorkflowExecutionStatus.COMPLETED and d.run_id == stopped.result_run_id, d.status
        await record(client.get_workflow_handle(wid2), "alert_incident-monitor-stays-stopped")
    finally:
        await _terminate(client, mon.id)
        await _terminate(client, wid)
        await _terminate(client, wid2)
        # Its last run completed ("stopped"): no alert would start it again for this module's
        # later tests. A run that ends terminated instead (none polls its queue).
        with contextlib.suppress(Exception):
            await client.start_workflow(_Completes.run, id=mon.id, task_queue=f"nobody-{uuid.uuid4().hex[:6]}")
        await _terminate(client, mon.id)


@workflow.defn(name="AlertsTestCompletes")
class _Completes:
    @workflow.run
    async def run(self) -> None:
        return None


async def _child_start_refused(client, wid: str) -> bool:
    async for e in client.get_workflow_handle(wid).fetch_history_events():
        if e.HasField("start_child_workflow_execution_failed_event_attributes"):
            return True
    return False


async def _with_alerts(client, wid: str, n: int):
    inc = await _incident(client, wid)
    return inc if inc and inc.alerts >= n else None


async def _closed_result(client, wid: str) -> IncidentSummary | None:
    h = client.get_workflow_handle(wid, result_type=IncidentSummary)
    if (await h.describe()).status != WorkflowExecutionStatus.COMPLETED:
        return None
    return await h.result()


async def _finding(handle, text: str):
    st = await handle.query(MonitorWorkflow.monitor_state)
    return st if any(text in f for f in st.findings) else None


async def test_storm_of_1000_alerts_is_one_workflow_and_none_lost(client, acfg, alertmanager, receiver):
    now = datetime.now(timezone.utc)
    group = {"alertname": "DiskStorm", "region": f"r-{uuid.uuid4().hex[:6]}"}
    wid = incident_id(acfg.service, "storm", _group_key(group))
    alerts = [_alert({**group, "instance": f"node-{i}"}, now) for i in range(1000)]
    try:
        # In three posts, so Alertmanager sends several notifications for the one group.
        for part in (alerts[:10], alerts[10:400], alerts[400:]):
            await _post_alerts(alertmanager, part)

        async def all_in():
            inc = await _incident(client, wid)
            return inc if inc and inc.alerts == 1000 else None

        inc = await _until(all_in, 60, "all 1000 alerts in the incident")
        assert inc.firing == 1000 and inc.action == "recorded"
        runs = [w async for w in client.list_workflows(f'WorkflowId = "{wid}"')]
        assert len(runs) == 1, [r.run_id for r in runs]
        count = await client.count_workflows(f'WorkflowType = "AlertIncidentWorkflow" AND TaskQueue = '
                                             f'"{acfg.temporal.control_task_queue}" AND WorkflowId = "{wid}"')
        assert count.count == 1
    finally:
        await _terminate(client, wid)


async def test_concurrent_reposts_converge_on_one_run(client, acfg, receiver):
    """The same notification posted 20 times at once (Alertmanager retrying while an attempt is
    in flight, an HA pair of Alertmanagers): one run, 50 alerts, every repeat a duplicate."""
    group = {"alertname": "DiskStorm", "region": f"r-{uuid.uuid4().hex[:6]}"}
    key = _group_key(group)
    wid = incident_id(acfg.service, "storm", key)
    now = datetime.now(timezone.utc)
    doc = _notification(group, [_alert({**group, "instance": f"n{i}"}, now) for i in range(50)], key)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
            codes = await asyncio.gather(*(_post(s, receiver, doc) for _ in range(20)))
        assert codes == [200] * 20
        inc = await _until(lambda: _dups(client, wid, 19 * 50), 20, "every repeat counted as a duplicate")
        assert inc.alerts == 50 and inc.notifications == 20 and inc.duplicates == 19 * 50
        runs = [w async for w in client.list_workflows(f'WorkflowId = "{wid}"')]
        assert len(runs) == 1, [r.run_id for r in runs]
    finally:
        await _terminate(client, wid)


async def test_a_notification_in_many_signals_never_closes_the_incident_half_way(client, acfg, receiver, queue):
    """A notification of more alerts than one signal carries goes as several. Its first 200
    all resolved closed the incident (none firing) before the next signal's firing alert
    arrived; that one opened a second incident, which acted again. Firing alerts go first."""
    from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

    from alerts.payload import parse
    from alerts.plan import plan

    group = {"alertname": "DiskStorm", "region": f"r-{uuid.uuid4().hex[:6]}"}
    key = _group_key(group)
    wid = incident_id(acfg.service, "storm", key)
    now = datetime.now(timezone.utc)
    old = [_alert({**group, "instance": f"n{i}"}, now) for i in range(200)]
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
            assert await _post(s, receiver, _notification(group, old, key)) == 200
        await _until(lambda: _with_alerts(client, wid, 200), 20, "the incident to take the first 200")
        # Alertmanager's next notification: the 200 resolved, listed first, and one new alert firing.
        doc = _notification(group, old, key, status="resolved")
        doc["status"] = "firing"
        doc["alerts"].append({**_alert({**group, "instance": "new"}, now), "status": "firing",
                              "fingerprint": "fpnew", "endsAt": "0001-01-01T00:00:00Z"})
        # Its signals sent as the receiver sends them, but each taken before the next goes (back
        # to back they usually land in one workflow task, which hides the fault).
        [inc] = plan(acfg, parse(json.dumps(doc).encode()))[0]
        batches = inc.batches()
        assert len(batches) == 2
        for i, batch in enumerate(batches):
            await client.start_workflow(AlertIncidentWorkflow.run, inc.input, id=wid, task_queue=queue,
                                        start_signal="alerts", start_signal_args=[batch],
                                        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                                        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)

            async def taken(n=2 + i):
                if (await client.get_workflow_handle(wid).describe()).status != WorkflowExecutionStatus.RUNNING:
                    return "closed"
                got = await _incident(client, wid)
                return got if got and got.notifications >= n else None
            await _until(taken, 20, f"signal {i + 1} to be taken")
        got = await _incident(client, wid)
        assert got is not None and (got.firing, got.resolved, got.outcome) == (1, 200, "open"), got
        runs = [w async for w in client.list_workflows(f'WorkflowId = "{wid}"')]
        assert len(runs) == 1, [(r.run_id, r.status) for r in runs]
    finally:
        await _terminate(client, wid)


async def _dups(client, wid: str, at_least: int):
    inc = await _incident(client, wid)
    return inc if inc and inc.duplicates >= at_least else None


_TOKENS: dict[int, str] = {}


def _token(acfg) -> str:
    return _TOKENS[id(acfg)]


@pytest.fixture(scope="module", autouse=True)
def _remember_token(acfg, token):
    _TOKENS[id(acfg)] = token[0]


async def _post(session: aiohttp.ClientSession, url: str, doc, raw: bytes | None = None) -> int:
    data = raw if raw is not None else json.dumps(doc).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


def _notification(group: dict, alerts: list[dict], group_key: str, status: str = "firing") -> dict:
    return {"receiver": "eagle-dr", "status": status, "version": "4", "groupKey": group_key, "truncatedAlerts": 0,
            "groupLabels": group, "commonLabels": group, "commonAnnotations": {}, "externalURL": "http://am",
            "alerts": [{**a, "status": status, "fingerprint": f"fp{i:05d}", "endsAt": "0001-01-01T00:00:00Z"}
                       for i, a in enumerate(alerts)]}


def test_a_failover_is_taken_on_the_firing_alerts_region_never_a_resolved_ones():
    """A group not grouped by region: the other region's alert, resolved, came first and named
    the failover's target (the healthy region failed over away from). Firing alerts that name
    two regions start nothing: which one failed is not for the receiver to guess."""
    from alerts.payload import parse
    from alerts.plan import plan
    from eagle_dr.config import DEFAULT_CONFIG, load_config

    cfg = load_config(DEFAULT_CONFIG, env={})
    cfg = cfg.model_copy(update={"alerts": AlertsConfig.model_validate({"rules": RULES})})
    a, b = cfg.regions[0].name, cfg.regions[1].name
    now = datetime.now(timezone.utc)
    group = {"alertname": "PrimaryRegionDown"}
    doc = _notification(group, [_alert({**group, "region": b}, now), _alert({**group, "region": a}, now)], "{}:x")
    doc["alerts"][0]["status"] = "resolved"
    (inc,), _ = plan(cfg, parse(json.dumps(doc).encode()))
    assert inc.input.action.input["target_region"] == b, inc.input.action  # a is down: fail over to b

    doc["alerts"][0]["status"] = "firing"
    (inc,), _ = plan(cfg, parse(json.dumps(doc).encode()))
    assert inc.input.action.workflow is None and "more than one region" in inc.input.action.refused, inc.input.action


async def test_bad_or_missing_token_is_401(acfg, receiver):
    doc = _notification({"alertname": "X", "region": "us-east-1"},
                        [_alert({"alertname": "X", "region": "us-east-1"}, datetime.now(timezone.utc))], "{}:{}")
    async with aiohttp.ClientSession() as s:
        assert await _post(s, receiver, doc) == 401
    for header in (f"Bearer {_token(acfg)}x", f"Basic {_token(acfg)}", "Bearer "):
        async with aiohttp.ClientSession(headers={"Authorization": header}) as s:
            assert await _post(s, receiver, doc) == 401, header


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("groupKey"), "groupKey"),
    (lambda d: d.update(version="3"), "version"),
    (lambda d: d["alerts"][1].pop("startsAt"), "alerts[1].startsAt"),
    (lambda d: d["alerts"][0].update(labels={"a": 1}), "alerts[0].labels.a"),
    (lambda d: d["alerts"][0].update(status="pending"), "alerts[0].status"),
    (lambda d: d.update(alerts=[]), "alerts"),
])
async def test_malformed_body_is_400_naming_the_field(acfg, receiver, mutate, field):
    group = {"alertname": "X", "region": "us-east-1"}
    now = datetime.now(timezone.utc)
    doc = _notification(group, [_alert(group, now), _alert({**group, "i": "2"}, now)], "{}:{}")
    mutate(doc)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
        async with s.post(receiver, json=doc) as r:
            assert r.status == 400
            body = await r.json()
    assert body["field"] == field and field in body["error"], body


async def test_not_json_is_400(acfg, receiver):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
        async with s.post(receiver, data=b"{not json") as r:
            assert r.status == 400
            assert (await r.json())["field"] == "(body)"


async def test_too_big_body_is_413(acfg, receiver):
    big = b'{"pad": "' + b"x" * MAX_BODY + b'"}'
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
        assert await _post(s, receiver, None, raw=big) == 413

        async def chunks():  # no Content-Length: the cap while reading answers
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        async with s.post(receiver, data=chunks()) as r:
            assert r.status == 413


async def test_the_default_body_limit_holds_a_storm_of_real_alerts():  # (async: the module is marked)
    """Alertmanager sends a group's every alert in one body and does not retry a 413: a storm
    over the limit is lost. 20,000 alerts as a real rule set labels them (the old 4 MiB default
    held about 3,800) fit the default, and parse."""
    from alerts.payload import parse

    def alert(i: int) -> dict:
        labels = {"alertname": "KubePodCrashLooping", "severity": "critical", "region": "us-east-1",
                  "cluster": "eagle-prod-use1", "namespace": "eagle-alerts", "pod": f"eagle-notifier-7d9f{i:06d}",
                  "container": "notifier", "job": "kube-state-metrics", "service": "eagle-alert",
                  "prometheus": "monitoring/k8s"}
        return {"status": "firing", "labels": labels,
                "annotations": {"summary": f"Pod eagle-alerts/eagle-notifier-7d9f{i:06d} is crash looping",
                                "description": "Pod eagle-alerts/eagle-notifier (notifier) is in waiting state "
                                               "(reason: CrashLoopBackOff) for longer than 15 minutes.",
                                "runbook_url": "https://runbooks.example.org/kubernetes/kubepodcrashlooping"},
                "startsAt": "2026-12-05T03:00:00.000Z", "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example.org/graph?g0.expr=max_over_time%28kube_pod_container"
                                "_status_waiting_reason%7Breason%3D%22CrashLoopBackOff%22%7D%5B5m%5D%29+%3E%3D+1",
                "fingerprint": f"{i:016x}"}
    n = 20_000
    body = json.dumps({"version": "4", "status": "firing", "receiver": "eagle-dr", "groupKey": '{}:{alertname="x"}',
                       "groupLabels": {"alertname": "KubePodCrashLooping"}, "commonLabels": {},
                       "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
                       "alerts": [alert(i) for i in range(n)]}).encode()
    assert len(body) / n > 900  # as big as a real alert, not a toy one
    assert len(body) < AlertsConfig().max_body, (len(body), AlertsConfig().max_body)
    assert len(parse(body).alerts) == n


async def test_temporal_down_then_back_alertmanager_retry_lands(client, acfg, alertmanager, proxied):
    url, proxy, dispatcher = proxied
    labels = {"alertname": f"Flaky{uuid.uuid4().hex[:6]}", "region": "us-east-1", "via": "proxy"}
    wid = incident_id(acfg.service, "unmatched", _group_key(labels, '{}/{via="proxy"}'))
    try:
        await _post_alerts(alertmanager, [_alert(labels, datetime.now(timezone.utc))])
        # Alertmanager posted and got 503 (Temporal unreachable through the stopped relay).
        async def refused_twice():
            return dispatcher.unavailable >= 2

        await _until(refused_twice, 30, "Alertmanager to retry after a 503")
        assert await _incident(client, wid) is None
        await proxy.start()
        inc = await _until(lambda: _acted(client, wid), 30, "Alertmanager's retry to land once Temporal is back")
        assert inc.alerts == 1 and inc.action == "recorded"
        log = (alertmanager.dir / "alertmanager.log").read_text()
        assert "503" in log
    finally:
        await _terminate(client, wid)


async def test_failover_rule_starts_failover_with_approval_required(client, acfg, alertmanager):
    """The failover is started (trigger alert, approval required, away from the labelled region)
    and terminated at once: it waits at its first activity on this module's queue."""
    now = datetime.now(timezone.utc)
    down = acfg.primary.name
    labels = {"alertname": "PrimaryRegionDown", "region": down, "severity": "critical"}
    wid = incident_id(acfg.service, "region-down", _group_key(labels))
    move = client.get_workflow_handle(move_id(acfg.service))
    try:
        await _post_alerts(alertmanager, [_alert(labels, now)])
        inc = await _until(lambda: _acted(client, wid), 20, "the incident")
        assert inc.action == f"started FailoverWorkflow {move.id}", inc
        desc = await move.describe()
        assert desc.workflow_type == "FailoverWorkflow"
        assert desc.typed_search_attributes.get(DR_TRIGGER) == "alert"
        assert desc.typed_search_attributes.get(DR_TARGET_REGION) == acfg.other(down).name
        history = await move.fetch_history()
        await decode_in_place(client.data_converter.payload_codec, history.events)
        first = history.events[0].workflow_execution_started_event_attributes
        args = json.loads(first.input.payloads[0].data)
        assert args["approval"]["required"] is True and args["trigger"] == "alert"
        assert args["target_region"] == acfg.other(down).name
        assert datetime.fromisoformat(args["detected_at"]) <= datetime.now(timezone.utc)
    finally:
        await _terminate(client, move.id)
        await _terminate(client, wid)


async def test_lab_runs_the_receiver_and_an_alertmanager_sending_to_it(lab, client):
    """What ``lab up`` starts: ``eagle-dr alerts serve`` as a process with the lab's token, and
    the lab's Alertmanager; an alert no rule takes is recorded by the lab's control worker."""
    lab.start_receiver()
    lab.start_alertmanager()
    am = lab.alertmanager()
    labels = {"alertname": f"LabCheck{uuid.uuid4().hex[:6]}", "region": "us-east-1"}
    wid = incident_id(lab.cfg.service, "unmatched", _group_key(labels))
    try:
        running = {p.name for p in lab.status().processes if p.running}
        assert {"alerts-receiver", "alertmanager"} <= running
        await _post_alerts(am, [_alert(labels, datetime.now(timezone.utc))])
        inc = await _until(lambda: _acted(client, wid), 30, "the lab's receiver to record the alert")
        assert inc.alerts == 1 and inc.action == "recorded"
        log = (lab.state / "alerts" / "receiver.log").read_text()
        assert wid in log and lab.secret("alerts-token") not in log
        # Its metrics endpoint: the requests it answered by code, the alerts they carried, and the
        # Temporal SDK client's own metrics. A request with a wrong token is counted as a 401.
        listen = lab.cfg.alerts.listen
        bad = urllib.request.Request(f"http://{listen.host}:{listen.port}/alert", data=b"{}", method="POST",
                                     headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 401

        async def counted():
            text = _scrape(lab.cfg.alerts.metrics_port)
            return text if (_value(text, "eagle_dr_alert_requests_total", code="401") or 0) >= 1 else None

        text = await _until(counted, 30, "the receiver's metrics to count the requests")
        assert (_value(text, "eagle_dr_alert_requests_total", code="200") or 0) >= 1, text
        assert (_value(text, "eagle_dr_alerts_received_total", status="firing") or 0) >= 1, text
        assert "temporal_request" in text, text[:2000]
    finally:
        await _terminate(client, wid)
        stopped = lab.stop_alerts()
    assert set(stopped) == {"alerts-receiver", "alertmanager"}
    await _until(_alerts_stopped(lab), 20, "the receiver and Alertmanager to stop")


def _alerts_stopped(lab):
    async def check():
        return not any(p.running for p in lab.status().processes if p.name in ("alerts-receiver", "alertmanager"))
    return check


async def test_a_firing_alert_wakes_the_monitor_for_a_round_now(lab, client):
    """On the lab's real workers: a monitor probing every 60 s runs its next quorum round as soon
    as an alert arrives, instead of at the end of the interval. The alert casts no vote."""
    from workflows.models import AlertNotice

    handle = await client.start_workflow(
        MonitorWorkflow.run, {"service": lab.cfg.service, "interval_seconds": 60, "failure_threshold": 3,
                              "watch_split_brain": False},
        id=f"monitor-alert-{uuid.uuid4().hex[:8]}", task_queue=lab.cfg.temporal.control_task_queue)
    try:
        async def rounds(n: int):
            async def check():
                try:
                    st = await handle.query(MonitorWorkflow.monitor_state)
                except Exception:  # noqa: BLE001 - its first task has not run yet
                    return None
                return st if st.rounds >= n else None
            return check

        first = await _until(await rounds(1), 60, "the monitor's first round")
        assert first.failures == 0
        await handle.signal(MonitorWorkflow.alert, AlertNotice(
            rule="health", incident_id="dr-alert-test", group_labels={"alertname": "DbSlow", "region": "us-east-1"},
            firing=1))
        st = await _until(await rounds(2), 20, "a round right after the alert (not 60 s later)")
        assert st.failures == 0 and any("alert (health): 1 firing" in f for f in st.findings), st.findings
        await handle.cancel()
        await _until(_closed(handle), 30, "the monitor to stop")
        await record(handle, "monitor-alert-wakeup")
    finally:
        await _terminate(client, handle.id)


def _closed(handle):
    async def check():
        return (await handle.describe()).status != WorkflowExecutionStatus.RUNNING
    return check


async def test_continue_as_new_keeps_every_alert_and_the_action_taken_once(client, acfg, worker, queue):
    """An incident that continues as new every 2 notifications: the counts travel with it and the
    monitor is started once, not again in each run."""
    from alerts.dispatch import Dispatcher
    from alerts.payload import parse
    from alerts.plan import plan

    group = {"alertname": "DbSlow", "region": f"r-{uuid.uuid4().hex[:6]}", "severity": "page"}
    key = _group_key(group)
    now = datetime.now(timezone.utc)
    docs = [_notification(group, [_alert({**group, "instance": f"n{i}"}, now) for i in range(10 * k, 10 * k + 10)],
                          key) for k in range(5)]
    for k, d in enumerate(docs):  # distinct fingerprints per notification
        for i, a in enumerate(d["alerts"]):
            a["fingerprint"] = f"fp{10 * k + i:05d}"
    docs.append(docs[0])  # a retry: 10 duplicates
    dispatcher = Dispatcher(None, queue, acfg.alerts.temporal_timeout, client=client)
    wid = None
    try:
        for d in docs:
            (inc,), _ = plan(acfg, parse(json.dumps(d).encode()))
            inc.input = inc.input.model_copy(update={"notifications_per_run": 2})
            wid = inc.workflow_id
            await dispatcher.deliver(inc)

        async def settled():
            inc = await _incident(client, wid)
            return inc if inc and inc.notifications == 6 else None

        inc = await _until(settled, 30, "all six notifications recorded across runs")
        assert (inc.alerts, inc.firing, inc.duplicates) == (50, 50, 10)
        assert inc.action == f"started MonitorWorkflow {monitor_id(acfg.service)}", inc.action
        # Several notifications can land in one workflow task: at least one continue-as-new. The
        # visibility store is eventually consistent, so the second run may show up a moment later.
        async def continued():
            runs = [w async for w in client.list_workflows(f'WorkflowId = "{wid}"')]
            return runs if len(runs) >= 2 else None

        await _until(continued, 20, "a second run of the incident (continued as new) in visibility", 0.2)
    finally:
        if wid:
            await _terminate(client, wid)
        await _terminate(client, monitor_id(acfg.service))


async def _post_direct(acfg, url: str, labels: dict, key: str) -> None:
    doc = _notification(labels, [_alert(labels, datetime.now(timezone.utc))], key)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_token(acfg)}"}) as s:
        assert await _post(s, url, doc) == 200


async def test_split_brain_rule_starts_detection_with_approval_required(client, acfg, receiver):
    labels = {"alertname": "TwoWritablePrimaries", "region": "us-east-1"}
    key = _group_key(labels) + uuid.uuid4().hex[:6]
    wid = incident_id(acfg.service, "split", key)
    move = client.get_workflow_handle(move_id(acfg.service))
    try:
        await _post_direct(acfg, receiver, labels, key)
        inc = await _until(lambda: _acted(client, wid), 20, "the incident")
        assert inc.action == f"started SplitBrainWorkflow {move.id}", inc
        desc = await move.describe()
        assert desc.workflow_type == "SplitBrainWorkflow" and desc.typed_search_attributes.get(DR_TRIGGER) == "alert"
        history = await move.fetch_history()
        await decode_in_place(client.data_converter.payload_codec, history.events)
        first = history.events[0].workflow_execution_started_event_attributes
        args = json.loads(first.input.payloads[0].data)
        assert args["approval"]["required"] is True and "TwoWritablePrimaries" in args["reason"]
    finally:
        await _terminate(client, move.id)
        await _terminate(client, wid)


async def test_failover_alert_without_a_region_is_recorded_not_acted_on(client, acfg, receiver):
    labels = {"alertname": "PrimaryRegionDown", "severity": "critical"}
    key = '{}:{alertname="PrimaryRegionDown"}' + uuid.uuid4().hex[:6]
    wid = incident_id(acfg.service, "region-down", key)
    try:
        started = datetime.now(timezone.utc)
        await _post_direct(acfg, receiver, labels, key)
        inc = await _until(lambda: _acted(client, wid), 20, "the incident")
        assert "failover not started" in inc.action and "'region' label" in inc.action, inc.action
        try:
            desc = await client.get_workflow_handle(move_id(acfg.service)).describe()
            assert desc.start_time < started, "no failover may start without the failed region"
        except RPCError:
            pass  # never started at all
    finally:
        await _terminate(client, wid)
