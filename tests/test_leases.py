"""Optional rank leases: a leased cell that stops heartbeating counts as missing; plain SGLang
registrations never expire."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import FakeClock, asgi_client, sglang_registration

pytestmark = pytest.mark.anyio


def beat(tp: int, port: int) -> dict[str, Any]:
    return {"dp": 0, "cp": 0, "tp": tp, "pp": 0, "rank_ip": "10.0.0.1", "rank_port": port}


async def register_pair(client: httpx.AsyncClient, lease: float | None) -> None:
    for tp in range(2):
        extra = {"lease_seconds": lease} if lease is not None else {}
        body = sglang_registration(attn_tp_rank=tp, rank_port=41000 + tp, **extra)
        assert (await client.put("/route", json=body)).status_code == 200


async def test_a_leased_cell_that_misses_its_heartbeat_makes_the_table_unready(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=10)
        assert (await client.get("/ready")).status_code == 200
        clock.advance(5)
        assert (await client.post("/heartbeat", json=beat(0, 41000))).status_code == 200
        clock.advance(6)
        response = await client.get("/ready")
        assert response.status_code == 503
        assert response.json()["missing_cells"] == [[0, 0, 1, 0]]
        assert response.json()["expired_cells"] == [[0, 0, 1, 0]]


async def test_an_expired_cell_is_shown_as_expired_in_the_table(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=10)
        clock.advance(11)
        report = (await client.get("/prefill_port_table")).json()
        assert [cell["state"] for cell in report["cells"]] == ["expired", "expired"]
        assert report["complete"] is False
        assert report["rows"][0]["registered"] == 0


async def test_a_heartbeat_after_expiry_brings_the_cell_back(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=10)
        clock.advance(11)
        assert (await client.get("/ready")).status_code == 503
        for tp in range(2):
            response = await client.post("/heartbeat", json=beat(tp, 41000 + tp))
            assert response.json()["lease_expires_at"] == clock.now + 10
        assert (await client.get("/ready")).status_code == 200


async def test_re_registering_renews_the_lease(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=10)
        clock.advance(8)
        await register_pair(client, lease=10)
        clock.advance(8)
        assert (await client.get("/ready")).status_code == 200


async def test_cells_registered_without_a_lease_never_expire(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=None)
        clock.advance(10**6)
        assert (await client.get("/ready")).status_code == 200


async def test_a_heartbeat_for_an_unregistered_cell_is_404(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        response = await client.post("/heartbeat", json=beat(0, 41000))
        assert response.status_code == 404
        assert response.json()["error"] == "cell_not_found"


async def test_a_heartbeat_from_a_replaced_rank_is_409_and_does_not_renew(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=10)
        body = sglang_registration(attn_tp_rank=0, rank_port=42000, lease_seconds=10)
        await client.put("/route", json=body)
        response = await client.post("/heartbeat", json=beat(0, 41000))
        assert response.status_code == 409
        assert "42000" in response.json()["message"]


async def test_expired_leases_are_reported_in_metrics(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    async with asgi_client(app_factory(clock=clock)) as client:
        await register_pair(client, lease=10)
        clock.advance(11)
        metrics = (await client.get("/metrics")).text
        assert "prefill_bootstrap_expired_cells 2.0" in metrics
        assert "prefill_bootstrap_ready 0.0" in metrics


@pytest.mark.parametrize("lease", [0, -1, "10", 86401])
async def test_a_bad_lease_is_422(app_factory: Callable[..., Any], lease: object) -> None:
    async with asgi_client(app_factory()) as client:
        response = await client.put("/route", json=sglang_registration(lease_seconds=lease))
        assert response.status_code == 422
        assert "lease_seconds" in response.json()["message"]


async def test_the_lease_is_not_echoed_to_decoders_in_server_info(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        await register_pair(client, lease=10)
        info = await client.get(
            "/route",
            params={
                "prefill_dp_rank": "-1",
                "prefill_cp_rank": "-1",
                "target_tp_rank": "-1",
                "target_pp_rank": "-1",
            },
        )
        assert "lease_seconds" not in info.json()
