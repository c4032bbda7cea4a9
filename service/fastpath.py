"""A lean ASGI layer in front of the FastAPI app.

It does two jobs. It caps every request body (413 before the app reads a byte more than the cap),
and it answers the protocol's hot routes (``GET /route``, ``GET /health``, ``POST
/register_dp_rank``, ``POST /query_dp_ranks``) itself, with the same answer functions the FastAPI
routes use: FastAPI's per-request routing and validation cost several times the work of these
answers, and decode workers call them once per request served.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from prefill_bootstrap.service import answers
from prefill_bootstrap.service.registry import Registry

__all__ = ["FrontDoor"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send(send: Send, reply: answers.Reply) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (b"content-type", reply.content_type),
                (b"content-length", str(len(reply.body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": reply.body})


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


class FrontDoor:
    def __init__(
        self, app: Any, registry: Registry, max_body_bytes: int, *, serve_hot_routes: bool = True
    ) -> None:
        self.app = app
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.serve_hot_routes = serve_hot_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        hot = self.serve_hot_routes
        if hot and method == "GET":
            if path == "/route":
                params = dict(parse_qsl(scope["query_string"].decode("latin-1")))
                await _send(send, answers.route_lookup(self.registry, params))
                return
            if path == "/health":
                await _send(send, answers.health())
                return
        if method not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive, self.max_body_bytes, _content_length(scope))
        except BodyTooLarge:
            await _send(send, _too_large(self.max_body_bytes))
            return
        except ClientGone:
            return
        if hot and method == "POST":
            if path == "/register_dp_rank":
                reply = answers.register_dp_rank(self.registry, body, time.time())
                await _send(send, reply)
                return
            if path == "/query_dp_ranks":
                reply = answers.query_dp_ranks(self.registry, body, time.time())
                await _send(send, reply)
                return
        await self.app(scope, _replay(body, receive), send)


def _too_large(limit: int) -> answers.Reply:
    return answers.error_reply(413, "body_too_large", f"the request body exceeds {limit} bytes")
