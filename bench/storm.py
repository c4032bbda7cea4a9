"""The start-up storm: every rank of a prefill group registers at the same moment.

Each rank opens a connection of its own, sends its ``PUT /route`` and waits for the answer, as
separate SGLang rank processes do. The clock runs from the first connection attempt to the last
200: since a 200 means the cell is in the table and on disk, that is "table complete". Failures
(refused or reset connections, timeouts, any status but 200) are counted, never retried, so a
backlog overflow or a 503 shows up as a failure rather than as a slower figure.

Why raw sockets and one ``epoll`` rather than asyncio: real ranks are separate processes on
separate hosts, so the load generator's own cost of opening thousands of connections is an
artefact of putting them all in one process. An asyncio coroutine per rank cost ~120 us of the
generator's core per rank (~0.47 s for 4096); this loop costs ~65 us, so the figure is the
server's.
"""

from __future__ import annotations

import errno
import re
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.payloads import INFO_PATH, Topology, cell_path, expected_address, registration_requests
from bench.wire import ProtocolError, build_request, fetch, parse_head

__all__ = ["StormResult", "state_commits", "storm", "verify_table"]

REQUEST_TIMEOUT = 60.0
SLOW_CONNECT = 0.9


@dataclass
class StormResult:
    ranks: int
    in_flight: int | None
    seconds: float
    failures: int
    failure_kinds: Counter[str] = field(default_factory=Counter)
    median_rank_seconds: float = 0.0
    first_answer_seconds: float = 0.0
    slowest_connect_seconds: float = 0.0
    slow_connects: int = 0
    """Connections that took over 0.9 s to establish: a SYN the kernel had to retransmit."""
    acked: list[float] = field(default_factory=list)
    """Per rank (in ``Topology.cells()`` order), ``time.monotonic()`` when its 200 arrived; NaN
    for a failed one. The watchers phase times event delivery from these."""

    def summary(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks,
            "in_flight": self.in_flight,
            "seconds": round(self.seconds, 4),
            "failures": self.failures,
            "failure_kinds": dict(self.failure_kinds.most_common(5)),
            "median_rank_seconds": round(self.median_rank_seconds, 4),
            "first_answer_seconds": round(self.first_answer_seconds, 4),
            "slowest_connect_seconds": round(self.slowest_connect_seconds, 4),
            "slow_connects": self.slow_connects,
        }


class _Rank:
    """One rank's connection: connecting, then waiting for its answer."""

    __slots__ = ("began", "connected", "index", "received", "request", "sock")

    def __init__(self, index: int, request: bytes, address: tuple[str, int]) -> None:
        self.index = index
        self.request = request
        self.received = b""
        self.connected = 0.0
        self.began = time.perf_counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex(address)  # EINPROGRESS; a refusal shows up as SO_ERROR

    def on_writable(self) -> str | None:
        """Connected (or failed to): send the request, which fits the socket buffer."""
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            return errno.errorcode.get(error, str(error))
        self.connected = time.perf_counter() - self.began
        self.sock.send(self.request)
        return None

    def on_readable(self) -> tuple[bool, str | None]:
        """(finished, problem): finished once the whole answer (or a failure) arrived."""
        try:
            chunk = self.sock.recv(65536)
        except OSError as exc:
            return True, type(exc).__name__
        if not chunk:
            return True, "closed before answering"
        self.received += chunk
        head, blank, body = self.received.partition(b"\r\n\r\n")
        if not blank:
            return False, None
        try:
            status, length = parse_head(head)
        except ProtocolError as exc:
            return True, str(exc)
        if len(body) < length:
            return False, None
        return True, None if status == 200 else f"PUT /route answered {status}"


def storm(port: int, topology: Topology, in_flight: int | None = None) -> StormResult:
    """Register every rank of ``topology`` at once, or at most ``in_flight`` at a time."""
    requests = registration_requests(topology)
    address = ("127.0.0.1", port)
    window = in_flight or len(requests)
    selector = selectors.DefaultSelector()
    failures: Counter[str] = Counter()
    finished: list[float] = []
    connects: list[float] = []
    waiting = iter(enumerate(requests))
    acked = [float("nan")] * len(requests)
    open_ranks = 0
    start = time.perf_counter()
    deadline = start + REQUEST_TIMEOUT

    def launch() -> None:
        nonlocal open_ranks
        while open_ranks < window:
            item = next(waiting, None)
            if item is None:
                return
            rank = _Rank(*item, address)
            selector.register(rank.sock, selectors.EVENT_WRITE, rank)
            open_ranks += 1

    def done(rank: _Rank, problem: str | None) -> None:
        nonlocal open_ranks
        selector.unregister(rank.sock)
        rank.sock.close()
        open_ranks -= 1
        finished.append(time.perf_counter() - start)
        connects.append(rank.connected)
        if problem is not None:
            failures[problem] += 1
        else:
            acked[rank.index] = time.monotonic()

    launch()
    while open_ranks and time.perf_counter() < deadline:
        for key, _ in selector.select(deadline - time.perf_counter()):
            rank: _Rank = key.data
            if key.events == selectors.EVENT_WRITE:
                problem = rank.on_writable()
                if problem is None:
                    selector.modify(rank.sock, selectors.EVENT_READ, rank)
                else:
                    done(rank, problem)
            else:
                complete, problem = rank.on_readable()
                if complete:
                    done(rank, problem)
        launch()
    for key in list(selector.get_map().values()):
        done(key.data, "timeout")
    selector.close()
    unsent = sum(1 for _ in waiting)
    if unsent:
        failures["not sent before the timeout"] += unsent
    finished.sort()
    return StormResult(
        ranks=len(requests),
        in_flight=in_flight,
        seconds=finished[-1],
        failures=sum(failures.values()),
        failure_kinds=failures,
        median_rank_seconds=finished[len(finished) // 2],
        first_answer_seconds=finished[0],
        slowest_connect_seconds=max(connects),
        slow_connects=sum(seconds > SLOW_CONNECT for seconds in connects),
        acked=acked,
    )


async def verify_table(port: int, topology: Topology, samples: int = 16) -> list[str]:
    """After a storm: the server says it is complete and a spread of cells read back right."""
    problems: list[str] = []
    info = await fetch("127.0.0.1", port, build_request("GET", INFO_PATH))
    if info.status != 200:
        problems.append(f"server info answered {info.status}: {info.body[:120]!r}")
    elif orjson.loads(info.body).get("dp_size") != topology.dp:
        problems.append(f"server info has the wrong dp_size: {info.body[:120]!r}")
    cells = topology.cells()
    step = max(1, len(cells) // samples)
    for index in range(0, len(cells), step):
        answer = await fetch("127.0.0.1", port, build_request("GET", cell_path(cells[index])))
        if answer.status != 200 or orjson.loads(answer.body) != expected_address(index):
            problems.append(f"cell {cells[index]} answered {answer.status} {answer.body[:80]!r}")
    return problems


async def state_commits(port: int) -> int | None:
    """How many durable commits the server made so far (its group-commit batching at work)."""
    answer = await fetch("127.0.0.1", port, build_request("GET", "/metrics"))
    found = re.search(rb"^prefill_bootstrap_state_commits_total ([0-9.e+]+)$", answer.body, re.M)
    return int(float(found.group(1))) if answer.status == 200 and found else None
