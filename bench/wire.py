"""Raw HTTP/1.1 over asyncio protocols: the cheapest client Python can drive.

Why not httpx: on this 2-core machine the load generator gets one core, and httpx spends ~10x
more CPU per request than the server's hot path (see bench/README.md), so it measures itself.
A protocol object with a callback per response, prebuilt request bytes and a parser that only
finds the status and ``content-length`` keeps the generator far below the server's cost.

Only what the benchmark needs: one request in flight per connection (no pipelining), keep-alive,
responses framed by ``content-length`` (the server always sends it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import NamedTuple, cast

__all__ = [
    "Connection",
    "ProtocolError",
    "Response",
    "build_request",
    "connect",
    "fetch",
    "new_loop",
    "parse_head",
]

Callback = Callable[[int, bytes], None]
"""Called with (status, body) for every response; status 0 means the connection failed."""


class ProtocolError(Exception):
    """The server sent something this client cannot frame (no content-length, bad status)."""


class Response(NamedTuple):
    status: int
    body: bytes


def build_request(
    method: str, path: str, body: bytes | None = None, *, close: bool = False
) -> bytes:
    """One request as bytes, built once and sent many times."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + (body or b"")


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``send`` a request, the callback gets the response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._body_start = -1
        self._need = -1
        self._status = 0
        self._callback: Callback | None = None
        self.closed = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            if self._need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                try:
                    self._status, length = parse_head(bytes(buffer[:end]))
                except ProtocolError:
                    self._fail()
                    return
                self._body_start = end + 4
                self._need = self._body_start + length
            if len(buffer) < self._need:
                return
            body = bytes(buffer[self._body_start : self._need])
            del buffer[: self._need]
            status, self._need = self._status, -1
            callback, self._callback = self._callback, None
            if callback is not None:
                callback(status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(0, b"")

    # -- use -----------------------------------------------------------------------------------

    def send(self, request: bytes, callback: Callback) -> None:
        """Write one request; ``callback`` fires once with its response (or status 0)."""
        if self.closed or self.transport is None:
            callback(0, b"")
            return
        self._callback = callback
        self.transport.write(request)

    async def request(self, request: bytes) -> Response:
        """The same as ``send`` for code that prefers to await."""
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def done(status: int, body: bytes) -> None:
            if not future.done():
                future.set_result(Response(status, body))

        self.send(request, done)
        return await future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _fail(self) -> None:
        callback, self._callback = self._callback, None
        self.abort()
        if callback is not None:
            callback(0, b"")


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, content-length) of a response head, without the blank line that ends it."""
    if not head.startswith(b"HTTP/1.1 ") or len(head) < 12:
        raise ProtocolError(f"not an HTTP/1.1 status line: {head[:40]!r}")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ProtocolError("response without content-length")
    start = at + len(b"\r\ncontent-length:")
    end = lower.find(b"\r\n", start)
    return status, int(lower[start : end if end >= 0 else None])


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


async def fetch(host: str, port: int, request: bytes, timeout: float = 10.0) -> Response:
    """One request on a fresh connection, closed afterwards (a rank registering, a probe)."""
    connection = await asyncio.wait_for(connect(host, port), timeout)
    try:
        return await asyncio.wait_for(connection.request(request), timeout)
    finally:
        connection.close()


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with uvicorn[standard]): a cheaper client loop."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
