"""``deregister()``: the body it sends, and what each answer of ``POST /deregister`` means."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from prefill_bootstrap.client.core import Deregistered
from prefill_bootstrap.client.http import AsyncBootstrapClient, BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import RequestRejected, UnexpectedAnswer

URL = "http://bootstrap:8998"
FAST = RetryPolicy(deadline=0.3, attempts=3, initial_backoff=0.01, max_backoff=0.02, jitter=0.0)
LEFT = {
    "cell": [1, 0, 3, 0],
    "address": {"rank_ip": "10.0.1.4", "rank_port": 41003},
    "registered": 15,
    "expected": 16,
    "complete": False,
    "incarnation": "g1.4",
}


def answering(status: int, body: dict, sent: list[httpx.Request] | None = None) -> BootstrapClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if sent is not None:
            sent.append(request)
        return httpx.Response(status, json=body)

    return BootstrapClient(URL, transport=httpx.MockTransport(handler), retry=FAST)


def leave(client: BootstrapClient) -> Deregistered | None:
    with client:
        return client.deregister(1, 0, 3, 0, rank_ip="10.0.1.4", rank_port=41003)


def test_it_posts_the_heartbeats_shape_and_answers_what_left() -> None:
    sent: list[httpx.Request] = []
    departure = leave(answering(200, LEFT, sent))
    assert departure is not None
    assert (departure.cell, departure.registered, departure.incarnation) == (
        (1, 0, 3, 0),
        15,
        "g1.4",
    )
    assert (sent[0].method, sent[0].url.path) == ("POST", "/deregister")
    assert json.loads(sent[0].content) == {
        "dp": 1, "cp": 0, "tp": 3, "pp": 0, "rank_ip": "10.0.1.4", "rank_port": 41003
    }  # fmt: skip


def test_a_cell_nobody_holds_is_already_gone() -> None:
    body = {"error": "cell_not_found", "message": "no rank registered cell", "details": []}
    assert leave(answering(404, body)) is None


def test_a_server_without_the_route_is_not_mistaken_for_already_gone() -> None:
    with pytest.raises(UnexpectedAnswer, match="no POST /deregister"):
        leave(answering(404, {"detail": "Not Found"}))


def test_another_address_holding_the_cell_is_refused_with_the_servers_words() -> None:
    body = {
        "error": "address_mismatch",
        "message": "cell (dp=1, cp=0, tp=3, pp=0) is registered at 10.0.1.9:41003",
        "details": [{"registered": {"rank_ip": "10.0.1.9", "rank_port": 41003}}],
    }
    with pytest.raises(RequestRejected, match=r"registered at 10\.0\.1\.9:41003") as caught:
        leave(answering(409, body))
    assert caught.value.status_code == 409


def test_the_async_twin_reads_the_same_answers() -> None:
    async def run() -> Deregistered | None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=LEFT))
        async with AsyncBootstrapClient(URL, transport=transport, retry=FAST) as client:
            return await client.deregister(1, 0, 3, 0, rank_ip="10.0.1.4", rank_port=41003)

    departure = asyncio.run(run())
    assert departure is not None and departure.complete is False
