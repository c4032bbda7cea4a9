"""Fan-out of table events to every watcher, without ever letting a watcher slow a change down.

The hub holds ONE subscription to the event log. A publish serialises the event to its SSE frame
once, adds it to the hub's batch and, if none is due, schedules ONE flush: publishing never awaits
a watcher, never writes to a socket and costs the same however many watchers there are. The flush
runs as a callback of its own (after the registrations whose commit published the batch, never
inside one), at most every ``flush_interval`` seconds: it joins the batch ONCE into one ``bytes``
and gives that same object to every watcher that was up to date, the common case; only a watcher
that already holds part of the batch (one opened meanwhile, its backlog read from the history) gets
a join of its own. Each stream's own task (the ASGI request it answers, ``EventStream.run``) writes
what is pending, so a storm's hundreds of events reach a watcher as a few writes, not hundreds.

A watcher whose pending bytes pass ``buffer_bytes`` is dropped: its pending list is freed, its
connection aborted (a polite close would wait for a reader that does not read), one warning is
logged and the metric counts it. The client may reconnect with ``Last-Event-ID`` and is sent what
it missed from the history.

JSON long polls that found nothing to answer are parked here too (``Waiters``: a callback and a
timer, woken together by the next publish), so the ``watchers`` gauge counts both kinds.

Opening a stream is synchronous on the event loop, as publishing is: the watcher is added and its
backlog read in one step, so no event can fall between the backlog and the live feed; each
watcher also keeps the last seq it was given and is given nothing not newer (no duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prefill_bootstrap.service.event_log import EventLog, HistoryGone
from prefill_bootstrap.service.metrics import Metrics
from prefill_bootstrap.service.waiters import Waiters
from prefill_bootstrap.shared.events import EventPosition, TableEvent, format_position

__all__ = [
    "ABORT_EXTENSION",
    "FLUSH_INTERVAL",
    "KEEPALIVE",
    "RETRY",
    "SSE_HEADERS",
    "Watcher",
    "WatcherHub",
    "sse_frame",
]

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

RETRY = b"retry: 2000\n\n"
"""The stream's first bytes: how long an EventSource waits before reconnecting (ms)."""
KEEPALIVE = b": keep-alive\n\n"
"""A comment line: ignored by SSE parsers, but traffic for proxies that cut idle connections."""
SSE_HEADERS = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx would otherwise buffer the stream
)
FLUSH_INTERVAL = 0.005
"""The least time between two flushes (s). A flush costs a write per watcher whatever it carries,
so during a storm it is the number of flushes that costs the server, not the number of events:
measured with 1,000 watchers and a 512-rank storm (bench/README.md, the watchers section)."""
ABORT_EXTENSION = "prefill_bootstrap.abort"
"""The ASGI scope extension (set by our uvicorn protocol) that aborts the request's connection."""


def sse_frame(stream: str, event: TableEvent) -> bytes:
    """One event as SSE: ``id: <stream>:<seq>``, ``event: <kind>``, ``data: <TableEvent JSON>``
    (compact JSON has no newline, so one ``data:`` line carries it)."""
    position = format_position(stream, event.seq).encode()
    data = event.model_dump_json().encode()
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (position, event.kind.encode(), data)


