"""Issue 14 at scale: N SSE watchers of the change feed while a storm registers and cells move.

One run, on a fresh server:

1. N watchers open ``GET /prefill_port_table/events`` (``bench/sse_watchers.py``, a load process
   of its own) and the server's RSS is read once all are open;
2. a storm registers every rank at once (``bench/storm.py``), then ``moves`` cells re-register
   one after another at a new port, ``move_gap`` seconds apart (ranks restarting);
3. every watcher must have received every event exactly once, in seq order, and the same bytes
   as every other watcher; the events must be one ``registered`` per cell, one ``complete`` and
   one ``moved`` per moved cell. These are asserted (``problems``), never the times.

Delivery, per (watcher, event) pair for every cell event: ``t_recv - t_ack``, where ``t_ack`` is
when the registering client had its 200 and ``t_recv`` when that watcher read the event; both
``time.monotonic()``, one clock for every process on Linux. The server publishes an event once
the change is durable, as it answers, so a delivery can be slightly negative.

The storm is also run on a fresh server with no watchers, alternating which goes first from run
to run, so "storm with N watchers" and "storm alone" meet the same machine conditions.
"""

from __future__ import annotations

import math
import pickle
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench.load import percentile
from bench.payloads import BASE_RANK_PORT, Topology, registration
from bench.server import Server
from bench.sse_watchers import Received
from bench.storm import StormResult, storm
from bench.wire import build_request, parse_head

__all__ = ["MOVED_PORT_OFFSET", "WatchRun", "moves", "storm_alone", "watched_storm"]

MOVED_PORT_OFFSET = 10000
"""A moved cell re-registers at its storm port plus this."""
READY_DEADLINE = 90.0


def moves(port: int, topology: Topology, count: int, gap: float) -> tuple[list[float], list[str]]:
    """Re-register the first ``count`` cells at a new port, one at a time on one keep-alive
    connection, ``gap`` seconds apart: (``time.monotonic()`` of each 200, problems)."""
    acked: list[float] = []
    problems: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for index, cell in enumerate(topology.cells()[:count]):
            body = registration(topology, cell, index)
            body["rank_port"] = BASE_RANK_PORT + MOVED_PORT_OFFSET + index
            sock.sendall(build_request("PUT", "/route", orjson.dumps(body)))
            status = _answer(sock)
            acked.append(time.monotonic())
            if status != 200:
                problems.append(f"moving cell {cell}: PUT /route answered {status}")
            time.sleep(gap)
    return acked, problems


def _answer(sock: socket.socket) -> int:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status, length = parse_head(head)
    while len(body) < length:
        body += sock.recv(65536)
    return status


