"""FastAPI's side of error handling: every exception becomes the reply ``replies.py`` defines."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefill_bootstrap.service.replies import Reply, error_reply, reply_for, validation_reply
from prefill_bootstrap.shared.errors import (
    CellNotFound,
    LeaseNotHeld,
    ProtocolMismatch,
    StateStoreError,
    TopologyConflict,
)

__all__ = ["error_response", "install_error_handlers", "json_response", "reply_response"]


def reply_response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, media_type=reply.content_type.decode())


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error_response(
    status: int, error: str, message: str, details: list[dict[str, Any]] | None = None
) -> Response:
    return reply_response(error_reply(status, error, message, details))


async def _on_validation(_: Request, exc: RequestValidationError) -> Response:
    return reply_response(validation_reply(list(exc.errors())))


async def _on_domain_error(_: Request, exc: Exception) -> Response:
    return reply_response(reply_for(exc))  # type: ignore[arg-type]


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
    kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    return error_response(
        exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail)
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    for domain_error in (
        TopologyConflict,
        StateStoreError,
        CellNotFound,
        LeaseNotHeld,
        ProtocolMismatch,
    ):
        app.add_exception_handler(domain_error, _on_domain_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
