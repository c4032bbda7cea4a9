"""The one pipeline every door runs: ``gate`` (the route's token check, then the body cap),
``dispatch`` (the declared answer, or a long poll to park), ``settle`` (await what is not
answered at once) and ``observe`` (metrics).

The doors differ only in how they read and write bytes: uvicorn's parser for the hot routes
(``hot_protocol.py``), ASGI (``fastpath.FrontDoor``), and the FastAPI routes generated from the
same table (``openapi.py``, all answers when ``fast_path=False``). What a route needs (its access,
whether it is a long poll, its answer) comes from its declaration in ``routes.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NamedTuple, cast

from prefill_bootstrap.service.answers import query_params
from prefill_bootstrap.service.event_stream import EventStream
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply, Waiting, error_reply, reply_for
from prefill_bootstrap.service.routes import (
    ALLOWED,
    HOT,
    METRIC_LABELS,
    Route,
    access_of,
    long_poll_seconds,
)
from prefill_bootstrap.service.waiters import OnWake, Parked
from prefill_bootstrap.service.watching import accepts_event_stream
from prefill_bootstrap.shared.errors import BootstrapError

__all__ = ["LongPoll", "Outcome", "Pipeline", "Receive", "wait_while_connected"]

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
_REGISTRATION = ("PUT", "/route")


class LongPoll(NamedTuple):
    """A long poll that must wait for the table: park it, then answer ``route`` as it stands."""

    route: Route
    seconds: float
    instance: str | None


Outcome = Reply | LongPoll | Waiting | EventStream | Awaitable[Reply]
"""What ``dispatch`` gives a door: an answer now, a wait for the table, an answer to await
(while the client stays, for ``Waiting``), or an event stream to run (the ASGI doors only: no
route that streams is hot)."""


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
    if not registry.waits.must_wait(seconds, instance):
        return
    waiting = asyncio.ensure_future(registry.waits.wait_until_complete(seconds, instance))
    leaving = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        leaving.cancel()


async def _unless_gone(answer: Awaitable[Reply], receive: Receive) -> Reply:
    """Await ``answer`` unless the client leaves first: then it is cancelled (and unparks), and
    the answer nobody will read is a 499."""
    answering = asyncio.ensure_future(answer)
    leaving = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not answering.done():
            answering.cancel()
    if answering.cancelled():
        return error_reply(499, "client_closed", "the client closed the connection")
    return answering.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Pipeline:
    """The steps of answering a declared route, shared by every door."""

    def __init__(
        self,
        registry: Registry,
        max_body_bytes: int,
        *,
        serve_hot_routes: bool = True,
        auth_token: str | None = None,
        auth_reads: bool = False,
    ) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.serve_hot_routes = serve_hot_routes
        self._token = auth_token.encode() if auth_token else None
        self.auth_reads = auth_reads
        self._hot = HOT if serve_hot_routes else {}

    def hot_route(self, method: str, path: str) -> Route | None:
        """The route the lean door answers inside uvicorn's parser, or None (ASGI then)."""
        return self._hot.get((method, path))

    def gate(
        self,
        route: Route | None,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        client: Any,
        body_size: int | None,
    ) -> Reply | None:
        """401 when the route needs the token and the request lacks it, else 413 when the body
        (its declared or counted size) exceeds the cap, else None: go on."""
        if self._token is not None:
            refusal = self._refusal(route, method, path, headers, client)
            if refusal is not None:
                return refusal
        if body_size is not None and body_size > self.max_body_bytes:
            return self.too_large()
        return None

    def dispatch(
        self,
        route: Route,
        query: bytes,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> Outcome:
        """The declared answer to an admitted request, or the long poll to park first. Only a
        route that can stream reads ``headers`` (whether SSE was asked for, ``Last-Event-ID``)."""
        try:
            if route.stream is not None:
                headers = list(headers)
                if accepts_event_stream(headers):
                    return route.stream(self.registry, query, headers)
            if route.long_poll:
                params = query_params(query)
                seconds = long_poll_seconds(params)
                if isinstance(seconds, Reply):
                    return seconds
                instance = params.get("instance")
                if self.registry.waits.must_wait(seconds, instance):
                    return LongPoll(route, seconds, instance)
            return route.answer(self.registry, query, body)
        except BootstrapError as exc:
            return reply_for(exc)
        except Exception as exc:  # a bug: answered as every door answers one, not escaped
            return self.failed(route.method, route.path, exc)

    def after_wait(self, poll: LongPoll) -> Reply:
        """A long poll's answer once the table completed or its wait ran out."""
        return cast(Reply, poll.route.answer(self.registry, b"", b""))  # long polls answer now

    def park(self, poll: LongPoll, on_wake: OnWake) -> Parked:
        return self.registry.waits.park_until_complete(poll.seconds, on_wake)

    async def settle(self, outcome: Outcome, receive: Receive, route: Route) -> Reply:
        """The ASGI doors' end of ``dispatch``: wait out a long poll (unparked if the client
        leaves), or await an answer. What the answer raises is answered as the lean door answers
        it (``failed``), never left to the ASGI server's plain-text 500."""
        if type(outcome) is Reply:
            return outcome
        if type(outcome) is LongPoll:
            await wait_while_connected(self.registry, outcome.seconds, outcome.instance, receive)
            return self.after_wait(outcome)
        try:
            if type(outcome) is Waiting:
                return await _unless_gone(outcome.answer, receive)
            return await outcome  # type: ignore[misc]
        except Exception as exc:
            return self.failed(route.method, route.path, exc)

    def failed(self, method: str, path: str, failure: BaseException) -> Reply:
        """An awaited answer that raised: a domain error by its status, anything else a 500."""
        if isinstance(failure, BootstrapError):
            return reply_for(failure)
        log.error("%s %s failed unexpectedly.", method, path, exc_info=failure)
        return error_reply(500, "internal_error", f"unexpected {type(failure).__name__}")

    def observe(self, method: str, path: str, status: int, started: float) -> None:
        """Count one answered request for ``/metrics`` (every door calls this)."""
        route = path if path in METRIC_LABELS else "other"
        metrics = self.registry.metrics
        metrics.observe(route, method, time.perf_counter() - started)
        if status in (400, 413, 422) and (method, path) == _REGISTRATION:
            metrics.registrations["invalid"] += 1

    def too_large(self) -> Reply:
        return error_reply(
            413, "body_too_large", f"the request body exceeds {self.max_body_bytes} bytes"
        )

    @staticmethod
    def not_allowed(method: str, path: str) -> Reply | None:
        """405 naming the declared methods when ``path`` is known, else None (a 404)."""
        allowed = ALLOWED.get(path)
        if allowed is None:
            return None
        return error_reply(
            405,
            "method_not_allowed",
            f"{method} is not allowed on {path} ({', '.join(allowed)})",
            headers=((b"allow", ", ".join(allowed).encode()),),
        )

    def _refusal(
        self,
        route: Route | None,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        client: Any,
    ) -> Reply | None:
        access = access_of(route, path)
        if access == "probe" or (access == "read" and not self.auth_reads):
            return None
        offered = next((value for name, value in headers if name == b"authorization"), None)
        if offered is not None and hmac.compare_digest(_bearer_token(offered), self._token or b""):
            return None
        self.registry.metrics.unauthorized += 1
        if (method, path) == _REGISTRATION:
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
