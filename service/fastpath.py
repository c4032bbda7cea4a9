"""The lean ASGI door in front of the FastAPI app: the one door every request passes.

It runs the shared pipeline (``pipeline.py``: token check, body cap, dispatch, metrics) for every
request and stamps the instance id header on every response. With the fast path on it answers
every declared route itself: FastAPI's per-request routing and validation cost several times the
work of these answers. What the table does not declare goes to FastAPI: ``/docs``,
``/openapi.json`` and the 404s (a known path with an undeclared method is a 405 here).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prefill_bootstrap.service.event_stream import EventStream
from prefill_bootstrap.service.pipeline import Pipeline, Receive
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply, send_reply
from prefill_bootstrap.service.routes import ROUTES

__all__ = ["INSTANCE_HEADER", "FrontDoor", "instance_header"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

INSTANCE_HEADER = b"x-sglang-disaggregation-instance-id"


def instance_header(registry: Registry, method: str) -> bytes:
    """The ``X-SGLang-Disaggregation-Instance-ID`` value of an answer to ``method``.

    A read's answer carries the incarnation: what a decode caches comes from reads, and the
    incarnation changes exactly when such an answer may have gone stale (a reset, a cell that
    moved or left). A write's acknowledgement carries the group's instance id, the group the
    write landed in: the previous release's rank client compares its ``PUT /route``
    acknowledgement's header with ``/ready``'s ``instance_id``, and would take the first move in
    its group for a reset and re-register until its wait ran out."""
    group = registry.group
    return (group.incarnation if method in _READS else group.instance_id).encode()


"""The header SGLang discussed for "the prefill behind this address was replaced"."""

_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_READS = frozenset({"GET", "HEAD"})


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def _read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    value = next((v for name, v in scope["headers"] if name == b"content-length"), None)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """Give the app the body we already read, then whatever the server says next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class FrontDoor(Pipeline):
    """The server as an ASGI app; ``app`` (FastAPI) serves what the table does not declare."""

    def __init__(
        self,
        app: Any,
        registry: Registry,
        max_body_bytes: int,
        *,
        serve_hot_routes: bool = True,
        auth_token: str | None = None,
        auth_reads: bool = False,
        max_header_bytes: int = 65536,
        header_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            registry,
            max_body_bytes,
            serve_hot_routes=serve_hot_routes,
            auth_token=auth_token,
            auth_reads=auth_reads,
        )
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        status = await self._handle(scope, receive, send, method, path)
        self.observe(method, path, status, started)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str
    ) -> int:
        route = ROUTES.get((method, path))
        with_body = method in _WITH_BODY
        declared = _content_length(scope) if with_body else None
        refusal = self.gate(route, method, path, scope["headers"], scope.get("client"), declared)
        if refusal is not None:
            return await self._send(send, refusal, method)
        body = b""
        if with_body:
            try:
                body = await _read_body(receive, self.max_body_bytes, None)
            except BodyTooLarge:
                return await self._send(send, self.too_large(), method)
            except ClientGone:
                return 499
            receive = _replay(body, receive)
        if route is None:
            refused = self.not_allowed(method, path)
            if refused is not None:
                return await self._send(send, refused, method)
            return await self._forward(scope, receive, send)
        if not self.serve_hot_routes:
            return await self._forward(scope, receive, send)
        outcome = self.dispatch(route, scope["query_string"], body, scope["headers"])
        if type(outcome) is EventStream:
            instance = (INSTANCE_HEADER, instance_header(self.registry, method))
            return await outcome.run(scope, send, receive, (instance,))
        return await self._send(send, await self.settle(outcome, receive, route), method)

    async def _send(self, send: Send, reply: Reply, method: str) -> int:
        return await send_reply(
            send, reply, (INSTANCE_HEADER, instance_header(self.registry, method))
        )

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> int:
        status = 500
        registry = self.registry

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((INSTANCE_HEADER, instance_header(registry, scope["method"])))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, stamped)
        return status
