"""Closed-loop load: C keep-alive connections, each sending its next request as soon as the
previous answer arrives, for a fixed duration. Every answer is checked, not just counted.

The loop is callback-driven (no coroutine per request) so the generator stays cheap; a short
warm-up is excluded from the figures. The phase is bounded: it stops sending at its deadline and
gives in-flight requests a fixed drain time, after which they count as errors.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from bench.payloads import Topology, cell_path, expected_address
from bench.wire import Connection, build_request, connect

__all__ = [
    "DpRankPairs",
    "Health",
    "LoadResult",
    "RoomFlood",
    "RouteLookups",
    "Session",
    "Workload",
    "closed_loop",
    "percentile",
]

DRAIN_SECONDS = 10.0


class Session(Protocol):
    """One connection's request sequence: what to send next, and whether an answer is right."""

    def next_request(self) -> bytes: ...

    def check(self, status: int, body: bytes) -> str | None:
        """None when the answer is right, else a short description of what was wrong."""


class Workload(Protocol):
    name: str

    def session(self, index: int) -> Session: ...


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float] = field(repr=False)
    error_kinds: Counter[str] = field(default_factory=Counter)
    answers: int = 0
    """All answers, warm-up included: the divisor for CPU time per request."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "req_per_s": round(self.rate, 1),
            "p50_ms": round(percentile(ordered, 0.50) * 1e3, 3),
            "p99_ms": round(percentile(ordered, 0.99) * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3) if ordered else None,
            "error_kinds": dict(self.error_kinds.most_common(5)),
        }


class _Driver:
    """One connection's loop, as callbacks: send, check the answer, record, send again."""

    __slots__ = ("connection", "run", "sent_at", "session")

    def __init__(self, run: _Run, connection: Connection, session: Session) -> None:
        self.run = run
        self.connection = connection
        self.session = session
        self.sent_at = 0.0

    def send(self) -> None:
        self.sent_at = time.perf_counter()
        self.connection.send(self.session.next_request(), self.answered)

    def answered(self, status: int, body: bytes) -> None:
        now = time.perf_counter()
        run = self.run
        run.answers += 1
        problem = "connection lost" if status == 0 else self.session.check(status, body)
        if now >= run.measure_from:
            run.latencies.append(now - self.sent_at)
            run.last_answer = now
            if problem is not None:
                run.errors[problem] += 1
        elif problem is not None:
            run.errors[problem] += 1  # warm-up answers are not timed, but must be right too
        if status != 0 and now < run.stop_at and run.take():
            self.send()
        else:
            run.finished(self)


class _Run:
    def __init__(
        self, measure_from: float, stop_at: float, drivers: int, budget: int | None
    ) -> None:
        self.budget = budget
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.last_answer = measure_from
        self.answers = 0
        """Every answer, warm-up and drain included (for CPU cost per request)."""
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.pending = drivers
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(self) -> bool:
        """One more request may be sent (always, unless the phase has a request budget)."""
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True

    def finished(self, _: _Driver) -> None:
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)


async def closed_loop(
    port: int,
    workload: Workload,
    connections: int,
    seconds: float,
    warmup: float,
    budget: int | None = None,
) -> LoadResult:
    """Run ``workload`` for ``warmup + seconds``, or until ``budget`` requests were sent."""
    opened = await asyncio.gather(*(connect("127.0.0.1", port) for _ in range(connections)))
    start = time.perf_counter()
    run = _Run(start + warmup, start + warmup + seconds, connections, budget)
    drivers = [
        _Driver(run, connection, workload.session(index)) for index, connection in enumerate(opened)
    ]
    for driver in drivers:
        if run.take():
            driver.send()
        else:
            run.finished(driver)
    try:
        await asyncio.wait_for(asyncio.shield(run.done), warmup + seconds + DRAIN_SECONDS)
    except asyncio.TimeoutError:
        run.errors[f"no answer within {DRAIN_SECONDS:.0f}s after the deadline"] += run.pending
    for connection in opened:
        connection.abort()
    elapsed = max(run.last_answer - run.measure_from, 1e-9)
    errors = sum(run.errors.values())
    return LoadResult(len(run.latencies), errors, elapsed, run.latencies, run.errors, run.answers)


# -- workloads ---------------------------------------------------------------------------------


