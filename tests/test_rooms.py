"""bootstrap_room -> dp_rank: expiry after the TTL and a hard bound on entries."""

from __future__ import annotations

import tracemalloc

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


def test_a_room_lives_until_its_bucket_is_a_ttl_old_and_never_an_eighth_longer() -> None:
    rooms = RoomTable(ttl_seconds=80, capacity=1000)  # buckets span at most 10 s
    rooms.register(1, dp_rank=0, now=0.0)
    rooms.register(2, dp_rank=1, now=9.0)  # same bucket as room 1
    assert rooms.query([1, 2], now=85.0) == {"1": 0, "2": 1}  # room 1 is 85 s old, < 80 + 10
    assert rooms.query([1, 2], now=89.0) == {}


def test_a_room_frozen_into_an_older_bucket_is_still_found() -> None:
    rooms = RoomTable(ttl_seconds=120, capacity=800)  # buckets of 100 rooms
    for room in range(350):
        rooms.register(room, dp_rank=room % 7, now=1.0)
    assert rooms.query(range(350), now=2.0) == {str(room): room % 7 for room in range(350)}
    assert rooms.query([350, 10**18, 2**63 - 1], now=2.0) == {}


def test_a_room_registered_again_answers_its_newest_rank_from_any_bucket() -> None:
    rooms = RoomTable(ttl_seconds=120, capacity=80)  # buckets of 10 rooms
    rooms.register(5, dp_rank=1, now=0.0)
    for room in range(100, 125):
        rooms.register(room, dp_rank=0, now=0.0)
    rooms.register(5, dp_rank=3, now=0.0)
    assert rooms.query([5], now=1.0) == {"5": 3}


def test_a_full_table_costs_about_twelve_bytes_a_room() -> None:
    rooms = RoomTable(ttl_seconds=120, capacity=200_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for room in range(1 << 40, (1 << 40) + 400_000):
            rooms.register(room, dp_rank=room % 16, now=1.0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(rooms) <= 200_000
    assert held / len(rooms) < 24  # frozen rooms cost 12 bytes; the live dict ~90 per room
