"""uvicorn's httptools protocol, answering the bootstrap protocol's hot routes itself.

For the routes ``routes.py`` declares hot (``GET /route``, ``GET /health``, the room routes, the
registrations, the long polls of ``/ready`` and ``/prefill_port_table``) most of a request's cost
was uvicorn's ASGI machinery around a microsecond of work: a scope, a request/response cycle, an
event, a task, and two socket writes (headers, then body). Here those requests are answered
straight from the parser's callbacks with one write, through the same pipeline the ASGI door runs
(``pipeline.py``: ``gate``, ``dispatch``, ``observe``), so both doors answer the same bytes. ``PUT
/route`` (the start-up storm) is answered once its registration is durable (a task awaits the
disk), and a long poll (``GET /ready?wait=``) once the table completes
(a callback parked with the registry, no task: ``waiters.py``). Meanwhile a placeholder holds
uvicorn's cycle slot, so a request pipelined behind it waits its turn as it would behind any
cycle. A parked long poll whose client goes away is unparked at once, so abandoned waits hold no
memory; a registration whose client goes away stands. Anything unusual
(HTTP/1.0, ``Connection: close``, ``Expect``, pipelining, access logging) takes uvicorn's normal
path, as does every other route.

Every connection, whichever route it asks for, has its request line and headers bounded: past
``--max-header-bytes`` it is answered 431 and closed, and a request whose headers are not complete
``--header-timeout`` seconds after it began (or after the connection opened) is closed, with a 408
if it had sent anything. httptools would otherwise buffer an unfinished header without limit.

Each connection also holds the ``Slot`` the admission listener (``listener.py``) accepted it with.
It gives it back as soon as its first request turns out not to be a registration, else once that
registration is answered, or when it closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from typing import Any

from prefill_bootstrap.service.fastpath import INSTANCE_HEADER, FrontDoor, instance_header
from prefill_bootstrap.service.listener import Slot
from prefill_bootstrap.service.pipeline import LongPoll
from prefill_bootstrap.service.replies import Reply, error_reply
from prefill_bootstrap.service.routes import Route
from prefill_bootstrap.service.uvicorn_glue import STATUS_LINE, PendingCycle, UvicornHttpProtocol
from prefill_bootstrap.service.waiters import Parked
from prefill_bootstrap.service.watchers import ABORT_EXTENSION

__all__ = ["hot_path_protocol"]

log = logging.getLogger(__name__)


_JOIN_BODY_BYTES = 16384
"""Bodies up to this size go out in the same write as their head (one syscall)."""


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a request already answered."""


