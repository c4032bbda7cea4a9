"""What SGLang's protocol routes answer, as bytes: functions over the registry's state.

Every door calls these through the route table (``routes.py``), so no two can disagree (the
answers of the routes that are ours, not SGLang's, are in ``additions.py``). Each has
the one signature the table declares (``registry, query, body``). Texts and status codes that
SGLang clients read are kept exactly; everything else uses the one JSON error shape.

Bodies are validated by their models in ``shared/protocol.py``. The room routes are the hot path
of every request a decode serves, so a quick check accepts the common, valid body first (about
three times cheaper than the model); whatever it does not accept goes to the model, which names
the problem. ``tests/test_validation_parity.py`` proves the quick checks accept nothing the
models refuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson
from pydantic import ValidationError

from prefill_bootstrap.service.bounds import extra_problem
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import (
    TEXT,
    Reply,
    error_reply,
    invalid_reply,
    reply_for,
    validation_reply,
)
from prefill_bootstrap.service.table import older_server_info
from prefill_bootstrap.shared.errors import (
    CellNotFound,
    ProtocolMismatch,
    TopologyNotAddressable,
)
from prefill_bootstrap.shared.generations import (
    GEN1_QUERY,
    GEN2_QUERY,
    GEN3_QUERY,
    ProtocolGeneration,
    lookup_generation,
    registration_generation,
    to_current,
)
from prefill_bootstrap.shared.protocol import (
    MAX_QUERY_ROOMS,
    MAX_RANK,
    MAX_ROOM,
    Cell,
    DpRankQuery,
    DpRankRegistration,
    RankRegistration,
)

__all__ = [
    "OK",
    "health",
    "query_dp_ranks",
    "query_params",
    "register",
    "register_dp_rank",
    "route_lookup",
]

_LOOKUP_RANK = re.compile(r"-?[0-9]{1,12}")
"""A ``GET /route`` rank: a short integer; one past ``MAX_RANK`` is a cell nobody registered (404,
as SGLang answers), so the lookup needs no bound of its own beyond the digits it reads."""
OK = Reply(200, b"OK", TEXT)
MISSING_INPUTS = Reply(400, b"Missing inputs for bootstrap server.", TEXT)


def query_params(query: bytes) -> dict[str, str]:
    """A raw query string as ``name -> value``; a parameter given empty counts as present."""
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def _invalid(field: str, problem: str, location: str = "body") -> Reply:
    return error_reply(
        422,
        "validation_error",
        f"{location}.{field}: {problem}",
        [{"loc": [location, field], "msg": problem}],
    )


def health(registry: Registry, query: bytes, body: bytes) -> Reply:
    return OK


def _not_ready(registry: Registry) -> Reply:
    registry.metrics.not_ready_responses += 1
    return Reply(
        503,
        b"Prefill server not fully registered yet (%d workers registered)."
        % registry.group.table.live_count,
        TEXT,
    )


def _parse_ranks(params: Mapping[str, str], names: tuple[str, ...]) -> list[int] | Reply:
    raw = [params.get(name, "") for name in names]
    if not all(raw):
        return MISSING_INPUTS
    ranks: list[int] = []
    for name, value in zip(names, raw, strict=True):
        if not _LOOKUP_RANK.fullmatch(value):
            return _invalid(name, f"{value[:32]!r} is not an integer", "query")
        ranks.append(int(value))
    if any(rank != -1 for rank in ranks):
        for name, rank in zip(names, ranks, strict=True):
            if rank < 0:
                return _invalid(
                    name, f"{rank} is negative (only all -1 ask for server info)", "query"
                )
    return ranks


def route_lookup(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``GET /route`` in the generation the query speaks: server info when every rank is ``-1``,
    else one cell's address. The parameters are read by hand: which ones are present (even
    empty) tells the generation, which no model of the query would say."""
    params = query_params(query)
    lookup = lookup_generation(params)
    if lookup is None:
        return MISSING_INPUTS
    pinned = registry.settings.protocol
    if pinned != "auto" and lookup != pinned:
        return reply_for(ProtocolMismatch(pinned, lookup))
    if lookup == "3":
        return _current_lookup(registry, params)
    return _older_lookup(registry, params, lookup)


def _current_lookup(registry: Registry, params: Mapping[str, str]) -> Reply:
    ranks = _parse_ranks(params, GEN3_QUERY)
    if isinstance(ranks, Reply):
        return ranks
    table = registry.group.table
    if not table.is_complete:
        return _not_ready(registry)
    if ranks == [-1, -1, -1, -1]:
        return Reply(200, registry.cache.get("server_info", table.server_info))
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
    return Reply(200, registry.cache.get(cell, record.address.model_dump))


