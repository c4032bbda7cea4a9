"""The change feed's memory: a bounded history of table events and the subscribers told of each.

A domain object with no I/O and no asyncio, tested without a server. It numbers events, keeps
the last ``capacity`` of them (memory stays bounded however many changes a long-lived group
sees), answers "everything after this position" for watchers that resume, and calls subscribers
synchronously on each publish, so whoever fans events out to watchers (SSE queues, parked long
polls) does so without this module knowing how.

Positions (``<stream>:<seq>``, see ``shared/events.py``) resume without a gap or a duplicate
while the event right after them is still held. Otherwise ``since`` returns ``HistoryGone`` rather
than a partial list: a watcher told "here is what you missed" must be told all of it, or told to
re-read the table.

Not thread-safe: the server publishes from its event loop thread, where ``PortGroup`` applies
changes, and reads history on the same thread.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from prefill_bootstrap.shared.events import (
    MAX_SEQ,
    EventKind,
    HistoryGoneDetails,
    TableEvent,
    format_position,
    parse_position,
)
from prefill_bootstrap.shared.protocol import Cell, RankAddress

__all__ = ["DEFAULT_CAPACITY", "EventLog", "EventSubscriber", "HistoryGone"]

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4096
"""Events held for resuming: a full 512-rank storm plus moves, a few MB at most."""

EventSubscriber = Callable[[TableEvent], None]


@dataclass(frozen=True)
class HistoryGone:
    """``since`` cannot answer: the position is older than the history held, ahead of it, or of
    another stream. The server answers it as 410 ``history_gone``; the watcher re-reads the
    table and watches from the table's ``stream``/``seq``."""

    stream: str
    oldest: int
    latest: int

    def details(self) -> HistoryGoneDetails:
        """The 410's ``details`` entry."""
        return HistoryGoneDetails(stream=self.stream, oldest=self.oldest, latest=self.latest)


class EventLog:
    """Numbers, keeps and announces table events for one server run.

    ``stream`` is random per instance: a restarted server has a new one, so a position from
    before the restart is recognised as foreign instead of being mistaken for one of the new
    run's (whose seq restarts at 1)."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        stream: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"event history capacity must be an integer >= 1, not {capacity!r}")
        self.capacity = capacity
        self.stream = stream if stream is not None else secrets.token_hex(8)
        parse_position(format_position(self.stream, 0))  # a stream id no client could send back
        self._clock = clock
        self._history: deque[TableEvent] = deque(maxlen=capacity)
        self._latest = 0
        self._subscribers: dict[EventSubscriber, None] = {}  # insertion-ordered set

    def __len__(self) -> int:
        """Events held right now (at most ``capacity``)."""
        return len(self._history)

    @property
    def latest(self) -> int:
        """The last seq published; 0 before the first event."""
        return self._latest

    @property
    def oldest(self) -> int:
        """The oldest seq still held; ``latest + 1`` (the next event) when none is."""
        return self._history[0].seq if self._history else self._latest + 1

    @property
    def position(self) -> str:
        """``<stream>:<latest>``: where a watcher that has seen everything so far resumes (the
        table snapshot carries it, so read-then-watch misses and repeats nothing)."""
        return format_position(self.stream, self._latest)

    def publish(
        self,
        kind: EventKind,
        *,
        instance_id: str,
        incarnation: str,
        cell: Cell | None = None,
        address: RankAddress | None = None,
        previous: RankAddress | None = None,
        address_version: int | None = None,
        detail: str | None = None,
        at: float | None = None,
    ) -> TableEvent:
        """Number the event, keep it (dropping the oldest beyond ``capacity``) and tell every
        subscriber, in subscription order. A subscriber that raises is logged and skipped: one
        broken watcher must not keep the others, or the change itself, from going out."""
        event = TableEvent(
            seq=self._latest + 1,
            kind=kind,
            instance_id=instance_id,
            incarnation=incarnation,
            at=self._clock() if at is None else at,
            cell=cell,
            address=address,
            previous=previous,
            address_version=address_version,
            detail=detail,
        )
        self._latest = event.seq
        self._history.append(event)
        for subscriber in list(self._subscribers):  # a copy: one may unsubscribe while called
            try:
                subscriber(event)
            except Exception:
                log.exception(
                    "An event subscriber (%r) failed on event %s (%s); the other subscribers "
                    "were still told",
                    subscriber,
                    format_position(self.stream, event.seq),
                    event.kind,
                )
        return event

    def since(self, position: str | int | None) -> list[TableEvent] | HistoryGone:
        """Every held event after ``position``, oldest first, or ``HistoryGone``.

        ``position`` is ``<stream>:<seq>``, a bare seq (an ``int`` or its text) of the current
        stream, or ``None``: "from now", an empty list. Without a position there is no point
        the watcher has seen up to, and replaying whatever happens to be held would be neither
        the whole history nor a consistent view; a watcher that needs one reads the table and
        passes its ``stream:seq``. A position is honoured when ``oldest - 1 <= seq <= latest``;
        a seq ahead of ``latest`` (a bare integer from before a restart) is ``HistoryGone`` too,
        so the watcher resynchronises. A malformed position raises ``ValueError`` naming why."""
        if position is None:
            return []
        if isinstance(position, bool):
            raise ValueError(f"event position must be text or an integer, not {position!r}")
        if isinstance(position, int):
            if not 0 <= position <= MAX_SEQ:
                raise ValueError(
                    f"event position {position} is not a sequence number (0 to {MAX_SEQ})"
                )
            stream, seq = None, position
        elif isinstance(position, str):
            stream, seq = parse_position(position)
        else:
            raise ValueError(f"event position must be text or an integer, not {position!r}")
        oldest = self.oldest
        if (stream is not None and stream != self.stream) or not oldest - 1 <= seq <= self._latest:
            return HistoryGone(stream=self.stream, oldest=oldest, latest=self._latest)
        return list(islice(self._history, seq - (oldest - 1), None))

    def subscribe(self, callback: EventSubscriber) -> None:
        """Call ``callback(event)`` on every publish from now on (once, however often it is
        subscribed). It runs on the publisher's stack, so it must be quick and must not block:
        hand the event to a bounded queue, do not write to a socket."""
        self._subscribers[callback] = None

    def unsubscribe(self, callback: EventSubscriber) -> None:
        """Stop calling ``callback``; unsubscribing one that is not subscribed does nothing (a
        watcher's cleanup may run after it was already dropped)."""
        self._subscribers.pop(callback, None)

    @property
    def subscribers(self) -> int:
        """How many callbacks are subscribed (the metrics' current watchers)."""
        return len(self._subscribers)