class _HotPathProtocol(UvicornHttpProtocol):
    front: FrontDoor

    def __init__(self, *args: Any, slot: Slot | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot = slot
        self._header_bytes = 0
        self._awaiting_headers = True
        self._began_in_read = False
        self._in_head = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._parked: Parked | None = None
        """This connection's long poll among the waiters, unparked when its client leaves (a
        registration, in contrast, stands). Kept here, not on the cycle: a request pipelined
        behind the long poll becomes uvicorn's cycle."""

    # -- bounded request lines and headers -----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.slot is not None:
            self.slot.heard = True
        counted = self._awaiting_headers
        self._began_in_read = False
        super().data_received(data)
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if counted and not self._began_in_read:
            # Whole reads spent on one unfinished head (a read that also began the message is
            # not counted: the bound holds to within one read, with no false refusals).
            self._header_bytes += len(data)
        if self._header_bytes > self.front.max_header_bytes:
            self._refuse_head(431, "headers_too_large", self._too_large(self._header_bytes))

    def _too_large(self, size: int) -> str:
        return (
            f"the request line and headers take {size} bytes or more, over the "
            f"{self.front.max_header_bytes} allowed (--max-header-bytes)"
        )

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():  # closing: we already answered (431)
            super().send_400_response(msg)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.front.header_timeout, self._header_timed_out
            )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse_head(
                408,
                "headers_timeout",
                f"the request's headers were not complete within {self.front.header_timeout:g}s "
                "(--header-timeout)",
            )
        else:
            self.transport.close()  # connected and never sent anything: nothing to answer

    def _refuse_head(self, status: int, error: str, message: str) -> None:
        body = error_reply(status, error, message).body
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()
        log.warning("Closed the connection from %s: %s.", _peer(self.client), message)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.slot is not None:  # checked here: this runs once per response
            self._release_slot()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._disarm_header_timer()
        self._release_slot()
        if self._parked is not None:
            self._parked.cancel()
            self._parked = None

    def _release_slot(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began_in_read = self._in_head = True
        self._awaiting_headers = True
        self._header_bytes = 0
        self._arm_header_timer()
        self._hot: tuple[Route, bytes, float] | None = None
        self._hot_body: list[bytes] = []
        self._hot_size = 0

    def on_headers_complete(self) -> None:
        self._awaiting_headers = self._in_head = False
        self._disarm_header_timer()
        if self._parked is not None:
            # A request pipelined behind a parked long poll ends its wait now, answered with
            # the table as it stands: uvicorn stops reading a connection with a request queued,
            # so a client that then went away would go unnoticed until the poll's deadline.
            self._parked.run_now()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.front.max_header_bytes:
            self._refuse_head(431, "headers_too_large", self._too_large(size))
            raise _HeadRefused  # stops the parser; uvicorn's 400 for it is skipped below
        if self.slot is not None and self.parser.get_method() != b"PUT":
            # Only registrations (the storm) keep their slot until answered: a read is answered
            # at once anyway, and a long poll (?wait=) must not pace everyone queued behind it.
            self._release_slot()
        if not self._take_hot_path():
            self.lend_abort(ABORT_EXTENSION)  # before uvicorn hands the scope to the app
            super().on_headers_complete()

    def _take_hot_path(self) -> bool:
        parser = self.parser
        method = parser.get_method().decode("ascii")
        if method not in ("GET", "POST", "PUT") or parser.get_http_version() != "1.1":
            return False
        if not parser.should_keep_alive() or parser.should_upgrade():
            return False
        if not self.uvicorn_idle():
            return False  # e.g. an earlier request on this connection is still being answered
        path, _, query = self.url.partition(b"?")
        try:
            route = self.front.hot_route(method, path.decode("ascii"))
        except UnicodeDecodeError:
            return False
        if route is None:
            return False
        self._hot = (route, query.partition(b"#")[0], time.perf_counter())
        return True

    def on_body(self, body: bytes) -> None:
        if self._hot is None:
            super().on_body(body)
            return
        self._hot_size += len(body)
        if self._hot_size <= self.front.max_body_bytes:
            self._hot_body.append(body)

    def on_message_complete(self) -> None:
        self._awaiting_headers = True  # the next request's, if one comes on this connection
        if self._hot is None:
            super().on_message_complete()
            return
        route, query, started = self._hot
        self._hot = None
        front = self.front
        # A GET's body is no input of its route: the ASGI doors neither read nor cap it.
        size = None if route.method == "GET" else self._hot_size
        reply = front.gate(route, route.method, route.path, self.headers, self.client, size)
        if reply is None:
            outcome = front.dispatch(route, query, b"".join(self._hot_body))
            if type(outcome) is LongPoll:
                self._park(outcome, started)
                return
            if type(outcome) is not Reply:
                self._answer_later(outcome, route, started)  # type: ignore[arg-type]
                return
            reply = outcome  # type: ignore[assignment]
        self._write(reply, route.method)
        front.observe(route.method, route.path, reply.status, started)
        self.on_response_complete()

    def _park(self, poll: LongPoll, started: float) -> None:
        placeholder = self.hold_cycle()
        on_wake = functools.partial(self._woken, placeholder, poll, started)
        self._parked = self.front.park(poll, on_wake)

    def _woken(self, placeholder: PendingCycle, poll: LongPoll, started: float) -> int:
        """Answer a parked long poll; the bytes written (the waiters pace wake-ups by them)."""
        self._parked = None
        placeholder.response_complete = True
        if self.transport.is_closing():
            return 0
        reply = self.front.after_wait(poll)
        self.front.observe(poll.route.method, poll.route.path, reply.status, started)
        return self._finish(placeholder, reply, poll.route.method)

    def _answer_later(self, answering: Awaitable[Reply], route: Route, started: float) -> None:
        task = self.loop.create_task(answering)  # type: ignore[arg-type]
        placeholder = self.hold_cycle()
        self.keep_task(task)  # uvicorn's graceful shutdown waits for it
        task.add_done_callback(functools.partial(self._answered, placeholder, route, started))

    def _answered(
        self,
        placeholder: PendingCycle,
        route: Route,
        started: float,
        task: asyncio.Task[Reply],
    ) -> None:
        self.drop_task(task)
        placeholder.response_complete = True
        if task.cancelled():  # the graceful shutdown's deadline passed: nothing to answer with
            self.transport.close()
            return
        failure = task.exception()
        reply = (
            task.result()
            if failure is None
            else self.front.failed(route.method, route.path, failure)
        )
        self.front.observe(route.method, route.path, reply.status, started)
        if self.transport.is_closing():
            return  # the client went away (a registration stands)
        self._finish(placeholder, reply, route.method)

    def _finish(self, placeholder: PendingCycle, reply: Reply, method: str) -> int:
        written = self._write(reply, method)
        if not placeholder.keep_alive:
            self.transport.close()
        self.on_response_complete()
        return written

    def _write(self, reply: Reply, method: str) -> int:
        parts = [STATUS_LINE[reply.status]]
        for name, value in self.default_headers():
            parts += [name, b": ", value, b"\r\n"]
        parts += [
            b"content-type: ", reply.content_type, b"\r\n",
            b"content-length: %d\r\n" % len(reply.body),
        ]  # fmt: skip
        for name, value in reply.headers:
            parts += [name, b": ", value, b"\r\n"]
        instance = instance_header(self.front.registry, method)
        parts += [INSTANCE_HEADER, b": ", instance, b"\r\n\r\n"]
        if len(reply.body) <= _JOIN_BODY_BYTES:
            self.transport.write(b"".join([*parts, reply.body]))
        else:  # a shared table body of a megabyte is not copied once per waiter
            self.transport.write(b"".join(parts))
            self.transport.write(reply.body)
        return len(reply.body)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


def hot_path_protocol(front: FrontDoor) -> type[Any]:
    """The protocol class to give uvicorn (``Config(http=...)``), bound to this server's door."""
    return type("HotPathProtocol", (_HotPathProtocol,), {"front": front})
