"""Every route of the server, declared once: the table every door and the docs are derived from.

A ``Route`` says everything about one method and path: who may call it (``access``, a required
field, so a new route cannot be left open by omission), whether the lean door answers it inside
uvicorn's parser (``hot``), whether it is a long poll (``?wait=``), its body and query for the
docs, and its answer. From this table come the hot-path dispatcher and the ASGI ``FrontDoor``
(``fastpath.py``, ``hot_protocol.py``), the FastAPI routes and OpenAPI schema (``openapi.py``),
the token check, the metrics' route labels and the 405s of known paths. ``/docs`` and
``/openapi.json`` stay FastAPI's own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel

from prefill_bootstrap.service import additions, answers, watching
from prefill_bootstrap.service.event_stream import EventStream
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply, Waiting
from prefill_bootstrap.service.ui_routes import ASSETS, asset, status_page_root
from prefill_bootstrap.service.wait_param import WAIT_SECONDS, WaitSeconds, long_poll_seconds
from prefill_bootstrap.shared.events import EventPage
from prefill_bootstrap.shared.generations import Gen1Registration, Gen2Registration
from prefill_bootstrap.shared.protocol import (
    Deregistered,
    Deregistration,
    DpRankQuery,
    DpRankRegistration,
    ErrorBody,
    Heartbeat,
    RankRegistration,
    ReadyReport,
    TableReport,
)

__all__ = [
    "ALLOWED",
    "HOT",
    "METRIC_LABELS",
    "ROUTES",
    "TABLE",
    "Access",
    "Answer",
    "QueryParam",
    "Route",
    "StreamAnswer",
    "WaitSeconds",
    "access_of",
    "long_poll_seconds",
]

Access = Literal["write", "read", "probe"]
"""``write``: needs the token whenever one is configured. ``read``: needs it only with
``--auth-reads`` (unmodified SGLang decodes send none). ``probe``: never (liveness probes and the
status page, which asks for the token itself)."""
Answer = Callable[[Registry, bytes, bytes], "Reply | Awaitable[Reply] | Waiting"]
"""``(registry, raw query string, body) -> Reply``, or an awaitable of one (writes that must be
durable first), or ``Waiting`` for one (a read that waits for something to happen: abandoned if
its client leaves). A ``BootstrapError`` raised by an answer is answered by its own status."""
StreamAnswer = Callable[[Registry, bytes, Sequence[tuple[bytes, bytes]]], "Reply | EventStream"]
"""``(registry, raw query string, request headers) -> EventStream`` (or a ``Reply``: an error
before any stream byte), for a request that asked for ``Accept: text/event-stream``."""


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    method: str
    path: str
    access: Access
    answer: Answer
    summary: str
    hot: bool = False
    """Answered inside uvicorn's parser by the lean door (``hot_protocol.py``)."""
    long_poll: bool = False
    """Takes ``?wait=`` (and ``?instance=``): parked until the table completes, then answered."""
    stream: StreamAnswer | None = None
    """Answers ``Accept: text/event-stream`` requests with an event stream (others: ``answer``).
    Never hot: only the ASGI doors can run a stream."""
    body: type[BaseModel] | Mapping[str, Any] | None = None
    """The request body's model (or JSON schema), for the docs; the answer validates it."""
    query: tuple[QueryParam, ...] = ()
    responses: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    """OpenAPI responses beyond those derived from the rest (401, 413, 422 and the like)."""


LONG_POLL_QUERY = (
    QueryParam(
        "wait",
        "long poll: answer as soon as complete, or after this many seconds",
        {**WAIT_SECONDS.json_schema(), "default": 0},
    ),
    QueryParam(
        "instance",
        "the group instance the caller registered in: a long poll about another instance (the "
        "table was reset since) is answered at once",
    ),
)
LOOKUP_QUERY = (
    *(
        QueryParam(name, "generation 3 (and target_pp_rank: 2)")
        for name in ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank")
    ),
    QueryParam("engine_rank", "generations 1-2"),
    QueryParam("target_dp_group", "generations 1-2"),
)
REGISTRATION_BODY = {
    "anyOf": [
        RankRegistration.model_json_schema(),
        Gen2Registration.model_json_schema(),
        Gen1Registration.model_json_schema(),
    ],
    "description": "SGLang protocol generation 3 (0.5.10+), 2 (0.5.0rc0-0.5.9) or 1 "
    "(0.4.6-0.4.10), told apart by the fields",
}
TEXT_OK = {"content": {"text/plain": {"example": "OK"}}}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


