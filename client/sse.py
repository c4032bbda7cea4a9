"""A Server-Sent Events reader: bytes in, events out, no I/O.

It follows the event-stream rules of the HTML standard: lines end in CRLF, LF or CR; a line
starting with ``:`` is a comment (our server's keep-alive); ``field: value`` drops one space after
the colon; ``data`` lines join with ``\\n``; a blank line dispatches the event, unless it carried
no data (then it only resets the event type, as ``retry: 2000`` followed by a blank line does);
``id`` persists from event to event; ``retry`` takes digits only; unknown fields are ignored.

Bytes rather than text go in because a chunk may end inside a multi-byte character (or between
the CR and LF of one line ending): lines are cut on bytes, which UTF-8 never uses inside a
character, and decoded whole. Both clients feed it the chunks httpx hands them, so the sync and
async watchers parse one way.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_LINE_BYTES", "SSEDecoder", "ServerSentEvent"]

MAX_LINE_BYTES = 1 << 20
"""Longest line the decoder holds (1 MiB): a table event is a few hundred bytes, so a longer line
is a broken or hostile peer, and holding it would let it grow memory without bound."""


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: ``event`` defaults to ``message``; ``id`` is the last id seen on the
    stream so far (which is what a reconnect sends as ``Last-Event-ID``)."""

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed it chunks in order with :meth:`feed`; it returns the events they completed.

    ``retry`` is the reconnection delay the server last asked for (milliseconds), ``last_id`` the
    last event id. A line longer than ``max_line`` bytes raises ``ValueError``."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self.retry: int | None = None
        self.last_id: str | None = None
        self._pending = b""
        self._after_cr = False
        self._first_line = True
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._after_cr = False
        events: list[ServerSentEvent] = []
        buffer = self._pending + chunk
        start = 0
        while True:
            cr, lf = buffer.find(b"\r", start), buffer.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or (0 <= lf < cr) else cr
            line = buffer[start:end]
            if buffer[end : end + 1] == b"\r":
                if end + 1 == len(buffer):
                    self._after_cr = True  # the LF may come in the next chunk
                    start = end + 1
                elif buffer[end + 1 : end + 2] == b"\n":
                    start = end + 2
                else:
                    start = end + 1
            else:
                start = end + 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._pending = buffer[start:]
        if len(self._pending) > self.max_line:
            raise ValueError(
                f"an event-stream line is longer than {self.max_line} bytes without an end"
            )
        return events

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if len(raw) > self.max_line:
            raise ValueError(f"an event-stream line is longer than {self.max_line} bytes")
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self.last_id)
