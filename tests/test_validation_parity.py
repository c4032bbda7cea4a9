"""The room routes' quick checks and the models in ``shared/protocol.py`` are one validation: a
body the quick check accepts, the model accepts with the same values (so the model is the one
source of truth, and the quick check only saves the hot path its cost). Every body the quick
check does not accept is answered by the model's own errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from prefill_bootstrap.service.answers import quick_room_query, quick_room_registration
from prefill_bootstrap.shared.protocol import (
    MAX_QUERY_ROOMS,
    MAX_RANK,
    MAX_ROOM,
    DpRankQuery,
    DpRankRegistration,
)

EDGES = [0, 1, -1, MAX_RANK, MAX_RANK + 1, MAX_ROOM, MAX_ROOM + 1, 1.0, True, False, "1", None]
REGISTRATIONS: list[Any] = [
    *({"bootstrap_room": room, "dp_rank": 0} for room in EDGES),
    *({"bootstrap_room": 0, "dp_rank": rank} for rank in EDGES),
    {"bootstrap_room": 1},
    {"dp_rank": 1},
    {"bootstrap_room": 1, "dp_rank": 2, "extra": "kept out"},
    [1, 2],
    "room",
    None,
]
QUERIES: list[Any] = [
    *({"bootstrap_rooms": [room]} for room in EDGES),
    {"bootstrap_rooms": []},
    {"bootstrap_rooms": [1] * MAX_QUERY_ROOMS},
    {"bootstrap_rooms": [1] * (MAX_QUERY_ROOMS + 1)},
    {"bootstrap_rooms": 5},
    {"bootstrap_rooms": None},
    {},
    [[1]],
]


def _dumps(data: Any) -> bytes:
    return json.dumps(data).encode()  # orjson refuses integers past 64 bits; a client may not


def _model(model: Any, body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None


def _registration_agrees(body: bytes) -> None:
    quick = quick_room_registration(body)
    model = _model(DpRankRegistration, body)
    if quick is not None:
        assert model is not None and quick == (model.bootstrap_room, model.dp_rank)


def _query_agrees(body: bytes) -> None:
    quick = quick_room_query(body)
    model = _model(DpRankQuery, body)
    if quick is not None:
        assert model is not None and quick == model.bootstrap_rooms


@pytest.mark.parametrize("data", REGISTRATIONS, ids=repr)
def test_the_quick_room_registration_accepts_only_what_the_model_accepts(data: Any) -> None:
    body = _dumps(data)
    _registration_agrees(body)
    valid = _model(DpRankRegistration, body) is not None
    assert (quick_room_registration(body) is not None) == valid  # and it is not stricter


@pytest.mark.parametrize("data", QUERIES, ids=lambda d: repr(d)[:40])
def test_the_quick_room_query_accepts_only_what_the_model_accepts(data: Any) -> None:
    body = _dumps(data)
    _query_agrees(body)
    assert (quick_room_query(body) is not None) == (_model(DpRankQuery, body) is not None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)  # fmt: skip
rooms = st.one_of(st.integers(-2, 2), st.integers(MAX_ROOM - 1, MAX_ROOM + 1), json_values)


@given(room=rooms, rank=st.one_of(st.integers(-1, MAX_RANK + 1), json_values))
@settings(max_examples=300, deadline=None)
def test_any_room_registration_is_judged_alike(room: Any, rank: Any) -> None:
    _registration_agrees(_dumps({"bootstrap_room": room, "dp_rank": rank}))


@given(st.lists(rooms, max_size=4))
@settings(max_examples=300, deadline=None)
def test_any_room_query_is_judged_alike(values: list[Any]) -> None:
    _query_agrees(_dumps({"bootstrap_rooms": values}))
