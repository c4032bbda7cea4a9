"""Answers as bytes, and domain errors -> HTTP in one place.

Both doors (the FastAPI app and the lean hot path) turn our errors into answers through
``reply_for``, so a 409 or a 422 reads the same whichever door served it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from prefill_bootstrap.shared.errors import (
    BootstrapError,
    CellNotFound,
    LeaseNotHeld,
    ProtocolMismatch,
    StateStoreError,
    TopologyConflict,
)

__all__ = ["JSON", "TEXT", "Reply", "error_reply", "reply_for", "validation_reply"]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = JSON


def error_reply(
    status: int, error: str, message: str, details: list[dict[str, Any]] | None = None
) -> Reply:
    """The one JSON error shape: ``{"error", "message", "details"}``."""
    body = {"error": error, "message": message, "details": details or []}
    return Reply(status, orjson.dumps(body))


def _plain(value: Any) -> Any:
    """Keep validation details JSON-safe (pydantic may put exceptions in ``ctx``)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


def _clean(message: object) -> str:
    return str(message).removeprefix("Value error, ")


def validation_reply(errors: Sequence[dict[str, Any]]) -> Reply:
    """pydantic/FastAPI validation errors: 400 for a body that is not JSON, else 422 naming
    every field (the first five in the message)."""
    details = [
        {"loc": _plain(e.get("loc", [])), "msg": _clean(e.get("msg")), "type": e.get("type")}
        for e in errors
    ]
    if any(error.get("type") == "json_invalid" for error in errors):
        return error_reply(400, "invalid_json", "the request body is not valid JSON", details)
    parts = [
        ".".join(str(part) for part in error.get("loc", ())) + f": {_clean(error.get('msg'))}"
        for error in errors[:5]
    ]
    more = len(errors) - 5
    message = "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return error_reply(422, "validation_error", message, details)


def reply_for(exc: BootstrapError) -> Reply:
    """The answer to a domain error a request ran into."""
    if isinstance(exc, TopologyConflict):
        details = [{"field": exc.field, "established": exc.established, "offered": exc.offered}]
        return error_reply(409, "topology_conflict", str(exc), details)
    if isinstance(exc, ProtocolMismatch):
        details = [{"pinned": exc.pinned, "offered": exc.offered}]
        return error_reply(422, "protocol_mismatch", str(exc), details)
    if isinstance(exc, CellNotFound):
        message = f"{exc}; register the rank (PUT /route) before renewing its lease"
        return error_reply(404, "cell_not_found", message)
    if isinstance(exc, LeaseNotHeld):
        return error_reply(409, "lease_not_held", str(exc))
    if isinstance(exc, StateStoreError):
        message = f"{exc}; the request was not acknowledged, retry it"
        return error_reply(503, "state_not_durable", message)
    return error_reply(500, "internal_error", str(exc))
