"""The change feed's wire models: every kind survives JSON both ways, positions parse strictly.

What the server writes onto ``/prefill_port_table/events`` the client must read back unchanged,
and a position (``<stream>:<seq>``) must either mean exactly one point of the feed or be refused
with a message that says what is wrong with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from prefill_bootstrap.shared.events import (
    EVENT_KINDS,
    MAX_SEQ,
    EventPage,
    EventPosition,
    HistoryGoneDetails,
    TableEvent,
    format_position,
    parse_position,
)
from prefill_bootstrap.shared.protocol import Cell, RankAddress

OLD = RankAddress(rank_ip="10.0.1.4", rank_port=41003)
NEW = RankAddress(rank_ip="10.0.1.4", rank_port=41107)

# One realistic event per kind: the fields each kind carries (the others stay null).
EXAMPLES: dict[str, dict[str, Any]] = {
    "registered": {"cell": Cell(0, 0, 1, 0), "address": OLD, "address_version": 1},
    "moved": {"cell": Cell(1, 0, 3, 0), "address": NEW, "previous": OLD, "address_version": 2},
    "expired": {"cell": Cell(0, 0, 0, 0), "address": OLD, "address_version": 1},
    "renewed": {"cell": Cell(0, 0, 0, 0), "address": OLD, "address_version": 1},
    "left": {"cell": Cell(0, 1, 0, 0), "address": OLD, "address_version": 1},
    "complete": {},
    "incomplete": {},
    "reset": {"detail": "previous instance 3f2a9c"},
    "conflict": {"cell": Cell(0, 0, 0, 0), "address": NEW, "detail": "attn_tp_size: 2 != 4"},
}


def event(kind: str, seq: int = 7, **fields: Any) -> TableEvent:
    return TableEvent(
        seq=seq,
        kind=kind,  # type: ignore[arg-type]
        instance_id="group-1",
        incarnation="group-1.2",
        at=1764650584.25,
        **{**EXAMPLES[kind], **fields},
    )


def test_the_examples_cover_every_kind() -> None:
    assert set(EXAMPLES) == set(EVENT_KINDS)


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_every_kind_round_trips_through_json_unchanged(kind: str) -> None:
    original = event(kind)
    assert TableEvent.model_validate_json(original.model_dump_json()) == original


def test_an_event_serialises_cells_as_lists_and_absent_fields_as_null() -> None:
    dumped = event("moved").model_dump(mode="json")
    assert dumped == {
        "seq": 7,
        "kind": "moved",
        "instance_id": "group-1",
        "incarnation": "group-1.2",
        "at": 1764650584.25,
        "cell": [1, 0, 3, 0],
        "address": {"rank_ip": "10.0.1.4", "rank_port": 41107},
        "previous": {"rank_ip": "10.0.1.4", "rank_port": 41003},
        "address_version": 2,
        "detail": None,
    }
    assert event("complete").model_dump(mode="json")["cell"] is None


def test_an_event_read_back_has_a_typed_cell() -> None:
    read = TableEvent.model_validate_json(event("left").model_dump_json())
    assert read.cell == Cell(dp=0, cp=1, tp=0, pp=0)
    assert read.address == OLD


def test_an_unknown_kind_is_refused_naming_the_field() -> None:
    body = {**event("complete").model_dump(mode="json"), "kind": "renamed"}
    with pytest.raises(ValidationError, match="kind"):
        TableEvent.model_validate(body)


@pytest.mark.parametrize("seq", [0, -1, "3", 1.0, True])
def test_an_event_seq_is_a_strict_integer_from_one(seq: Any) -> None:
    with pytest.raises(ValidationError, match="seq"):
        event("complete", seq=seq)


def test_an_event_is_frozen_so_subscribers_cannot_change_what_others_see() -> None:
    with pytest.raises(ValidationError):
        event("complete").seq = 8  # type: ignore[misc]


def test_the_long_poll_page_round_trips_with_its_events() -> None:
    page = EventPage(
        stream="a1b2c3d4e5f60718",
        seq=8,
        instance_id="group-1",
        incarnation="group-1.2",
        events=[event("moved", seq=7), event("complete", seq=8)],
    )
    assert EventPage.model_validate_json(page.model_dump_json()) == page
    assert set(page.model_dump()) == {"stream", "seq", "instance_id", "incarnation", "events"}


def test_the_history_gone_details_carry_stream_oldest_and_latest() -> None:
    details = HistoryGoneDetails(stream="a1b2c3d4e5f60718", oldest=4000, latest=8095)
    assert details.model_dump() == {"stream": "a1b2c3d4e5f60718", "oldest": 4000, "latest": 8095}
    assert HistoryGoneDetails.model_validate_json(details.model_dump_json()) == details


def test_a_position_is_the_stream_and_seq_joined_by_a_colon() -> None:
    assert format_position("a1b2c3d4e5f60718", 12) == "a1b2c3d4e5f60718:12"
    assert parse_position("a1b2c3d4e5f60718:12") == EventPosition("a1b2c3d4e5f60718", 12)


def test_a_bare_integer_position_names_no_stream() -> None:
    assert parse_position("12") == EventPosition(None, 12)
    assert parse_position("0") == EventPosition(None, 0)


def test_the_largest_seq_parses_and_one_more_does_not() -> None:
    assert parse_position(f"s:{MAX_SEQ}").seq == MAX_SEQ
    with pytest.raises(ValueError, match="malformed sequence number"):
        parse_position(f"s:{MAX_SEQ + 1}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no sequence number"),
        ("abc:", "no sequence number"),
        (":12", "empty stream"),
        ("abc", "malformed sequence number"),
        ("abc:-1", "malformed sequence number"),
        ("-1", "malformed sequence number"),
        ("+1", "malformed sequence number"),
        (" 1", "malformed sequence number"),
        ("abc:1.5", "malformed sequence number"),
        ("abc:١٢", "malformed sequence number"),  # Arabic-Indic digits: int() would take them
        ("abc:0x10", "malformed sequence number"),
        ("a b:1", "malformed stream"),
        ("a:b:1", "malformed stream"),
        ("x" * 65 + ":1", "malformed stream"),
    ],
)
def test_a_malformed_position_is_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as raised:
        parse_position(text)
    assert "expected '<stream>:<seq>'" in str(raised.value)


def test_a_huge_malformed_position_is_quoted_short_in_the_message() -> None:
    with pytest.raises(ValueError) as raised:
        parse_position("x" * 100_000)
    assert len(str(raised.value)) < 500
