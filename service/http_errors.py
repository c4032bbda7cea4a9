"""Domain errors -> HTTP, in one place, with the one JSON error shape."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefill_bootstrap.client.errors import (
    CellNotFound,
    LeaseNotHeld,
    ProtocolMismatch,
    StateStoreError,
    TopologyConflict,
)

__all__ = ["error_response", "install_error_handlers", "json_response"]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error_response(
    status: int, error: str, message: str, details: list[dict[str, Any]] | None = None
) -> Response:
    return json_response({"error": error, "message": message, "details": details or []}, status)


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


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        msg = _clean(error.get("msg", "invalid"))
        parts.append(f"{where}: {msg}")
    more = len(errors) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _on_validation(_: Request, exc: RequestValidationError) -> Response:
    errors = list(exc.errors())
    details = [
        {"loc": _plain(e.get("loc", [])), "msg": _clean(e.get("msg")), "type": e.get("type")}
        for e in errors
    ]
    if any(error.get("type") == "json_invalid" for error in errors):
        return error_response(400, "invalid_json", "the request body is not valid JSON", details)
    return error_response(422, "validation_error", _validation_message(errors), details)


async def _on_conflict(_: Request, exc: TopologyConflict) -> Response:
    return error_response(
        409,
        "topology_conflict",
        str(exc),
        [{"field": exc.field, "established": exc.established, "offered": exc.offered}],
    )


async def _on_cell_not_found(_: Request, exc: CellNotFound) -> Response:
    return error_response(
        404, "cell_not_found", f"{exc}; register the rank (PUT /route) before renewing its lease"
    )


async def _on_lease_not_held(_: Request, exc: LeaseNotHeld) -> Response:
    return error_response(409, "lease_not_held", str(exc))


async def _on_protocol_mismatch(_: Request, exc: ProtocolMismatch) -> Response:
    return error_response(
        422, "protocol_mismatch", str(exc), [{"pinned": exc.pinned, "offered": exc.offered}]
    )


async def _on_store_error(_: Request, exc: StateStoreError) -> Response:
    return error_response(
        503, "state_not_durable", f"{exc}; the request was not acknowledged, retry it"
    )


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
    kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    return error_response(
        exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail)
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(TopologyConflict, _on_conflict)  # type: ignore[arg-type]
    app.add_exception_handler(StateStoreError, _on_store_error)  # type: ignore[arg-type]
    app.add_exception_handler(CellNotFound, _on_cell_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(LeaseNotHeld, _on_lease_not_held)  # type: ignore[arg-type]
    app.add_exception_handler(ProtocolMismatch, _on_protocol_mismatch)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
