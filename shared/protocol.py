"""The bootstrap wire protocol, defined once for both sides.

The shapes follow SGLang's current bootstrap protocol (``PUT /route`` registrations, ``GET /route``
lookups, dp-rank rooms) so unmodified SGLang workers can talk to our server. Bounds live on the
models, so every malformed input becomes a 422 that names the field instead of a 500 deep inside
the server. Integers are strict: ``"4"`` or ``true`` where a size is expected is a client bug that
should surface, not be coerced.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_PORT",
    "DEREGISTER_PATH",
    "EVENTS_PATH",
    "HEALTH_PATH",
    "HEARTBEAT_PATH",
    "INSTANCE_HEADER",
    "MAX_BODY_BYTES",
    "MAX_QUERY_ROOMS",
    "MAX_RANK",
    "MAX_ROOM",
    "OPTIONAL_INFO_KEYS",
    "READY_PATH",
    "ROUTE_PATH",
    "SERVER_INFO_QUERY",
    "TABLE_PATH",
    "Cell",
    "CellReport",
    "ConflictReport",
    "Deregistered",
    "Deregistration",
    "DpRankQuery",
    "DpRankRegistration",
    "ErrorBody",
    "Heartbeat",
    "RankAddress",
    "RankRegistration",
    "ReadyReport",
    "ReplacementReport",
    "RowReport",
    "TableReport",
    "TopologyReport",
    "incarnation_of",
    "instance_of",
]

DEFAULT_PORT = 8998
"""SGLang's default ``--disaggregation-bootstrap-port``; the sidecar and the engine agree on it."""

ROUTE_PATH = "/route"
HEALTH_PATH = "/health"
READY_PATH = "/ready"
TABLE_PATH = "/prefill_port_table"
HEARTBEAT_PATH = "/heartbeat"
DEREGISTER_PATH = "/deregister"
INSTANCE_HEADER = "x-sglang-disaggregation-instance-id"
"""On every answer of our server: the group's incarnation (``incarnation_of``): it changes on a
reset and whenever a cell moves to another address or leaves, so a decode that compares it
drops its cached addresses exactly when they may be stale."""
MAX_BODY_BYTES = 1 << 20
MAX_ROOM = (1 << 63) - 1
EVENTS_PATH = "/prefill_port_table/events"
SERVER_INFO_QUERY = {
    "prefill_dp_rank": "-1",
    "prefill_cp_rank": "-1",
    "target_tp_rank": "-1",
    "target_pp_rank": "-1",
}


def incarnation_of(instance_id: str, address_changes: int) -> str:
    """The incarnation: the instance id while no cell of the group changed address, else
    ``<instance_id>.<n>`` after n moves or removals (instance ids never hold a dot)."""
    return instance_id if address_changes == 0 else f"{instance_id}.{address_changes}"


def instance_of(incarnation: str) -> str:
    """The stable group id an incarnation belongs to (``incarnation_of`` undone): a rank asks
    whether the *group* was reset, which a cell moving does not do."""
    return incarnation.partition(".")[0]


OPTIONAL_INFO_KEYS = (
    "enable_dsa_cache_layer_split",
    "enable_kv_cache_sharding",
    "kv_layout",
    "dsv41_spec_layout",
    "decode_allocation_policy",
    "prefill_http_port",
)
"""Server-info keys that newer SGLang releases add; echoed only when the prefill carried them."""

