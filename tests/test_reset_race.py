"""A reset racing registrations that wait for the disk (found by the kill -9 storms, issue 17).

The store writes in submission order, so a registration queued before a reset is wiped by it on
disk; the server must not serve it in the new instance either, or a restart would lose a cell
the server had served after the reset.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import Change, MemoryStore
from tests.conftest import sglang_registration


class GatedStore(MemoryStore):
    """Writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()

    def write(self, changes: Sequence[Change]) -> None:
        self.writing.set()
        self.gate.wait(timeout=30)
        super().write(changes)


@pytest.mark.anyio
async def test_a_registration_queued_before_a_reset_is_not_served_after_it() -> None:
    store = GatedStore()
    app = create_app(ServerSettings(state_dir=None), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
        store.gate.clear()
        registering = asyncio.create_task(c.put("/route", json=sglang_registration()))
        while not store.writing.is_set():
            await asyncio.sleep(0.005)
        before_reset = app.registry.table
        resetting = asyncio.create_task(c.delete("/prefill_port_table"))
        while app.registry.table is before_reset:  # then its write is queued behind the other
            await asyncio.sleep(0.005)
        store.gate.set()
        assert (await registering).status_code == 200
        new_instance = (await resetting).json()["instance_id"]

        report = (await c.get("/prefill_port_table")).json()
        assert report["instance_id"] == new_instance
        assert report["cells"] == [] and report["topology"] is None
    app.registry.close()
    assert store.load().snapshot.cells == ()
