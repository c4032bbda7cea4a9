"""uvicorn's httptools protocol, answering the bootstrap protocol's hot routes itself.

For ``GET /route``, ``GET /health``, ``POST /register_dp_rank`` and ``POST /query_dp_ranks`` most
of a request's cost was uvicorn's ASGI machinery around a microsecond of work: a scope, a
request/response cycle, an event, a task, and two socket writes (headers, then body). Here those
requests are answered straight from the parser's callbacks with one write, through the same
``FrontDoor`` methods the ASGI path uses (token check, answer, metrics), so both doors answer the
same bytes. Anything unusual (HTTP/1.0, ``Connection: close``, ``Expect``, pipelining, access
logging) takes uvicorn's normal path, as does every other route.

Each connection also holds the ``Slot`` the admission listener (``listener.py``) accepted it with,
and gives it back once its first answer is written or it closes.
"""

from __future__ import annotations

import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from prefill_bootstrap.service.fastpath import INSTANCE_HEADER, FrontDoor
from prefill_bootstrap.service.listener import Slot
from prefill_bootstrap.service.replies import Reply

__all__ = ["hot_path_protocol"]


class _HotPathProtocol(HttpToolsProtocol):
    front: FrontDoor

    def __init__(self, *args: Any, slot: Slot | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot = slot

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._release_slot()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._release_slot()

    def _release_slot(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._hot: tuple[str, str, bytes, float] | None = None
        self._hot_body: list[bytes] = []
        self._hot_size = 0

    def on_headers_complete(self) -> None:
        if not self._take_hot_path():
            super().on_headers_complete()

    def _take_hot_path(self) -> bool:
        parser = self.parser
        method = parser.get_method().decode("ascii")
        if method not in ("GET", "POST") or parser.get_http_version() != "1.1":
            return False
        if not parser.should_keep_alive() or parser.should_upgrade():
            return False
        if self.access_log or self.expect_100_continue or self.pipeline:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False  # an earlier request on this connection is still being answered
        path, _, query = self.url.partition(b"?")
        try:
            route = path.decode("ascii")
        except UnicodeDecodeError:
            return False
        if not self.front.is_hot(method, route):
            return False
        self._hot = (method, route, query.partition(b"#")[0], time.perf_counter())
        return True

    def on_body(self, body: bytes) -> None:
        if self._hot is None:
            super().on_body(body)
            return
        self._hot_size += len(body)
        if self._hot_size <= self.front.max_body_bytes:
            self._hot_body.append(body)

    def on_message_complete(self) -> None:
        if self._hot is None:
            super().on_message_complete()
            return
        method, route, query, started = self._hot
        self._hot = None
        front = self.front
        reply = front.refusal(self.headers, self.client, method, route)
        if reply is None:
            if self._hot_size > front.max_body_bytes:
                reply = front.too_large()
            else:
                reply = front.hot_reply(method, route, query, b"".join(self._hot_body))
        self._write(reply)
        front.observe(method, route, reply.status, started)
        self.on_response_complete()

    def _write(self, reply: Reply) -> None:
        parts = [STATUS_LINE[reply.status]]
        for name, value in self.server_state.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        parts += [
            b"content-type: ", reply.content_type, b"\r\n",
            b"content-length: %d\r\n" % len(reply.body),
            INSTANCE_HEADER, b": ", self.front.registry.instance_id.encode(), b"\r\n\r\n",
            reply.body,
        ]  # fmt: skip
        self.transport.write(b"".join(parts))


def hot_path_protocol(front: FrontDoor) -> type[Any]:
    """The protocol class to give uvicorn (``Config(http=...)``), bound to this server's door."""
    return type("HotPathProtocol", (_HotPathProtocol,), {"front": front})
