"""Each record kind as JSON, declared once: what the routes answer and what the store keeps.

The report models in ``shared/protocol.py`` (``CellReport``, ``ReplacementReport``, ...) are the
schema; these functions produce exactly the dicts those models dump, without building a model
per record: ``/prefill_port_table`` lists up to 16k cells, and plain dicts serialise several
times faster than models. ``tests/test_records.py`` proves every function agrees with its model
(validated and dumped again, the dict comes back unchanged), so the two cannot drift.

The store writes the same shapes for its history entries (``replacement_json`` without the
deprecated alias, ``conflict_json``) and one row per cell (``cell_row``), and reads them back with
the ``*_from_*`` functions: the store's format is documented here and nowhere else.

Schema 2 of the store (the ``SCHEMA_VERSION`` in ``store.py``):

- ``meta``: ``schema_version``, ``instance_id``, ``topology`` (``topology_json``),
  ``address_changes`` (how often a cell of this instance moved or left: the incarnation's
  counter, written in the transaction of the move or removal; absent, as state written by
  earlier releases leaves it, reads as 0);
- ``cells``: one row per cell, the columns of ``CELL_COLUMNS`` (``cell_row``); a deregistered
  cell's row is deleted;
- ``events``: ``kind`` ``"replacement"`` or ``"conflict"`` and a JSON ``body``
  (``replacement_json(deprecated_alias=False)`` or ``conflict_json``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import orjson

from prefill_bootstrap.service.table import CellRecord, Conflict, Replacement, Topology
from prefill_bootstrap.shared.protocol import Cell, RankAddress

__all__ = [
    "CELL_COLUMNS",
    "cell_from_row",
    "cell_row",
    "cells_json",
    "conflict_from_json",
    "conflict_json",
    "replacement_from_json",
    "replacement_json",
    "topology_from_json",
    "topology_json",
    "topology_report",
]

CELL_COLUMNS = (
    "dp",
    "cp",
    "tp",
    "pp",
    "rank_ip",
    "rank_port",
    "first_registered_at",
    "last_registered_at",
    "address_version",
    "extra",
    "lease_seconds",
    "protocol",
)
"""The ``cells`` table's columns in ``cell_row`` order (``extra`` is JSON text)."""


def topology_json(topology: Topology) -> dict[str, Any]:
    """Everything the group agreed on, the carried options included (the store's form)."""
    return asdict(topology)


def topology_from_json(body: Mapping[str, Any]) -> Topology:
    return Topology(**body)


def topology_report(topology: Topology) -> dict[str, Any]:
    """``TopologyReport``: the sizes, page size and dtype, without the carried options."""
    return {
        "dp_size": topology.dp_size,
        "attn_cp_size": topology.attn_cp_size,
        "attn_tp_size": topology.attn_tp_size,
        "pp_size": topology.pp_size,
        "page_size": topology.page_size,
        "kv_cache_dtype": topology.kv_cache_dtype,
    }


def cells_json(
    records: Iterable[CellRecord],
    expired: Container[Cell],
    lease_expires_at: Callable[[Cell], float | None],
) -> list[dict[str, Any]]:
    """``CellReport`` of each record, as ``/prefill_port_table`` lists cells (with the deprecated
    ``generation``, the address version's old name, for one release). One loop for all cells:
    a call per cell would cost a group of 16k cells a few percent of its table's build."""
    return [
        {
            "dp": record.cell.dp,
            "cp": record.cell.cp,
            "tp": record.cell.tp,
            "pp": record.cell.pp,
            "rank_ip": record.address.rank_ip,
            "rank_port": record.address.rank_port,
            "first_registered_at": record.first_registered_at,
            "last_registered_at": record.last_registered_at,
            "address_version": record.address_version,
            "generation": record.address_version,
            "state": "expired" if record.cell in expired else "registered",
            "lease_seconds": record.lease_seconds,
            "lease_expires_at": lease_expires_at(record.cell),
            "protocol": record.protocol,
            "extra": record.extra,
        }
        for record in records
    ]


def cell_row(record: CellRecord) -> tuple[Any, ...]:
    """The store's row of one cell, in ``CELL_COLUMNS`` order."""
    return (
        *record.cell,
        record.address.rank_ip,
        record.address.rank_port,
        record.first_registered_at,
        record.last_registered_at,
        record.address_version,
        orjson.dumps(record.extra).decode(),
        record.lease_seconds,
        record.protocol,
    )


def cell_from_row(row: Mapping[str, Any]) -> CellRecord:
    return CellRecord(
        cell=Cell(row["dp"], row["cp"], row["tp"], row["pp"]),
        address=RankAddress(rank_ip=row["rank_ip"], rank_port=row["rank_port"]),
        first_registered_at=row["first_registered_at"],
        last_registered_at=row["last_registered_at"],
        address_version=row["address_version"],
        extra=orjson.loads(row["extra"]),
        lease_seconds=row["lease_seconds"],
        protocol=row["protocol"],
    )


def _address(address: RankAddress) -> dict[str, Any]:
    return {"rank_ip": address.rank_ip, "rank_port": address.rank_port}


def replacement_json(event: Replacement, *, deprecated_alias: bool = True) -> dict[str, Any]:
    """``ReplacementReport``; the store keeps it without the deprecated ``generation``."""
    body: dict[str, Any] = {
        "cell": list(event.cell),
        "old": _address(event.old),
        "new": _address(event.new),
        "address_version": event.address_version,
    }
    if deprecated_alias:
        body["generation"] = event.address_version
    body["at"] = event.at
    return body


def replacement_from_json(body: Mapping[str, Any]) -> Replacement:
    return Replacement(
        Cell(*body["cell"]),
        RankAddress(**body["old"]),
        RankAddress(**body["new"]),
        body["address_version"],
        body["at"],
    )


def conflict_json(event: Conflict) -> dict[str, Any]:
    """``ConflictReport``: a refused registration, the store's form too."""
    return {
        "field": event.field,
        "established": event.established,
        "offered": event.offered,
        "rank_ip": event.address.rank_ip,
        "rank_port": event.address.rank_port,
        "cell": list(event.cell),
        "at": event.at,
    }


def conflict_from_json(body: Mapping[str, Any]) -> Conflict:
    return Conflict(
        body["field"],
        body["established"],
        body["offered"],
        RankAddress(rank_ip=body["rank_ip"], rank_port=body["rank_port"]),
        Cell(*body["cell"]),
        body["at"],
    )
