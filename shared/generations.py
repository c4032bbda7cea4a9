"""SGLang's older bootstrap protocol generations, recognised by shape and mapped onto one table.

The sidecar ships apart from the engines it serves, so it must understand every generation a
deployed SGLang speaks (facts and releases: ``tests/golden/README.md``):

- gen 1 (SGLang 0.4.6 - 0.4.10, NIXL until 0.5.3rc0): ``role, tp_size, dp_size, engine_rank``;
  lookups by ``engine_rank, target_dp_group``; no cp, no pp.
- gen 2 (0.5.0rc0 - 0.5.9): attention-tp/dp and pp fields with ``role``, 2b adds ``page_size``;
  lookups add ``target_pp_rank``.
- gen 3 (0.5.10 on): :class:`~prefill_bootstrap.shared.protocol.RankRegistration`.

Older registrations become current ones (cp 0, pp 0 for gen 1), so one table serves all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from prefill_bootstrap.shared.protocol import (
    Host,
    Port,
    Rank,
    RankRegistration,
    Size,
    rank_inside_its_size,
)

__all__ = [
    "GEN1_QUERY",
    "GEN2_QUERY",
    "GEN3_QUERY",
    "RELEASES",
    "Gen1Registration",
    "Gen2Registration",
    "LookupGeneration",
    "ProtocolGeneration",
    "lookup_generation",
    "registration_generation",
    "to_current",
]

ProtocolGeneration = Literal["1", "2a", "2b", "3"]
"""What a registration tells apart (1a and 1b send identical bodies)."""
LookupGeneration = Literal["1", "2", "3"]
"""What a lookup tells apart (2a and 2b send identical queries)."""

GEN3_QUERY = ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank")
GEN2_QUERY = ("engine_rank", "target_dp_group", "target_pp_rank")
GEN1_QUERY = ("engine_rank", "target_dp_group")
PREFILL_ROLE = "Prefill"
RELEASES: dict[str, str] = {
    "1": "SGLang 0.4.6 - 0.4.10, NIXL until 0.5.3rc0",
    "2": "SGLang 0.5.0rc0 - 0.5.9",
    "2a": "SGLang 0.5.0rc0 - 0.5.7",
    "2b": "SGLang 0.5.8 - 0.5.9",
    "3": "SGLang 0.5.10 and later",
}

Role = Annotated[str, Field(min_length=1, max_length=64)]


class Gen1Registration(BaseModel):
    """``PUT /route`` of SGLang 0.4.6 - 0.4.10: the global tp rank of a dp-attention engine."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: Role
    tp_size: Size = Field(description="tp ranks over all dp groups")
    dp_size: Size
    rank_ip: Host
    rank_port: Port
    engine_rank: Rank = Field(description="global tp rank, 0 .. tp_size-1")

    @model_validator(mode="after")
    def _divisible_and_inside(self) -> Gen1Registration:
        if self.tp_size % self.dp_size:
            raise ValueError(f"tp_size={self.tp_size} is not a multiple of dp_size={self.dp_size}")
        if self.engine_rank >= self.tp_size:
            raise ValueError(f"engine_rank={self.engine_rank} is outside tp_size={self.tp_size}")
        return self

    def to_current(self) -> RankRegistration:
        per_group = self.tp_size // self.dp_size
        return RankRegistration(
            attn_tp_size=per_group,
            attn_tp_rank=self.engine_rank % per_group,
            attn_cp_size=1,
            attn_cp_rank=0,
            attn_dp_size=self.dp_size,
            attn_dp_rank=self.engine_rank // per_group,
            pp_size=1,
            pp_rank=0,
            system_dp_size=1,
            system_dp_rank=0,
            rank_ip=self.rank_ip,
            rank_port=self.rank_port,
            page_size=None,
            kv_cache_dtype=None,
        )


class Gen2Registration(BaseModel):
    """``PUT /route`` of SGLang 0.5.0rc0 - 0.5.9 (2b, from 0.5.8, adds ``page_size``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: Role
    attn_tp_size: Size
    attn_tp_rank: Rank
    attn_dp_size: Size
    attn_dp_rank: Rank
    pp_size: Size
    pp_rank: Rank
    system_dp_size: Size
    system_dp_rank: Rank
    rank_ip: Host
    rank_port: Port
    page_size: Annotated[StrictInt, Field(ge=1)] | None = None

    _ranks_inside_sizes = field_validator(
        "attn_tp_rank", "attn_dp_rank", "pp_rank", "system_dp_rank", mode="after"
    )(rank_inside_its_size)

    def to_current(self) -> RankRegistration:
        # Merged, not passed as keywords beside the dump: an unknown field of the older body
        # that the current shape declares (``kv_cache_dtype``, ``attn_cp_rank``) would be given
        # twice (a TypeError, answered 500). Gen 2 has no such fields: the mapping's own win.
        return RankRegistration(
            **{
                **self.model_dump(exclude={"role", "page_size"}, exclude_unset=False),
                "attn_cp_size": 1,
                "attn_cp_rank": 0,
                "page_size": self.page_size,
                "kv_cache_dtype": None,
            }
        )


def registration_generation(body: Mapping[str, Any]) -> ProtocolGeneration:
    """Tell the generation of a ``PUT /route`` body from the fields it carries.

    Gen 3 never sends ``role``, gens 1-2 never send ``attn_cp_size``; a body that matches no
    older shape is validated as the current one, so its 422 names the current fields.
    """
    if "attn_cp_size" in body:
        return "3"
    if "attn_tp_size" in body and "role" in body:
        return "2b" if "page_size" in body else "2a"
    if "engine_rank" in body and "tp_size" in body:
        return "1"
    return "3"


def to_current(body: Mapping[str, Any], generation: ProtocolGeneration) -> RankRegistration | None:
    """Validate a body of ``generation`` and map it to the current shape; ``None`` for a role
    other than Prefill (acknowledged and stored nowhere, as SGLang's own servers did)."""
    if generation == "3":
        return RankRegistration.model_validate(body)
    older = Gen1Registration if generation == "1" else Gen2Registration
    registration = older.model_validate(body)
    if registration.role != PREFILL_ROLE:
        return None
    return registration.to_current()


def lookup_generation(params: Mapping[str, str]) -> LookupGeneration | None:
    """Tell the generation of a ``GET /route`` query; a parameter counts even when empty."""
    if any(name in params for name in GEN3_QUERY[:3]):
        return "3"
    if "target_pp_rank" in params:
        return "2" if any(name in params for name in GEN1_QUERY) else "3"
    if any(name in params for name in GEN1_QUERY):
        return "1"
    return None
