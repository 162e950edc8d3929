"""``eagle-dr codec-server``: decrypts payloads for the Temporal UI and CLI (temporal.codec)."""

from __future__ import annotations

from typing import Optional

import typer

from eagle_dr.cli import _fail, app, cfg
from eagle_dr.cli.alerts import _listen


@app.command("codec-server")
def codec_server(listen: Optional[str] = typer.Option(None, "--listen",
                                                      help="HOST:PORT (default: temporal.codec.server.listen)."),
                 pidfile: Optional[str] = typer.Option(None, "--pidfile")):
    """Serve POST /encode and /decode for the Temporal UI (--ui-codec-endpoint) and CLI (--codec-endpoint)."""
    import asyncio
    import os
    import sys

    from eagle_dr import logs
    from eagle_dr.codec import codec_from_config
    from eagle_dr.codec_server import default_origins, serve_forever
    from eagle_dr.config import SecretUnavailable

    c = cfg()
    codec_cfg = c.temporal.codec
    if codec_cfg is None:
        _fail("temporal.codec: not configured; payloads are stored in plain JSON and need no codec server")
    server = codec_cfg.server
    host, port = _listen(listen) if listen else (server.listen.host, server.listen.port)
    try:
        codec = codec_from_config(codec_cfg)
        token = server.token.resolve() if server.token else None
    except SecretUnavailable as e:
        _fail(f"temporal.codec: {e}")
    origins = server.cors_origins if server.cors_origins is not None else default_origins(c.temporal.ui_url)
    logs.configure("codec")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    code = 0
    try:
        asyncio.run(serve_forever(codec, origins, token, host, port))
    except OSError as e:  # the port is taken
        logs.get("codec").error("codec server cannot listen", listen=f"{host}:{port}", error=str(e))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