def _older_lookup(registry: Registry, params: Mapping[str, str], lookup: str) -> Reply:
    """Gens 1-2: no readiness gate (their servers had none), sizes under their own key names."""
    names = GEN1_QUERY if lookup == "1" else GEN2_QUERY
    ranks = _parse_ranks(params, names)
    if isinstance(ranks, Reply):
        return ranks
    topology = registry.group.table.topology
    if topology is not None:
        problem = topology.older_decode_problem(lookup)
        if problem is not None:
            return reply_for(TopologyNotAddressable(lookup, problem))
    if all(rank == -1 for rank in ranks):
        return Reply(
            200,
            registry.cache.get(
                ("server_info", lookup), lambda: older_server_info(topology, lookup)
            ),
        )
    if lookup == "1":
        engine_rank, dp_group = ranks
        # 1a decodes send their global tp rank, 1b decodes the rank inside the group: the
        # remainder serves both (tests/golden/README.md, case A).
        tp_rank = engine_rank % topology.attn_tp_size if topology else engine_rank
        cell = Cell(dp_group, 0, tp_rank, 0)
    else:
        engine_rank, dp_group, pp_rank = ranks
        cell = Cell(dp_group, 0, engine_rank, pp_rank)
    try:
        record = registry.group.table.lookup(cell)
    except CellNotFound:
        return error_reply(
            404,
            "cell_not_found",
            f"Bootstrap info not found for target_dp_group={dp_group} engine_rank={engine_rank}"
            + (f" target_pp_rank={cell.pp}" if lookup == "2" else ""),
        )
    return Reply(200, registry.cache.get(cell, record.address.model_dump))


def _loads(body: bytes) -> Any:
    """The body as JSON, or None when it is not (the model then says why)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _is_room(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_ROOM


def quick_room_registration(body: bytes) -> tuple[int, int] | None:
    """``(room, dp_rank)`` of a valid ``DpRankRegistration`` body, or None: ask the model."""
    data = _loads(body)
    if type(data) is not dict:
        return None
    room, dp_rank = data.get("bootstrap_room"), data.get("dp_rank")
    if _is_room(room) and type(dp_rank) is int and 0 <= dp_rank <= MAX_RANK:
        return room, dp_rank
    return None


def quick_room_query(body: bytes) -> list[int] | None:
    """The rooms of a valid ``DpRankQuery`` body, or None: ask the model."""
    data = _loads(body)
    if type(data) is not dict:
        return None
    rooms = data.get("bootstrap_rooms")
    if type(rooms) is list and len(rooms) <= MAX_QUERY_ROOMS and all(map(_is_room, rooms)):
        return rooms
    return None


def register_dp_rank(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``POST /register_dp_rank``: remember which dp rank serves a room."""
    quick = quick_room_registration(body)
    if quick is None:
        try:
            model = DpRankRegistration.model_validate_json(body)
        except ValidationError as exc:
            return invalid_reply(exc, "body")
        quick = model.bootstrap_room, model.dp_rank
    registry.rooms.register(*quick, registry.clock())
    return OK


def query_dp_ranks(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``POST /query_dp_ranks``: the dp rank of each known room."""
    rooms = quick_room_query(body)
    if rooms is None:
        try:
            rooms = DpRankQuery.model_validate_json(body).bootstrap_rooms
        except ValidationError as exc:
            return invalid_reply(exc, "body")
    return Reply(200, orjson.dumps(registry.rooms.query(rooms, registry.clock())))


def parse_registration(
    body: bytes, pinned: str
) -> tuple[RankRegistration | None, ProtocolGeneration] | Reply:
    """A ``PUT /route`` body of any protocol generation as a current registration (None for a
    gen 1-2 role other than Prefill, which SGLang acknowledged and ignored), or the error reply.
    The content type is ignored: SGLang's own server reads any body as JSON."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return validation_reply(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"Invalid JSON: {exc}"}]
        )
    protocol = registration_generation(data) if isinstance(data, dict) else "3"
    if pinned != "auto" and not protocol.startswith(pinned):
        return reply_for(ProtocolMismatch(pinned, protocol))
    try:
        registration = to_current(data, protocol)
    except ValidationError as exc:
        return invalid_reply(exc, "body")
    if registration is not None:
        beyond = extra_problem(registration)
        if beyond is not None:
            return _invalid(*beyond)
    return registration, protocol


def _group_too_big(registration: RankRegistration, cap: int) -> Reply | None:
    """Each size is bounded on its own; their product, the cells the table must hold and
    report, is bounded here (``--max-cells``)."""
    dp_name = "attn_dp_size" if registration.system_dp_size == 1 else "system_dp_size"
    sizes = {
        dp_name: registration.dp_size,
        "attn_cp_size": registration.attn_cp_size,
        "attn_tp_size": registration.attn_tp_size,
        "pp_size": registration.pp_size,
    }
    cells = 1
    for size in sizes.values():
        cells *= size
    if cells <= cap:
        return None
    product = " x ".join(f"{name}={size}" for name, size in sizes.items())
    problem = (
        f"{product} makes a group of {cells} cells, more than the server's cap of {cap} "
        "(--max-cells / PREFILL_BOOTSTRAP_MAX_CELLS)"
    )
    return error_reply(
        422,
        "validation_error",
        f"body: {problem}",
        [{"loc": ["body", name], "msg": problem, "type": "too_many_cells"} for name in sizes],
    )


async def register(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``PUT /route``: 200 ``OK`` once the registration is durable, else the error reply (a
    ``TopologyConflict`` or ``StateStoreError`` raised here is answered by the pipeline)."""
    parsed = parse_registration(body, registry.settings.protocol)
    if isinstance(parsed, Reply):
        return parsed
    registration, protocol = parsed
    if registration is None:
        return OK
    too_big = _group_too_big(registration, registry.settings.max_cells)
    if too_big is not None:
        return too_big
    await registry.group.register(registration, protocol=protocol)
    return OK
