"""Answers as bytes, and every error -> its answer, in one place.

Every door (the lean protocol, the ASGI ``FrontDoor``, the FastAPI routes) answers a ``Reply``,
and every error becomes one here: a ``BootstrapError`` by its own ``status``/``kind``/``details``
(``reply_for``), a validation error by ``validation_reply``. So a 409 or a 422 reads the same
whichever door served it, and pydantic's messages are cleaned and located in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Literal, NamedTuple

import orjson
from pydantic import ValidationError

from prefill_bootstrap.shared.errors import BootstrapError

__all__ = [
    "JSON",
    "TEXT",
    "Reply",
    "Waiting",
    "error_reply",
    "invalid_reply",
    "reply_for",
    "send_reply",
    "validation_reply",
]

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
Location = Literal["body", "query"]


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()
    """Headers beyond content type and length (the status page's ``cache-control``, a
    redirect's ``location``, a 405's ``allow``)."""


class Waiting(NamedTuple):
    """An answer that waits for something to happen (the change feed's long poll for the next
    event): the doors await it while the client stays connected and abandon it (cancelled, so
    it unparks) the moment the client leaves, unlike a write, which stands."""

    answer: Awaitable[Reply]


async def send_reply(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    reply: Reply,
    *extra: tuple[bytes, bytes],
) -> int:
    """Write ``reply`` through an ASGI ``send``, ``extra`` headers last; its status, for the
    metrics. The ASGI doors' one way to answer, so every answer is framed alike."""
    headers = [
        (b"content-type", reply.content_type),
        (b"content-length", b"%d" % len(reply.body)),
        *reply.headers,
        *extra,
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
    return reply.status


def error_reply(
    status: int,
    error: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> Reply:
    """The one JSON error shape: ``{"error", "message", "details"}``."""
    body = {"error": error, "message": message, "details": details or []}
    return Reply(status, orjson.dumps(body), JSON, headers)


def reply_for(exc: BootstrapError) -> Reply:
    """The answer to a domain error a request ran into: its class says the status and kind."""
    return error_reply(exc.status, exc.kind, exc.answer_message(), exc.details())


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
    """pydantic prefixes a validator's own ``ValueError`` text; the caller needs only the text."""
    return str(message).removeprefix("Value error, ")


def validation_reply(errors: Sequence[dict[str, Any]]) -> Reply:
    """Located validation errors: 400 for a body that is not JSON, else 422 naming every field
    (the first five in the message)."""
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


def invalid_reply(exc: ValidationError, location: Location, *name: str) -> Reply:
    """A model's errors located where the input came from: ``body.<field>`` for a body,
    ``query.<param>`` for a query parameter (``name`` when the model is of the value alone)."""
    return validation_reply(
        [{**error, "loc": (location, *name, *error["loc"])} for error in exc.errors()]
    )
