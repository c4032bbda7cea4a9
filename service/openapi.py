"""The FastAPI routes and the OpenAPI schema, generated from the route table.

Each declared route becomes one ``add_api_route`` whose endpoint runs the same pipeline as the
lean door (``Pipeline.dispatch`` then ``settle``): with ``fast_path=False`` FastAPI serves the
identical bytes, and no handler exists only for the docs. The endpoints take the raw request, so
FastAPI validates nothing itself; the schema's parameters, bodies and error responses are written
from the table, with those every route of a kind shares derived here (401 for a route that may
need the token, 413 and 400 for one with a body, 422 for one that reads input).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from prefill_bootstrap.service.event_stream import EventStream
from prefill_bootstrap.service.http_errors import reply_response
from prefill_bootstrap.service.pipeline import Pipeline
from prefill_bootstrap.service.routes import TABLE, Route
from prefill_bootstrap.shared.protocol import ErrorBody

__all__ = ["install_routes"]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


def _responses(route: Route) -> dict[int | str, dict[str, Any]]:
    derived: dict[int | str, dict[str, Any]] = {}
    if route.access != "probe":
        when = "always" if route.access == "write" else "with --auth-reads"
        derived[401] = _error(f"unauthorized: the bearer token is missing or wrong ({when})")
    if route.body is not None:
        derived[400] = _error("invalid_json: the body is not JSON")
        derived[413] = _error("body_too_large: larger than the configured cap")
        derived[422] = _error("validation_error: a field is missing, mistyped or out of range")
    if route.long_poll:
        derived[422] = _error("validation_error: query.wait is not a number from 0 to 3600")
    return {**derived, **route.responses}


def _openapi_extra(route: Route) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if route.query:
        extra["parameters"] = [
            {
                "name": param.name,
                "in": "query",
                "required": False,
                "description": param.description,
                "schema": dict(param.schema),
            }
            for param in route.query
        ]
    if route.body is not None:
        schema = (
            route.body.model_json_schema()
            if isinstance(route.body, type) and issubclass(route.body, BaseModel)
            else dict(route.body)
        )
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    return extra


class _StreamResponse(Response):
    """An ``EventStream`` as the response FastAPI runs: it writes itself (the door in front
    stamps the instance header on its start, as on every forwarded answer)."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__()
        self.stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.stream.run(scope, send, receive)


def _endpoint(front: Pipeline, route: Route) -> Any:
    async def endpoint(request: Request) -> Response:
        scope = request.scope
        body = await request.body()
        outcome = front.dispatch(route, scope["query_string"], body, scope["headers"])
        if type(outcome) is EventStream:
            return _StreamResponse(outcome)
        return reply_response(await front.settle(outcome, request.receive, route))

    endpoint.__name__ = f"{route.method.lower()}_{route.path.strip('/') or 'root'}"
    return endpoint


def install_routes(app: FastAPI, front: Pipeline) -> None:
    """One FastAPI route per declared route, answering through ``front``'s pipeline."""
    for route in TABLE:
        app.add_api_route(
            route.path,
            _endpoint(front, route),
            methods=[route.method],
            summary=route.summary,
            response_class=Response,
            responses=_responses(route),
            openapi_extra=_openapi_extra(route) or None,
        )
