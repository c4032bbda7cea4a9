"""``examples/decode_cache.py``: the cache drops exactly the cells that moved or left, and
everything on a reset or a resync, fed by a scripted event source."""

from __future__ import annotations

import time

from examples.decode_cache import DecodeCache
from prefill_bootstrap.client.feed import Resynced
from prefill_bootstrap.shared.protocol import Cell, RankAddress, TableReport
from tests.feed_fakes import event, table

CELLS = [Cell(0, 0, tp, 0) for tp in range(4)]


def filled() -> tuple[DecodeCache, list[Cell]]:
    asked: list[Cell] = []

    def lookup(cell: Cell) -> RankAddress:
        asked.append(cell)
        return RankAddress(rank_ip="10.0.1.4", rank_port=41000 + cell.tp)

    cache = DecodeCache(lookup)
    for cell in CELLS:
        cache.address(cell)
    asked.clear()
    return cache, asked


def test_a_move_drops_only_that_cell_and_the_next_request_looks_it_up_again() -> None:
    cache, asked = filled()
    moved = event(5, "moved", cell=[0, 0, 2, 0], incarnation="g1.1")
    cache.follow([moved])
    assert set(cache.cached()) == set(CELLS) - {Cell(0, 0, 2, 0)}
    assert cache.incarnation == "g1.1"
    assert cache.address(Cell(0, 0, 2, 0)) == "10.0.1.4:41002"
    assert cache.address(Cell(0, 0, 1, 0)) == "10.0.1.4:41001"
    assert asked == [Cell(0, 0, 2, 0)]


def test_a_rank_that_left_is_dropped_too() -> None:
    cache, _ = filled()
    assert cache.apply(event(6, "left", cell=[0, 0, 1, 0])) == [Cell(0, 0, 1, 0)]
    assert Cell(0, 0, 1, 0) not in cache.cached()


def test_changes_that_keep_addresses_right_drop_nothing() -> None:
    cache, _ = filled()
    for kind in ("registered", "expired", "renewed", "complete", "incomplete", "conflict"):
        assert cache.apply(event(7, kind)) == []
    assert set(cache.cached()) == set(CELLS)


def test_a_reset_or_a_resync_drops_everything() -> None:
    cache, _ = filled()
    assert cache.apply(event(8, "reset", instance_id="g2", incarnation="g2")) is None
    assert cache.cached() == {}
    cache, _ = filled()
    report = TableReport.model_validate(table("s2", 9))
    assert cache.apply(Resynced("history_gone", "g1", "g1", "s2", 9, report, time.time())) is None
    assert cache.cached() == {}


def test_a_lookup_answered_before_a_move_that_lands_meanwhile_is_not_kept() -> None:
    """The answer of a lookup in flight when a cell moves may be the old address: keeping it
    would cache the stale address after the one invalidation that was to drop it."""
    cell = Cell(0, 0, 2, 0)
    ports = iter([41002, 41107])

    def lookup(asked: Cell) -> RankAddress:
        port = next(ports)
        if port == 41002:  # the server answered the old address; the move arrives meanwhile
            cache.apply(event(5, "moved", cell=list(asked), incarnation="g1.1"))
        return RankAddress(rank_ip="10.0.1.4", rank_port=port)

    cache = DecodeCache(lookup)
    assert cache.address(cell) == "10.0.1.4:41002"  # this request used what it was told
    assert cell not in cache.cached()
    assert cache.address(cell) == "10.0.1.4:41107"
    assert cache.cached() == {cell: "10.0.1.4:41107"}
