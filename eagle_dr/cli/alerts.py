"""``eagle-dr alerts``: the Alertmanager webhook receiver."""

from __future__ import annotations

from typing import Optional

import typer

from eagle_dr.cli import _fail, app, cfg

alerts_app = typer.Typer(no_args_is_help=True, help="Alerts in: Alertmanager's webhook receiver.")
app.add_typer(alerts_app, name="alerts")


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"--listen: expected HOST:PORT, got {text!r}")
    return host, int(port)


@alerts_app.command("serve")
def serve(listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT (default: alerts.listen)."),
          pidfile: Optional[str] = typer.Option(None, "--pidfile")):
    """Receive Alertmanager's webhook (v4) at POST /alert and start or signal the rule's workflow."""
    import asyncio
    import os
    import sys

    from alerts.server import serve_forever
    from eagle_dr import logs
    from eagle_dr.config import SecretUnavailable

    c = cfg()
    host, port = _listen(listen) if listen else (c.alerts.listen.host, c.alerts.listen.port)
    if c.alerts.token is None:
        _fail("alerts.token: not configured; the receiver can start a failover, so it needs a bearer token "
              "({env: VAR} or {file: path})")
    try:
        token = c.alerts.token.resolve()
    except SecretUnavailable as e:
        _fail(f"alerts.token: {e}")
    if not token:
        _fail("alerts.token: resolves to an empty string")
    logs.configure("alerts")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    code = 0
    try:
        asyncio.run(serve_forever(c, token, host, port, f"127.0.0.1:{c.lab.dev_server.grpc_port}"))
    except OSError as e:  # the port is taken
        logs.get("alerts").error("alerts receiver cannot listen", listen=f"{host}:{port}", error=str(e))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # The Temporal SDK can crash at interpreter exit (sdk-python#300).
    os._exit(code)
