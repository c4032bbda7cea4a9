"""The ``/prefill_port_table`` and ``/ready`` bodies, built from the registry's state."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefill_bootstrap.service.registry import Registry

__all__ = ["LISTED_MISSING_CELLS", "readiness", "table_report"]

LISTED_MISSING_CELLS = 1000
"""Most missing cells an answer lists; ``missing_count`` gives the total. A group of the largest
allowed size answers in bounded time and bytes, whatever is missing."""


def _missing(registry: Registry) -> dict[str, Any]:
    table = registry.group.table
    return {
        "missing_cells": [list(cell) for cell in table.missing_cells(LISTED_MISSING_CELLS)],
        "missing_count": table.missing_count,
    }


def table_report(registry: Registry) -> dict[str, Any]:
    table = registry.group.table
    topology = table.topology
    per_row = topology.cells_per_row() if topology else 0
    report = {
        "instance_id": registry.group.instance_id,
        "complete": table.is_complete,
        "topology": (
            {key: value for key, value in asdict(topology).items() if key != "options"}
            if topology
            else None
        ),
        "expected_cells": table.expected_count,
        "registered_cells": table.registered_count,
        **_missing(registry),
        "expired_cells": [list(cell) for cell in table.expired_cells()],
        "rows": [
            {"dp": dp, "expected": per_row, "registered": count, "complete": count >= per_row}
            for dp, count in sorted(table.row_counts().items())
        ],
        "cells": [
            {
                "dp": record.cell.dp,
                "cp": record.cell.cp,
                "tp": record.cell.tp,
                "pp": record.cell.pp,
                "rank_ip": record.address.rank_ip,
                "rank_port": record.address.rank_port,
                "first_registered_at": record.first_registered_at,
                "last_registered_at": record.last_registered_at,
                "generation": record.generation,
                "state": "expired" if table.is_expired(record.cell) else "registered",
                "lease_seconds": record.lease_seconds,
                "lease_expires_at": table.lease_expires_at(record.cell),
                "protocol": record.protocol,
                "extra": record.extra,
            }
            for record in table.records()
        ],
        "replacements": [
            {
                "cell": list(event.cell),
                "old": event.old.model_dump(),
                "new": event.new.model_dump(),
                "generation": event.generation,
                "at": event.at,
            }
            for event in table.replacements
        ],
        "conflicts": [
            {
                "field": event.field,
                "established": event.established,
                "offered": event.offered,
                "rank_ip": event.address.rank_ip,
                "rank_port": event.address.rank_port,
                "cell": list(event.cell),
                "at": event.at,
            }
            for event in table.conflicts
        ],
        "server_info": table.server_info() if table.is_complete else None,
        "state": registry.group.store.kind,
    }
    return report


def readiness(registry: Registry) -> dict[str, Any]:
    table = registry.group.table
    return {
        "ready": table.is_complete,
        "instance_id": registry.group.instance_id,
        "expected_cells": table.expected_count,
        "registered_cells": table.registered_count,
        **_missing(registry),
        "expired_cells": [list(cell) for cell in table.expired_cells()],
    }
