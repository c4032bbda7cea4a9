"""The server's parts, built and wired together once; nothing here decides anything.

``PortGroup`` (group.py) changes the table, durable first, and tells ``EventLog`` (event_log.py)
what changed; ``WatcherHub`` (watchers.py) fans the events out to watchers; ``CompletionWaits``
holds the long polls; ``AnswerCache`` the serialised answers; ``RoomTable`` the bootstrap rooms;
``Metrics`` the counters every part is given rather than owns. The routes' answer functions read
what they need from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prefill_bootstrap.service.answer_cache import AnswerCache
from prefill_bootstrap.service.completion_waits import CompletionWaits
from prefill_bootstrap.service.event_log import EventLog
from prefill_bootstrap.service.group import PortGroup
from prefill_bootstrap.service.metrics import Metrics
from prefill_bootstrap.service.rooms import RoomTable
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import StateStore
from prefill_bootstrap.service.watchers import WatcherHub

__all__ = ["Registry"]


@dataclass(frozen=True)
class Registry:
    settings: ServerSettings
    clock: Callable[[], float]
    metrics: Metrics
    group: PortGroup
    events: EventLog
    watchers: WatcherHub
    waits: CompletionWaits
    rooms: RoomTable
    cache: AnswerCache

    @classmethod
    def open(
        cls, settings: ServerSettings, store: StateStore, clock: Callable[[], float] = time.time
    ) -> Registry:
        """Load the stored group (``settings.reset``: start a new one) and wire the parts."""
        metrics = Metrics()
        events = EventLog(settings.event_history, clock=clock)
        events.subscribe(metrics.count_event)
        group = PortGroup(
            store,
            metrics,
            clock,
            max_cells=settings.max_cells,
            lease_sweep_seconds=settings.lease_sweep_seconds,
            reset=settings.reset,
            events=events,
        )
        rooms = RoomTable(settings.room_ttl_seconds, settings.room_capacity)
        group.on_reset(rooms.clear)  # rooms name dp ranks of the group that is gone
        return cls(
            settings=settings,
            clock=clock,
            metrics=metrics,
            group=group,
            events=events,
            watchers=WatcherHub(
                events,
                metrics,
                buffer_bytes=settings.watcher_buffer_bytes,
                keepalive_seconds=settings.keepalive_seconds,
            ),
            waits=CompletionWaits(group, settings.max_wait_seconds),
            rooms=rooms,
            cache=AnswerCache(lambda: group.version),
        )

    def close(self) -> None:
        self.group.close()
