"""The streaming answer: one SSE response, written by its own request's task.

``EventStream`` is what ``dispatch`` gives a door for ``Accept: text/event-stream``: unlike a
``Reply`` it is not bytes but a loop. The ASGI doors run it with ``more_body=True`` sends (uvicorn
frames them as chunks). It writes ``retry:`` and the backlog at once, then whatever the hub left
pending whenever woken, and a keep-alive comment after ``keepalive_seconds`` of silence. It ends
when the client leaves, when the hub drops or closes it (shutdown), never on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import MutableMapping, Sequence
from typing import Any

from prefill_bootstrap.service.event_log import HistoryGone
from prefill_bootstrap.service.replies import reply_for, send_reply
from prefill_bootstrap.service.watchers import (
    ABORT_EXTENSION,
    KEEPALIVE,
    RETRY,
    SSE_HEADERS,
    Message,
    Receive,
    Send,
    Watcher,
    WatcherHub,
)
from prefill_bootstrap.shared.errors import HistoryGoneError
from prefill_bootstrap.shared.events import EventPosition

Scope = MutableMapping[str, Any]
Headers = Sequence[tuple[bytes, bytes]]

__all__ = ["EventStream"]


class EventStream:
    """A stream to open from ``position`` (checked by the answer already); the door supplies
    ``send``/``receive`` and the scope (peer, abort)."""

    __slots__ = ("hub", "position")

    def __init__(self, hub: WatcherHub, position: EventPosition | None) -> None:
        self.hub = hub
        self.position = position

    async def run(self, scope: Scope, send: Send, receive: Receive, headers: Headers = ()) -> int:
        """Write the stream until it ends; the status for the door's metrics.

        The watcher is opened before the first ``await``, so nothing is published between the
        position's check and the watcher's backlog on the lean door; on the others, a history
        that moved past the position meanwhile is still answered 410, as JSON."""
        hub = self.hub
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "an unknown peer"
        abort = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
        watcher = hub.open(self.position, peer, abort)
        if isinstance(watcher, HistoryGone):
            shown = "?" if self.position is None else str(self.position.seq)
            gone = HistoryGoneError(shown, watcher.stream, watcher.oldest, watcher.latest)
            return await send_reply(send, reply_for(gone), *headers)
        leaving = asyncio.ensure_future(_until_disconnect(receive))
        leaving.add_done_callback(lambda _: hub.remove(watcher))
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]}
            )
            await _more(send, watcher, RETRY + watcher.take())
            while not watcher.closed:
                await watcher.wait(hub.keepalive_seconds)
                if watcher.closed:
                    break
                await _more(send, watcher, watcher.take() or KEEPALIVE)
            if not watcher.dropped:  # a dropped one was aborted: nothing more can be written
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            leaving.cancel()
            hub.remove(watcher)
        return 200


async def _more(send: Send, watcher: Watcher, body: bytes) -> None:
    watcher.writing = True
    try:
        await send({"type": "http.response.body", "body": body, "more_body": True})
    finally:
        watcher.writing = False


async def _until_disconnect(receive: Receive) -> None:
    with contextlib.suppress(Exception):  # a server that has no more to say: the client is gone
        message: Message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
