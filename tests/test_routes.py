"""The route table is the server's one declaration of its HTTP edge: these tests enumerate it, so
a route added to it is checked for auth, docs and both doors without a test of its own."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import orjson
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.routes import ALLOWED, ROUTES, TABLE, Route
from prefill_bootstrap.service.store import MemoryStore
from tests.conftest import asgi_client, sglang_registration

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"
GOOD = {"authorization": f"Bearer {TOKEN}"}
READS_BY_POST = {("POST", "/query_dp_ranks")}
"""The one route that reads by POST: a query whose rooms travel in its body, asked by unmodified
SGLang decodes, which send no token."""
BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "/route"): sglang_registration(attn_tp_size=1),
    ("POST", "/register_dp_rank"): {"bootstrap_room": 7, "dp_rank": 0},
    ("POST", "/query_dp_ranks"): {"bootstrap_rooms": [7]},
    ("POST", "/heartbeat"): {"dp": 0, "cp": 0, "tp": 0, "pp": 0, "rank_ip": "10.0.0.1",
                             "rank_port": 41000},
    ("POST", "/deregister"): {"dp": 0, "cp": 0, "tp": 0, "pp": 0, "rank_ip": "10.0.0.1",
                              "rank_port": 41000},
}  # fmt: skip
ids = [f"{route.method} {route.path}" for route in TABLE]


def test_access_is_a_required_field_of_every_route() -> None:
    access = next(f for f in dataclasses.fields(Route) if f.name == "access")
    assert access.default is dataclasses.MISSING
    assert access.default_factory is dataclasses.MISSING


@pytest.mark.parametrize("route", TABLE, ids=ids)
def test_every_route_that_is_not_a_read_by_method_needs_the_token(route: Route) -> None:
    if route.method not in ("GET", "HEAD") and (route.method, route.path) not in READS_BY_POST:
        assert route.access == "write"


def test_a_route_that_streams_is_never_hot() -> None:
    """The lean door writes one answer from the parser's callbacks; a stream needs the ASGI
    doors, which run it as a loop of ``more_body`` sends."""
    assert [route.path for route in TABLE if route.stream is not None and route.hot] == []


def test_each_method_and_path_is_declared_once() -> None:
    keys = [(route.method, route.path) for route in TABLE]
    assert len(keys) == len(set(keys))


async def test_every_declared_route_is_in_the_openapi_schema() -> None:
    app = create_app(ServerSettings(state_dir=None), MemoryStore())
    async with asgi_client(app) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    app.registry.close()
    for route in TABLE:
        operation = paths[route.path][route.method.lower()]
        assert operation["summary"] == route.summary
        if route.access != "probe":
            assert "401" in operation["responses"]
        if route.body is not None:
            assert "requestBody" in operation
        assert {p["name"] for p in operation.get("parameters", [])} == {p.name for p in route.query}


async def _ask(client: httpx.AsyncClient, route: Route) -> httpx.Response:
    body = BODIES.get((route.method, route.path))
    content = orjson.dumps(body) if body is not None else None
    return await client.request(route.method, route.path, content=content)


@pytest.mark.parametrize("route", TABLE, ids=ids)
async def test_each_door_answers_each_declared_route_alike(route: Route) -> None:
    """The lean door and FastAPI's routes answer the same bytes (the instance id and the feed's
    stream aside, new per server; and the metrics, which time the requests)."""
    answers = []
    for fast_path in (True, False):
        app = create_app(
            ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path, clock=lambda: 1e9
        )
        async with asgi_client(app) as client:
            await client.put("/route", json=sglang_registration(attn_tp_size=1))
            response = await _ask(client, route)
        app.registry.close()
        assert response.status_code < 500, response.text
        instance = response.headers["x-sglang-disaggregation-instance-id"].encode()
        stream = app.registry.events.stream.encode()  # the change feed's run id, new per server
        body = response.content.replace(instance, b"<instance>").replace(stream, b"<stream>")
        answers.append(
            (
                response.status_code,
                response.headers["content-type"],
                response.headers.get("cache-control"),
                response.headers.get("location"),
                b"" if route.path == "/metrics" else body,
            )
        )
    assert answers[0] == answers[1]


@pytest.mark.parametrize("route", TABLE, ids=ids)
async def test_the_token_is_asked_exactly_where_the_table_says(route: Route) -> None:
    for auth_reads in (False, True):
        app = create_app(
            ServerSettings(state_dir=None, auth_token=TOKEN, auth_reads=auth_reads), MemoryStore()
        )
        async with asgi_client(app) as client:
            refused = (await _ask(client, route)).status_code == 401
            client.headers.update(GOOD)
            assert (await _ask(client, route)).status_code != 401
        app.registry.close()
        needs = route.access == "write" or (route.access == "read" and auth_reads)
        assert refused == needs, (route.method, route.path, auth_reads)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
@pytest.mark.parametrize("path", sorted(ALLOWED))
async def test_an_undeclared_method_on_a_known_path_is_405_naming_the_allowed(
    path: str, fast_path: bool
) -> None:
    app = create_app(ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path)
    async with asgi_client(app) as client:
        response = await client.request("PATCH", path)
    app.registry.close()
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert set(response.headers["allow"].split(", ")) == set(ALLOWED[path])
    assert path in response.json()["message"]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
@pytest.mark.parametrize(
    ("method", "path", "part"),
    [("POST", "/heartbeat", "renew"), ("PUT", "/route", "register")],
    ids=["answered-at-once", "awaited"],
)
async def test_an_answer_that_fails_unexpectedly_is_the_one_json_500_on_every_door(
    fast_path: bool, method: str, path: str, part: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug behind a route is answered as the lean door answers it (logged, JSON, counted,
    stamped with the instance), not as whatever the ASGI server makes of an escaped error."""
    app = create_app(ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.registry.group, part, broken)
    async with asgi_client(app) as client:
        response = await _ask(client, ROUTES[method, path])
        metrics = (await client.get("/metrics")).text
    app.registry.close()
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    assert "x-sglang-disaggregation-instance-id" in response.headers
    assert f'route="{path}"' in metrics


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
async def test_a_405_of_fastapis_own_pages_names_the_allowed_too(
    path: str, fast_path: bool
) -> None:
    app = create_app(ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path)
    async with asgi_client(app) as client:
        response = await client.request("DELETE", path)
    app.registry.close()
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]
