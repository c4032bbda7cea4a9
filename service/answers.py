"""What the protocol's hot routes answer, as bytes: pure functions over the registry's state.

Both the lean ASGI path (``service/fastpath.py``) and the FastAPI routes (``service/app.py``) call
these, so the two can never disagree. Texts and status codes that SGLang clients read are kept
exactly; everything else uses the one JSON error shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from prefill_bootstrap.client.errors import CellNotFound
from prefill_bootstrap.client.protocol import MAX_ROOM, Cell
from prefill_bootstrap.service.registry import Registry

__all__ = [
    "JSON",
    "TEXT",
    "Reply",
    "error_reply",
    "health",
    "query_dp_ranks",
    "register_dp_rank",
    "route_lookup",
]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
_INTEGER = re.compile(r"-?[0-9]{1,12}")
ROUTE_PARAMS = ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank")


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = JSON


OK = Reply(200, b"OK", TEXT)


def error_reply(
    status: int, error: str, message: str, details: list[dict[str, Any]] | None = None
) -> Reply:
    body = {"error": error, "message": message, "details": details or []}
    return Reply(status, orjson.dumps(body))


def _invalid(field: str, problem: str, location: str = "body") -> Reply:
    return error_reply(
        422,
        "validation_error",
        f"{location}.{field}: {problem}",
        [{"loc": [location, field], "msg": problem}],
    )


def health() -> Reply:
    return OK


def _not_ready(registry: Registry) -> Reply:
    registry.metrics.not_ready_responses += 1
    return Reply(
        503,
        b"Prefill server not fully registered yet (%d workers registered)."
        % registry.table.live_count,
        TEXT,
    )


def route_lookup(registry: Registry, params: Mapping[str, str]) -> Reply:
    """``GET /route``: server info for all ``-1``, else one cell's address."""
    raw = [params.get(name, "") for name in ROUTE_PARAMS]
    if not all(raw):
        return Reply(400, b"Missing inputs for bootstrap server.", TEXT)
    ranks: list[int] = []
    for name, value in zip(ROUTE_PARAMS, raw, strict=True):
        if not _INTEGER.fullmatch(value):
            return _invalid(name, f"{value[:32]!r} is not an integer", "query")
        ranks.append(int(value))
    table = registry.table
    if ranks == [-1, -1, -1, -1]:
        if not table.is_complete:
            return _not_ready(registry)
        return Reply(200, registry.cached("server_info", table.server_info))
    for name, rank in zip(ROUTE_PARAMS, ranks, strict=True):
        if rank < 0:
            return _invalid(name, f"{rank} is negative (only all four -1 ask for server info)")
    if not table.is_complete:
        return _not_ready(registry)
    cell = Cell(*ranks)
    try:
        record = table.lookup(cell)
    except CellNotFound:
        return Reply(
            404,
            ("Bootstrap info not found for dp_rank={} cp_rank={} tp_rank={} pp_rank={}")
            .format(*cell)
            .encode(),
            TEXT,
        )
    return Reply(200, registry.cached(cell, record.address.model_dump))


def _parse_object(body: bytes) -> dict[str, Any] | Reply:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error_reply(400, "invalid_json", f"the request body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return error_reply(422, "validation_error", "the request body must be a JSON object")
    return data


def _room(value: Any) -> int | None:
    if type(value) is int and 0 <= value <= MAX_ROOM:
        return value
    return None


def register_dp_rank(registry: Registry, body: bytes, now: float) -> Reply:
    data = _parse_object(body)
    if isinstance(data, Reply):
        return data
    if "bootstrap_room" not in data:
        return _invalid("bootstrap_room", "field required")
    if "dp_rank" not in data:
        return _invalid("dp_rank", "field required")
    room = _room(data["bootstrap_room"])
    if room is None:
        return _invalid("bootstrap_room", "must be an integer from 0 to 2**63-1")
    dp_rank = data["dp_rank"]
    if type(dp_rank) is not int or dp_rank < 0:
        return _invalid("dp_rank", "must be a non-negative integer")
    registry.rooms.register(room, dp_rank, now)
    return OK


def query_dp_ranks(registry: Registry, body: bytes, now: float) -> Reply:
    data = _parse_object(body)
    if isinstance(data, Reply):
        return data
    rooms = data.get("bootstrap_rooms")
    if rooms is None:
        return _invalid("bootstrap_rooms", "field required")
    if not isinstance(rooms, list):
        return _invalid("bootstrap_rooms", "must be a list of integers")
    for index, value in enumerate(rooms):
        if _room(value) is None:
            return _invalid(f"bootstrap_rooms[{index}]", "must be an integer from 0 to 2**63-1")
    return Reply(200, orjson.dumps(registry.rooms.query(rooms, now)))
