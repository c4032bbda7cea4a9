"""What the protocol's hot routes answer, as bytes: pure functions over the registry's state.

Both the lean ASGI path (``service/fastpath.py``) and the FastAPI routes (``service/app.py``) call
these, so the two can never disagree. Texts and status codes that SGLang clients read are kept
exactly; everything else uses the one JSON error shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

import orjson
from annotated_types import Ge, Le
from pydantic import TypeAdapter, ValidationError

from prefill_bootstrap.service.bounds import extra_problem
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import (
    TEXT,
    Reply,
    error_reply,
    reply_for,
    validation_reply,
)
from prefill_bootstrap.service.report import readiness, table_report
from prefill_bootstrap.service.table import older_server_info
from prefill_bootstrap.shared.errors import (
    CellNotFound,
    ProtocolMismatch,
    StateStoreError,
    TopologyConflict,
)
from prefill_bootstrap.shared.generations import (
    GEN1_QUERY,
    GEN2_QUERY,
    GEN3_QUERY,
    RELEASES,
    Generation,
    lookup_generation,
    registration_generation,
    to_current,
)
from prefill_bootstrap.shared.protocol import (
    MAX_QUERY_ROOMS,
    MAX_RANK,
    MAX_ROOM,
    Cell,
    RankRegistration,
)

__all__ = [
    "WaitSeconds",
    "health",
    "long_poll_seconds",
    "parse_registration",
    "port_table",
    "query_dp_ranks",
    "ready",
    "register",
    "register_dp_rank",
    "route_lookup",
]

_INTEGER = re.compile(r"-?[0-9]{1,12}")
OK = Reply(200, b"OK", TEXT)
MISSING_INPUTS = Reply(400, b"Missing inputs for bootstrap server.", TEXT)


def _invalid(field: str, problem: str, location: str = "body") -> Reply:
    return error_reply(
        422,
        "validation_error",
        f"{location}.{field}: {problem}",
        [{"loc": [location, field], "msg": problem}],
    )


def health() -> Reply:
    return OK


WaitSeconds = Annotated[float, Ge(0), Le(3600)]
"""``?wait=`` of ``/ready`` and ``/prefill_port_table``: the one declaration both doors check
(the FastAPI routes and their OpenAPI schema, and the lean door)."""
_WAIT_SECONDS: TypeAdapter[float] = TypeAdapter(WaitSeconds)


def long_poll_seconds(params: Mapping[str, str]) -> float | Reply:
    """How long a read may wait for the table to complete (0 when not asked), or the 422."""
    raw = params.get("wait")
    if raw is None:
        return 0.0
    try:
        return _WAIT_SECONDS.validate_strings(raw)
    except ValidationError as exc:
        return validation_reply([{**error, "loc": ("query", "wait")} for error in exc.errors()])


def ready(registry: Registry) -> Reply:
    """``GET /ready``: 200 once every cell is live, else 503 naming what is missing. One
    serialisation per state of the group, shared by every waiter and probe."""
    registry.group.expire_leases()
    body = registry.cache.get("ready", lambda: readiness(registry))
    return Reply(200 if registry.group.table.is_complete else 503, body)


def port_table(registry: Registry) -> Reply:
    """``GET /prefill_port_table``: the whole table (always 200)."""
    registry.group.expire_leases()
    return Reply(200, registry.cache.get("table", lambda: table_report(registry)))


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
        if not _INTEGER.fullmatch(value):
            return _invalid(name, f"{value[:32]!r} is not an integer", "query")
        ranks.append(int(value))
    if any(rank != -1 for rank in ranks):
        for name, rank in zip(names, ranks, strict=True):
            if rank < 0:
                return _invalid(
                    name, f"{rank} is negative (only all -1 ask for server info)", "query"
                )
    return ranks


def route_lookup(registry: Registry, params: Mapping[str, str]) -> Reply:
    """``GET /route`` in the generation the query speaks: server info when every rank is ``-1``,
    else one cell's address."""
    generation = lookup_generation(params)
    if generation is None:
        return MISSING_INPUTS
    pinned = registry.settings.protocol
    if pinned != "auto" and generation != pinned:
        return error_reply(
            400,
            "protocol_mismatch",
            f"this server speaks only bootstrap protocol generation {pinned} "
            f"({RELEASES[pinned]}; --protocol); the query is generation {generation} "
            f"({RELEASES[generation]})",
        )
    if generation == "3":
        return _current_lookup(registry, params)
    return _older_lookup(registry, params, generation)


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


def _older_lookup(registry: Registry, params: Mapping[str, str], generation: str) -> Reply:
    """Gens 1-2: no readiness gate (their servers had none), sizes under their own key names."""
    names = GEN1_QUERY if generation == "1" else GEN2_QUERY
    ranks = _parse_ranks(params, names)
    if isinstance(ranks, Reply):
        return ranks
    topology = registry.group.table.topology
    if topology is not None:
        problem = topology.older_decode_problem(generation)
        if problem is not None:
            return error_reply(409, "protocol_mismatch", problem)
    if all(rank == -1 for rank in ranks):
        return Reply(
            200,
            registry.cache.get(
                ("server_info", generation), lambda: older_server_info(topology, generation)
            ),
        )
    if generation == "1":
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
            + (f" target_pp_rank={cell.pp}" if generation == "2" else ""),
        )
    return Reply(200, registry.cache.get(cell, record.address.model_dump))


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
    if type(dp_rank) is not int or not 0 <= dp_rank <= MAX_RANK:
        return _invalid("dp_rank", f"must be an integer from 0 to {MAX_RANK}")
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
    if len(rooms) > MAX_QUERY_ROOMS:
        return _invalid("bootstrap_rooms", f"at most {MAX_QUERY_ROOMS} rooms per query")
    for index, value in enumerate(rooms):
        if _room(value) is None:
            return _invalid(f"bootstrap_rooms[{index}]", "must be an integer from 0 to 2**63-1")
    return Reply(200, orjson.dumps(registry.rooms.query(rooms, now)))


def parse_registration(
    body: bytes, pinned: str
) -> tuple[RankRegistration | None, Generation] | Reply:
    """A ``PUT /route`` body of any protocol generation as a current registration (None for a
    gen 1-2 role other than Prefill, which SGLang acknowledged and ignored), or the error reply.
    The content type is ignored: SGLang's own server reads any body as JSON."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return validation_reply(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"Invalid JSON: {exc}"}]
        )
    generation = registration_generation(data) if isinstance(data, dict) else "3"
    if pinned != "auto" and not generation.startswith(pinned):
        return reply_for(ProtocolMismatch(pinned, generation))
    try:
        registration = to_current(data, generation)
    except ValidationError as exc:
        return validation_reply(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        )
    if registration is not None:
        beyond = extra_problem(registration)
        if beyond is not None:
            return _invalid(*beyond)
    return registration, generation


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


async def register(registry: Registry, body: bytes) -> Reply:
    """``PUT /route``: 200 ``OK`` once the registration is durable, else the error reply."""
    parsed = parse_registration(body, registry.settings.protocol)
    if isinstance(parsed, Reply):
        return parsed
    registration, generation = parsed
    if registration is None:
        return OK
    too_big = _group_too_big(registration, registry.settings.max_cells)
    if too_big is not None:
        return too_big
    try:
        await registry.group.register(registration, generation)
    except (TopologyConflict, StateStoreError) as exc:
        return reply_for(exc)
    return OK
