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
So a watcher does its Python work per chunk of bytes received, never per event: one clock read,
the chunked framing, one regex ``findall`` of the ``id:`` seqs in the complete events, and one
update of a running hash of everything it received (keep-alive comments left out). The checks
are made once at the end: every watcher's hash must equal watcher 0's (the same bytes), and its
seqs 1..latest once each, in order (the parent); watcher 0 alone keeps its bytes, whose events
are parsed once to name each seq's kind and cell.

Times are ``time.monotonic()``: CLOCK_MONOTONIC, the same clock in every process on Linux, so
the parent can subtract its own acknowledgement times from them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import pickle
import re
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
RETRY = b"retry: 2000\n\n"
"""A stream's first bytes (the wire, README: SSE)."""
KEEPALIVE = b": keep-alive\n\n"
ID = re.compile(rb"id: [^\n:]+:(\d+)\n")
"""An event's ``id: <stream>:<seq>`` line (a ``data:`` line's JSON never starts a line)."""
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
    open_cpu_seconds: float = 0.0
    """The part of it spent opening the streams, before any event."""
    writes: int = 0
    """Chunks of events read, all watchers together (one per server write, mostly)."""
    """This process's CPU (user + system) from start to the end of the wait."""


class Watcher(asyncio.Protocol):
    """One SSE stream: the head, then chunked framing, then events separated by blank lines."""

    def __init__(self, shared: Shared, keep: bool = False) -> None:
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
        self.writes = 0
        self.hash = hashlib.blake2b(digest_size=16)
        self.kept: list[bytes] | None = [] if keep else None
        """Watcher 0 keeps every complete event it received, to be parsed once at the end."""

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
        payload = self._dechunk(data) if self.chunked else data
        if payload:
            self._events(payload, now)

    def _dechunk(self, data: bytes) -> bytes:
        """The payload of every complete chunk received so far, keep-alive comments left out
        (the server writes one chunk per flush, so this loops per flush, not per event)."""
        raw = self.raw
        if not raw:  # the common case: data is exactly one whole chunk
            end = data.find(b"\r\n")
            if end > 0:
                stop = end + 2 + int(data[:end], 16)
                if len(data) == stop + 2 and stop > end + 2:
                    payload = data[end + 2 : stop]
                    return b"" if payload == KEEPALIVE else payload
        raw += data
        parts: list[bytes] = []
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
            payload = bytes(raw[end + 2 : end + 2 + size])
            if payload != KEEPALIVE:
                parts.append(payload)
            at = end + 2 + size + 2
        del raw[:at]
        return b"".join(parts)

    def _events(self, payload: bytes, now: float) -> None:
        """Count the complete events in ``payload``: their seqs are the first one's onwards
        (checked once at the end, on watcher 0's bytes, which every other's must equal)."""
        if self.text:  # an event split between chunks (our server never does; a proxy might)
            payload = bytes(self.text) + payload
            self.text.clear()
        end = payload.rfind(b"\n\n") + 2
        if end < len(payload):
            self.text += payload[end:]
            payload = payload[:end]
        if not self.opened:
            if not payload.startswith(RETRY):
                if payload:
                    self._fail(f"the stream began {payload[:40]!r}")
                return
            self.opened = True
            self.shared.opened += 1
            payload = payload[len(RETRY) :]
        if not payload.startswith(b"id: "):
            if payload:
                self._fail(f"an event began {payload[:40]!r}")
            return
        first = int(payload[4 : payload.index(b"\n")].rpartition(b":")[2])
        count = payload.count(b"\nid: ") + 1
        self.writes += 1
        self.seqs.extend(range(first, first + count))
        self.times.extend([now] * count)
        self.hash.update(payload)
        if self.kept is not None:
            self.kept.append(payload)

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
    """What every watcher adds to: counts and problems."""

    def __init__(self) -> None:
        self.opened = 0
        self.problems: dict[str, int] = {}


Events = dict[int, tuple[str, tuple[int, ...] | None]]


def _judge(watchers: list[Watcher], shared: Shared) -> Events:
    """seq -> (kind, cell) of watcher 0's events; a problem for any other whose bytes differ."""
    first = watchers[0]
    digest = first.hash.digest()
    differ = sum(1 for w in watchers[1:] if w.opened and w.hash.digest() != digest)
    if differ:
        shared.problems[f"{differ} watchers received other bytes than watcher 0"] = differ
    text = b"".join(first.kept or [])
    if [int(seq) for seq in ID.findall(text)] != first.seqs.tolist():
        shared.problems["watcher 0's event ids are not consecutive within a write"] = 1
    found: Events = {}
    for block in text.split(b"\n\n"):
        if not block:
            continue
        seq = ID.search(block)
        if seq is not None:
            event = orjson.loads(block[block.index(b"\ndata: ") + 7 :].split(b"\n", 1)[0])
            found[int(seq[1])] = (event["kind"], tuple(event["cell"]) if event["cell"] else None)
    return found


async def _open(port: int, count: int, shared: Shared) -> list[Watcher]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    watchers = [Watcher(shared, keep=index == 0) for index in range(count)]

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
    opened = resource.getrusage(resource.RUSAGE_SELF)
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
        events=_judge(watchers, shared),
        problems=shared.problems,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        open_cpu_seconds=opened.ru_utime + opened.ru_stime,
        writes=sum(w.writes for w in watchers),
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
