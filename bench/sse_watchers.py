"""N concurrent SSE watchers of ``/prefill_port_table/events``, in a load process of their own.

Run by the ``watchers`` phase (``bench/watchers.py``) as ``python -m bench.sse_watchers``; it talks
to its parent in lines:

- it prints ``ready <opened> <failed>`` once every watcher has its stream open (the ``retry:``
  preamble arrived, so the server has registered it), or has failed;
- the parent writes ``until <seq>``: it waits until every open watcher has event ``seq`` (or a
  deadline), writes what each one received to ``--out`` (a pickle of ``Received`` as a dict:
  this module runs as ``__main__``, whose classes the parent cannot unpickle), prints
  ``done`` and exits.

Why a process of its own and raw asyncio protocols (uvloop) rather than httpx: the 1000 watchers
must not share an interpreter with the storm client whose acknowledgements they are timed
against, and on a 2-core machine every microsecond a watcher costs is taken from the load side.
Per chunk of bytes a watcher does one clock read, the chunked framing, a split on blank lines
and, per event, one ``int()`` of its ``id:``; the JSON is parsed once per event (by the first
watcher that has it), the other watchers' copies are compared with it byte for byte.

Times are ``time.monotonic()``: CLOCK_MONOTONIC, the same clock in every process on Linux, so
the parent can subtract its own acknowledgement times from them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import pickle
import resource
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import orjson

from bench.server import raise_fd_limit
from bench.wire import new_loop

__all__ = ["Received", "main"]

CONNECT_CONCURRENCY = 128
OPEN_DEADLINE = 60.0
UNTIL_DEADLINE = 60.0
REQUEST = (
    b"GET /prefill_port_table/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Accept: text/event-stream\r\n\r\n"
)


@dataclass
class Received:
    """What the watchers received, as the parent unpickles it."""

    seqs: list[array]
    """Per watcher, the ``seq`` of every event in the order received."""
    times: list[array]
    """Per watcher, ``time.monotonic()`` when each of those events arrived."""
    events: dict[int, tuple[str, tuple[int, ...] | None]]
    """seq -> (kind, cell) of every event seen by any watcher."""
    problems: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    """This process's CPU (user + system) from start to the end of the wait."""


class Watcher(asyncio.Protocol):
    """One SSE stream: the head, then chunked framing, then blocks separated by blank lines."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.raw = bytearray()
        self.text = bytearray()
        self.chunked = False
        self.in_body = False
        self.opened = False
        self.problem: str | None = None
        self.seqs = array("q")
        self.times = array("d")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end]).lower()
            data = bytes(self.head[end + 4 :])
            self.head = bytearray()
            self.in_body = True
            if not head.startswith(b"http/1.1 200") or b"text/event-stream" not in head:
                self._fail(f"answered {head[:60]!r}")
                return
            self.chunked = b"transfer-encoding: chunked" in head
        if self.chunked:
            self._dechunk(data)
        else:
            self.text += data
        self._blocks(now)

    def _dechunk(self, data: bytes) -> None:
        """Move every complete chunk's payload from ``raw`` to ``text``."""
        raw = self.raw
        raw += data
        at = 0
        while True:
            end = raw.find(b"\r\n", at)
            if end < 0:
                break
            size = int(raw[at:end].split(b";", 1)[0], 16)
            if size == 0:
                self._fail("the stream ended")
                break
            if len(raw) < end + 2 + size + 2:
                break
            self.text += raw[end + 2 : end + 2 + size]
            at = end + 2 + size + 2
        del raw[:at]

    def _blocks(self, now: float) -> None:
        text = self.text
        end = text.rfind(b"\n\n")
        if end < 0:
            return
        blocks = bytes(text[:end]).split(b"\n\n")
        del text[: end + 2]
        shared = self.shared
        for block in blocks:
            if block.startswith(b"id: "):
                newline = block.index(b"\n")
                seq = int(block[4:newline].rpartition(b":")[2])
                self.seqs.append(seq)
                self.times.append(now)
                shared.see(seq, block)
            elif block.startswith(b"retry:") and not self.opened:
                self.opened = True
                shared.opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.problem is None:
            self.problem = "closed by the server" if exc is None else type(exc).__name__
            self.shared.problems[self.problem] = self.shared.problems.get(self.problem, 0) + 1

    def _fail(self, problem: str) -> None:
        self.problem = problem
        self.shared.problems[problem] = self.shared.problems.get(problem, 0) + 1
        if self.transport is not None:
            self.transport.abort()


class Shared:
    """What every watcher adds to: the first copy of each event, counts, problems."""

    def __init__(self) -> None:
        self.first: dict[int, bytes] = {}
        self.opened = 0
        self.problems: dict[str, int] = {}

    def see(self, seq: int, block: bytes) -> None:
        known = self.first.get(seq)
        if known is None:
            self.first[seq] = block
        elif known != block:
            self.problems[f"event {seq} differs between watchers"] = 1

    def events(self) -> dict[int, tuple[str, tuple[int, ...] | None]]:
        found: dict[int, tuple[str, tuple[int, ...] | None]] = {}
        for seq, block in self.first.items():
            data = block[block.index(b"\ndata: ") + 7 :].split(b"\n", 1)[0]
            event = orjson.loads(data)
            found[seq] = (event["kind"], tuple(event["cell"]) if event["cell"] else None)
        return found


async def _open(port: int, count: int, shared: Shared) -> list[Watcher]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    watchers = [Watcher(shared) for _ in range(count)]

    async def one(watcher: Watcher) -> None:
        async with gate:
            try:
                await loop.create_connection(lambda: watcher, "127.0.0.1", port)
            except OSError as exc:
                watcher.problem = f"connect: {type(exc).__name__}"
                shared.problems[watcher.problem] = shared.problems.get(watcher.problem, 0) + 1

    await asyncio.gather(*(one(watcher) for watcher in watchers))
    deadline = time.monotonic() + OPEN_DEADLINE
    while time.monotonic() < deadline:
        if all(w.opened or w.problem for w in watchers):
            break
        await asyncio.sleep(0.01)
    return watchers


async def _run(port: int, count: int, out: str) -> None:
    shared = Shared()
    watchers = await _open(port, count, shared)
    failed = sum(1 for w in watchers if not w.opened)
    print(f"ready {count - failed} {failed}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = (await reader.readline()).decode().split()
    until = int(line[1]) if len(line) == 2 and line[0] == "until" else 0
    deadline = time.monotonic() + UNTIL_DEADLINE
    live = [w for w in watchers if w.opened]
    while time.monotonic() < deadline:
        if all(w.problem or (w.seqs[-1] if w.seqs else 0) >= until for w in live):
            break
        await asyncio.sleep(0.005)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    received = Received(
        seqs=[w.seqs for w in watchers],
        times=[w.times for w in watchers],
        events=shared.events(),
        problems=shared.problems,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )
    with Path(out).open("wb") as file:
        pickle.dump(dataclasses.asdict(received), file, protocol=pickle.HIGHEST_PROTOCOL)
    for watcher in watchers:
        if watcher.transport is not None:
            watcher.problem = watcher.problem or "closed by the watcher"
            watcher.transport.abort()
    print("done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_watchers", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--watchers", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    raise_fd_limit()
    loop = new_loop()
    try:
        loop.run_until_complete(_run(args.port, args.watchers, args.out))
    finally:
        with contextlib.suppress(Exception):
            loop.close()


if __name__ == "__main__":
    main()
