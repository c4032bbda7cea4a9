"""The benchmark's phases, one function each, mirroring the issue's table.

A phase runs ``plan.runs`` times and returns its figures per run plus every correctness problem
seen (failed registrations, wrong answers, errors). Storms always get a fresh server with a fresh
durable state directory; the steady-load phases share one server per run, filled by a storm first.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import wrk
from bench.load import DpRankPairs, Health, LoadResult, RoomFlood, RouteLookups, closed_loop
from bench.payloads import Topology, cell_path
from bench.server import Server, core_busy, core_times
from bench.stats import Stat
from bench.storm import state_commits, storm, verify_table
from bench.waiters import WaitResult, release_waiters, startup_with_wait
from bench.watchers import storm_alone, watched_storm
from bench.wire import new_loop

__all__ = ["PHASES", "Phase", "PhaseResult", "Plan"]

T = TypeVar("T")

ROOM_FLOOD_LIMIT = 600.0
"""Seconds the memory phase's room flood may take at most (it stops at its request count)."""


@dataclass(frozen=True)
class Plan:
    """How big and how long; ``Plan.smoke()`` is the CI-sized version of the same phases."""

    runs: int = 3
    storm_sizes: tuple[int, ...] = (512, 1024, 2048, 4096)
    capped_ranks: int = 512
    capped_in_flight: int = 64
    load_ranks: int = 512
    connections: int = 64
    seconds: float = 10.0
    warmup: float = 1.0
    memory_ranks: int = 4096
    memory_rooms: int = 1_000_000
    use_wrk: bool = True
    waiter_sizes: tuple[int, ...] = (512, 1024, 4096)
    startup_wait_ranks: int = 4096
    wait_path: str = "ready"
    """Which wait the waiters send (``bench.waiters.WAIT_PATHS``): the rank client's."""
    watchers: int = 1000
    """Issue 14: SSE watchers open while a storm of ``watch_ranks`` registers and
    ``watch_moves`` cells then move, ``watch_move_gap`` seconds apart."""
    watch_ranks: int = 512
    watch_moves: int = 100
    watch_move_gap: float = 0.05
    server_args: tuple[str, ...] = ()
    server_source: Path | None = None
    """Run servers from another checkout (``Server.source``): before/after figures."""
    server_cpus: str | None = None
    """Where servers run (``taskset -c``); the CLI sets it from ``pin_load_generator``."""
    toy: bool = False
    """Toy sizes: the table then shows figures but never judges them against targets."""

    @classmethod
    def smoke(cls) -> Plan:
        return cls(
            runs=1,
            storm_sizes=(64,),
            capped_ranks=64,
            capped_in_flight=16,
            load_ranks=64,
            connections=16,
            seconds=0.6,
            warmup=0.1,
            memory_ranks=64,
            memory_rooms=3000,
            use_wrk=False,
            waiter_sizes=(64,),
            startup_wait_ranks=64,
            watchers=16,
            watch_ranks=64,
            watch_moves=8,
            watch_move_gap=0.01,
            toy=True,
        )


@dataclass
class PhaseResult:
    name: str
    metrics: dict[str, Stat] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            previous = self.metrics.get(key, Stat.of([]))
            self.metrics[key] = Stat.of([*previous.runs, value])

    def as_json(self) -> dict[str, Any]:
        return {
            "metrics": {key: stat.as_json() for key, stat in self.metrics.items()},
            "runs": self.runs,
            "problems": self.problems,
        }


Phase = Callable[[Plan], PhaseResult]


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    loop = new_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def _server(plan: Plan) -> Server:
    return Server(
        extra_args=list(plan.server_args), cpus=plan.server_cpus, source=plan.server_source
    )


def startup(plan: Plan) -> PhaseResult:
    """Process start (exec) to the first ``/health`` 200, fresh state directory each time."""
    result = PhaseResult("startup")
    for _ in range(plan.runs):
        with _server(plan) as server:
            result.add({"seconds": server.healthy_after})
            result.runs.append(
                {"seconds": round(server.healthy_after, 4), "server_affinity": server.affinity}
            )
    return result


