"""Step 3 at scale (issue 16): thousands of ranks waiting for a complete table.

Two scenarios, both on raw non-blocking sockets and one ``selectors`` loop (see ``storm.py`` for
why not asyncio or httpx: the load generator's own cost must stay far below the server's):

- ``release``: N-1 cells registered, N waiters parked on the rank client's wait path, each on a
  connection of its own; then the last rank registers. The clock runs from just before that
  last registration is sent to each waiter's complete answer.
- ``startup``: N ranks, each on its own connection, register and then wait on the same
  connection, all at once, as ``bootstrap_prefill_rank`` does; the clock runs from the first
  connection to the last rank's answer to its wait.

``WAIT_PATHS`` names the wait each generation of the rank client sends, so the same script
measures the server before and after a change (``--wait-path table`` is what the client sent
before issue 16).
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.payloads import Topology, registration_requests
from bench.server import Server
from bench.wire import ProtocolError, build_request, parse_head

__all__ = ["WAIT_PATHS", "WaitResult", "release_waiters", "startup_with_wait"]

WAIT_SECONDS = 60
WAIT_PATHS = {
    "ready": f"/ready?wait={WAIT_SECONDS}",
    "table": f"/prefill_port_table?wait={WAIT_SECONDS}",
}
ANSWER_DEADLINE = WAIT_SECONDS + 30.0
QUIET_CPU_SECONDS = 0.005
"""Server CPU per 0.25 s below which the parked waiters are taken to be settled."""


class _Exchange:
    """One connection sending its requests in turn, each after the previous one's answer."""

    __slots__ = ("answers", "buffer", "problem", "requests", "sent", "sock")

    def __init__(self, requests: list[bytes], address: tuple[str, int]) -> None:
        self.requests = requests
        self.sent = 0
        self.buffer = b""
        self.answers: list[tuple[int, float, int, bytes]] = []
        """(status, perf_counter when complete, bytes on the wire, body) per request."""
        self.problem: str | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex(address)

    @property
    def finished(self) -> bool:
        return self.problem is not None or len(self.answers) == len(self.requests)

    def on_writable(self) -> bool:
        """Connected or refused: send the first request. True while the exchange goes on."""
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.problem = errno.errorcode.get(error, str(error))
            return False
        self._send_next()
        return True

    def on_readable(self) -> bool:
        """Read what arrived; True while more answers are due."""
        try:
            chunk = self.sock.recv(65536)
        except OSError as exc:
            self.problem = type(exc).__name__
            return False
        if not chunk:
            self.problem = "closed before answering"
            return False
        self.buffer += chunk
        head, blank, body = self.buffer.partition(b"\r\n\r\n")
        if not blank:
            return True
        try:
            status, length = parse_head(head)
        except ProtocolError as exc:
            self.problem = str(exc)
            return False
        if len(body) < length:
            return True
        size = len(head) + 4 + length
        self.answers.append((status, time.perf_counter(), size, body[:length]))
        self.buffer = body[length:]
        if self.finished:
            return False
        self._send_next()
        return True

    def _send_next(self) -> None:
        self.sock.send(self.requests[self.sent])
        self.sent += 1


class _Loop:
    """Every exchange of a scenario on one selector.

    A finished exchange leaves the selector but keeps its socket open until ``close``: ranks on
    other hosts close theirs a network round trip later, while on loopback the server would
    otherwise spend the measured window on thousands of disconnects.
    """

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)
        self.selector = selectors.DefaultSelector()
        self.open = 0
        self.done: list[_Exchange] = []

    def start(self, requests: list[list[bytes]]) -> list[_Exchange]:
        exchanges = [_Exchange(each, self.address) for each in requests]
        for exchange in exchanges:
            self.selector.register(exchange.sock, selectors.EVENT_WRITE, exchange)
        self.open += len(exchanges)
        return exchanges

    def pump(self, until: Callable[[], bool], deadline: float) -> None:
        while self.open and not until() and time.perf_counter() < deadline:
            for key, _ in self.selector.select(min(0.05, max(0.0, deadline - time.perf_counter()))):
                exchange: _Exchange = key.data
                if key.events == selectors.EVENT_WRITE:
                    going_on = exchange.on_writable()
                    if going_on:
                        self.selector.modify(exchange.sock, selectors.EVENT_READ, exchange)
                else:
                    going_on = exchange.on_readable()
                if not going_on:
                    self._close(exchange)

    def _close(self, exchange: _Exchange) -> None:
        self.selector.unregister(exchange.sock)
        self.done.append(exchange)
        self.open -= 1

    def close_finished(self) -> None:
        for exchange in self.done:
            exchange.sock.close()
        self.done.clear()

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            exchange: _Exchange = key.data
            exchange.problem = exchange.problem or "no answer before the deadline"
            self._close(exchange)
        self.close_finished()
        self.selector.close()