class _FixedSession:
    def __init__(self, requests: list[bytes], checks: list[Callable[[int, bytes], str | None]]):
        self._pairs = itertools.cycle(list(zip(requests, checks, strict=True)))
        self._check: Callable[[int, bytes], str | None] = checks[0]

    def next_request(self) -> bytes:
        request, self._check = next(self._pairs)
        return request

    def check(self, status: int, body: bytes) -> str | None:
        return self._check(status, body)


class RouteLookups:
    """``GET /route`` for single cells, each connection walking the table from its own offset;
    every answer must be 200 and name the address that cell's rank registered."""

    name = "route"

    def __init__(self, topology: Topology) -> None:
        self.cells = topology.cells()
        self.requests = [build_request("GET", cell_path(cell)) for cell in self.cells]
        self.checks = [_address_check(index) for index in range(len(self.cells))]

    def session(self, index: int) -> Session:
        offset = (index * 7919) % len(self.cells)
        order = list(range(offset, len(self.cells))) + list(range(offset))
        return _FixedSession([self.requests[i] for i in order], [self.checks[i] for i in order])


def _address_check(index: int) -> Callable[[int, bytes], str | None]:
    wanted = expected_address(index)

    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"GET /route answered {status}"
        if orjson.loads(body) != wanted:
            return "GET /route answered the wrong address"
        return None

    return check


class Health:
    name = "health"

    def session(self, index: int) -> Session:
        def check(status: int, body: bytes) -> str | None:
            return None if status == 200 and body == b"OK" else f"/health answered {status}"

        return _FixedSession([build_request("GET", "/health")], [check])


class DpRankPairs:
    """SGLang's per-request pair: ``POST /register_dp_rank`` for a new room, then
    ``POST /query_dp_ranks`` for a batch of 32 rooms (the new one and the 31 before it on this
    connection), which must all come back with the dp rank they were registered with."""

    name = "dp_rank_pairs"
    BATCH = 32

    def __init__(self, dp_size: int, room_base: int = 1 << 40) -> None:
        self.dp_size = dp_size
        self.room_base = room_base

    def session(self, index: int) -> Session:
        return _PairSession(self.room_base + index * (1 << 32), self.dp_size, self.BATCH)


class _PairSession:
    def __init__(self, first_room: int, dp_size: int, batch: int) -> None:
        self.next_room = first_room
        self.dp_size = dp_size
        self.recent: list[int] = []
        self.batch = batch
        self.querying = False

    def next_request(self) -> bytes:
        if self.querying:
            body = orjson.dumps({"bootstrap_rooms": self.recent})
            return build_request("POST", "/query_dp_ranks", body)
        room = self.next_room
        self.next_room += 1
        self.recent.append(room)
        if len(self.recent) > self.batch:
            del self.recent[0]
        body = orjson.dumps({"bootstrap_room": room, "dp_rank": room % self.dp_size})
        return build_request("POST", "/register_dp_rank", body)

    def check(self, status: int, body: bytes) -> str | None:
        querying, self.querying = self.querying, not self.querying
        if not querying:
            return None if status == 200 and body == b"OK" else f"register_dp_rank: {status}"
        if status != 200:
            return f"query_dp_ranks: {status}"
        wanted = {str(room): room % self.dp_size for room in self.recent}
        return None if orjson.loads(body) == wanted else "query_dp_ranks: wrong or missing rooms"


class RoomFlood:
    """Only ``POST /register_dp_rank`` with ever-new rooms: fills the room table for the memory
    phase (the table must stay bounded however many rooms arrive)."""

    name = "room_flood"

    def __init__(self, dp_size: int, per_connection: int) -> None:
        self.dp_size = dp_size
        self.per_connection = per_connection

    def session(self, index: int) -> Session:
        return _FloodSession(index * self.per_connection * 2 + 1, self.dp_size)


class _FloodSession:
    def __init__(self, first_room: int, dp_size: int) -> None:
        self.room = first_room
        self.dp_size = dp_size

    def next_request(self) -> bytes:
        self.room += 1
        body = orjson.dumps({"bootstrap_room": self.room, "dp_rank": self.room % self.dp_size})
        return build_request("POST", "/register_dp_rank", body)

    def check(self, status: int, body: bytes) -> str | None:
        return None if status == 200 and body == b"OK" else f"register_dp_rank: {status}"