MAX_RANK = 1 << 20
"""Largest size or rank any field accepts: far beyond any real group, small enough to store."""
MAX_QUERY_ROOMS = 65536
"""Most rooms one ``POST /query_dp_ranks`` may ask about."""
Size = Annotated[StrictInt, Field(ge=1, le=MAX_RANK)]
Rank = Annotated[StrictInt, Field(ge=0, le=MAX_RANK)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
_RANK_OF_SIZE = {
    "attn_tp_rank": "attn_tp_size",
    "attn_cp_rank": "attn_cp_size",
    "attn_dp_rank": "attn_dp_size",
    "pp_rank": "pp_size",
    "system_dp_rank": "system_dp_size",
}
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def rank_host(value: str) -> str:
    """An IP literal (IPv6 without brackets; answered in its normal form) or an RFC 1123 host
    name. Anything else would be served to decodes as is, to fail far from its cause."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        zone = getattr(address, "scope_id", None)
        if zone is not None and not _ZONE.fullmatch(zone):
            raise ValueError(f"{value[:64]!r} has an invalid IPv6 zone (interface name)")
        return str(address)
    if value.startswith("[") or value.count(":") == 1:
        raise ValueError(
            f"{value[:64]!r} is not an IP address or host name: give an IPv6 address without "
            "brackets and the port in rank_port"
        )
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{value[:64]!r} is neither an IP address nor an RFC 1123 host name (letters, "
            "digits and '-' in dot-separated labels of 1-63 characters)"
        )
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{value[:64]!r} is not a valid IPv4 address")
    return value


Host = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(rank_host)]


class Cell(NamedTuple):
    """One slot of the port table: (dp group, attention-cp rank, attention-tp rank, pp rank)."""

    dp: int
    cp: int
    tp: int
    pp: int


def rank_inside_its_size(cls: type, rank: int, info: ValidationInfo) -> int:
    """Field validator for ``*_rank`` fields; each model's size field is declared before its rank,
    so the size is already in ``info.data`` (and the 422 names the rank field)."""
    size_field = _RANK_OF_SIZE[info.field_name or ""]
    size = info.data.get(size_field)
    if size is not None and rank >= size:
        raise ValueError(
            f"{info.field_name}={rank} is outside {size_field}={size} "
            f"(ranks count from 0 to {size_field}-1)"
        )
    return rank


class RankAddress(BaseModel):
    """Where one rank's KV-transfer endpoint listens (SGLang's ``PrefillRankInfo``)."""

    model_config = ConfigDict(frozen=True)

    rank_ip: str
    rank_port: int


class RankRegistration(BaseModel):
    """The body of ``PUT /route``: one prefill rank announcing its cell and address.

    Fields newer SGLang releases add are accepted and kept (``extra="allow"``) so a sidecar older
    than its engine never rejects a registration.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    attn_tp_size: Size
    attn_tp_rank: Rank
    attn_cp_size: Size
    attn_cp_rank: Rank
    attn_dp_size: Size
    attn_dp_rank: Rank
    pp_size: Size
    pp_rank: Rank
    system_dp_size: Size
    system_dp_rank: Rank
    rank_ip: Host
    rank_port: Port
    page_size: Annotated[StrictInt, Field(ge=1)] | None
    kv_cache_dtype: Annotated[str, Field(min_length=1, max_length=64)] | None
    load_balance_method: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    enable_dsa_cache_layer_split: StrictBool | None = None
    enable_kv_cache_sharding: StrictBool | None = None
    kv_layout: Annotated[str, Field(max_length=64)] | None = None
    dsv41_spec_layout: dict[str, Any] | None = None
    decode_allocation_policy: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    prefill_http_port: Port | None = None
    lease_seconds: Annotated[float, Field(gt=0, le=86400, strict=True)] | None = Field(
        None,
        description="ours, not SGLang's: the cell expires unless renewed via POST /heartbeat "
        "within this many seconds; absent means it never expires",
    )

    _ranks_inside_sizes = field_validator(*_RANK_OF_SIZE, mode="after")(rank_inside_its_size)

    @property
    def dp_group(self) -> int:
        """SGLang's rule: the attention-dp rank unless the system runs several dp groups."""
        return self.attn_dp_rank if self.system_dp_size == 1 else self.system_dp_rank

    @property
    def dp_size(self) -> int:
        return self.attn_dp_size if self.system_dp_size == 1 else self.system_dp_size

    @property
    def cell(self) -> Cell:
        return Cell(self.dp_group, self.attn_cp_rank, self.attn_tp_rank, self.pp_rank)

    @property
    def address(self) -> RankAddress:
        return RankAddress(rank_ip=self.rank_ip, rank_port=self.rank_port)

    def carried_keys(self) -> frozenset[str]:
        """The optional keys this rank's release put on the wire (even if null)."""
        return frozenset(self.model_fields_set) | frozenset(self.model_extra or {})

    def wire(self) -> dict[str, Any]:
        """The JSON body exactly as this rank would send it (unset optional keys left out)."""
        return self.model_dump(mode="json", exclude_unset=True)


class Heartbeat(BaseModel):
    """``POST /heartbeat``: a leased rank renews its cell (cheap: nothing is written to disk)."""

    dp: Rank
    cp: Rank
    tp: Rank
    pp: Rank
    rank_ip: Host
    rank_port: Port

    @property
    def cell(self) -> Cell:
        return Cell(self.dp, self.cp, self.tp, self.pp)

    @property
    def address(self) -> RankAddress:
        return RankAddress(rank_ip=self.rank_ip, rank_port=self.rank_port)


class Deregistration(Heartbeat):
    """``POST /deregister``: a rank takes its own cell out of the group (a clean shutdown). The
    heartbeat's shape: the cell, and the address that must hold it."""


class Deregistered(BaseModel):
    """``POST /deregister``'s answer, once the removal is durable."""

    cell: Cell
    address: RankAddress = Field(description="the address that left")
    registered: int = Field(description="cells registered now")
    expected: int | None = Field(description="cells of the topology")
    complete: bool = Field(description="false: the group lacks the cell that left")
    incarnation: str = Field(description="X-SGLang-Disaggregation-Instance-ID from now on")


