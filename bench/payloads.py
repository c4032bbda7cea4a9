"""Request bodies exactly as SGLang 0.5.23 sends them, for a topology of any size.

The registration body has the same keys and values as ``tests/conftest.py``'s
``sglang_registration()`` (``tests/test_bench_smoke.py`` checks that they agree), so the
benchmark pays the server's real parsing and validation cost. Rank addresses are loopback
strings: they are data the server stores, never an address anyone connects to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from bench.wire import build_request

__all__ = [
    "INFO_PATH",
    "Topology",
    "cell_path",
    "expected_address",
    "registration",
    "registration_requests",
]

INFO_PATH = "/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1"
BASE_RANK_PORT = 20000


@dataclass(frozen=True)
class Topology:
    """dp x cp x tp x pp; the issue's storms use tp 8, pp 4 and dp = ranks / 32."""

    dp: int
    cp: int = 1
    tp: int = 8
    pp: int = 4

    @classmethod
    def for_ranks(cls, ranks: int) -> Topology:
        if ranks % 32:
            raise ValueError(f"{ranks} ranks is not a multiple of tp8 x pp4 = 32")
        return cls(dp=ranks // 32)

    @property
    def ranks(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    def cells(self) -> list[tuple[int, int, int, int]]:
        return [
            (dp, cp, tp, pp)
            for dp in range(self.dp)
            for cp in range(self.cp)
            for tp in range(self.tp)
            for pp in range(self.pp)
        ]

    def __str__(self) -> str:
        return f"dp{self.dp} cp{self.cp} tp{self.tp} pp{self.pp}"


def expected_address(index: int) -> dict[str, Any]:
    """The address rank ``index`` (its position in ``Topology.cells()``) registers."""
    return {"rank_ip": "127.0.0.1", "rank_port": BASE_RANK_PORT + index}


def registration(topology: Topology, cell: tuple[int, int, int, int], index: int) -> dict[str, Any]:
    """A ``PUT /route`` body as an SGLang 0.5.23 prefill rank sends it (dp attention on)."""
    dp, cp, tp, pp = cell
    return {
        "attn_tp_size": topology.tp,
        "attn_tp_rank": tp,
        "attn_cp_size": topology.cp,
        "attn_cp_rank": cp,
        "attn_dp_size": topology.dp,
        "attn_dp_rank": dp,
        "pp_size": topology.pp,
        "pp_rank": pp,
        "system_dp_size": 1,
        "system_dp_rank": 0,
        **expected_address(index),
        "page_size": 16,
        "kv_cache_dtype": "auto",
        "kv_layout": None,
        "dsv41_spec_layout": None,
        "load_balance_method": "auto",
        "enable_dsa_cache_layer_split": False,
        "enable_kv_cache_sharding": False,
        "prefill_http_port": 30000,
        "decode_allocation_policy": "early",
    }


def registration_requests(topology: Topology) -> list[bytes]:
    """Every rank's ``PUT /route``, each on a connection of its own (as separate ranks do)."""
    return [
        build_request("PUT", "/route", orjson.dumps(registration(topology, cell, index)))
        for index, cell in enumerate(topology.cells())
    ]


def cell_path(cell: tuple[int, int, int, int]) -> str:
    dp, cp, tp, pp = cell
    return (
        f"/route?prefill_dp_rank={dp}&prefill_cp_rank={cp}&target_tp_rank={tp}&target_pp_rank={pp}"
    )
