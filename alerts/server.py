"""The HTTP side of ``eagle-dr alerts serve``: Alertmanager's webhook in, one answer out.

- 401 without ``Authorization: Bearer <token>`` matching the configured secret (checked
  first, before the body is read: an unauthenticated client learns nothing else);
- 413 when the body is larger than ``alerts.max_body`` (by Content-Length, and while reading
  for a chunked body);
- 400 for a body that is not a v4 notification, naming the field;
- 503 when Temporal cannot take the incident: Alertmanager retries 5xx with backoff and keeps
  retrying on every group interval, so an alert waits in Alertmanager instead of being lost;
- 200 once every incident of the notification is recorded in Temporal.

The work behind a 200 is one signal-with-start per incident (a few milliseconds): it is done
before answering, not queued in this process, so a 200 means durable and a crash of the
receiver loses nothing Alertmanager believes delivered.

aiohttp rather than the standard library's http.server: the Temporal client is asyncio,
and aiohttp serves on the same event loop with a body cap built in; it was also the fastest
of the frameworks measured for this receiver (shared notes, integrations.md section 6).
"""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from eagle_dr import logs
from eagle_dr import metrics
from eagle_dr.config import EagleConfig
from alerts.dispatch import Dispatcher, TemporalUnavailable
from alerts.payload import Malformed, parse
from alerts.plan import plan

log = logs.get("alerts.server")

PATH = "/alert"

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
CONFIG = web.AppKey("config", EagleConfig)
TOKEN = web.AppKey("token", bytes)
# The Temporal runtime's meter when the receiver has a metrics endpoint (alerts.metrics_port).
METER = web.AppKey("meter", object)
# What a parsed request carried, for the request metrics: (firing, resolved).
COUNTS = "eagle_dr_alert_counts"


@web.middleware
async def _measured(request: web.Request, handler):
    """Every webhook answer counted by code and timed, whichever branch answered it."""
    started = time.perf_counter()
    response = await handler(request)
    if request.path == PATH:
        firing, resolved = request.get(COUNTS, (0, 0))
        metrics.alert_request(request.app[METER], request.app[CONFIG].service, response.status,
                              time.perf_counter() - started, firing=firing, resolved=resolved)
    return response


def _error(status: int, message: str, **fields) -> web.Response:
    return web.json_response({"status": "error", "error": message, **fields}, status=status)


def _authorized(request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # Constant time: the comparison must not tell how much of a guessed token was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), request.app[TOKEN])


async def receive(request: web.Request) -> web.Response:
    started = time.perf_counter()
    peer = request.remote
    if not _authorized(request):
        log.warning("alert refused: bad or missing token", peer=peer)
        return _error(401, "missing or invalid bearer token")
    cfg = request.app[CONFIG]
    limit = cfg.alerts.max_body
    if request.content_length is not None and request.content_length > limit:
        # An error, not a warning: Alertmanager does not retry a 413, so these alerts are lost.
        log.error("alert refused: body too big (lost: Alertmanager does not retry it; raise alerts.max_body)",
                  peer=peer, size=request.content_length, limit=limit)
        return _error(413, f"body of {request.content_length} bytes is over the {limit}-byte limit")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        log.error("alert refused: body too big (lost: Alertmanager does not retry it; raise alerts.max_body)",
                  peer=peer, limit=limit)
        return _error(413, f"body is over the {limit}-byte limit")
    try:
        notification = parse(body)
    except Malformed as e:
        log.warning("alert refused: malformed payload", peer=peer, field=e.field, reason=e.reason)
        return _error(400, f"malformed payload: {e}", field=e.field)
    request[COUNTS] = (sum(a.status == "firing" for a in notification.alerts),
                       sum(a.status == "resolved" for a in notification.alerts))
    incidents, ignored = plan(cfg, notification)
    dispatcher = request.app[DISPATCHER]
    try:
        for inc in incidents:
            await dispatcher.deliver(inc)
    except TemporalUnavailable as e:
        log.error("alert not recorded: Temporal unavailable (503, Alertmanager retries)", peer=peer,
                  group_key=notification.groupKey, error=str(e))
        return _error(503, f"Temporal unavailable: {e}")
    ms = (time.perf_counter() - started) * 1000
    if notification.truncatedAlerts:
        # Alertmanager's max_alerts dropped alerts from this body: they are not recorded here.
        log.warning("alert notification truncated by Alertmanager (set max_alerts: 0)",
                    group_key=notification.groupKey, truncated=notification.truncatedAlerts)
    log.info("alert recorded", group_key=notification.groupKey, status=notification.status,
             alerts=len(notification.alerts), ignored=ignored, truncated=notification.truncatedAlerts,
             incidents=[{"rule": i.rule, "workflow_id": i.workflow_id, "alerts": len(i.alerts),
                         "action": i.input.action.kind} for i in incidents], ms=round(ms, 2))
    return web.json_response({"status": "ok", "ignored": ignored, "incidents": [
        {"rule": i.rule, "workflow_id": i.workflow_id, "alerts": len(i.alerts)} for i in incidents]})


async def ready(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def make_app(cfg: EagleConfig, token: str, dispatcher: Dispatcher, meter=None) -> web.Application:
    if not token:
        raise ValueError("alerts.token resolves to an empty string")
    # aiohttp's own cap (413 while reading) backs up the Content-Length check for chunked bodies.
    app = web.Application(client_max_size=cfg.alerts.max_body, middlewares=[_measured])
    app[METER] = meter
    app[CONFIG] = cfg
    app[TOKEN] = token.encode()
    app[DISPATCHER] = dispatcher
    app.router.add_post(PATH, receive)
    app.router.add_get("/-/ready", ready)
    return app


async def start(cfg: EagleConfig, token: str, dispatcher: Dispatcher, host: str, port: int,
                meter=None) -> web.AppRunner:
    """Serve until the returned runner is cleaned up (``await runner.cleanup()``)."""
    runner = web.AppRunner(make_app(cfg, token, dispatcher, meter), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("alerts receiver listening", url=f"http://{host}:{port}{PATH}", rules=[r.name for r in cfg.alerts.rules])
    return runner


async def serve_forever(cfg: EagleConfig, token: str, host: str, port: int, temporal_address: str | None) -> None:
    """The ``alerts serve`` process: until SIGTERM or SIGINT, then a clean stop (requests in
    flight finish; Alertmanager retries anything that got no answer)."""
    import asyncio
    import signal

    runtime = None
    if cfg.alerts.metrics_port:
        try:
            runtime = metrics.worker_runtime(f"{host}:{cfg.alerts.metrics_port}")
            log.info("alerts receiver metrics", url=f"http://{host}:{cfg.alerts.metrics_port}/metrics")
        except Exception as e:  # noqa: BLE001 - a taken port costs the metrics, never the receiver
            log.warning("alerts receiver runs without metrics", port=cfg.alerts.metrics_port, error=str(e))
    dispatcher = Dispatcher(temporal_address, cfg.temporal.control_task_queue, cfg.alerts.temporal_timeout,
                            runtime=runtime, config=cfg)
    runner = await start(cfg, token, dispatcher, host, port, runtime.metric_meter if runtime else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Connect now when Temporal is up (the first alert then pays no connect); when it is
        # down the receiver serves all the same, answering 503 until it is back.
        await dispatcher.client()
    except TemporalUnavailable as e:
        log.warning("Temporal not reachable yet: answering 503 until it is", error=str(e))
    await stop.wait()
    log.info("alerts receiver stopping")
    await runner.cleanup()
