"""``POST /deregister``: a rank takes its own cell out of the group on a clean shutdown.

Only the address that holds the cell may remove it, with the token like every write, and the 200
means the removal is on disk. Afterwards the table lacks the cell, ``/ready`` answers 503, the
incarnation has moved on and watchers were told (``left``, then ``incomplete``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import MemoryStore, SqliteStore
from prefill_bootstrap.service.table import PortTable
from prefill_bootstrap.shared.errors import AddressMismatch, NothingToDeregister
from prefill_bootstrap.shared.protocol import INSTANCE_HEADER, Cell, RankAddress, RankRegistration
from tests.conftest import FakeClock, asgi_client
from tests.conftest import cell_body as leaving
from tests.conftest import two_cell_rank as rank
from tests.stepped_store import SteppedStore

pytestmark = pytest.mark.anyio


async def fill(client: httpx.AsyncClient, **overrides: Any) -> None:
    for tp in range(2):
        assert (await client.put("/route", json=rank(tp, **overrides))).status_code == 200


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
async def test_the_rank_at_the_address_leaves_and_the_table_is_incomplete(
    fast_path: bool,
) -> None:
    app = create_app(ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path)
    async with asgi_client(app) as client:
        await fill(client)
        group = app.registry.group.instance_id
        answer = await client.post("/deregister", json=leaving(1))
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "cell": [0, 0, 1, 0],
            "address": {"rank_ip": "10.0.0.1", "rank_port": 41001},
            "registered": 1,
            "expected": 2,
            "complete": False,
            "incarnation": f"{group}.1",
        }
        assert answer.headers[INSTANCE_HEADER] == group  # a write's acknowledgement: the group
        ready = await client.get("/ready")
        assert ready.headers[INSTANCE_HEADER] == f"{group}.1"
        assert ready.status_code == 503 and ready.json()["missing_cells"] == [[0, 0, 1, 0]]
        table = (await client.get("/prefill_port_table")).json()
        assert [(cell["tp"], cell["rank_port"]) for cell in table["cells"]] == [(0, 41000)]
        assert table["incarnation"] == f"{group}.1"
    app.registry.close()
    left, incomplete = app.registry.events.since(0)[-2:]
    assert (left.kind, left.cell, left.address_version) == ("left", (0, 0, 1, 0), 1)
    assert left.address == RankAddress(rank_ip="10.0.0.1", rank_port=41001)
    assert incomplete.kind == "incomplete" and left.incarnation == f"{group}.1"


async def test_another_address_is_refused_naming_both(app_factory: Callable[..., Any]) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        before = app.registry.events.latest
        answer = await client.post("/deregister", json=leaving(1, port=49999))
        assert (await client.get("/ready")).status_code == 200
    assert answer.status_code == 409
    assert answer.json()["error"] == "address_mismatch"
    assert answer.json()["details"] == [
        {
            "registered": {"rank_ip": "10.0.0.1", "rank_port": 41001},
            "offered": {"rank_ip": "10.0.0.1", "rank_port": 49999},
        }
    ]
    assert app.registry.events.latest == before


def test_an_ipv6_address_is_bracketed_in_the_refusal() -> None:
    refused = AddressMismatch(
        Cell(0, 0, 1, 0),
        RankAddress(rank_ip="fd00::1", rank_port=41001),
        RankAddress(rank_ip="fd00::2", rank_port=41001),
    )
    assert "registered at [fd00::1]:41001, not at [fd00::2]:41001" in str(refused)


async def test_a_cell_nobody_holds_is_not_found(app_factory: Callable[..., Any]) -> None:
    async with asgi_client(app_factory()) as client:
        await client.put("/route", json=rank(0))
        answer = await client.post("/deregister", json=leaving(1))
        again = await client.post("/deregister", json=leaving(0))
        twice = await client.post("/deregister", json=leaving(0))
    assert answer.status_code == 404 and answer.json()["error"] == "cell_not_found"
    assert "already gone" in answer.json()["message"]
    assert (again.status_code, twice.status_code) == (200, 404)


async def test_it_needs_the_token_when_one_is_set(app_factory: Callable[..., Any]) -> None:
    app = app_factory(auth_token="s3cret")
    async with asgi_client(app, authorization="Bearer s3cret") as client:
        await fill(client)
    async with asgi_client(app) as anonymous:
        assert (await anonymous.post("/deregister", json=leaving(1))).status_code == 401
    assert app.registry.group.table.is_complete


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**leaving(0), "rank_port": "x"}, "rank_port"),
        ({key: value for key, value in leaving(0).items() if key != "tp"}, "tp"),
        ({**leaving(0), "dp": -1}, "dp"),
    ],
)
async def test_an_invalid_body_is_a_422_naming_the_field(
    app_factory: Callable[..., Any], body: dict[str, Any], field: str
) -> None:
    async with asgi_client(app_factory()) as client:
        answer = await client.post("/deregister", json=body)
    assert answer.status_code == 422
    assert field in answer.text


async def test_the_cell_stays_gone_after_a_restart(tmp_path: Path) -> None:
    app = create_app(ServerSettings(state_dir=tmp_path), SqliteStore(tmp_path))
    async with asgi_client(app) as client:
        await fill(client)
        incarnation = (await client.post("/deregister", json=leaving(0))).json()["incarnation"]
    app.registry.close()
    again = create_app(ServerSettings(state_dir=tmp_path), SqliteStore(tmp_path))
    async with asgi_client(again) as client:
        assert (await client.get("/ready")).json()["missing_cells"] == [[0, 0, 0, 0]]
        assert (await client.get("/health")).headers[INSTANCE_HEADER] == incarnation
    again.registry.close()


async def test_an_expired_cell_can_leave_and_the_counts_stay_right(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    app = app_factory(clock=clock)
    async with asgi_client(app) as client:
        await fill(client, lease_seconds=10)
        clock.advance(11)
        assert (await client.get("/ready")).json()["expired_cells"] == [[0, 0, 0, 0], [0, 0, 1, 0]]
        assert (await client.post("/deregister", json=leaving(1))).status_code == 200
        ready = (await client.get("/ready")).json()
    assert ready["registered_cells"] == 1 and ready["expired_cells"] == [[0, 0, 0, 0]]
    assert ready["missing_count"] == 2


async def test_a_cell_that_left_registers_again_as_new(app_factory: Callable[..., Any]) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        await client.post("/deregister", json=leaving(1))
        assert (await client.put("/route", json=rank(1, port=41107))).status_code == 200
        assert (await client.get("/ready")).status_code == 200
    assert [event.kind for event in app.registry.events.since(0)][-2:] == ["registered", "complete"]


async def test_a_deregistration_racing_a_reset_is_not_served_in_the_new_group() -> None:
    store = SteppedStore()
    app = create_app(ServerSettings(state_dir=None), store)
    async with asgi_client(app) as client:
        store.permits.release(2)
        await fill(client)
        leaving_task = asyncio.create_task(client.post("/deregister", json=leaving(0)))
        while store.started < 3:
            await asyncio.sleep(0.005)
        resetting = asyncio.create_task(client.delete("/prefill_port_table"))
        await asyncio.sleep(0.05)
        store.permits.release(10)
        assert (await leaving_task).status_code == 200
        new = (await resetting).json()["instance_id"]
        assert (await client.get("/health")).headers[INSTANCE_HEADER] == new
    app.registry.close()
    assert app.registry.group.table.registered_count == 0
    assert store.load().snapshot.cells == () and store.load().address_changes == 0


def registration(tp: int, port: int) -> RankRegistration:
    return RankRegistration.model_validate(rank(tp, port))


def test_the_table_plans_a_removal_against_the_registrations_in_flight() -> None:
    table = PortTable()
    table.register(registration(0, 41000), now=1.0)
    moving = table.plan(registration(0, 41107), now=2.0)
    old = RankAddress(rank_ip="10.0.0.1", rank_port=41000)
    with pytest.raises(AddressMismatch):
        table.plan_removal(Cell(0, 0, 0, 0), old, now=3.0)
    table.commit(moving)
    removal = table.plan_removal(Cell(0, 0, 0, 0), moving.record.address, now=3.0)
    with pytest.raises(NothingToDeregister):  # a removal in flight leaves nobody holding it
        table.plan_removal(Cell(0, 0, 0, 0), moving.record.address, now=3.0)
    returning = table.plan(registration(0, 41300), now=4.0)
    assert returning.outcome.value == "new" and returning.record.address_version == 1
    table.commit_removal(removal)
    assert table.registered_count == 0 and table.missing_count == 2
    table.commit(returning)
    assert table.registered_count == 1 and table.in_flight == 0
