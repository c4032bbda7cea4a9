"""The ``/prefill_port_table`` and ``/ready`` bodies (``TableReport``, ``ReadyReport``), built
from the registry's state."""

from __future__ import annotations

from typing import Any

from prefill_bootstrap.service.records import (
    cells_json,
    conflict_json,
    replacement_json,
    topology_report,
)
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
    """``TableReport``, record by record through ``records.py`` (plain dicts: see there why)."""
    table = registry.group.table
    topology = table.topology
    per_row = topology.cells_per_row() if topology else 0
    return {
        "instance_id": registry.group.instance_id,
        "incarnation": registry.group.incarnation,
        "stream": registry.events.stream,
        "seq": registry.events.latest,
        "complete": table.is_complete,
        "topology": topology_report(topology) if topology else None,
        "expected_cells": table.expected_count,
        "registered_cells": table.registered_count,
        **_missing(registry),
        "expired_cells": [list(cell) for cell in table.expired_cells()],
        "rows": [
            {"dp": dp, "expected": per_row, "registered": count, "complete": count >= per_row}
            for dp, count in sorted(table.row_counts().items())
        ],
        "cells": cells_json(table.records(), set(table.expired_cells()), table.lease_expires_at),
        "replacements": [replacement_json(event) for event in table.replacements],
        "conflicts": [conflict_json(event) for event in table.conflicts],
        "server_info": table.server_info() if table.is_complete else None,
        "state": registry.group.store.kind,
    }


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
