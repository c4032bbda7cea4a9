"""bootstrap_room -> prefill dp rank, with expiry and a hard memory bound.

With prefill dp > 1 and a load-balance method other than ``follow_bootstrap_room``, SGLang
registers one room per request served, so this table sees sustained traffic. Entries expire after
a TTL (SGLang: 120 s) and the table never holds more than ``capacity`` entries (oldest evicted
first), so memory stays bounded at any request rate. Expiry is swept incrementally on writes:
with one TTL for all entries, insertion order is expiry order, and the oldest entries sit at the
front of the ordered dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["RoomTable"]


class RoomTable:
    def __init__(self, ttl_seconds: float, capacity: int) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.ttl_seconds = ttl_seconds
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, room: int, dp_rank: int, now: float) -> None:
        entries = self._entries
        if room in entries:
            del entries[room]  # re-registration restarts the room's lifetime
        entries[room] = (dp_rank, now + self.ttl_seconds)
        self.sweep(now)
        while len(entries) > self.capacity:
            entries.popitem(last=False)
            self.evicted += 1

    def query(self, rooms: Iterable[int], now: float) -> dict[str, int]:
        found: dict[str, int] = {}
        entries = self._entries
        for room in rooms:
            entry = entries.get(room)
            if entry is not None and entry[1] > now:
                found[str(room)] = entry[0]
        return found

    def sweep(self, now: float) -> int:
        """Drop expired entries from the front; cheap because the front is the oldest."""
        entries = self._entries
        dropped = 0
        while entries:
            room, (_, expires_at) = next(iter(entries.items()))
            if expires_at > now:
                break
            del entries[room]
            dropped += 1
        self.expired += dropped
        return dropped