class DpRankRegistration(BaseModel):
    """``POST /register_dp_rank``: which prefill dp rank serves a bootstrap room."""

    bootstrap_room: Annotated[StrictInt, Field(ge=0, le=MAX_ROOM)]
    dp_rank: Rank


class DpRankQuery(BaseModel):
    """``POST /query_dp_ranks``: the dp rank of each room (unknown rooms are left out)."""

    bootstrap_rooms: Annotated[
        list[Annotated[StrictInt, Field(ge=0, le=MAX_ROOM)]], Field(max_length=MAX_QUERY_ROOMS)
    ]


class ErrorBody(BaseModel):
    """The one JSON error shape of every non-SGLang error answer."""

    error: str = Field(description="machine-readable kind, e.g. validation_error, conflict")
    message: str = Field(description="a sentence for humans: what happened and what to do")
    details: list[dict[str, Any]] = Field(default_factory=list)


DEPRECATED_GENERATION = (
    "deprecated: address_version's old name, always the same value; removed in the next release"
)


def address_version_from_generation(cls: type, data: Any) -> Any:
    """A server older than the ``address_version`` rename sends only ``generation``: read it as
    the address version, so this client reads either release."""
    if isinstance(data, dict) and "address_version" not in data and "generation" in data:
        return {**data, "address_version": data["generation"]}
    return data


class TopologyReport(BaseModel):
    dp_size: int
    attn_cp_size: int
    attn_tp_size: int
    pp_size: int
    page_size: int | None
    kv_cache_dtype: str | None


class CellReport(BaseModel):
    dp: int
    cp: int
    tp: int
    pp: int
    rank_ip: str
    rank_port: int
    first_registered_at: float = Field(description="unix seconds of the cell's first registration")
    last_registered_at: float = Field(description="unix seconds of the latest registration")
    address_version: int = Field(description="1 at first registration, +1 per address change")
    generation: int | None = Field(
        None, description=DEPRECATED_GENERATION, json_schema_extra={"deprecated": True}
    )
    state: Literal["registered", "expired"] = "registered"
    lease_seconds: float | None = None
    lease_expires_at: float | None = None
    protocol: str = Field("3", description='SGLang protocol generation: "1", "2a", "2b", "3"')
    extra: dict[str, Any] = Field(default_factory=dict, description="fields we do not interpret")

    _older_server = model_validator(mode="before")(address_version_from_generation)

    @property
    def cell(self) -> Cell:
        return Cell(self.dp, self.cp, self.tp, self.pp)


class RowReport(BaseModel):
    dp: int
    expected: int
    registered: int
    complete: bool


class ReplacementReport(BaseModel):
    cell: Cell
    old: RankAddress
    new: RankAddress
    address_version: int = Field(description="the cell's address version after the move")
    generation: int | None = Field(
        None, description=DEPRECATED_GENERATION, json_schema_extra={"deprecated": True}
    )
    at: float

    _older_server = model_validator(mode="before")(address_version_from_generation)


class ConflictReport(BaseModel):
    field: str
    established: Any
    offered: Any
    rank_ip: str
    rank_port: int
    cell: Cell
    at: float


class ReadyReport(BaseModel):
    """``GET /ready`` (200 complete, 503 not yet): what a waiting rank needs, a few hundred bytes
    once complete, where the table is a few hundred per cell."""

    ready: bool
    instance_id: str
    expected_cells: int | None
    registered_cells: int
    missing_cells: list[Cell] = Field(description="the first 1000 missing cells, in cell order")
    missing_count: int = Field(0, description="how many cells are missing in all")
    expired_cells: list[Cell] = Field(default_factory=list)


class TableReport(BaseModel):
    """``GET /prefill_port_table``: the whole table for humans and scripts (a stable schema)."""

    instance_id: str = Field(description="the stable group id: only a reset changes it")
    incarnation: str | None = Field(
        None,
        description="X-SGLang-Disaggregation-Instance-ID at this snapshot (null from servers "
        "older than the change feed)",
    )
    stream: str | None = Field(
        None, description="the change feed's run id at this snapshot: watch from <stream>:<seq>"
    )
    seq: int | None = Field(None, description="the last event this snapshot includes")
    complete: bool
    topology: TopologyReport | None
    expected_cells: int | None
    registered_cells: int
    missing_cells: list[Cell] = Field(description="the first 1000 missing cells, in cell order")
    missing_count: int = Field(0, description="how many cells are missing in all")
    expired_cells: list[Cell] = Field(default_factory=list)
    rows: list[RowReport]
    cells: list[CellReport]
    replacements: list[ReplacementReport]
    conflicts: list[ConflictReport]
    server_info: dict[str, Any] | None = Field(
        description="what GET /route with all four ranks -1 answers once complete"
    )
    state: Literal["memory", "sqlite"]

    def registered_hosts(self) -> list[str]:
        return sorted({cell.rank_ip for cell in self.cells})
