"""``create_app(settings, store=...)``: the bootstrap server as an ASGI application.

Routes are thin: parse, call the registry, shape a response. The protocol's hot routes are served
by the lean layer in ``fastpath.py``; they are declared here too, calling the same answer
functions, so the OpenAPI schema stays truthful and ``fast_path=False`` serves identical bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from prefill_bootstrap import __version__
from prefill_bootstrap.service import answers
from prefill_bootstrap.service.fastpath import FrontDoor, wait_while_connected
from prefill_bootstrap.service.http_errors import (
    error_response,
    install_error_handlers,
    json_response,
    reply_response,
)
from prefill_bootstrap.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from prefill_bootstrap.service.metrics import render as render_metrics
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import StateStore, open_store
from prefill_bootstrap.service.ui_routes import install_ui
from prefill_bootstrap.shared.generations import (
    Gen1Registration,
    Gen2Registration,
)
from prefill_bootstrap.shared.protocol import (
    DpRankQuery,
    DpRankRegistration,
    ErrorBody,
    Heartbeat,
    RankRegistration,
    TableReport,
)

__all__ = ["create_app"]

Body = TypeVar("Body", bound=BaseModel)
TEXT_OK = {"content": {"text/plain": {"example": "OK"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "a field is missing, mistyped or out of range"},
}


def _body_schema(model: type[Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _invalid_body(exc: ValidationError) -> RequestValidationError:
    """Model errors take the same 422 path (and shape) as FastAPI's own validation."""
    return RequestValidationError(
        [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
    )


async def _parse(request: Request, model: type[Body]) -> Body:
    """Parse a JSON body whatever its content type: SGLang's own server reads any body as JSON,
    and curl users forget the header."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _invalid_body(exc) from exc


InstanceQuery = Annotated[
    str | None,
    Query(
        description="the group instance the caller registered in: a long poll about another "
        "instance (the table was reset since) is answered at once"
    ),
]
WaitQuery = Annotated[
    answers.WaitSeconds,
    Query(description="long poll: answer as soon as complete, or after this long"),
]


def create_app(
    settings: ServerSettings | None = None,
    store: StateStore | None = None,
    *,
    fast_path: bool = True,
    clock: Callable[[], float] = time.time,
) -> Any:
    """Build the server. ``store`` defaults to what ``settings.state_dir`` names; ``clock``
    (unix seconds) drives leases, room expiry and registration times."""
    settings = settings or ServerSettings()
    store = store if store is not None else open_store(settings.state_dir, settings.reset)
    registry = Registry.open(settings, store, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(registry.group.sweep_leases_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            registry.close()

    app = FastAPI(
        title="prefill-bootstrap",
        version=__version__,
        summary="SGLang-compatible bootstrap server for multi-node disaggregated prefill.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    install_error_handlers(app)
    install_ui(app)

    @app.put(
        "/route",
        summary="A prefill rank registers its cell and KV-transfer address (SGLang protocol).",
        response_class=Response,
        responses={
            200: TEXT_OK,
            409: {"model": ErrorBody, "description": "contradicts the established topology"},
            413: {"model": ErrorBody, "description": "body larger than the configured cap"},
            503: {"model": ErrorBody, "description": "could not be made durable; retry"},
            **ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                RankRegistration.model_json_schema(),
                                Gen2Registration.model_json_schema(),
                                Gen1Registration.model_json_schema(),
                            ],
                            "description": "SGLang protocol generation 3 (0.5.10+), 2 "
                            "(0.5.0rc0-0.5.9) or 1 (0.4.6-0.4.10), told apart by the fields",
                        }
                    }
                },
            }
        },
    )
    async def register_rank(request: Request) -> Response:
        return reply_response(await answers.register(registry, await request.body()))

    @app.get(
        "/route",
        summary="Server info (all four ranks -1) or one cell's address (SGLang protocol).",
        response_class=Response,
        responses={
            200: {"description": "server info, or {rank_ip, rank_port}"},
            400: {"description": "Missing inputs for bootstrap server."},
            404: {"description": "no rank registered that cell"},
            503: {"description": "Prefill server not fully registered yet (N workers ...)."},
            **ERRORS,
        },
    )
    async def lookup(
        request: Request,
        prefill_dp_rank: str | None = None,
        prefill_cp_rank: str | None = None,
        target_tp_rank: str | None = None,
        target_pp_rank: str | None = None,
        engine_rank: Annotated[str | None, Query(description="generations 1-2")] = None,
        target_dp_group: Annotated[str | None, Query(description="generations 1-2")] = None,
    ) -> Response:
        # The declared parameters document the route; the answer needs to know which ones were
        # present (even empty), which only the raw query string tells.
        return reply_response(answers.route_lookup(registry, dict(request.query_params)))

    @app.api_route(
        "/route",
        methods=["POST", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    async def route_other_methods(request: Request) -> Response:
        return error_response(
            405, "method_not_allowed", f"{request.method} is not allowed on /route (PUT, GET)"
        )

    @app.post(
        "/register_dp_rank",
        summary="Remember which prefill dp rank serves a bootstrap room (SGLang protocol).",
        response_class=Response,
        responses={200: TEXT_OK, **ERRORS},
        openapi_extra=_body_schema(DpRankRegistration),
    )
    async def register_dp_rank(request: Request) -> Response:
        return reply_response(
            answers.register_dp_rank(registry, await request.body(), registry.clock())
        )

    @app.post(
        "/query_dp_ranks",
        summary="Which dp rank serves each room; unknown or expired rooms are left out.",
        response_class=Response,
        responses={200: {"description": '{"<room>": dp_rank, ...}'}, **ERRORS},
        openapi_extra=_body_schema(DpRankQuery),
    )
    async def query_dp_ranks(request: Request) -> Response:
        return reply_response(
            answers.query_dp_ranks(registry, await request.body(), registry.clock())
        )

    @app.get(
        "/health",
        summary="Liveness: the process serves requests.",
        response_class=Response,
        responses={200: TEXT_OK},
    )
    async def health() -> Response:
        return reply_response(answers.health())

    @app.get(
        "/ready",
        summary="Readiness: 200 only when every cell of the topology is registered.",
        responses={503: {"description": "incomplete; the body lists the missing cells"}},
    )
    async def ready(
        request: Request, wait: WaitQuery = 0, instance: InstanceQuery = None
    ) -> Response:
        await wait_while_connected(registry, wait, instance, request.receive)
        return reply_response(answers.ready(registry))

    @app.get(
        "/prefill_port_table",
        summary="The whole port table for humans and scripts.",
        response_model=TableReport,
    )
    async def prefill_port_table(
        request: Request, wait: WaitQuery = 0, instance: InstanceQuery = None
    ) -> Response:
        await wait_while_connected(registry, wait, instance, request.receive)
        return reply_response(answers.port_table(registry))

    @app.delete(
        "/prefill_port_table",
        summary="Forget every registration and start a new group (new instance id).",
    )
    async def reset_table() -> dict[str, str]:
        return {"instance_id": await registry.group.reset()}

    @app.post(
        "/heartbeat",
        summary="A leased rank renews its cell (ours, not SGLang's; nothing is written to disk).",
        responses={
            404: {"model": ErrorBody, "description": "the cell is not registered: register"},
            409: {"model": ErrorBody, "description": "another address holds the cell now"},
            **ERRORS,
        },
        openapi_extra=_body_schema(Heartbeat),
    )
    async def heartbeat(request: Request) -> Response:
        beat = await _parse(request, Heartbeat)
        return json_response({"lease_expires_at": registry.group.renew(beat)})

    @app.get(
        "/metrics",
        summary="Prometheus metrics: cells, readiness, registrations by outcome, rooms, latency.",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        registry.group.expire_leases()
        return Response(render_metrics(registry), media_type=METRICS_CONTENT_TYPE.decode())

    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    return FrontDoor(
        app,
        registry,
        settings.max_body_bytes,
        serve_hot_routes=fast_path,
        auth_token=token,
        auth_reads=settings.auth_reads,
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout,
    )
