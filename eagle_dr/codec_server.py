"""``eagle-dr codec-server``: the Temporal UI's (and CLI's) remote codec.

The browser calls it directly: ``POST /decode`` (and ``/encode``, for what a user types into
the UI) with the proto-JSON of a ``Payloads`` message, ``X-Namespace`` and, when configured,
``Authorization: Bearer <token>``. So it answers CORS for the UI's origin (preflight
``OPTIONS`` included) and ignores the query string (``?preserveStorageRefs=true``).

Anyone who can call /decode reads every runbook's inputs and results: the token (by
reference) keeps it to the UI's users when it is reachable beyond the operators' network.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from eagle_dr import logs
from eagle_dr.codec import CodecKeyError, EncryptionCodec

log = logs.get("codec.server")

CODEC = web.AppKey("codec", EncryptionCodec)
ORIGINS = web.AppKey("origins", frozenset)
TOKEN = web.AppKey("token", bytes)
# The UI sends these (x-namespace always, authorization when a token is set up).
_ALLOW_HEADERS = "content-type,x-namespace,authorization"
# Larger bodies are refused before parsing: a page of a history's payloads is far smaller.
MAX_BODY = 16 << 20


def default_origins(ui_url: str) -> list[str]:
    """The UI's origin under both loopback names: a browser sends the one it was opened with."""
    u = urlsplit(ui_url)
    origin = f"{u.scheme}://{u.netloc}"
    host = u.hostname or ""
    twins = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}
    out = [origin]
    if host in twins:
        out.append(origin.replace(host, twins[host], 1))
    return out


def _cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin and origin in request.app[ORIGINS]:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "POST,OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = _ALLOW_HEADERS
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
    return response


def _authorized(request: web.Request) -> bool:
    token = request.app[TOKEN]
    if not token:
        return True
    sent = request.headers.get("Authorization", "")
    return hmac.compare_digest(sent.encode(), b"Bearer " + token)


async def _preflight(request: web.Request) -> web.StreamResponse:
    # Preflight carries no credentials: it is answered for the allowed origins only.
    return _cors(request, web.Response(status=200 if request.headers.get("Origin") in request.app[ORIGINS] else 403))


def _handler(action: str):
    async def handle(request: web.Request) -> web.StreamResponse:
        if not _authorized(request):
            return _cors(request, web.json_response({"error": "unauthorized"}, status=401))
        try:
            payloads = json_format.Parse(await request.text(), Payloads())
        except json_format.ParseError as e:
            return _cors(request, web.json_response({"error": f"not a Payloads JSON: {e}"}, status=400))
        codec = request.app[CODEC]
        try:
            out = await (codec.encode if action == "encode" else codec.decode)(list(payloads.payloads))
        except CodecKeyError as e:
            return _cors(request, web.json_response({"error": str(e)}, status=400))
        body = json_format.MessageToJson(Payloads(payloads=out))
        return _cors(request, web.Response(text=body, content_type="application/json"))

    return handle


async def _ready(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(codec: EncryptionCodec, origins: list[str], token: str | None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[CODEC] = codec
    app[ORIGINS] = frozenset(origins)
    app[TOKEN] = (token or "").encode()
    for action in ("encode", "decode"):
        app.router.add_post(f"/{action}", _handler(action))
        app.router.add_route("OPTIONS", f"/{action}", _preflight)
    app.router.add_get("/-/ready", _ready)
    return app


async def start(codec: EncryptionCodec, origins: list[str], token: str | None, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(codec, origins, token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("codec server listening", url=f"http://{host}:{port}", origins=origins, auth=bool(token))
    return runner


async def serve_forever(codec: EncryptionCodec, origins: list[str], token: str | None, host: str, port: int) -> None:
    """Until SIGTERM or SIGINT."""
    import asyncio
    import signal

    runner = await start(codec, origins, token, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
