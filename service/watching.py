"""What ``GET /prefill_port_table/events`` answers: a JSON page of events (long poll) or an SSE
stream (``Accept: text/event-stream``). Same signature as every answer, plus the request headers
for the stream (``Last-Event-ID`` lives there).

A position (``?since=``, ``Last-Event-ID``) is parsed by ``shared.events.parse_position``, the
one reader of the format, so a malformed one is a 422 naming where it came from; one the history
cannot honour is a 410 ``history_gone`` (``HistoryGoneError``) before any stream byte is sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefill_bootstrap.service.answers import query_params
from prefill_bootstrap.service.event_log import HistoryGone
from prefill_bootstrap.service.event_stream import EventStream
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply, Waiting, validation_reply
from prefill_bootstrap.service.wait_param import long_poll_seconds
from prefill_bootstrap.shared.errors import HistoryGoneError
from prefill_bootstrap.shared.events import (
    EventPage,
    EventPosition,
    format_position,
    parse_position,
)

__all__ = ["accepts_event_stream", "poll", "stream"]

Headers = Sequence[tuple[bytes, bytes]]


def accepts_event_stream(headers: Headers) -> bool:
    """Whether the request asked for SSE: ``Accept`` names ``text/event-stream`` with a quality
    above 0 (``q=0`` is "not acceptable"; wildcards stay the JSON page, which any client reads)."""
    for name, value in headers:
        if name == b"accept" and b"text/event-stream" in value.lower():
            return any(_streams(media) for media in value.lower().split(b","))
    return False


def _streams(media: bytes) -> bool:
    kind, *params = (part.strip() for part in media.split(b";"))
    if kind != b"text/event-stream":
        return False
    for param in params:
        key, _, quality = param.partition(b"=")
        if key.strip() == b"q":
            try:
                return float(quality) > 0
            except ValueError:
                return True  # a malformed weight: take the type as asked for
    return True


def poll(registry: Registry, query: bytes, body: bytes) -> Reply | Waiting:
    """The JSON long poll: every event after ``?since=`` at once, else the next one within
    ``?wait=`` seconds (an empty page when none came: it still says where to resume)."""
    params = query_params(query)
    seconds = long_poll_seconds(params)
    if isinstance(seconds, Reply):
        return seconds
    position = _parse(params.get("since"), "query", "since")
    if isinstance(position, Reply):
        return position
    events = registry.events
    if position is None:  # from now: the next event is the first one to answer
        position = EventPosition(events.stream, events.latest)
    page = _page(registry, position)
    seconds = min(seconds, registry.settings.max_wait_seconds)
    if page.events or seconds <= 0 or registry.watchers.closing:
        return _reply(page)
    return Waiting(_poll_later(registry, position, seconds))


async def _poll_later(registry: Registry, position: EventPosition, seconds: float) -> Reply:
    await registry.watchers.polls.wait(seconds)
    return _reply(_page(registry, position))


def stream(registry: Registry, query: bytes, headers: Headers) -> Reply | EventStream:
    """The SSE form: from ``Last-Event-ID`` (it wins: a reconnecting EventSource sends it), else
    ``?since=``, else from now. The position is checked here, so a 410 goes out as JSON."""
    last = next((value for name, value in headers if name == b"last-event-id"), b"")
    if last.strip():
        position = _parse(last.decode("latin-1").strip(), "header", "last-event-id")
    else:
        position = _parse(query_params(query).get("since"), "query", "since")
    if isinstance(position, Reply):
        return position
    if position is not None:
        _check(registry, position)
    return EventStream(registry.watchers, position)


def _parse(raw: str | None, location: str, name: str) -> EventPosition | Reply | None:
    if raw is None:
        return None
    try:
        return parse_position(raw)
    except ValueError as exc:
        return validation_reply([{"loc": (location, name), "msg": str(exc), "type": "value_error"}])


def _text(registry: Registry, position: EventPosition) -> str:
    return format_position(position.stream or registry.events.stream, position.seq)


def _check(registry: Registry, position: EventPosition) -> None:
    found = registry.events.since(_text(registry, position))
    if isinstance(found, HistoryGone):
        raise _gone(registry, position, found)


def _gone(registry: Registry, position: EventPosition, gone: HistoryGone) -> HistoryGoneError:
    shown = str(position.seq) if position.stream is None else _text(registry, position)
    return HistoryGoneError(shown, gone.stream, gone.oldest, gone.latest)


def _page(registry: Registry, position: EventPosition) -> EventPage:
    found = registry.events.since(_text(registry, position))
    if isinstance(found, HistoryGone):
        raise _gone(registry, position, found)
    group = registry.group
    return EventPage(
        stream=registry.events.stream,
        seq=found[-1].seq if found else registry.events.latest,
        instance_id=group.instance_id,
        incarnation=group.incarnation,
        events=found,
    )


def _reply(page: EventPage) -> Reply:
    return Reply(200, page.model_dump_json().encode())
