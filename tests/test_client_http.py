"""The sync and async clients against the real app in memory (and a few scripted answers).

``BootstrapClient`` runs over ``blocking_transport(app)``, ``AsyncBootstrapClient`` over
``httpx.ASGITransport(app)``: both speak to the same server code a deployment runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from prefill_bootstrap.client.http import AsyncBootstrapClient, BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import (
    CellNotFound,
    ConfigurationError,
    RequestRejected,
    ServerUnreachable,
    TableIncomplete,
    UnexpectedAnswer,
)
from prefill_bootstrap.shared.protocol import RankAddress, RankRegistration
from tests.conftest import sglang_registration

URL = "http://bootstrap:8998"
FAST = RetryPolicy(deadline=0.5, attempts=3, initial_backoff=0.01, max_backoff=0.05, jitter=0.0)


def rank(tp: int, dp: int = 0, **overrides: Any) -> dict[str, Any]:
    """One rank of a dp=2 x tp=2 group; every rank has its own port."""
    return sglang_registration(
        attn_dp_size=2,
        attn_dp_rank=dp,
        attn_tp_rank=tp,
        rank_ip=f"10.0.0.{dp + 1}",
        rank_port=41000 + tp,
        **overrides,
    )


@pytest.fixture
def connect(
    app_factory: Callable[..., Any], blocking_transport: Callable[[Any], httpx.BaseTransport]
) -> Callable[..., BootstrapClient]:
    """``connect(**client_options)``: a sync client on one shared in-memory app."""
    app = app_factory()
    clients: list[BootstrapClient] = []

    def make(**options: Any) -> BootstrapClient:
        client = BootstrapClient(
            URL, transport=blocking_transport(app), retry=options.pop("retry", FAST), **options
        )
        clients.append(client)
        return client

    return make


def test_a_registered_rank_appears_in_the_table_with_its_address(connect: Callable) -> None:
    client = connect()
    client.register(rank(tp=1))
    report = client.table()
    assert [(c.cell, c.rank_ip, c.rank_port) for c in report.cells] == [
        ((0, 0, 1, 0), "10.0.0.1", 41001)
    ]
    assert report.complete is False


def test_a_registration_may_be_a_model_or_a_plain_mapping(connect: Callable) -> None:
    client = connect()
    client.register(RankRegistration.model_validate(rank(tp=0)))
    client.register(rank(tp=1))
    assert client.table().registered_cells == 2


def test_an_invalid_mapping_is_refused_before_anything_is_sent() -> None:
    sent: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200))
    with (
        BootstrapClient(URL, transport=transport) as client,
        pytest.raises(ConfigurationError, match="attn_tp_rank"),
    ):
        client.register(sglang_registration(attn_tp_rank=5))
    assert sent == []


def test_lookup_answers_a_cells_address_once_the_table_is_complete(connect: Callable) -> None:
    client = connect()
    for dp in (0, 1):
        for tp in (0, 1):
            client.register(rank(tp=tp, dp=dp))
    assert client.lookup(1, 0, 1, 0) == RankAddress(rank_ip="10.0.0.2", rank_port=41001)


def test_lookup_of_a_cell_outside_the_topology_is_cell_not_found(connect: Callable) -> None:
    client = connect()
    client.register(sglang_registration(attn_tp_size=1))
    with pytest.raises(CellNotFound) as caught:
        client.lookup(0, 0, 3, 0)
    assert caught.value.cell == (0, 0, 3, 0)


def test_lookup_while_incomplete_retries_the_503_and_then_names_it(connect: Callable) -> None:
    client = connect()
    client.register(rank(tp=0))
    with pytest.raises(ServerUnreachable, match="not fully registered yet"):
        client.lookup(0, 0, 0, 0)


def test_server_info_is_what_a_decode_worker_reads(connect: Callable) -> None:
    client = connect()
    client.register(sglang_registration(attn_tp_size=1))
    info = client.server_info()
    assert (info["attn_tp_size"], info["dp_size"], info["page_size"]) == (1, 1, 16)


def test_wait_returns_as_soon_as_the_last_rank_registers(connect: Callable) -> None:
    waiter, late = connect(), connect()
    for dp, tp in ((0, 0), (0, 1), (1, 0)):
        waiter.register(rank(tp=tp, dp=dp))
    timer = threading.Timer(0.3, late.register, [rank(tp=1, dp=1)])
    started = time.monotonic()
    timer.start()
    try:
        report = waiter.wait_until_complete(20)
    finally:
        timer.join()
    assert report.complete
    assert report.registered_cells == 4
    assert time.monotonic() - started < 5


def test_wait_times_out_naming_exactly_the_missing_cells_and_the_hosts_that_registered(
    connect: Callable,
) -> None:
    client = connect()
    client.register(rank(tp=0, dp=0))
    client.register(rank(tp=1, dp=1))
    with pytest.raises(TableIncomplete) as caught:
        client.wait_until_complete(0.3)
    error = caught.value
    assert error.missing == [(0, 0, 1, 0), (1, 0, 0, 0)]
    assert error.expected == 4
    assert error.registered_hosts == ["10.0.0.1", "10.0.0.2"]
    assert error.url == f"{URL}/prefill_port_table"
    assert "2 of 4 cells are missing: (dp=0, cp=0, tp=1, pp=0), (dp=1, cp=0, tp=0, pp=0)" in str(
        error
    )


def test_wait_on_an_empty_table_says_the_topology_is_unknown(connect: Callable) -> None:
    with pytest.raises(TableIncomplete, match="no rank has registered yet"):
        connect().wait_until_complete(0.1)


def test_wait_paces_its_polls_when_the_server_does_not_long_poll() -> None:
    def incomplete(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            polls.append(request)
            return httpx.Response(503, json=_not_ready())
        return httpx.Response(200, json=_empty_report())

    polls: list[httpx.Request] = []
    with (
        BootstrapClient(URL, transport=httpx.MockTransport(incomplete)) as client,
        pytest.raises(TableIncomplete),
    ):
        client.wait_until_complete(0.5, poll_interval=0.1)
    assert 3 <= len(polls) <= 8


def test_the_wait_asks_only_whether_complete_and_reads_the_table_only_to_name_the_missing() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path == "/ready":
            return httpx.Response(503, json=_not_ready())
        return httpx.Response(200, json=_empty_report())

    asked: list[str] = []
    with (
        BootstrapClient(URL, transport=httpx.MockTransport(server)) as client,
        pytest.raises(TableIncomplete),
    ):
        client.wait_until_ready(0.3, poll_interval=0.1)
    assert set(asked[:-1]) == {"/ready"}, "every poll is the small readiness answer"
    assert asked[-1] == "/prefill_port_table", "read once, at the deadline, to name the hosts"


def test_a_complete_group_is_known_without_reading_the_table() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json={**_not_ready(), "ready": True, "registered_cells": 0})

    asked: list[str] = []
    with BootstrapClient(URL, transport=httpx.MockTransport(server)) as client:
        ready = client.wait_until_ready(5)
    assert asked == ["/ready"]
    assert (ready.complete, ready.instance_id) == (True, "x")


def test_a_503_that_is_not_a_readiness_answer_is_retried_like_any_outage() -> None:
    answers = iter([httpx.Response(503, text="<html>upstream busy</html>")])

    def server(request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(200, json={**_not_ready(), "ready": True}))

    with BootstrapClient(URL, transport=httpx.MockTransport(server), retry=FAST) as client:
        assert client.wait_until_ready(5).complete


def test_an_answer_that_is_not_a_table_is_an_unexpected_answer() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text="<html>hi</html>"))
    with BootstrapClient(URL, transport=transport) as client, pytest.raises(UnexpectedAnswer):
        client.table()


def test_the_auth_token_is_sent_as_a_bearer_header() -> None:
    seen: list[str | None] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, text="OK")

    with BootstrapClient(URL, transport=httpx.MockTransport(record), auth_token="s3cret") as c:
        c.register(rank(tp=0))
    assert seen == ["Bearer s3cret"]


def test_a_server_requiring_a_token_accepts_it_and_refuses_its_absence_without_retry(
    app_factory: Callable[..., Any], blocking_transport: Callable[[Any], httpx.BaseTransport]
) -> None:
    app = app_factory(auth_token="s3cret")
    with BootstrapClient(URL, transport=blocking_transport(app), auth_token="s3cret") as client:
        client.register(rank(tp=0))
    with (
        BootstrapClient(URL, transport=blocking_transport(app), retry=FAST) as client,
        pytest.raises(RequestRejected) as caught,
    ):
        client.register(rank(tp=1))
    assert caught.value.status_code == 401
    assert "Bearer" in caught.value.server_message


def test_a_conflicting_registration_is_rejected_with_the_servers_409_message(
    connect: Callable,
) -> None:
    client = connect()
    client.register(rank(tp=0))
    with pytest.raises(RequestRejected) as caught:
        client.register(rank(tp=1, attn_tp_size=4))
    assert caught.value.status_code == 409
    assert "attn_tp_size=4 contradicts the established attn_tp_size=2" in str(caught.value)


def test_a_registration_the_server_finds_invalid_is_rejected_with_its_422_message(
    connect: Callable,
) -> None:
    unchecked = RankRegistration.model_construct(**{**rank(tp=0), "rank_port": 70000})
    with pytest.raises(RequestRejected) as caught:
        connect().register(unchecked)
    assert caught.value.status_code == 422
    assert "rank_port" in caught.value.server_message


def _not_ready() -> dict[str, Any]:
    return {
        "ready": False,
        "instance_id": "x",
        "expected_cells": None,
        "registered_cells": 0,
        "missing_cells": [],
        "missing_count": 0,
        "expired_cells": [],
    }


def _empty_report() -> dict[str, Any]:
    return {
        "instance_id": "x",
        "complete": False,
        "topology": None,
        "expected_cells": None,
        "registered_cells": 0,
        "missing_cells": [],
        "rows": [],
        "cells": [],
        "replacements": [],
        "conflicts": [],
        "server_info": None,
        "state": "memory",
    }


# -- the async client: the same calls through the same core -------------------------------------


@pytest.fixture
def async_connect(app_factory: Callable[..., Any]) -> Callable[..., AsyncBootstrapClient]:
    app = app_factory()

    def make(**options: Any) -> AsyncBootstrapClient:
        retry = options.pop("retry", FAST)
        transport = httpx.ASGITransport(app=app)
        return AsyncBootstrapClient(URL, transport=transport, retry=retry, **options)

    return make


@pytest.mark.anyio
async def test_the_async_client_registers_and_reads_the_table(async_connect: Callable) -> None:
    async with async_connect() as client:
        await client.register(rank(tp=0))
        report = await client.table()
    assert report.registered_cells == 1


@pytest.mark.anyio
async def test_the_async_client_looks_up_cells_and_server_info(async_connect: Callable) -> None:
    async with async_connect() as client:
        await client.register(sglang_registration(attn_tp_size=1, rank_port=41234))
        address = await client.lookup(0, 0, 0, 0)
        info = await client.server_info()
    assert address.rank_port == 41234
    assert info["attn_tp_size"] == 1


@pytest.mark.anyio
async def test_the_async_wait_returns_when_the_last_rank_registers(async_connect: Callable) -> None:
    import anyio

    async with async_connect() as waiter, async_connect() as late:
        for dp, tp in ((0, 0), (0, 1), (1, 0)):
            await waiter.register(rank(tp=tp, dp=dp))

        async def register_late() -> None:
            await anyio.sleep(0.2)
            await late.register(rank(tp=1, dp=1))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(register_late)
            report = await waiter.wait_until_complete(20)
    assert report.complete


@pytest.mark.anyio
async def test_the_async_wait_times_out_naming_the_missing_cells(async_connect: Callable) -> None:
    async with async_connect() as client:
        await client.register(rank(tp=0, dp=1))
        with pytest.raises(TableIncomplete) as caught:
            await client.wait_until_complete(0.2)
    assert caught.value.missing == [(0, 0, 0, 0), (0, 0, 1, 0), (1, 0, 1, 0)]


@pytest.mark.anyio
async def test_the_async_client_retries_transient_failures_like_the_sync_one() -> None:
    answers = iter([httpx.Response(503, text="busy"), httpx.Response(200, text="OK")])
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return next(answers)

    async with AsyncBootstrapClient(URL, transport=httpx.MockTransport(handler), retry=FAST) as c:
        await c.register(rank(tp=0))
    assert len(calls) == 2


@pytest.mark.anyio
async def test_the_async_client_raises_a_409_at_once(async_connect: Callable) -> None:
    async with async_connect() as client:
        await client.register(rank(tp=0))
        with pytest.raises(RequestRejected, match="contradicts"):
            await client.register(rank(tp=0, page_size=32))
