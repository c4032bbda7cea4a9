"""The hub coalesces: what is published in one go reaches each watcher as one write, in order.

A flush costs a write per watcher, whatever it carries; these tests pin that a burst of publishes
(a group commit acknowledging many registrations) is one flush, that the up-to-date watchers share
one joined ``bytes``, that a watcher opened in the middle of a burst gets only what its backlog
lacked, and that flushes keep their minimum interval. Domain tests: a hub, an event log, no server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from prefill_bootstrap.service.event_log import EventLog
from prefill_bootstrap.service.metrics import Metrics
from prefill_bootstrap.service.watchers import RETRY, WatcherHub, sse_frame
from prefill_bootstrap.shared.events import EventPosition, TableEvent
from prefill_bootstrap.shared.protocol import RankAddress
from tests.test_events_route import SseCall, publish

pytestmark = pytest.mark.anyio


def hub_of(flush_interval: float = 0.0) -> tuple[EventLog, WatcherHub]:
    events = EventLog(stream="run1")
    hub = WatcherHub(
        events,
        Metrics(),
        buffer_bytes=1 << 20,
        keepalive_seconds=60,
        flush_interval=flush_interval,
    )
    return events, hub


def emit(events: EventLog, tp: int) -> TableEvent:
    return events.publish(
        "registered",
        instance_id="g",
        incarnation="g",
        cell=(0, 0, tp, 0),
        address=RankAddress(rank_ip="10.0.0.1", rank_port=41000 + tp),
        address_version=1,
    )


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_burst_of_publishes_is_one_flush_shared_by_every_up_to_date_watcher() -> None:
    events, hub = hub_of()
    first, second = hub.open(None, "a:1"), hub.open(None, "b:2")
    burst = [emit(events, tp) for tp in range(3)]
    assert first.pending == [] and hub.flushes == 0  # publishing writes nothing, joins nothing
    await settle()
    assert hub.flushes == 1
    assert first.pending == [b"".join(sse_frame("run1", e) for e in burst)]
    assert first.pending[0] is second.pending[0]  # joined once, the same object for both
    assert first.seq == second.seq == 3


async def test_a_watcher_opened_during_a_burst_gets_only_what_its_backlog_lacked() -> None:
    events, hub = hub_of()
    early = hub.open(None, "a:1")
    one = emit(events, 0)
    late = hub.open(EventPosition("run1", 0), "b:2")  # its backlog already holds event 1
    two = emit(events, 1)
    await settle()
    assert early.take() == sse_frame("run1", one) + sse_frame("run1", two)
    assert late.take() == sse_frame("run1", one) + sse_frame("run1", two)  # once each, in order
    three = emit(events, 2)
    await settle()
    assert early.take() == late.take() == sse_frame("run1", three)


async def test_flushes_keep_their_minimum_interval() -> None:
    events, hub = hub_of(flush_interval=0.2)
    watcher = hub.open(None, "a:1")
    emit(events, 0)
    await settle()
    assert hub.flushes == 1  # the first one at once: nothing was flushed lately
    emit(events, 1)
    emit(events, 2)
    await asyncio.sleep(0.05)
    assert hub.flushes == 1 and len(watcher.pending) == 1
    await asyncio.sleep(0.25)
    assert hub.flushes == 2 and len(watcher.pending) == 2 and watcher.seq == 3


def test_publishing_outside_an_event_loop_flushes_at_once() -> None:
    events, hub = hub_of()
    watcher = hub.open(None, "a:1")
    event = emit(events, 0)
    assert watcher.take() == sse_frame("run1", event)


class RecordingCall(SseCall):
    """An SSE request that also keeps each body write apart."""

    def __init__(self, app: Any) -> None:
        self.writes: list[bytes] = []
        super().__init__(app)

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.writes.append(message.get("body", b""))
        await super()._send(message)


async def test_a_burst_reaches_an_sse_stream_as_one_write_in_order(app_factory: Any) -> None:
    app = app_factory()
    call = RecordingCall(app)
    await call.until(lambda c: c.body.startswith(RETRY))
    burst = [publish(app, tp=tp) for tp in range(5)]
    await call.until(lambda c: len(c.events()) == 5)
    assert call.writes[1:] == [b"".join(sse_frame(app.registry.events.stream, e) for e in burst)]
    assert call.events() == burst
    await call.leave()