def _storm_runs(plan: Plan, result: PhaseResult, ranks: int, in_flight: int | None) -> None:
    topology = Topology.for_ranks(ranks)
    key = f"{ranks}" if in_flight is None else f"{ranks}_capped_{in_flight}"
    for _ in range(plan.runs):
        with _server(plan) as server:
            server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
            outcome = storm(server.port, topology, in_flight)
            server_cpu = server.cpu_seconds() - server_cpu
            busy = {
                "server_cpu_seconds": round(server_cpu, 3),
                "client_cpu_seconds": round(time.process_time() - client_cpu, 3),
                "server_us_per_registration": round(1e6 * server_cpu / ranks, 1),
            }
            problems = _run(verify_table(server.port, topology)) if not outcome.failures else []
            busy["state_commits"] = _run(state_commits(server.port))
            memory = server.memory()
        result.add(
            {
                f"seconds_{key}": outcome.seconds,
                f"failures_{key}": outcome.failures,
                f"server_us_per_registration_{key}": busy["server_us_per_registration"],
            }
        )
        result.runs.append(
            {**outcome.summary(), **busy, "topology": str(topology), "memory_mb": memory}
        )
        if outcome.failures:
            result.problems.append(
                f"storm of {ranks} ranks: {outcome.failures} failed registrations "
                f"{dict(outcome.failure_kinds)}"
            )
        result.problems.extend(f"storm of {ranks} ranks: {problem}" for problem in problems)


def storms(plan: Plan) -> PhaseResult:
    """N ranks at once, for each N of the scaling run (the first is the issue's 512)."""
    result = PhaseResult("storm")
    for ranks in plan.storm_sizes:
        _storm_runs(plan, result, ranks, None)
    return result


def capped_storm(plan: Plan) -> PhaseResult:
    result = PhaseResult("storm_capped")
    _storm_runs(plan, result, plan.capped_ranks, plan.capped_in_flight)
    return result


def _load(plan: Plan, server: Server, workload: Any) -> tuple[LoadResult, dict[str, Any]]:
    """The load, and how busy each side's core was: a server near 100% is the bottleneck; a
    load generator near 100% would mean we measure the client."""
    cores = core_times()
    server_cpu, client_cpu, wall = server.cpu_seconds(), time.process_time(), time.perf_counter()
    outcome = _run(closed_loop(server.port, workload, plan.connections, plan.seconds, plan.warmup))
    wall = time.perf_counter() - wall
    server_cpu = server.cpu_seconds() - server_cpu
    busy = {
        "server_cpu_pct": round(100 * server_cpu / wall, 1),
        "client_cpu_pct": round(100 * (time.process_time() - client_cpu) / wall, 1),
        "server_us_per_request": round(1e6 * server_cpu / max(outcome.answers, 1), 1),
        "core_busy_pct": core_busy(cores),
    }
    return outcome, busy


def steady_load(plan: Plan) -> PhaseResult:
    """``GET /route`` single cells, ``/health``, and the dp-rank pair, each at
    ``plan.connections`` keep-alive connections for ``plan.seconds``, on a complete table."""
    result = PhaseResult("steady_load")
    topology = Topology.for_ranks(plan.load_ranks)
    workloads = (RouteLookups(topology), Health(), DpRankPairs(topology.dp))
    for _ in range(plan.runs):
        run: dict[str, Any] = {}
        with _server(plan) as server:
            filled = storm(server.port, topology, plan.capped_in_flight)
            if filled.failures:
                result.problems.append(f"filling the table: {filled.failures} failures")
                continue
            for workload in workloads:
                outcome, busy = _load(plan, server, workload)
                summary = {**outcome.summary(), **busy}
                run[workload.name] = summary
                result.add(
                    {
                        f"{workload.name}_req_per_s": summary["req_per_s"],
                        f"{workload.name}_p50_ms": summary["p50_ms"],
                        f"{workload.name}_p99_ms": summary["p99_ms"],
                        f"{workload.name}_errors": summary["errors"],
                        f"{workload.name}_server_cpu_pct": busy["server_cpu_pct"],
                        f"{workload.name}_client_cpu_pct": busy["client_cpu_pct"],
                        f"{workload.name}_server_us_per_request": busy["server_us_per_request"],
                        f"{workload.name}_core0_busy_pct": busy["core_busy_pct"].get("cpu0", 0.0),
                    }
                )
                if outcome.errors:
                    result.problems.append(
                        f"{workload.name}: {outcome.errors} errors {summary['error_kinds']}"
                    )
            if plan.use_wrk and shutil.which("wrk"):
                _cross_check(plan, server, topology, result, run)
            run["memory_mb"] = server.memory()
        result.runs.append(run)
    return result


def _cross_check(
    plan: Plan, server: Server, topology: Topology, result: PhaseResult, run: dict[str, Any]
) -> None:
    """wrk (C, one thread on the load generator's core) on the two GET phases."""
    paths = {"wrk_route": cell_path(topology.cells()[-1]), "wrk_health": "/health"}
    for name, path in paths.items():
        figures = wrk.run(server.port, path, plan.connections, plan.seconds)
        run[name] = figures
        result.add({f"{name}_req_per_s": figures["req_per_s"], f"{name}_p99_ms": figures["p99_ms"]})
        if figures["errors"]:
            result.problems.append(f"{name}: {figures['errors']} errors")