class Watcher:
    """One open event stream: the frames it has yet to write, and how it is woken."""

    __slots__ = (
        "_deadline", "_timer", "_waiter", "abort", "closed", "dropped", "peer", "pending",
        "pending_bytes", "seq", "writing",
    )  # fmt: skip

    def __init__(self, peer: str, seq: int, abort: Callable[[], None] | None) -> None:
        self.peer = peer
        self.seq = seq
        """The last event given to it: a publish not newer than this is skipped."""
        self.abort = abort
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.closed = False
        self.dropped = False
        self.writing = False
        """Its task is inside a send (blocked there while its reader does not read)."""
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        """When the current wait ends with nothing pending (a keep-alive is due)."""
        self._timer: asyncio.TimerHandle | None = None

    def take(self) -> bytes:
        """Everything pending, as one write."""
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return data

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until something is pending, the watcher is closed, or ``seconds`` pass.

        One timer per watcher, re-armed only when it fires early: a watcher written to every few
        milliseconds would otherwise create and cancel a timer per write, a fair part of the
        cost of a flush to a thousand watchers."""
        if self.pending or self.closed:
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._due)
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _due(self) -> None:
        loop = asyncio.get_running_loop()
        if self.closed:
            self._timer = None
        elif loop.time() < self._deadline:  # written to since it was armed: not idle yet
            self._timer = loop.call_at(self._deadline, self._due)
        else:
            self._timer = None
            self.wake()

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WatcherHub:
    """Every watcher of one server: open SSE streams and parked JSON long polls."""

    def __init__(
        self,
        events: EventLog,
        metrics: Metrics,
        *,
        buffer_bytes: int,
        keepalive_seconds: float,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.events = events
        self.metrics = metrics
        self.buffer_bytes = buffer_bytes
        self.keepalive_seconds = keepalive_seconds
        self.flush_interval = flush_interval
        self.flushes = 0
        """Flushes so far (each is one write per watcher that had something new)."""
        self._batch: list[bytes] = []
        """The frames published since the last flush, in seq order."""
        self._batch_first = 0
        """The seq of ``_batch[0]``."""
        self._flush_due: asyncio.Handle | None = None
        self._last_flush = -math.inf
        self.polls = Waiters()
        """Parked JSON long polls, woken together by the next event."""
        self.closing = False
        self._streams: dict[Watcher, None] = {}
        events.subscribe(self._publish)

    def __len__(self) -> int:
        """Current watchers: open streams and parked long polls (the ``watchers`` gauge)."""
        return len(self._streams) + len(self.polls)

    def open(
        self, position: EventPosition | None, peer: str, abort: Callable[[], None] | None = None
    ) -> Watcher | HistoryGone:
        """A new stream watcher, already holding every event after ``position`` (``None``: from
        now), or ``HistoryGone`` when that cannot be honoured."""
        events = self.events
        if position is None:
            backlog: list[TableEvent] | HistoryGone = []
            start = events.latest
        else:
            start = position.seq
            stream = events.stream if position.stream is None else position.stream
            backlog = events.since(format_position(stream, position.seq))
        if isinstance(backlog, HistoryGone):
            return backlog
        watcher = Watcher(peer, start, abort)
        for event in backlog:
            self._give(watcher, event, sse_frame(events.stream, event))
        if not self.closing:
            self._streams[watcher] = None
        else:
            watcher.closed = True
        return watcher

    def remove(self, watcher: Watcher) -> None:
        """Forget a watcher (its stream ended); its pending frames are freed."""
        self._streams.pop(watcher, None)
        watcher.closed = True
        watcher.pending.clear()
        watcher.pending_bytes = 0
        watcher.stop_timer()
        watcher.wake()

    def close(self) -> None:
        """At shutdown: every stream ends now and parked polls answer with what they have."""
        self.closing = True
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush_due = None
        self._batch.clear()
        for watcher in list(self._streams):
            self.remove(watcher)
            if watcher.writing and watcher.abort is not None:
                watcher.abort()  # blocked on a reader that does not read: it would hold shutdown
        self.polls.wake_all()

    def _publish(self, event: TableEvent) -> None:
        if self._streams:
            if not self._batch:
                self._batch_first = event.seq
            self._batch.append(sse_frame(self.events.stream, event))
            if self._flush_due is None:
                self._schedule_flush()
        else:
            self._batch.clear()  # nobody to give it to; a watcher opened later starts after it
        if len(self.polls):
            self.polls.wake_all()

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # published outside the server's loop (a script, a test): at once
            self._flush()
            return
        due = self._last_flush + self.flush_interval
        if due <= loop.time():
            self._flush_due = loop.call_soon(self._flush)
        else:
            self._flush_due = loop.call_at(due, self._flush)

    def _flush(self) -> None:
        """Give the batch to every watcher: one join shared by all that were up to date."""
        self._flush_due = None
        frames, first = self._batch, self._batch_first
        self._batch = []
        if not frames:
            return
        with contextlib.suppress(RuntimeError):
            self._last_flush = asyncio.get_running_loop().time()
        self.flushes += 1
        last = first + len(frames) - 1
        shared = b"".join(frames)
        for watcher in list(self._streams):
            seq = watcher.seq
            if seq >= last:
                continue  # opened meanwhile: its backlog held the whole batch already
            # seq >= first - 1: a watcher is opened at the log's latest seq, so it holds every
            # event before the batch (those of earlier flushes or its backlog).
            data = shared if seq < first else b"".join(frames[seq - first + 1 :])
            self._add(watcher, last, data)

    def _give(self, watcher: Watcher, event: TableEvent, frame: bytes) -> None:
        if event.seq > watcher.seq:  # a backlog and the live feed may overlap: no duplicate
            self._add(watcher, event.seq, frame)

    def _add(self, watcher: Watcher, seq: int, data: bytes) -> None:
        watcher.seq = seq
        watcher.pending.append(data)
        watcher.pending_bytes += len(data)
        if watcher.pending_bytes > self.buffer_bytes and watcher in self._streams:
            self._drop(watcher)
        else:
            watcher.wake()

    def _drop(self, watcher: Watcher) -> None:
        behind, frames = watcher.pending_bytes, len(watcher.pending)
        watcher.dropped = True
        self.remove(watcher)
        self.metrics.watchers_dropped += 1
        log.warning(
            "Dropped the event stream of %s: it fell %d bytes (%d events) behind, over the %d "
            "allowed (--watcher-buffer-bytes); it may reconnect with Last-Event-ID.",
            watcher.peer,
            behind,
            frames,
            self.buffer_bytes,
        )
        if watcher.abort is not None:
            watcher.abort()
