"""bootstrap_room -> prefill dp rank, with expiry and a hard memory bound of ~12 bytes a room.

With prefill dp > 1 and a load-balance method other than ``follow_bootstrap_room``, SGLang
registers one room per request served, so this table sees sustained traffic and must stay small
at any rate. A plain dict costs ~90 bytes a room (the 63-bit key alone is a 40-byte int object),
so rooms live in *buckets*:

- new rooms go into a dict, the live bucket: the rooms a decode asks about were usually
  registered moments ago, and a dict answers those fastest;
- once it holds ``capacity / 8`` rooms or is ``ttl / 8`` old, it is frozen into two sorted arrays
  (8-byte rooms, 4-byte ranks) searched by bisection, and a new live bucket starts;
- a bucket expires as a whole once its newest room is ``ttl`` old, so a room is found for at
  least ``ttl`` after its last registration and at most ``ttl / 8`` longer (SGLang's own sweep
  keeps rooms between one and two TTLs);
- beyond ``capacity`` rooms the oldest buckets are evicted, so the table never holds more.

A room registered again is found with its newest dp rank: the newest bucket is asked first.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable

__all__ = ["BUCKETS", "RoomTable"]

BUCKETS = 8
"""Buckets per TTL and per capacity: more means finer expiry and smaller freezes, but more
arrays to search for a room that is not in the live bucket."""


class _Frozen:
    """One bucket, read-only: sorted rooms and their dp ranks, 12 bytes a room."""

    __slots__ = ("newest", "ranks", "rooms")

    def __init__(self, live: dict[int, int], newest: float) -> None:
        rooms = sorted(live)
        self.rooms = array("Q", rooms)
        self.ranks = array("I", map(live.__getitem__, rooms))
        self.newest = newest

    def __len__(self) -> int:
        return len(self.rooms)

    def get(self, room: int) -> int | None:
        rooms = self.rooms
        index = bisect_left(rooms, room)
        if index < len(rooms) and rooms[index] == room:
            return self.ranks[index]
        return None


class RoomTable:
    def __init__(self, ttl_seconds: float, capacity: int) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.ttl_seconds = ttl_seconds
        self.capacity = capacity
        self.bucket_size = max(1, capacity // BUCKETS)
        self.bucket_span = ttl_seconds / BUCKETS
        self._live: dict[int, int] = {}
        self._live_since = 0.0
        self._live_newest = 0.0
        self._frozen: deque[_Frozen] = deque()
        self._frozen_rooms = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        """Room entries held; a room registered again may count once per bucket."""
        return len(self._live) + self._frozen_rooms

    def register(self, room: int, dp_rank: int, now: float) -> None:
        self._age(now)
        live = self._live
        if not live:
            self._live_since = now
        live[room] = dp_rank
        self._live_newest = now
        if len(live) >= self.bucket_size:
            self._freeze()
        while len(self) > self.capacity and self._frozen:
            self.evicted += self._drop_oldest()

    def query(self, rooms: Iterable[int], now: float) -> dict[str, int]:
        """The dp rank of every known room, keyed by the room as a string (SGLang's shape)."""
        self._age(now)
        live, frozen = self._live, self._frozen
        found: dict[str, int] = {}
        for room in rooms:
            rank = live.get(room)
            if rank is None:
                for bucket in reversed(frozen):
                    rank = bucket.get(room)
                    if rank is not None:
                        break
                else:
                    continue
            found[str(room)] = rank
        return found

    def _age(self, now: float) -> None:
        """Freeze a live bucket that spans ``ttl / 8``, then drop expired buckets.

        Freezing first keeps every live room younger than the TTL, so only whole frozen
        buckets ever expire.
        """
        if self._live and now - self._live_since >= self.bucket_span:
            self._freeze()
        cutoff = now - self.ttl_seconds
        frozen = self._frozen
        while frozen and frozen[0].newest <= cutoff:
            self.expired += self._drop_oldest()

    def _freeze(self) -> None:
        bucket = _Frozen(self._live, self._live_newest)
        self._frozen.append(bucket)
        self._frozen_rooms += len(bucket)
        self._live = {}

    def _drop_oldest(self) -> int:
        dropped = len(self._frozen.popleft())
        self._frozen_rooms -= dropped
        return dropped

    def clear(self) -> None:
        """Forget every room (the group was reset); the eviction and expiry counts stand."""
        self._live = {}
        self._frozen.clear()
        self._frozen_rooms = 0