def _asset(path: str, registry: Registry, query: bytes, body: bytes) -> Reply:
    return asset(path)


TABLE: tuple[Route, ...] = (
    Route(
        method="PUT",
        path="/route",
        access="write",
        hot=True,
        answer=answers.register,
        summary="A prefill rank registers its cell and KV-transfer address (SGLang protocol).",
        body=REGISTRATION_BODY,
        responses={
            200: TEXT_OK,
            409: _error("topology_conflict: contradicts the established topology"),
            422: _error(
                "validation_error: a field is missing, mistyped or out of range; "
                "protocol_mismatch: a generation the server was pinned (--protocol) not to accept"
            ),
            503: _error("state_not_durable: could not be made durable; retry"),
        },
    ),
    Route(
        method="GET",
        path="/route",
        access="read",
        hot=True,
        answer=answers.route_lookup,
        summary="Server info (all four ranks -1) or one cell's address (SGLang protocol).",
        query=LOOKUP_QUERY,
        responses={
            200: {"description": "server info, or {rank_ip, rank_port}"},
            400: {"description": "Missing inputs for bootstrap server."},
            404: {"description": "no rank registered that cell"},
            409: _error("topology_not_addressable: an older decode cannot address this group"),
            422: _error(
                "validation_error: a rank is not an integer; protocol_mismatch: a generation "
                "the server was pinned (--protocol) not to accept"
            ),
            503: {"description": "Prefill server not fully registered yet (N workers ...)."},
        },
    ),
    Route(
        method="POST",
        path="/register_dp_rank",
        access="write",
        hot=True,
        answer=answers.register_dp_rank,
        summary="Remember which prefill dp rank serves a bootstrap room (SGLang protocol).",
        body=DpRankRegistration,
        responses={200: TEXT_OK},
    ),
    Route(
        method="POST",
        path="/query_dp_ranks",
        access="read",  # a query that carries its rooms in a body: decodes send no token
        hot=True,
        answer=answers.query_dp_ranks,
        summary="Which dp rank serves each room; unknown or expired rooms are left out.",
        body=DpRankQuery,
        responses={200: {"description": '{"<room>": dp_rank, ...}'}},
    ),
    Route(
        method="GET",
        path="/health",
        access="probe",
        hot=True,
        answer=answers.health,
        summary="Liveness: the process serves requests.",
        responses={200: TEXT_OK},
    ),
    Route(
        method="GET",
        path="/ready",
        access="read",
        hot=True,
        long_poll=True,
        answer=additions.ready,
        summary="Readiness: 200 only when every cell of the topology is registered.",
        query=LONG_POLL_QUERY,
        responses={
            200: {"model": ReadyReport, "description": "complete"},
            503: {"model": ReadyReport, "description": "incomplete; lists the missing cells"},
        },
    ),
    Route(
        method="GET",
        path="/prefill_port_table",
        access="read",
        hot=True,
        long_poll=True,
        answer=additions.port_table,
        summary="The whole port table for humans and scripts.",
        query=LONG_POLL_QUERY,
        responses={200: {"model": TableReport, "description": "the table"}},
    ),
    Route(
        method="GET",
        path="/prefill_port_table/events",
        access="read",
        answer=watching.poll,
        stream=watching.stream,
        summary="The table's change feed: Server-Sent Events (Accept: text/event-stream), "
        "else a JSON long poll.",
        query=(
            QueryParam(
                "since",
                "the position after which to answer events: '<stream>:<seq>' (an SSE id, or a "
                "table's stream and seq) or a bare seq of the current stream; absent: from now. "
                "For SSE a Last-Event-ID header wins over it",
            ),
            QueryParam(
                "wait",
                "JSON long poll: when no event follows since, wait up to this many seconds for "
                "the next (ignored by SSE, which streams until the server stops)",
                {**WAIT_SECONDS.json_schema(), "default": 0},
            ),
        ),
        responses={
            200: {
                "model": EventPage,
                "description": "JSON: every event after since (resume with since=<stream>:<seq> "
                "of this page). SSE (text/event-stream): 'retry: 2000', then per event 'id: "
                "<stream>:<seq>', 'event: <kind>', 'data: <TableEvent JSON>', and ': keep-alive' "
                "comments while idle",
                "content": {"text/event-stream": {}},
            },
            410: _error(
                "history_gone: since/Last-Event-ID is older than the history held, ahead of it "
                "or from another server run; re-read GET /prefill_port_table and watch from its "
                "stream and seq"
            ),
            422: _error(
                "validation_error: query.since or header.last-event-id is not a position, or "
                "query.wait is not a number from 0 to 3600"
            ),
        },
    ),
    Route(
        method="DELETE",
        path="/prefill_port_table",
        access="write",
        answer=additions.reset,
        summary="Forget every registration and start a new group (new instance id).",
        responses={200: {"description": '{"instance_id": "<the new instance>"}'}},
    ),
    Route(
        method="POST",
        path="/heartbeat",
        access="write",
        answer=additions.heartbeat,
        summary="A leased rank renews its cell (ours, not SGLang's; nothing is written to disk).",
        body=Heartbeat,
        responses={
            200: {"description": '{"lease_expires_at": <unix seconds>}'},
            404: _error("cell_not_found: the cell is not registered: register"),
            409: _error("lease_not_held: another address holds the cell now"),
        },
    ),
    Route(
        method="POST",
        path="/deregister",
        access="write",
        answer=additions.deregister,
        summary="A rank takes its own cell out of the group (a clean shutdown); durable first.",
        body=Deregistration,
        responses={
            200: {"model": Deregistered, "description": "the cell is gone; /ready answers 503"},
            404: _error("cell_not_found: the cell is not registered (already gone)"),
            409: _error("address_mismatch: another address holds the cell now"),
            503: _error("state_not_durable: could not be made durable; retry"),
        },
    ),
    Route(
        method="GET",
        path="/metrics",
        access="read",
        answer=additions.metrics,
        summary="Prometheus metrics: cells, readiness, registrations by outcome, rooms, latency.",
        responses={200: {"content": {"text/plain": {}}}},
    ),
    Route(
        method="GET",
        path="/",
        access="probe",
        answer=status_page_root,
        summary="The status page (redirects to /ui).",
        responses={307: {"description": "to /ui"}},
    ),
    *(
        Route(
            method="GET",
            path=path,
            access="probe",
            answer=partial(_asset, path),
            summary=f"Status page asset {path}",
            responses={200: {"content": {content_type.decode().partition(";")[0]: {}}}},
        )
        for path, (_, content_type) in ASSETS.items()
    ),
)

ROUTES: dict[tuple[str, str], Route] = {(route.method, route.path): route for route in TABLE}
"""Every declared route by ``(method, path)``: one dict lookup per request."""
HOT: dict[tuple[str, str], Route] = {key: route for key, route in ROUTES.items() if route.hot}
ALLOWED: dict[str, tuple[str, ...]] = {}
"""Each known path's declared methods: any other method is answered 405 with this ``allow``."""
for _route in TABLE:
    ALLOWED[_route.path] = (*ALLOWED.get(_route.path, ()), _route.method)
METRIC_LABELS = frozenset({*ALLOWED, "/docs", "/openapi.json"})
"""The ``route`` label of ``/metrics``: a known path, else ``other`` (labels stay bounded)."""
_UNDECLARED_ACCESS: dict[str, Access] = {
    path: "probe" if all(ROUTES[m, path].access == "probe" for m in methods) else "read"
    for path, methods in ALLOWED.items()
}


def access_of(route: Route | None, path: str) -> Access:
    """Who may ask: the route's own access, or for anything undeclared (a 404, a 405, the docs)
    ``read``; an undeclared method on a path open to probes stays open, so it learns its 405."""
    if route is not None:
        return route.access
    return _UNDECLARED_ACCESS.get(path, "read")
