"""The start-up storm: every rank of a prefill group registers at the same moment.

Each rank opens a connection of its own, sends its ``PUT /route`` and waits for the answer, as
separate SGLang rank processes do. The clock runs from the first connection attempt to the last
200: since a 200 means the cell is in the table and on disk, that is "table complete". Failures
(refused or reset connections, timeouts, any status but 200) are counted, never retried, so a
backlog overflow or a 503 shows up as a failure rather than as a slower figure.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from bench.payloads import INFO_PATH, Topology, cell_path, expected_address, registration_requests
from bench.wire import build_request, connect, fetch

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


async def storm(port: int, topology: Topology, in_flight: int | None = None) -> StormResult:
    """Register every rank of ``topology`` at once, or at most ``in_flight`` at a time."""
    requests = registration_requests(topology)
    gate = asyncio.Semaphore(in_flight) if in_flight else None
    start = time.perf_counter()

    async def rank(request: bytes) -> _Outcome:
        if gate is None:
            return await _register(port, request, start)
        async with gate:
            return await _register(port, request, start)

    outcomes = await asyncio.gather(*(rank(request) for request in requests))
    failures = Counter(o.problem for o in outcomes if o.problem is not None)
    per_rank = sorted(o.finished for o in outcomes)
    connects = [o.connected for o in outcomes]
    return StormResult(
        ranks=len(requests),
        in_flight=in_flight,
        seconds=per_rank[-1],
        failures=sum(failures.values()),
        failure_kinds=failures,
        median_rank_seconds=per_rank[len(per_rank) // 2],
        first_answer_seconds=per_rank[0],
        slowest_connect_seconds=max(connects),
        slow_connects=sum(seconds > SLOW_CONNECT for seconds in connects),
    )


class _Outcome(NamedTuple):
    problem: str | None
    connected: float
    """Seconds this rank's connect took (not since the start: a capped storm queues first)."""
    finished: float
    """Seconds from the storm's start to this rank's answer."""


async def _register(port: int, request: bytes, start: float) -> _Outcome:
    began = time.perf_counter()
    connected = 0.0
    try:
        connection = await asyncio.wait_for(connect("127.0.0.1", port), REQUEST_TIMEOUT)
        connected = time.perf_counter() - began
        try:
            response = await asyncio.wait_for(connection.request(request), REQUEST_TIMEOUT)
        finally:
            connection.close()
    except asyncio.TimeoutError:
        return _Outcome("timeout", connected, time.perf_counter() - start)
    except OSError as exc:
        return _Outcome(type(exc).__name__, connected, time.perf_counter() - start)
    problem = None if response.status == 200 else f"PUT /route answered {response.status}"
    return _Outcome(problem, connected, time.perf_counter() - start)


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
