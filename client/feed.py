"""The watch's decisions, shared by both clients: where to resume, what an event means, when to
resynchronise.

``BootstrapClient.watch`` and ``AsyncBootstrapClient.watch`` only move bytes: they open the call
this module describes, feed it the chunks, yield what it returns and reopen when it says so. So
the rules live once:

- resume from the last event seen, ``<stream>:<seq>``, sent as ``Last-Event-ID`` (and
  ``?since=``, which shows in access logs);
- a duplicate (a seq already seen on this stream) is dropped; a gap, a stream other than the one
  resumed, or a new instance that no ``reset`` event announced means events were missed: read the
  table, yield ``Resynced``, watch from the table's position;
- a 410 ``history_gone`` (the server restarted, or the watcher fell behind its history) is the
  same resynchronisation;
- a reconnect that has no stream to resume from (the connection dropped before the first event of
  a watch "from now") resynchronises too, since it cannot know what it missed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import httpx
from pydantic import BaseModel, ValidationError

from prefill_bootstrap.client.core import Call, Core
from prefill_bootstrap.client.retry import classify_transport_error
from prefill_bootstrap.client.sse import SSEDecoder
from prefill_bootstrap.shared.errors import (
    ConfigurationError,
    PortTableUnavailable,
    UnexpectedAnswer,
)
from prefill_bootstrap.shared.events import (
    EVENT_KINDS,
    TableEvent,
    format_position,
    parse_position,
)
from prefill_bootstrap.shared.protocol import EVENTS_PATH, TABLE_PATH, TableReport

__all__ = ["DEFAULT_IDLE_TIMEOUT", "Feed", "ResyncReason", "Resynced", "WatchItem"]

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 60.0
"""Seconds without a byte (not even the keep-alive comment, every 15 s by default) after which
the connection is taken for dead and reopened: a half-open TCP connection never errors by
itself."""

ResyncReason = Literal["history_gone", "new_stream", "new_instance", "gap", "no_position"]


@dataclass(frozen=True)
class Resynced:
    """Yielded instead of events the watcher could not see: the whole table as it is now, and the
    position the watch goes on from. A cache keyed on cells drops everything it holds and
    refills from ``table`` (or lazily)."""

    reason: ResyncReason
    instance_id: str
    incarnation: str
    stream: str
    seq: int
    table: TableReport
    at: float
    """Unix seconds at which the table was read."""

    @property
    def position(self) -> str:
        return format_position(self.stream, self.seq)


WatchItem = TableEvent | Resynced


class _TablePosition(BaseModel):
    """The change-feed fields of ``GET /prefill_port_table``, read beside the ``TableReport``."""

    instance_id: str
    stream: str
    seq: int
    incarnation: str | None = None


class Feed:
    """One watch: its position and the decisions; no I/O (the clients do that)."""

    def __init__(self, core: Core, since: str | None, idle_timeout: float) -> None:
        self.core = core
        self.idle_timeout = idle_timeout
        self.stream: str | None = None
        self.seq: int | None = None
        if since is not None:
            try:
                self.stream, self.seq = parse_position(since)
            except ValueError as exc:
                raise ConfigurationError(f"since: {exc}") from exc
        self.instance: str | None = None
        self.resync: ResyncReason | None = None
        self.decoder = SSEDecoder()
        self._opened = 0
        self._quiet = 0
        self._delivered = False

    @property
    def position(self) -> str | None:
        if self.seq is None:
            return None
        return format_position(self.stream, self.seq) if self.stream else str(self.seq)

    # -- calls -----------------------------------------------------------------------------------

    def must_resync(self) -> bool:
        """Whether the next step is reading the table rather than (re)opening the stream."""
        if self.resync is None and self._opened and self.stream is None:
            self.resync = "no_position"  # dropped before the first event: what was missed?
        return self.resync is not None

    def pause(self) -> float:
        """Seconds to wait before the next attempt to open: none after a stream that delivered
        events; growing like the retry policy's backoff after openings that delivered nothing
        (a server that accepts and hangs up at once, or keeps answering 410), so such a server is
        not hammered."""
        if self._quiet < 2:
            return 0.0
        policy = self.core.retry
        return min(policy.max_backoff, policy.initial_backoff * 2 ** (self._quiet - 2))

    def open_call(self) -> Call[httpx.Response | None]:
        """Open the event stream: the response to read chunks from, or None when the server can
        no longer resume from our position (410), after which ``resync`` is set."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        position = self.position
        if position is not None:
            headers["Last-Event-ID"] = position
        return Call(
            "GET",
            EVENTS_PATH,
            action="watch the port table's events",
            noun="watch request",
            read=self._opened_stream,
            policy=self.core.retry,
            timeout=httpx.Timeout(self.core.timeout, read=self.idle_timeout),
            params={"since": position} if position is not None else None,
            headers=headers,
            answers=frozenset({410}),
            not_found=lambda: PortTableUnavailable(self.core.base_url + EVENTS_PATH),
            stream=True,
        )

    def table_call(self) -> Call[Resynced]:
        """Read the table and its position, to resynchronise (``resync`` says why)."""
        reason = self.resync or "history_gone"
        return Call(
            "GET",
            TABLE_PATH,
            action="read the port table to resynchronise the watch",
            noun="table request",
            read=lambda response: self._resynced(reason, response),
            policy=self.core.retry,
            timeout=httpx.Timeout(self.core.timeout),
            not_found=lambda: PortTableUnavailable(self.core.base_url + TABLE_PATH),
        )

    def _opened_stream(self, response: httpx.Response) -> httpx.Response | None:
        if response.status_code == 410:
            kind = _error_kind(response)
            log.warning(
                "%s resynchronises its watch of %s: the server cannot resume from %s (%s).",
                self.core.who, self.core.base_url, self.position, kind or "HTTP 410",
            )  # fmt: skip
            self.resync = "history_gone"
            self._quiet += 1
            return None
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise ValueError(f"expected text/event-stream, got {content_type or 'no content-type'}")
        self._opened += 1
        self._delivered = False
        self.decoder = SSEDecoder()
        return response

    def _resynced(self, reason: ResyncReason, response: httpx.Response) -> Resynced:
        table = TableReport.model_validate_json(response.content)
        try:
            where = _TablePosition.model_validate_json(response.content)
        except ValidationError as exc:
            raise ValueError(
                "the table carries no stream/seq to watch from (a server without the change "
                f"feed?): {str(exc).splitlines()[0]}"
            ) from exc
        self.stream, self.seq, self.instance = where.stream, where.seq, where.instance_id
        self.resync = None
        return Resynced(
            reason, where.instance_id, where.incarnation or where.instance_id, where.stream,
            where.seq, table, time.time(),
        )  # fmt: skip

    # -- the stream ------------------------------------------------------------------------------

    def take(self, chunk: bytes) -> list[TableEvent]:
        """The events ``chunk`` completes, in order; stops early when ``resync`` becomes set (the
        client then closes the stream and resynchronises)."""
        try:
            raw = self.decoder.feed(chunk)
        except ValueError as exc:
            raise UnexpectedAnswer(self.core.base_url + EVENTS_PATH, 200, str(exc)) from exc
        events: list[TableEvent] = []
        for sse in raw:
            event = self._accept(sse.event, sse.id, sse.data)
            if self.resync is not None:
                break
            if event is not None:
                events.append(event)
        return events

    def _accept(self, kind: str, event_id: str | None, data: str) -> TableEvent | None:
        url = self.core.base_url + EVENTS_PATH
        try:
            stream, seq = parse_position(event_id or "")
        except ValueError as exc:
            raise UnexpectedAnswer(url, 200, f"an event's id: {exc}") from exc
        if stream is None:
            raise UnexpectedAnswer(url, 200, f"an event's id {event_id!r} names no stream")
        if self.stream is not None and stream != self.stream:
            return self._missed("new_stream", f"the stream is {stream}, not {self.stream}")
        if self.seq is not None and seq <= self.seq:
            return None  # seen already: a resumed stream repeating its boundary
        if self.seq is not None and self.stream is not None and seq > self.seq + 1:
            return self._missed("gap", f"events {self.seq + 1} to {seq - 1} never arrived")
        self.stream, self.seq = stream, seq
        if kind not in EVENT_KINDS:
            log.info("%s skips an event of a kind it does not know: %r.", self.core.who, kind)
            return None
        try:
            event = TableEvent.model_validate_json(data)
        except ValueError as exc:
            raise UnexpectedAnswer(url, 200, f"event {event_id}: {exc}") from exc
        unannounced = event.kind != "reset" and self.instance not in (None, event.instance_id)
        if unannounced:
            return self._missed("new_instance", f"instance {event.instance_id} appeared")
        self.instance = event.instance_id
        self._delivered = True
        return event

    def _missed(self, reason: ResyncReason, why: str) -> None:
        log.warning(
            "%s resynchronises its watch of %s: %s.", self.core.who, self.core.base_url, why
        )
        self.resync = reason
        return None

    def ended(self, exc: httpx.HTTPError | None) -> None:
        """The stream ended: ``exc`` None when the server closed it (shutting down) or we did (to
        resynchronise), else the connection broke. Transient breaks are resumed; anything else
        (a TLS failure) is a configuration error."""
        if exc is not None:
            transient = classify_transport_error(exc)
            if transient is None:
                where = self.core.base_url
                raise ConfigurationError(f"the watch of {where} failed: {exc}") from exc
            cause = f"the stream was cut: {exc}"  # it had been answered: not the generic text
        else:
            cause = "the server ended the stream"
        self._quiet = 0 if self._delivered else self._quiet + 1
        if self.resync is None:
            log.warning(
                "%s lost its watch of %s (%s); resuming from %s.",
                self.core.who, self.core.base_url, cause, self.position or "now",
            )  # fmt: skip


def _error_kind(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    kind = body.get("error") if isinstance(body, dict) else None
    return str(kind) if kind else None