def _table_seq(port: int) -> int | None:
    """The event log's latest seq, as ``GET /prefill_port_table`` carries it (None: it does
    not, a server from before the change feed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(build_request("GET", "/prefill_port_table", close=True))
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
    seq = orjson.loads(data.partition(b"\r\n\r\n")[2]).get("seq")
    return seq if isinstance(seq, int) else None


class WatchRun:
    """One run with watchers: what the phase reports, and every correctness problem."""

    def __init__(self, watchers: int) -> None:
        self.watchers = watchers
        self.figures: dict[str, float] = {}
        self.details: dict[str, Any] = {"watchers": watchers}
        self.problems: list[str] = []


def _start_watchers(server: Server, count: int, out: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.sse_watchers", "--port", str(server.port)]
    command += ["--watchers", str(count), "--out", str(out)]
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def _line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return process.stdout.readline().strip() if ready else ""


def watched_storm(
    server: Server, topology: Topology, watchers: int, moved: int, gap: float
) -> WatchRun:
    """Steps 1-3 of the module's docstring on ``server`` (fresh, nothing registered yet)."""
    run = WatchRun(watchers)
    with tempfile.TemporaryDirectory(prefix="bench-watchers-") as folder:
        out = Path(folder) / "received.pickle"
        process = _start_watchers(server, watchers, out)
        try:
            ready = _line(process, time.monotonic() + READY_DEADLINE).split()
            if len(ready) != 3 or ready[0] != "ready" or ready[2] != "0":
                run.problems.append(f"watchers did not all open: {ready or 'no answer'}")
            run.details["rss_connected_mb"] = server.memory()["VmRSS"]
            cpu = server.cpu_seconds()
            outcome = storm(server.port, topology)
            storm_cpu = server.cpu_seconds() - cpu
            moved_at, problems = moves(server.port, topology, moved, gap)
            moves_cpu = server.cpu_seconds() - cpu - storm_cpu
            run.problems += problems
            run.details["rss_after_mb"] = server.memory()["VmRSS"]
            latest = _table_seq(server.port)
            if latest is None:
                run.problems.append("GET /prefill_port_table carries no seq")
                latest = 0
            assert process.stdin is not None
            process.stdin.write(f"until {latest}\n")
            process.stdin.flush()
            done = _line(process, time.monotonic() + READY_DEADLINE)
            if done != "done":
                run.problems.append(f"the watcher process ended with {done or 'no answer'}")
            process.wait(timeout=30)
            received = Received(**pickle.loads(out.read_bytes()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    _judge(run, topology, outcome, moved_at, latest, received)
    run.figures.update(
        storm_seconds=outcome.seconds,
        storm_server_cpu_seconds=storm_cpu,
        moves_server_cpu_seconds=moves_cpu,
        rss_connected_mb=run.details["rss_connected_mb"],
        rss_after_mb=run.details["rss_after_mb"],
        watcher_process_cpu_seconds=received.cpu_seconds,
        watcher_process_open_cpu_seconds=received.open_cpu_seconds,
        watcher_writes=received.writes,
    )
    run.details.update(
        storm=outcome.summary(),
        storm_server_cpu_seconds=round(storm_cpu, 3),
        events=latest,
        watcher_process_cpu_seconds=round(received.cpu_seconds, 3),
        watcher_problems=received.problems,
    )
    return run


def _judge(
    run: WatchRun,
    topology: Topology,
    outcome: StormResult,
    moved_at: list[float],
    latest: int,
    received: Received,
) -> None:
    """Correctness (every event once, in order, the expected ones) and the delivery figures."""
    if outcome.failures:
        run.problems.append(f"storm: {outcome.failures} failed {dict(outcome.failure_kinds)}")
    cells = topology.cells()
    acks: dict[tuple[str, tuple[int, ...]], float] = {}
    acks.update((("registered", cell), at) for cell, at in zip(cells, outcome.acked, strict=True))
    acks.update((("moved", cell), at) for cell, at in zip(cells, moved_at, strict=False))
    kinds = Counter(kind for kind, _ in received.events.values())
    wanted = Counter(registered=len(cells), complete=1, moved=len(moved_at))
    if kinds != wanted or latest != sum(wanted.values()):
        run.problems.append(f"events seen {dict(kinds)}, latest seq {latest}; want {dict(wanted)}")
    seen = Counter(received.events.values())
    if any(count > 1 for count in seen.values()) or any(
        key not in seen for key in acks
    ):  # fmt: skip
        run.problems.append("a change was published more than once or not at all")
    expected = list(range(1, latest + 1))
    wrong = sum(1 for seqs in received.seqs if seqs.tolist() != expected)
    if wrong:
        run.problems.append(
            f"{wrong} of {run.watchers} watchers did not get seq 1..{latest} once each"
        )
    if received.problems:
        run.problems.append(f"watcher problems: {received.problems}")
    ack_of_seq = {
        seq: acks[(kind, cell)]
        for seq, (kind, cell) in received.events.items()
        if cell is not None and (kind, cell) in acks
    }
    storm_seqs = {seq for seq, (kind, _) in received.events.items() if kind == "registered"}
    storm_delivery: list[float] = []
    move_delivery: list[float] = []
    for seqs, times in zip(received.seqs, received.times, strict=True):
        for seq, at in zip(seqs, times, strict=True):
            ack = ack_of_seq.get(seq)
            if ack is not None and not math.isnan(ack):
                (storm_delivery if seq in storm_seqs else move_delivery).append(at - ack)
    delivery = sorted(storm_delivery + move_delivery)
    storm_delivery.sort()
    move_delivery.sort()
    for name, values in (("", delivery), ("storm_", storm_delivery), ("moves_", move_delivery)):
        run.figures[f"{name}delivery_p50_ms"] = 1000 * percentile(values, 0.5)
        run.figures[f"{name}delivery_p99_ms"] = 1000 * percentile(values, 0.99)
        run.figures[f"{name}delivery_max_ms"] = 1000 * (values[-1] if values else math.nan)
    run.details["delivery_pairs"] = len(delivery)


def storm_alone(server: Server, topology: Topology) -> tuple[StormResult, float]:
    """The same storm with nobody watching (the baseline), and the server's CPU seconds."""
    cpu = server.cpu_seconds()
    outcome = storm(server.port, topology)
    return outcome, server.cpu_seconds() - cpu