@dataclass
class WaitResult:
    """What one scenario measured; times in seconds from its clock's start."""

    waiters: int
    path: str
    answered: list[float]
    bytes_received: int
    server_cpu_seconds: float
    peak_rss_mb: float
    problems: Counter[str] = field(default_factory=Counter)

    def percentile(self, fraction: float) -> float:
        if not self.answered:
            return float("nan")
        ordered = sorted(self.answered)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "waiters": self.waiters,
            "path": self.path,
            "answered": len(self.answered),
            "first_s": round(min(self.answered, default=float("nan")), 4),
            "p50_s": round(self.percentile(0.5), 4),
            "p99_s": round(self.percentile(0.99), 4),
            "max_s": round(max(self.answered, default=float("nan")), 4),
            "bytes_per_waiter": round(self.bytes_received / max(self.waiters, 1)),
            "bytes_total": self.bytes_received,
            "server_cpu_seconds": round(self.server_cpu_seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "problems": dict(self.problems.most_common(5)),
        }


def _complete(status: int, body: bytes) -> bool:
    """The wait's answer says the table is complete (either path's body)."""
    if status != 200:
        return False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return bool(document.get("ready", document.get("complete")))


def _judge(exchanges: list[_Exchange], index: int, problems: Counter[str]) -> None:
    for exchange in exchanges:
        if exchange.problem is not None:
            problems[exchange.problem] += 1
        elif not _complete(exchange.answers[index][0], exchange.answers[index][3]):
            problems[f"answered {exchange.answers[index][0]} but not complete"] += 1


def _settle(loop: _Loop, server: Server, deadline: float) -> None:
    """Pump until the server is idle: every parked waiter was read and is now only waiting."""
    before = server.cpu_seconds()
    while time.perf_counter() < deadline:
        loop.pump(lambda: False, time.perf_counter() + 0.25)
        now = server.cpu_seconds()
        if now - before < QUIET_CPU_SECONDS:
            return
        before = now


def release_waiters(server: Server, waiters: int, path: str) -> WaitResult:
    """N-1 cells, N parked waiters, then the last registration: time to every waiter's answer."""
    topology = Topology.for_ranks(waiters)
    registrations = registration_requests(topology)
    loop = _Loop(server.port)
    problems: Counter[str] = Counter()
    try:
        first = loop.start([[request] for request in registrations[:-1]])
        loop.pump(lambda: all(e.finished for e in first), time.perf_counter() + 60)
        problems.update(
            f"registration: {e.problem or e.answers[0][0]}"
            for e in first
            if e.problem or e.answers[0][0] != 200
        )
        loop.close_finished()  # those ranks are done; the waiters below are the others
        wait = build_request("GET", WAIT_PATHS[path])
        parked = loop.start([[wait] for _ in range(waiters)])
        _settle(loop, server, time.perf_counter() + 60)
        early = sum(1 for e in parked if e.answers)
        if early:
            problems[f"answered before the table was complete: {early}"] += 1
        cpu = server.cpu_seconds()
        released = time.perf_counter()
        (last,) = loop.start([[registrations[-1]]])
        everyone = [*parked, last]
        loop.pump(lambda: all(e.finished for e in everyone), released + ANSWER_DEADLINE)
    finally:
        loop.close()
    cpu = server.cpu_seconds() - cpu
    if last.problem or not last.answers or last.answers[0][0] != 200:
        problems[f"last registration: {last.problem or last.answers[0][0]}"] += 1
    return _result(server, parked, 0, path, released, cpu, problems)


def startup_with_wait(server: Server, ranks: int, path: str) -> WaitResult:
    """Every rank registers and then waits on the same connection, all at once."""
    topology = Topology.for_ranks(ranks)
    wait = build_request("GET", WAIT_PATHS[path])
    loop = _Loop(server.port)
    cpu = server.cpu_seconds()
    started = time.perf_counter()
    try:
        exchanges = loop.start([[request, wait] for request in registration_requests(topology)])
        loop.pump(lambda: all(e.finished for e in exchanges), started + ANSWER_DEADLINE)
    finally:
        loop.close()
    cpu = server.cpu_seconds() - cpu
    problems: Counter[str] = Counter()
    for exchange in exchanges:
        if exchange.problem is None and exchange.answers[0][0] != 200:
            problems[f"registration answered {exchange.answers[0][0]}"] += 1
    return _result(server, exchanges, 1, path, started, cpu, problems)


def _result(
    server: Server,
    exchanges: list[_Exchange],
    index: int,
    path: str,
    clock_start: float,
    cpu: float,
    problems: Counter[str],
) -> WaitResult:
    """The figures of the wait that is each exchange's ``index``-th request."""
    _judge(exchanges, index, problems)
    done = [e for e in exchanges if len(e.answers) > index]
    return WaitResult(
        waiters=len(exchanges),
        path=WAIT_PATHS[path],
        answered=[e.answers[index][1] - clock_start for e in done],
        bytes_received=sum(e.answers[index][2] for e in done),
        server_cpu_seconds=cpu,
        peak_rss_mb=server.memory()["VmHWM"],
        problems=problems,
    )
