"""FastAPI's side of error handling: whatever FastAPI itself refuses becomes the one reply shape
``replies.py`` defines (the table's own routes answer through the pipeline, never raising)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefill_bootstrap.service.replies import Reply, error_reply, reply_for, validation_reply
from prefill_bootstrap.shared.errors import BootstrapError

__all__ = ["install_error_handlers", "reply_response"]

_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def reply_response(reply: Reply) -> Response:
    headers = {name.decode(): value.decode() for name, value in reply.headers}
    return Response(
        reply.body, reply.status, headers=headers, media_type=reply.content_type.decode()
    )


async def _on_validation(_: Request, exc: RequestValidationError) -> Response:
    return reply_response(validation_reply(list(exc.errors())))


async def _on_domain_error(_: Request, exc: BootstrapError) -> Response:
    return reply_response(reply_for(exc))


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
    kind = _KINDS.get(exc.status_code, "http_error")
    headers = tuple(
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in (exc.headers or {}).items()
    )  # a 405's ``allow``, as the door's own 405s carry it
    return reply_response(error_reply(exc.status_code, kind, str(exc.detail), headers=headers))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(BootstrapError, _on_domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
