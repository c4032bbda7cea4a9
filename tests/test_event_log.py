"""The event log: numbered, bounded, resumable without a gap or a duplicate, or honestly gone.

A watcher that resumes from a position gets exactly the events after it; when the log can no
longer say that (the events were dropped for memory, or the position is from another server run)
it says so (``HistoryGone``, answered as a 410) instead of returning a partial list.
"""

from __future__ import annotations

import logging
import tracemalloc
from typing import Any

import pytest

from prefill_bootstrap.service.event_log import DEFAULT_CAPACITY, EventLog, HistoryGone
from prefill_bootstrap.shared.events import MAX_SEQ, HistoryGoneDetails, TableEvent
from prefill_bootstrap.shared.protocol import Cell, RankAddress

ADDRESS = RankAddress(rank_ip="10.0.1.4", rank_port=41003)


def publish(log: EventLog, kind: str = "registered", **fields: Any) -> TableEvent:
    defaults: dict[str, Any] = {"instance_id": "group-1", "incarnation": "group-1.0"}
    if kind == "registered":
        defaults.update(cell=Cell(0, 0, 0, 0), address=ADDRESS, address_version=1)
    return log.publish(kind, **{**defaults, **fields})  # type: ignore[arg-type]


def publish_many(log: EventLog, count: int) -> list[TableEvent]:
    return [publish(log, "renewed") for _ in range(count)]


def seqs(answer: list[TableEvent] | HistoryGone) -> list[int]:
    assert isinstance(answer, list), answer
    return [event.seq for event in answer]


# numbering


def test_events_are_numbered_from_one_strictly_increasing() -> None:
    log = EventLog()
    assert [event.seq for event in publish_many(log, 5)] == [1, 2, 3, 4, 5]
    assert log.latest == 5


def test_an_empty_log_has_latest_zero_and_oldest_one() -> None:
    log = EventLog()
    assert (log.latest, log.oldest, len(log)) == (0, 1, 0)
    assert log.position == f"{log.stream}:0"


def test_publish_returns_the_event_with_every_field_it_was_given() -> None:
    log = EventLog(clock=lambda: 1764650584.5)
    event = log.publish(
        "moved",
        instance_id="group-1",
        incarnation="group-1.3",
        cell=Cell(1, 0, 3, 0),
        address=RankAddress(rank_ip="10.0.1.4", rank_port=41107),
        previous=ADDRESS,
        address_version=2,
    )
    assert event.model_dump(mode="json") == {
        "seq": 1,
        "kind": "moved",
        "instance_id": "group-1",
        "incarnation": "group-1.3",
        "at": 1764650584.5,
        "cell": [1, 0, 3, 0],
        "address": {"rank_ip": "10.0.1.4", "rank_port": 41107},
        "previous": {"rank_ip": "10.0.1.4", "rank_port": 41003},
        "address_version": 2,
        "detail": None,
    }


def test_an_explicit_time_wins_over_the_clock() -> None:
    log = EventLog(clock=lambda: 1.0)
    assert publish(log, "complete", at=2.0).at == 2.0


def test_each_log_has_its_own_random_stream() -> None:
    streams = {EventLog().stream for _ in range(50)}
    assert len(streams) == 50
    assert all(len(stream) == 16 for stream in streams)


def test_a_stream_no_client_could_send_back_is_refused() -> None:
    with pytest.raises(ValueError, match="malformed stream"):
        EventLog(stream="has:colon")


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "10"])
def test_the_capacity_must_be_a_positive_integer(capacity: Any) -> None:
    with pytest.raises(ValueError, match="capacity"):
        EventLog(capacity)


def test_the_default_capacity_holds_a_512_rank_storm_several_times_over() -> None:
    assert EventLog().capacity == DEFAULT_CAPACITY >= 4 * 512


# bounded memory


def test_the_history_holds_only_the_last_capacity_events() -> None:
    log = EventLog(capacity=100)
    publish_many(log, 10_000)
    assert len(log) == 100
    assert (log.oldest, log.latest) == (9_901, 10_000)
    assert seqs(log.since(9_900)) == list(range(9_901, 10_001))


def test_memory_stays_bounded_however_many_events_are_published() -> None:
    log = EventLog(capacity=200)
    tracemalloc.start()
    try:
        publish_many(log, 1_000)  # the history is full (and traced) from here on
        before, _ = tracemalloc.get_traced_memory()
        publish_many(log, 20_000)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(log) == 200
    assert after - before < 16 * 1024, f"{after - before} bytes kept by 20,000 more events"


# resuming


def test_none_means_from_now_and_returns_nothing_even_with_history() -> None:
    log = EventLog()
    publish_many(log, 3)
    assert log.since(None) == []


def test_the_current_position_resumes_with_nothing_missed() -> None:
    log = EventLog()
    publish_many(log, 3)
    position = log.position
    assert log.since(position) == []
    later = publish_many(log, 2)
    assert log.since(position) == later


def test_resuming_from_each_point_returns_exactly_the_events_after_it() -> None:
    log = EventLog(capacity=50)
    events = publish_many(log, 30)
    for seen in range(31):
        assert log.since(f"{log.stream}:{seen}") == events[seen:]


def test_a_watcher_resuming_after_each_batch_sees_every_event_once_in_order() -> None:
    log = EventLog(capacity=16)
    received: list[int] = []
    position = log.position
    for batch in (1, 5, 16, 0, 3, 16):
        publish_many(log, batch)
        answer = log.since(position)
        received += seqs(answer)
        position = f"{log.stream}:{received[-1]}" if received else position
    assert received == list(range(1, 42))