def memory(plan: Plan) -> PhaseResult:
    """VmRSS/VmHWM idle, after a storm, and after ``plan.memory_rooms`` room registrations."""
    result = PhaseResult("memory")
    topology = Topology.for_ranks(plan.memory_ranks)
    for _ in range(plan.runs):
        with _server(plan) as server:
            idle = server.memory()
            filled = storm(server.port, topology)
            after_storm = server.memory()
            rooms = RoomFlood(topology.dp, plan.memory_rooms // plan.connections + 1)
            flood = _run(
                closed_loop(
                    server.port, rooms, plan.connections, ROOM_FLOOD_LIMIT, 0.0, plan.memory_rooms
                )
            )
            after_rooms = server.memory()
        result.add(
            {
                "idle_rss_mb": idle["VmRSS"],
                "storm_rss_mb": after_storm["VmRSS"],
                "rooms_rss_mb": after_rooms["VmRSS"],
                "rooms_hwm_mb": after_rooms["VmHWM"],
                "rooms_req_per_s": flood.rate,
            }
        )
        result.runs.append(
            {
                "idle": idle,
                "after_storm": after_storm,
                "after_rooms": after_rooms,
                "storm": filled.summary(),
                "rooms": flood.summary(),
            }
        )
        if filled.failures:
            result.problems.append(f"memory storm: {filled.failures} failed registrations")
        if flood.errors:
            result.problems.append(f"room flood: {flood.errors} errors {dict(flood.error_kinds)}")
        if flood.requests < plan.memory_rooms:
            result.problems.append(f"room flood stopped early: {flood.requests} requests")
    return result


def _wait_figures(outcome: WaitResult, key: str) -> dict[str, float]:
    summary = outcome.summary()
    return {
        f"{name}_{key}": summary[name]
        for name in (
            "first_s", "p50_s", "p99_s", "max_s", "bytes_per_waiter", "server_cpu_seconds",
            "peak_rss_mb",
        )
    }  # fmt: skip


def _wait_runs(
    plan: Plan,
    result: PhaseResult,
    count: int,
    scenario: Callable[[Server, int, str], WaitResult],
    label: str,
) -> None:
    for _ in range(plan.runs):
        with _server(plan) as server:
            outcome = scenario(server, count, plan.wait_path)
        result.add(_wait_figures(outcome, str(count)))
        result.runs.append(outcome.summary())
        if outcome.problems:
            result.problems.append(f"{label}: {dict(outcome.problems)}")


def waiters(plan: Plan) -> PhaseResult:
    """N ranks parked on the completeness wait, then the last registration (issue 16)."""
    result = PhaseResult("waiters")
    for count in plan.waiter_sizes:
        _wait_runs(plan, result, count, release_waiters, f"{count} waiters")
    return result


def startup_wait(plan: Plan) -> PhaseResult:
    """The whole start-up of N ranks: each registers, then waits for the complete table."""
    result = PhaseResult("startup_wait")
    count = plan.startup_wait_ranks
    _wait_runs(plan, result, count, startup_with_wait, f"{count}-rank start-up")
    return result


def watchers(plan: Plan) -> PhaseResult:
    """Event delivery to N SSE watchers during a storm and moves, and the same storm alone
    (alternating which goes first), each on a fresh server (``bench/watchers.py``)."""
    result = PhaseResult("watchers")
    topology = Topology.for_ranks(plan.watch_ranks)
    for index in range(plan.runs):
        run: dict[str, Any] = {}
        for which in ("alone", "watched") if index % 2 == 0 else ("watched", "alone"):
            with _server(plan) as server:
                if which == "alone":
                    alone, alone_cpu = storm_alone(server, topology)
                    run["alone"] = {**alone.summary(), "server_cpu_seconds": round(alone_cpu, 3)}
                    if alone.failures:
                        result.problems.append(f"storm alone: {alone.failures} failures")
                    continue
                watched = watched_storm(
                    server, topology, plan.watchers, plan.watch_moves, plan.watch_move_gap
                )
                run["watched"] = {**watched.details, **watched.figures}
                result.add(watched.figures)
                result.problems.extend(watched.problems)
        slower = run["watched"]["storm_seconds"] / run["alone"]["seconds"] - 1
        run["storm_slower_pct"] = round(100 * slower, 1)
        result.add(
            {"storm_alone_seconds": run["alone"]["seconds"], "storm_slower_pct": 100 * slower}
        )
        result.runs.append(run)
    return result


PHASES: dict[str, Phase] = {
    "startup": startup,
    "storm": storms,
    "storm_capped": capped_storm,
    "steady_load": steady_load,
    "memory": memory,
    "waiters": waiters,
    "startup_wait": startup_wait,
    "watchers": watchers,
}


def run_phase(name: str, plan: Plan) -> PhaseResult:
    """Run one phase by name (kept separate so a failing phase names itself)."""
    return PHASES[name](plan)
