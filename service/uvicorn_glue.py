"""Every place the server reaches into uvicorn beyond its public ``Config`` and ``Server.run``.

uvicorn gives us the event loop, HTTP/1.1 on httptools (keep-alive, pipelining, flow control, the
ASGI cycle of every route we do not answer ourselves) and the graceful shutdown. Two of our
classes go further: ``server.py`` runs our own listener inside uvicorn's ``Server``, and
``hot_protocol.py`` answers the hot routes inside uvicorn's protocol. Both import uvicorn from
here only, subclassing the two base classes below, whose accessors name what each internal is
for; every internal either relies on is listed in ``TOUCH_POINTS`` with the reason we use it.
uvicorn does not promise any of them, so ``pyproject.toml`` bounds uvicorn to the releases we
tested (``TESTED_UVICORN``), and ``check_uvicorn()`` (run at start-up and by the tests) fails with
the touch point's name when an installed release lacks one, rather than a request failing later.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
import uvicorn.lifespan.on
import uvicorn.server

from prefill_bootstrap.shared.errors import ConfigurationError

__all__ = [
    "STATUS_LINE",
    "TESTED_UVICORN",
    "TOUCH_POINTS",
    "Config",
    "PendingCycle",
    "TouchPoint",
    "UvicornHttpProtocol",
    "UvicornIncompatible",
    "UvicornServer",
    "check_uvicorn",
]

TESTED_UVICORN = ">=0.29,<0.55"
"""The releases the server is tested with: the bound in pyproject.toml says the same."""


class UvicornIncompatible(ConfigurationError):
    """The installed uvicorn lacks an internal the server is built on."""

    def __init__(self, touch_point: str, use: str) -> None:
        self.touch_point = touch_point
        super().__init__(
            f"the installed uvicorn {uvicorn.__version__} lacks {touch_point}, which the server "
            f"uses to {use}; install a uvicorn it is tested with ({TESTED_UVICORN}, as "
            "pyproject.toml requires)"
        )


try:
    from uvicorn.protocols.http.httptools_impl import (
        STATUS_LINE,
        HttpToolsProtocol,
        RequestResponseCycle,
    )
except ImportError as exc:
    if exc.name and not exc.name.startswith("uvicorn"):
        raise  # httptools itself is missing: the [server] extra's message says what to install
    raise UvicornIncompatible(
        "uvicorn.protocols.http.httptools_impl (HttpToolsProtocol, STATUS_LINE)",
        f"answer the hot routes inside uvicorn's HTTP protocol ({exc})",
    ) from exc


# -- the server: our listener inside uvicorn's Server ---------------------------------------------

Config = uvicorn.Config
"""uvicorn's public settings, named here so that ``server.py`` imports uvicorn from here only."""


class Listener(Protocol):
    """What uvicorn does with each of ``Server.servers`` on shutdown."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class UvicornServer(uvicorn.Server):
    """uvicorn's ``Server``, with the internals ``server.py`` uses behind names of ours."""

    def connection_protocol(
        self, loop: asyncio.AbstractEventLoop
    ) -> Callable[..., asyncio.Protocol]:
        """Builds the protocol of one accepted connection (given more keywords of its own) as
        uvicorn's start-up would: ``Config.http_protocol_class`` with uvicorn's ``server_state``
        (connections, tasks, default headers) and the lifespan's ``state``."""
        config = self.config
        return functools.partial(
            config.http_protocol_class,
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
            _loop=loop,
        )

    def add_listener(self, listener: Listener) -> None:
        """uvicorn's shutdown closes, then awaits, every one of ``servers``."""
        self.servers.append(listener)  # type: ignore[arg-type]

    def forget_signals(self) -> None:
        """uvicorn re-raises the signals it caught once its graceful shutdown is over (so the
        process dies "killed by SIGTERM"); forgetting them lets it exit 0."""
        self._captured_signals.clear()

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context uvicorn's ``Config.load`` built from the certificate settings."""
        return self.config.ssl


# -- the protocol: hot routes answered inside uvicorn's HTTP protocol ----------------------------


class _NoWaiters:
    def set(self) -> None:
        """uvicorn sets a lost connection's cycle event; nothing waits on a pending one's."""


class PendingCycle:
    """Holds uvicorn's cycle slot (``protocol.cycle``) while an answer is awaited: a
    registration's disk write, or a long poll's wait for the table.

    uvicorn queues a pipelined request while ``response_complete`` is false, marks
    ``disconnected`` and sets ``message_event`` when the connection is lost, and clears
    ``keep_alive`` to close after the answer on a graceful shutdown: the four things it does
    to any cycle it did not start itself.
    """

    __slots__ = ("disconnected", "keep_alive", "response_complete")
    message_event = _NoWaiters()

    def __init__(self) -> None:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True


class UvicornHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the state ``hot_protocol.py`` relies on behind names
    of ours. The request as parsed so far is uvicorn's too: ``parser``, ``url``, ``headers``,
    and the connection's ``transport``, ``client`` and ``loop`` (see ``TOUCH_POINTS``)."""

    def uvicorn_idle(self) -> bool:
        """Whether uvicorn has nothing of its own to do for the request just parsed: no access
        log line to write, no ``100 Continue`` to send, no request queued on this connection
        and none still being answered."""
        if self.access_log or self.expect_100_continue or self.pipeline:
            return False
        return self.cycle is None or self.cycle.response_complete

    def hold_cycle(self) -> PendingCycle:
        """Take uvicorn's cycle slot until the answer is written (``PendingCycle``)."""
        pending = PendingCycle()
        self.cycle = pending  # type: ignore[assignment]
        return pending

    def keep_task(self, task: asyncio.Task[Any]) -> None:
        """uvicorn's graceful shutdown waits for ``server_state.tasks`` (up to its deadline)."""
        self.tasks.add(task)  # type: ignore[arg-type]

    def drop_task(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)  # type: ignore[arg-type]

    def lend_abort(self, extension: str) -> None:
        """Put the connection's ``transport.abort`` in the ASGI scope of the request just parsed
        (``scope["extensions"][extension]``), before uvicorn starts the app on it. ASGI has no
        way to drop a connection, and ending a response politely waits for the client to read
        it: an event stream whose reader stalled is aborted through this instead."""
        extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
        extensions[extension] = self.transport.abort  # type: ignore[index]

    def default_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers uvicorn puts on every answer (``date``, ``server``), kept current by
        its main loop."""
        return self.server_state.default_headers


# -- the touch points and their check ------------------------------------------------------------


@dataclass(frozen=True)
class TouchPoint:
    """One uvicorn internal the server relies on, what for, and how to tell it is there."""

    name: str
    use: str
    present: Callable[[], bool]


def _code_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):  # nested functions and comprehensions
            yield from _code_names(constant)


def _uses(owner: type, *names: str) -> Callable[[], bool]:
    """Whether ``owner``'s own code still sets or reads every attribute in ``names``: renaming or
    removing one there takes it out of its methods' compiled names (``co_names``)."""

    def present() -> bool:
        used: set[str] = set()
        for member in vars(owner).values():
            function = getattr(member, "fget", None) or getattr(member, "__func__", member)
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType):
                used.update(_code_names(code))
        return set(names) <= used

    return present


def _has(owner: object, *names: str) -> Callable[[], bool]:
    return lambda: all(callable(getattr(owner, name, None)) for name in names)


def _takes(owner: object, name: str, *keywords: str, positional: int = 0) -> Callable[[], bool]:
    """Whether ``owner.name`` takes each of ``keywords`` (we pass them by name), and at least
    ``positional`` arguments besides ``self`` (uvicorn passes them by position)."""

    def present() -> bool:
        target = getattr(owner, name, None)
        if not callable(target):
            return False
        try:
            parameters = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            return False
        if inspect.isfunction(target):  # a method looked up on its class: the first is self
            parameters = parameters[1:]
        by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = {parameter.name for parameter in parameters}
        positions = sum(parameter.kind in by_position for parameter in parameters)
        return set(keywords) <= names and positions >= positional

    return present


