"""What every fake upstream shares: a real server on a real port in a background thread
with its own event loop, the record of what it received, a TCP reset, and the command line
that runs a fake as a process.

A fake module defines its ``_Upstream`` (the aiohttp app and its state, used from the
loop only) and a ``FakeServer`` subclass that builds one and says where its API is rooted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, Self, TypeVar

from aiohttp import web


class Upstream(Protocol):
    # ``received`` is read from the test's thread while the loop thread appends.
    lock: threading.Lock
    received: list[Any]

    async def start(self, host: str, port: int) -> int: ...

    async def stop(self) -> None: ...


U = TypeVar("U", bound=Upstream)


class FakeServer(Generic[U]):
    """The fake on a real port, in a background thread with its own event loop."""

    # Appended to the server root in ``base_url`` (where the provider's API is rooted).
    api_root = ""

    def __init__(self, upstream: U, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._upstream = upstream
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{self.api_root}"

    @property
    def received(self) -> list[Any]:
        """(path, headers, parsed JSON body) of every request so far, oldest first."""
        with self._upstream.lock:
            return list(self._upstream.received)

    def clear(self) -> None:
        with self._upstream.lock:
            self._upstream.received.clear()

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        name = f"fake-{type(self).__name__.removeprefix('Fake').lower()}"
        self._thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._upstream.start(self.host, self.port), loop)
        self.port = started.result(30)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        asyncio.run_coroutine_threadsafe(self._upstream.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST, as a crashed upstream or a proxy would."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def serve_main(make: Callable[[], Upstream], description: str, argv: list[str] | None) -> None:
    """Run a fake as a process (recording nothing): stdout's first line is ``PORT <n>``,
    then it serves until killed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)

    async def serve() -> None:
        upstream = make()
        port = await upstream.start(args.host, args.port)
        print(f"PORT {port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await upstream.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
