"""A lean ASGI layer in front of the FastAPI app: the one door every request passes.

It does four cheap jobs for every route: checks the bearer token (writes always, reads when
configured), caps the request body (413 before reading more than the cap), stamps the instance id
header on every response, and times the request for ``/metrics``. And it answers the protocol's
hot routes (``GET /route``, ``GET /health``, ``POST /register_dp_rank``, ``POST
/query_dp_ranks``) itself, with the same answer functions the FastAPI routes use: FastAPI's
per-request routing and validation cost several times the work of these answers, and decode
workers call them once per request served. So are the reads every rank of a group makes at
start-up, ``GET /ready`` and ``GET /prefill_port_table``, whose long polls (``?wait=``) park
thousands of ranks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from prefill_bootstrap.service import answers
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply, error_reply
from prefill_bootstrap.service.ui_routes import UI_PATHS
from prefill_bootstrap.service.waiters import OnWake, Parked

__all__ = ["INSTANCE_HEADER", "FrontDoor", "wait_while_connected"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INSTANCE_HEADER = b"x-sglang-disaggregation-instance-id"
"""The header SGLang discussed for "the prefill behind this address was replaced"."""

_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HOT = frozenset(
    {
        ("GET", "/route"),
        ("GET", "/health"),
        ("POST", "/register_dp_rank"),
        ("POST", "/query_dp_ranks"),
        ("GET", "/ready"),
        ("GET", "/prefill_port_table"),
    }
)
_LONG_POLLS = frozenset({"/ready", "/prefill_port_table"})
_REGISTRATION = ("PUT", "/route")
_WRITES = frozenset(
    {
        ("PUT", "/route"),
        ("POST", "/register_dp_rank"),
        ("POST", "/heartbeat"),
        ("DELETE", "/prefill_port_table"),
    }
)
_OPEN_WITH_AUTH_READS = UI_PATHS | {"/health"}  # probes carry no token; the page asks for it
_KNOWN_ROUTES = frozenset(
    {
        "/route", "/health", "/ready", "/prefill_port_table", "/register_dp_rank",
        "/query_dp_ranks", "/heartbeat", "/metrics", "/docs", "/openapi.json", *UI_PATHS,
    }
)  # fmt: skip


def _bearer_token(credentials: bytes) -> bytes:
    """The token of ``Bearer <token>``; the scheme is case-insensitive (RFC 7235), so ``bearer``
    and ``BEARER`` count too. Anything else yields no token."""
    scheme, _, token = credentials.partition(b" ")
    return token.strip(b" ") if scheme.lower() == b"bearer" else b""


async def wait_while_connected(
    registry: Registry, seconds: float, instance: str | None, receive: Receive
) -> None:
    """An ASGI long poll (HTTP/1.0, ``Connection: close``, pipelined, or FastAPI-only): wait
    for the table like a lean-door one, and stop waiting, unparked, the moment the client
    disconnects, so abandoned waits hold nothing until their deadline."""
    if not registry.must_wait(seconds, instance):
        return
    waiting = asyncio.ensure_future(registry.wait_until_complete(seconds, instance))
    leaving = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        leaving.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _params(query: bytes) -> dict[str, str]:
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


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


class FrontDoor:
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
        self.app = app
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.serve_hot_routes = serve_hot_routes
        self._token = auth_token.encode() if auth_token else None
        self.auth_reads = auth_reads
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

    def observe(self, method: str, path: str, status: int, started: float) -> None:
        """Count one answered request for ``/metrics`` (every door calls this)."""
        route = path if path in _KNOWN_ROUTES else "other"
        metrics = self.registry.metrics
        metrics.observe(route, method, time.perf_counter() - started)
        if method == "PUT" and path == "/route" and status in (400, 413, 422):
            metrics.registrations["invalid"] += 1

    def is_hot(self, method: str, path: str) -> bool:
        """Answered at once, without the app: the protocol's hot reads and room routes."""
        return self.serve_hot_routes and (method, path) in _HOT

    def is_registration(self, method: str, path: str) -> bool:
        """``PUT /route``, answered without the app once durable: the start-up storm's route."""
        return self.serve_hot_routes and (method, path) == _REGISTRATION

    async def register(self, body: bytes) -> Reply:
        return await answers.register(self.registry, body)

    def long_poll(self, method: str, path: str, query: bytes) -> float | None:
        """Seconds a hot read must wait before it is answered (a long poll on an incomplete
        table), or None: answer at once (``hot_reply``, which also refuses a bad ``wait``)."""
        if method != "GET" or path not in _LONG_POLLS:
            return None
        params = _params(query)
        seconds = answers.long_poll_seconds(params)
        if isinstance(seconds, Reply):
            return None
        if not self.registry.must_wait(seconds, params.get("instance")):
            return None
        return seconds

    def park(self, seconds: float, on_wake: OnWake) -> Parked:
        return self.registry.park_until_complete(seconds, on_wake)

    def long_poll_reply(self, path: str) -> Reply:
        if path == "/ready":
            return answers.ready(self.registry)
        return answers.port_table(self.registry)

    def hot_reply(self, method: str, path: str, query: bytes, body: bytes) -> Reply:
        """The answer of a hot route, once the token (if any) was checked and the body read."""
        registry = self.registry
        if path == "/route":
            return answers.route_lookup(registry, _params(query))
        if path == "/health":
            return answers.health()
        if path in _LONG_POLLS:
            seconds = answers.long_poll_seconds(_params(query))
            return seconds if isinstance(seconds, Reply) else self.long_poll_reply(path)
        if path == "/register_dp_rank":
            return answers.register_dp_rank(registry, body, registry.clock())
        return answers.query_dp_ranks(registry, body, registry.clock())

    def refusal(
        self, headers: Iterable[tuple[bytes, bytes]], client: Any, method: str, path: str
    ) -> Reply | None:
        """401 when this route needs the token and the request lacks it, else None."""
        if self._token is None or not self._needs_token(method, path):
            return None
        offered = next((value for name, value in headers if name == b"authorization"), None)
        if offered is not None and hmac.compare_digest(_bearer_token(offered), self._token):
            return None
        self.registry.metrics.unauthorized += 1
        if method == "PUT" and path == "/route":
            self.registry.metrics.registrations["unauthorized"] += 1
        problem = "was missing" if offered is None else "did not match"
        where = client[0] if client else "?"
        log.warning("Refused %s %s from %s: the bearer token %s.", method, path, where, problem)
        return error_reply(
            401,
            "unauthorized",
            f"{method} {path} needs 'Authorization: Bearer <token>' with the server's token "
            f"(--auth-token / PREFILL_BOOTSTRAP_AUTH_TOKEN); the token {problem}",
        )

    def too_large(self) -> Reply:
        return error_reply(
            413, "body_too_large", f"the request body exceeds {self.max_body_bytes} bytes"
        )

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str
    ) -> int:
        refusal = self.refusal(scope["headers"], scope.get("client"), method, path)
        if refusal is not None:
            return await self._send(send, refusal)
        body = b""
        if method in _WITH_BODY:
            try:
                body = await _read_body(receive, self.max_body_bytes, _content_length(scope))
            except BodyTooLarge:
                return await self._send(send, self.too_large())
            except ClientGone:
                return 499
            receive = _replay(body, receive)
        if self.is_hot(method, path):
            query = scope["query_string"]
            seconds = self.long_poll(method, path, query)
            if seconds is not None:
                instance = _params(query).get("instance")
                await wait_while_connected(self.registry, seconds, instance, receive)
                return await self._send(send, self.long_poll_reply(path))
            return await self._send(send, self.hot_reply(method, path, query, body))
        if self.is_registration(method, path):
            # Registrations arrive as a storm at start-up; FastAPI's routing was most of their cost.
            return await self._send(send, await self.register(body))
        return await self._forward(scope, receive, send)

    def _needs_token(self, method: str, path: str) -> bool:
        if (method, path) in _WRITES:
            return True
        return self.auth_reads and path not in _OPEN_WITH_AUTH_READS

    async def _send(self, send: Send, reply: Reply) -> int:
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", reply.content_type),
                    (b"content-length", b"%d" % len(reply.body)),
                    (INSTANCE_HEADER, self.registry.instance_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})
        return reply.status

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> int:
        status = 500
        registry = self.registry

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((INSTANCE_HEADER, registry.instance_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, stamped)
        return status