def test_a_bare_integer_is_a_position_in_the_current_stream() -> None:
    log = EventLog()
    events = publish_many(log, 4)
    assert log.since("2") == events[2:]
    assert log.since(2) == events[2:]
    assert log.since(0) == events


def test_the_position_just_before_the_oldest_held_event_still_resumes() -> None:
    log = EventLog(capacity=10)
    publish_many(log, 25)
    assert log.oldest == 16
    assert seqs(log.since(15)) == list(range(16, 26))


# history gone


def test_a_position_older_than_the_history_is_gone_with_the_bounds() -> None:
    log = EventLog(capacity=10)
    publish_many(log, 25)
    assert log.since(f"{log.stream}:14") == HistoryGone(stream=log.stream, oldest=16, latest=25)
    assert log.since(0) == HistoryGone(stream=log.stream, oldest=16, latest=25)


def test_a_position_from_another_stream_is_gone_even_if_its_seq_is_held() -> None:
    before_restart = EventLog()
    publish_many(before_restart, 5)
    after_restart = EventLog()
    publish_many(after_restart, 5)
    assert after_restart.since(before_restart.position) == HistoryGone(
        stream=after_restart.stream, oldest=1, latest=5
    )


def test_a_bare_integer_ahead_of_the_latest_is_gone_so_the_watcher_resynchronises() -> None:
    # a watcher that kept a bare seq across a server restart: the new run has not got that far
    log = EventLog()
    publish_many(log, 3)
    assert log.since(7) == HistoryGone(stream=log.stream, oldest=1, latest=3)
    assert log.since(f"{log.stream}:4") == HistoryGone(stream=log.stream, oldest=1, latest=3)


def test_an_empty_log_resumes_only_from_zero() -> None:
    log = EventLog()
    assert log.since(0) == []
    assert log.since(1) == HistoryGone(stream=log.stream, oldest=1, latest=0)


def test_history_gone_gives_the_410_details() -> None:
    gone = HistoryGone(stream="a1b2c3d4e5f60718", oldest=16, latest=25)
    assert gone.details() == HistoryGoneDetails(stream="a1b2c3d4e5f60718", oldest=16, latest=25)


# malformed positions


@pytest.mark.parametrize(
    ("position", "problem"),
    [
        ("", "no sequence number"),
        ("-1", "malformed sequence number"),
        ("abc:x", "malformed sequence number"),
        (":3", "empty stream"),
        ("a/b:3", "malformed stream"),
        (-1, "not a sequence number"),
        (MAX_SEQ + 1, "not a sequence number"),
        (True, "text or an integer"),
        (1.0, "text or an integer"),
    ],
)
def test_a_malformed_position_raises_a_value_error_naming_the_problem(
    position: Any, problem: str
) -> None:
    log = EventLog()
    publish_many(log, 2)
    with pytest.raises(ValueError, match=problem):
        log.since(position)


# subscribers


def test_subscribers_are_told_of_each_event_synchronously_in_order() -> None:
    log = EventLog()
    told: list[tuple[str, int]] = []
    log.subscribe(lambda event: told.append(("first", event.seq)))
    log.subscribe(lambda event: told.append(("second", event.seq)))
    publish(log)
    assert told == [("first", 1), ("second", 1)]
    publish(log)
    assert told[2:] == [("first", 2), ("second", 2)]


def test_a_subscriber_is_told_of_the_event_already_in_the_history() -> None:
    log = EventLog()
    seen: list[list[int]] = []
    log.subscribe(lambda event: seen.append(seqs(log.since(event.seq - 1))))
    publish_many(log, 2)
    assert seen == [[1], [2]]


def test_a_subscriber_that_raises_is_logged_and_the_others_are_still_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = EventLog()
    told: list[int] = []

    def broken(event: TableEvent) -> None:
        raise RuntimeError("watcher queue closed")

    log.subscribe(broken)
    log.subscribe(lambda event: told.append(event.seq))
    with caplog.at_level(logging.ERROR, logger="prefill_bootstrap.service.event_log"):
        event = publish(log)
    assert told == [1]
    assert log.since(0) == [event]
    [record] = caplog.records
    assert f"{log.stream}:1" in record.getMessage()
    assert "watcher queue closed" in record.exc_text


def test_unsubscribed_callbacks_are_no_longer_told() -> None:
    log = EventLog()
    told: list[TableEvent] = []
    log.subscribe(told.append)
    publish(log)
    log.unsubscribe(told.append)
    publish(log)
    assert seqs(told) == [1]
    assert log.subscribers == 0


def test_subscribing_twice_tells_once_and_unsubscribing_a_stranger_does_nothing() -> None:
    log = EventLog()
    told: list[TableEvent] = []
    log.subscribe(told.append)
    log.subscribe(told.append)
    log.unsubscribe(lambda event: None)
    publish(log)
    assert seqs(told) == [1]
    assert log.subscribers == 1


def test_a_subscriber_may_unsubscribe_itself_while_being_told() -> None:
    log = EventLog()
    told: list[int] = []

    def once(event: TableEvent) -> None:
        told.append(event.seq)
        log.unsubscribe(once)

    log.subscribe(once)
    log.subscribe(lambda event: told.append(-event.seq))
    publish_many(log, 2)
    assert told == [1, -1, -2]
