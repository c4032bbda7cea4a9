"""Fan-out of table events to every watcher, without ever letting a watcher slow a change down.

The hub holds ONE subscription to the event log. On each publish it serialises the event to its
SSE frame once and appends that same ``bytes`` to every stream watcher's pending list, then wakes
it: publishing never awaits a watcher and never writes to a socket. Each stream's own task (the
ASGI request it answers, ``EventStream.run``) writes what is pending. A watcher whose pending bytes
pass ``buffer_bytes`` is dropped: its pending list is freed, its connection aborted (a polite close
would wait for a reader that does not read), one warning is logged and the metric counts it. The
client may reconnect with ``Last-Event-ID`` and is sent what it missed from the history.

JSON long polls that found nothing to answer are parked here too (``Waiters``: a callback and a
timer, woken together by the next publish), so the ``watchers`` gauge counts both kinds.

Opening a stream is synchronous on the event loop, as publishing is: the watcher is added and its
backlog read in one step, so no event can fall between the backlog and the live feed; each
watcher also keeps the last seq it was given and skips anything not newer (no duplicates).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prefill_bootstrap.service.event_log import EventLog, HistoryGone
from prefill_bootstrap.service.metrics import Metrics
from prefill_bootstrap.service.waiters import Waiters
from prefill_bootstrap.shared.events import EventPosition, TableEvent, format_position

__all__ = [
    "ABORT_EXTENSION",
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
        "_waiter", "abort", "closed", "dropped", "peer", "pending", "pending_bytes", "seq",
        "writing",
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
        """Until something is pending, the watcher is closed, or ``seconds`` pass."""
        if self.pending or self.closed:
            return
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(seconds, self.wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None


class WatcherHub:
    """Every watcher of one server: open SSE streams and parked JSON long polls."""

    def __init__(
        self, events: EventLog, metrics: Metrics, *, buffer_bytes: int, keepalive_seconds: float
    ) -> None:
        self.events = events
        self.metrics = metrics
        self.buffer_bytes = buffer_bytes
        self.keepalive_seconds = keepalive_seconds
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
        watcher.wake()

    def close(self) -> None:
        """At shutdown: every stream ends now and parked polls answer with what they have."""
        self.closing = True
        for watcher in list(self._streams):
            self.remove(watcher)
            if watcher.writing and watcher.abort is not None:
                watcher.abort()  # blocked on a reader that does not read: it would hold shutdown
        self.polls.wake_all()

    def _publish(self, event: TableEvent) -> None:
        if self._streams:
            frame = sse_frame(self.events.stream, event)
            for watcher in list(self._streams):
                self._give(watcher, event, frame)
        if len(self.polls):
            self.polls.wake_all()

    def _give(self, watcher: Watcher, event: TableEvent, frame: bytes) -> None:
        if event.seq <= watcher.seq:
            return  # given already (a backlog and the live feed may overlap): no duplicate
        watcher.seq = event.seq
        watcher.pending.append(frame)
        watcher.pending_bytes += len(frame)
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
