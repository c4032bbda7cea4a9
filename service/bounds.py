"""Bounds on what a registration may carry beyond the fields we know.

Newer SGLang releases add fields, so unknown fields are accepted and kept (stored with the cell,
shown in the diagnostics). Kept, they must stay storable and cheap to serve: a value nested
deeper than the JSON encoder can write, or megabytes of it per cell, would fail the commit it
rides in and every answer that shows it. These bounds are far beyond anything SGLang sends.
"""

from __future__ import annotations

from typing import Any

import orjson

from prefill_bootstrap.shared.protocol import RankRegistration

__all__ = ["MAX_EXTRA_BYTES", "MAX_EXTRA_DEPTH", "MAX_EXTRA_FIELD_BYTES", "extra_problem"]

MAX_EXTRA_DEPTH = 32
"""How deep an unknown field (or ``dsv41_spec_layout``) may nest lists and objects."""
MAX_EXTRA_FIELD_BYTES = 16 * 1024
"""Largest JSON encoding of one unknown field."""
MAX_EXTRA_BYTES = 64 * 1024
"""Largest JSON encoding of all unknown fields of one registration together."""


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Iterative, so a value nested past Python's recursion limit is measured, not crashed on."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _field_problem(value: Any) -> str | None:
    if _nests_deeper_than(value, MAX_EXTRA_DEPTH):
        return f"nests lists or objects deeper than {MAX_EXTRA_DEPTH} levels"
    size = len(orjson.dumps(value))
    if size > MAX_EXTRA_FIELD_BYTES:
        return f"is {size} bytes of JSON, more than the {MAX_EXTRA_FIELD_BYTES} a field may carry"
    return None


def extra_problem(registration: RankRegistration) -> tuple[str, str] | None:
    """``(field, problem)`` for the first field past its bound, or None when all are within."""
    if registration.dsv41_spec_layout is not None:
        problem = _field_problem(registration.dsv41_spec_layout)
        if problem is not None:
            return "dsv41_spec_layout", problem
    total = 0
    for name, value in (registration.model_extra or {}).items():
        problem = _field_problem(value)
        if problem is not None:
            return name, f"unknown field {problem}"
        total += len(orjson.dumps(value)) + len(name)
        if total > MAX_EXTRA_BYTES:
            return name, (
                f"unknown fields together exceed {MAX_EXTRA_BYTES} bytes of JSON "
                "(kept with every cell and shown in every table report)"
            )
    return None
