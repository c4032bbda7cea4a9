"""The change feed's wire models: table events, the long poll's page, the 410's details.

Both sides speak these: the server serialises them onto ``GET /prefill_port_table/events`` (SSE
``data:`` lines and the JSON long poll), the client parses them back. A watcher's position in the
feed is written ``<stream>:<seq>``: ``stream`` is a random id per server run (the history is kept
in memory, so a restarted server cannot honour a position in the previous run's feed) and ``seq``
counts events within that run from 1. ``parse_position`` is the one reader of that format, so the
SSE ``Last-Event-ID``, ``?since=`` and the client agree on what a position is.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from prefill_bootstrap.shared.protocol import Cell, RankAddress

__all__ = [
    "EVENT_KINDS",
    "HISTORY_GONE",
    "MAX_SEQ",
    "EventKind",
    "EventPage",
    "EventPosition",
    "HistoryGoneDetails",
    "TableEvent",
    "format_position",
    "parse_position",
]

EventKind = Literal[
    "registered",
    "moved",
    "expired",
    "renewed",
    "left",
    "complete",
    "incomplete",
    "reset",
    "conflict",
]
"""What happened to the table. ``renewed`` is a lease that came back after expiring (not every
heartbeat: those change nothing a watcher can see); ``complete``/``incomplete`` are the table as
a whole crossing the line ``/ready`` answers; ``conflict`` is a registration that was refused."""

EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
"""Every kind, in declaration order (metrics label values, tests that cover each kind)."""

HISTORY_GONE = "history_gone"
"""The error ``kind`` of the 410 answered to a position the server can no longer resume from."""

MAX_SEQ = (1 << 63) - 1
"""The largest sequence number a position may name (a bound on what a parser accepts)."""

Seq = Annotated[StrictInt, Field(ge=0, le=MAX_SEQ)]


class TableEvent(BaseModel):
    """One change to the port table, as every watcher sees it.

    Frozen: one instance is handed to every subscriber and kept in the history, so nobody may
    change what the others see. Fields that do not apply to a kind are ``null`` rather than
    absent, so a consumer reads one shape for every kind."""

    model_config = ConfigDict(frozen=True)

    seq: Annotated[StrictInt, Field(ge=1, le=MAX_SEQ)] = Field(
        description="strictly increasing within one server run (one stream), from 1"
    )
    kind: EventKind
    instance_id: str = Field(description="the stable group id, as in the table's JSON")
    incarnation: str = Field(
        description="X-SGLang-Disaggregation-Instance-ID after this event: it changes on a reset "
        "and whenever a cell's address changes, so a decode's cached addresses are stale exactly "
        "when it differs from the one they were read under"
    )
    at: float = Field(description="unix seconds at which the server applied the change")
    cell: Cell | None = Field(None, description="[dp, cp, tp, pp], or null for whole-table kinds")
    address: RankAddress | None = Field(
        None,
        description="the cell's address now; for left, the address that left; for conflict, the "
        "refused one",
    )
    previous: RankAddress | None = Field(None, description="moved: the address the cell left")
    address_version: int | None = Field(
        None, description="the cell's address version after the event, where there is a cell"
    )
    detail: str | None = Field(
        None,
        description="conflict: the field and the established and offered values; reset: the "
        "previous instance",
    )


class EventPage(BaseModel):
    """The JSON long poll's answer (``GET /prefill_port_table/events?since=...&wait=S``).

    ``seq`` is where the next poll resumes: send ``since=<stream>:<seq>``. It is the last event's
    seq when ``events`` is not empty, else the latest seq at the moment of the answer; so a poll
    that timed out with no events still moves the watcher to "now" without skipping anything."""

    stream: str = Field(description="the server run's random id (a restart makes a new one)")
    seq: Seq = Field(description="resume from <stream>:<seq>; 0 before the first event")
    instance_id: str = Field(description="the stable group id")
    incarnation: str = Field(description="X-SGLang-Disaggregation-Instance-ID right now")
    events: list[TableEvent] = Field(description="every event after since, oldest first")


class HistoryGoneDetails(BaseModel):
    """The ``details`` entry of a 410 ``history_gone``: the position asked for is older than the
    history the server still holds, or from another stream (the server restarted).

    A watcher recovers by reading ``GET /prefill_port_table`` (which carries ``stream`` and
    ``seq``) and watching from that point. ``oldest``/``latest`` say which positions would have
    been honoured: ``<stream>:<n>`` for ``oldest - 1 <= n <= latest``."""

    stream: str = Field(description="the current stream")
    oldest: Seq = Field(description="the oldest event still held (latest + 1 when none is)")
    latest: Seq = Field(description="the last event published; 0 before the first")


class EventPosition(NamedTuple):
    """A parsed position: every event with a greater ``seq`` is still to come. ``stream`` is
    ``None`` for a bare integer, which means "of the current stream"."""

    stream: str | None
    seq: int


_STREAM = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_SEQ = re.compile(r"[0-9]{1,19}", re.ASCII)
_FORMAT = "expected '<stream>:<seq>' or a bare sequence number such as '12'"


def format_position(stream: str, seq: int) -> str:
    """The SSE ``id:`` of an event, and what a client sends back as ``since``/``Last-Event-ID``."""
    return f"{stream}:{seq}"


def parse_position(text: str) -> EventPosition:
    """Read ``<stream>:<seq>`` or a bare ``<seq>``; a ``ValueError`` names what is wrong.

    Strict on purpose: signs, spaces, decimals and non-ASCII digits are refused rather than
    guessed at, since a misread position would silently skip or repeat events."""
    shown = repr(text[:80])
    stream_text, colon, seq_text = text.rpartition(":")
    if not colon:
        stream_text, seq_text = "", text
    elif not stream_text:
        raise ValueError(f"event position {shown} has an empty stream before ':'; {_FORMAT}")
    elif not _STREAM.fullmatch(stream_text):
        raise ValueError(
            f"event position {shown} has a malformed stream {stream_text[:80]!r} (1 to 64 "
            f"letters, digits, '-' or '_'); {_FORMAT}"
        )
    if not seq_text:
        raise ValueError(f"event position {shown} has no sequence number; {_FORMAT}")
    if not _SEQ.fullmatch(seq_text) or int(seq_text) > MAX_SEQ:
        raise ValueError(
            f"event position {shown} has a malformed sequence number {seq_text[:80]!r} (a "
            f"non-negative integer up to {MAX_SEQ}); {_FORMAT}"
        )
    return EventPosition(stream_text or None, int(seq_text))