def _all(*checks: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(check() for check in checks)


def _status_lines() -> bool:
    lines: Mapping[int, bytes] = STATUS_LINE
    return all(
        isinstance(lines.get(status), bytes) and lines[status].startswith(b"HTTP/1.1 %d" % status)
        for status in range(200, 600)
    )


_SERVER = "uvicorn.Server"
_PROTOCOL = "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol"
_CYCLE = ("response_complete", "disconnected", "keep_alive", "message_event")
_CONFIG_KEYWORDS = (
    "log_level", "access_log", "backlog", "timeout_graceful_shutdown", "log_config",
    "ssl_certfile", "ssl_keyfile", "http", "proxy_headers",
)  # fmt: skip
_CALLBACKS = (
    "connection_made", "data_received", "connection_lost", "on_message_begin",
    "on_headers_complete", "on_body", "on_message_complete", "on_response_complete",
    "send_400_response",
)  # fmt: skip

TOUCH_POINTS: tuple[TouchPoint, ...] = (
    # server.py: BootstrapServer is a UvicornServer
    TouchPoint(
        f"{_SERVER}.startup(sockets=)",
        "run the app's lifespan without a listener of uvicorn's (ours paces accepting)",
        _takes(uvicorn.Server, "startup", "sockets"),
    ),
    TouchPoint(
        f"{_SERVER}.shutdown(sockets=)",
        "answer parked long polls before the graceful shutdown",
        _takes(uvicorn.Server, "shutdown", "sockets"),
    ),
    TouchPoint(
        f"{_SERVER}.handle_exit(sig, frame)",
        "log the signal that starts the graceful shutdown",
        _takes(uvicorn.Server, "handle_exit", positional=2),
    ),
    TouchPoint(
        f"{_SERVER}._captured_signals",
        "exit 0 after a SIGTERM rather than re-raise it (UvicornServer.forget_signals)",
        _uses(uvicorn.Server, "_captured_signals"),
    ),
    TouchPoint(
        f"{_SERVER}.servers",
        "have the graceful shutdown close and await our listener (UvicornServer.add_listener)",
        _uses(uvicorn.Server, "servers"),
    ),
    TouchPoint(
        f"{_SERVER}.server_state and .lifespan.state",
        "build each connection's protocol as uvicorn would (UvicornServer.connection_protocol)",
        _all(
            _uses(uvicorn.Server, "server_state", "lifespan"),
            _uses(uvicorn.lifespan.on.LifespanOn, "state"),
        ),
    ),
    TouchPoint(
        "uvicorn.Config.http_protocol_class and .ssl",
        "build each connection's protocol and TLS the way uvicorn's start-up does",
        _uses(uvicorn.Config, "http_protocol_class", "ssl"),
    ),
    TouchPoint(
        f"uvicorn.Config({', '.join(_CONFIG_KEYWORDS)})",
        "configure uvicorn (server.prepare)",
        _takes(uvicorn, "Config", *_CONFIG_KEYWORDS),
    ),
    TouchPoint(
        f"{_PROTOCOL}(config, server_state, app_state, _loop)",
        "build each connection's protocol (UvicornServer.connection_protocol)",
        _takes(HttpToolsProtocol, "__init__", "config", "server_state", "app_state", "_loop"),
    ),
    # hot_protocol.py: the hot path's protocol is a UvicornHttpProtocol
    TouchPoint(
        "uvicorn.protocols.http.httptools_impl.STATUS_LINE",
        "write a status line as uvicorn does, for every status 200-599",
        _status_lines,
    ),
    TouchPoint(
        f"{_PROTOCOL}'s {', '.join(_CALLBACKS)}",
        "bound request heads, answer hot routes from the parser's callbacks and pass every other "
        "request on to uvicorn (an error raised in a callback ends in send_400_response)",
        _has(HttpToolsProtocol, *_CALLBACKS),
    ),
    TouchPoint(
        f"{_PROTOCOL}.parser, .url, .headers, .transport, .client, .loop",
        "read the request uvicorn parsed and answer on its connection",
        _uses(HttpToolsProtocol, "parser", "url", "headers", "transport", "client", "loop"),
    ),
    TouchPoint(
        f"{_PROTOCOL}.access_log, .expect_100_continue, .pipeline",
        "leave a request to uvicorn when it has work of its own (UvicornHttpProtocol.uvicorn_idle)",
        _uses(HttpToolsProtocol, "access_log", "expect_100_continue", "pipeline"),
    ),
    TouchPoint(
        f"{_PROTOCOL}.cycle and the cycle's {', '.join(_CYCLE)}",
        "hold the cycle slot while an answer is awaited (PendingCycle stands in for uvicorn's "
        "RequestResponseCycle)",
        _all(_uses(HttpToolsProtocol, "cycle", *_CYCLE), _uses(RequestResponseCycle, *_CYCLE)),
    ),
    TouchPoint(
        f"{_PROTOCOL}.scope",
        "lend the app a way to abort a stalled event stream's connection, in the scope built "
        "in on_message_begin and handed to the app in on_headers_complete (lend_abort)",
        _uses(HttpToolsProtocol, "scope", "transport"),
    ),
    TouchPoint(
        f"{_PROTOCOL}.tasks",
        "have the graceful shutdown wait for a registration's disk write (keep_task)",
        _uses(HttpToolsProtocol, "tasks"),
    ),
    TouchPoint(
        f"{_PROTOCOL}.server_state.default_headers",
        "put uvicorn's date and server headers on hot answers (default_headers)",
        _all(
            _uses(HttpToolsProtocol, "server_state"),
            _uses(uvicorn.server.ServerState, "default_headers"),
        ),
    ),
)


def check_uvicorn() -> None:
    """Raise ``UvicornIncompatible`` naming the first touch point the installed uvicorn lacks.

    Cheap (it reads uvicorn's classes and builds nothing): ``server.prepare`` runs it first.
    """
    for point in TOUCH_POINTS:
        if not point.present():
            raise UvicornIncompatible(point.name, point.use)
