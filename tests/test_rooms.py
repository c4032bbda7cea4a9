"""bootstrap_room -> dp_rank: expiry after the TTL and a hard bound on entries."""

from __future__ import annotations

from prefill_bootstrap.service.rooms import RoomTable


def test_a_registered_room_is_found_until_its_ttl_passes() -> None:
    rooms = RoomTable(ttl_seconds=10, capacity=100)
    rooms.register(7, dp_rank=3, now=100.0)
    assert rooms.query([7], now=105.0) == {"7": 3}
    assert rooms.query([7], now=110.5) == {}


def test_unknown_rooms_are_left_out_of_the_answer() -> None:
    rooms = RoomTable(ttl_seconds=10, capacity=100)
    rooms.register(1, dp_rank=0, now=0.0)
    assert rooms.query([1, 2, 3], now=1.0) == {"1": 0}


def test_expired_entries_are_swept_on_later_writes() -> None:
    rooms = RoomTable(ttl_seconds=10, capacity=100)
    for room in range(50):
        rooms.register(room, dp_rank=0, now=0.0)
    rooms.register(1000, dp_rank=1, now=20.0)
    assert len(rooms) == 1
    assert rooms.expired == 50


def test_the_table_never_holds_more_than_its_capacity_and_evicts_the_oldest() -> None:
    rooms = RoomTable(ttl_seconds=1000, capacity=3)
    for room in range(10):
        rooms.register(room, dp_rank=room % 2, now=float(room))
    assert len(rooms) == 3
    assert rooms.evicted == 7
    assert rooms.query(range(10), now=10.0) == {"7": 1, "8": 0, "9": 1}


def test_re_registering_a_room_restarts_its_lifetime_and_takes_the_new_rank() -> None:
    rooms = RoomTable(ttl_seconds=10, capacity=100)
    rooms.register(5, dp_rank=0, now=0.0)
    rooms.register(6, dp_rank=0, now=1.0)
    rooms.register(5, dp_rank=2, now=8.0)
    assert rooms.query([5, 6], now=12.0) == {"5": 2}


def test_a_million_registrations_stay_within_the_bound() -> None:
    rooms = RoomTable(ttl_seconds=120, capacity=10_000)
    for room in range(1_000_000):
        rooms.register(room, dp_rank=room % 8, now=room / 10_000)
    assert len(rooms) <= 10_000
