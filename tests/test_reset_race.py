"""A reset racing registrations that wait for the disk (found by the kill -9 storms, issue 17).

The store writes in submission order, so a registration queued before a reset is wiped by it on
disk; the server must not serve it in the new instance either, or a restart would lose a cell
the server had served after the reset.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from tests.conftest import sglang_registration
from tests.stepped_store import SteppedStore


@pytest.mark.anyio
async def test_a_registration_queued_before_a_reset_is_not_served_after_it() -> None:
    store = SteppedStore()
    app = create_app(ServerSettings(state_dir=None), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
        registering = asyncio.create_task(c.put("/route", json=sglang_registration()))
        while store.started < 1:
            await asyncio.sleep(0.005)
        resetting = asyncio.create_task(c.delete("/prefill_port_table"))
        await asyncio.sleep(0.05)  # the reset's write is queued behind the registration's
        store.permits.release(10)
        assert (await registering).status_code == 200
        new_instance = (await resetting).json()["instance_id"]

        report = (await c.get("/prefill_port_table")).json()
        assert report["instance_id"] == new_instance
        assert report["cells"] == [] and report["topology"] is None
    app.registry.close()
    assert store.load().snapshot.cells == ()


@pytest.mark.anyio
async def test_a_registration_between_two_resets_is_served_exactly_as_a_restart_finds_it() -> None:
    store = SteppedStore()
    app = create_app(ServerSettings(state_dir=None), store)
    registry = app.registry
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
        first = asyncio.create_task(c.delete("/prefill_port_table"))
        while store.started < 1:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(c.delete("/prefill_port_table"))
        await asyncio.sleep(0.05)  # the second reset is queued behind the first's write
        store.permits.release()
        first_instance = (await first).json()["instance_id"]
        assert registry.group.instance_id == first_instance
        registering = asyncio.create_task(c.put("/route", json=sglang_registration()))
        await asyncio.sleep(0.05)
        store.permits.release(10)
        assert (await registering).status_code == 200
        second_instance = (await second).json()["instance_id"]
        served = (await c.get("/prefill_port_table")).json()
    registry.close()
    stored = store.load()
    assert served["instance_id"] == stored.instance_id == second_instance
    assert [(cell["tp"], cell["rank_port"]) for cell in served["cells"]] == [
        (record.cell.tp, record.address.rank_port) for record in stored.snapshot.cells
    ]
    assert len(served["cells"]) == 1, "registered after both resets: it stands"
