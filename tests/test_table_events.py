"""What the server publishes: every change a watcher can see, once it is durable and applied.

Each test drives the server in memory (the ASGI app) and reads the event log it published into,
so the rules read as the feed's specification: one event per cell changed, ``complete`` /
``incomplete`` right after the change that crossed the line, nothing for a change that changes
nothing (a same-address re-registration, an ordinary heartbeat) or that never reached the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import Change, MemoryStore
from prefill_bootstrap.shared.errors import StateStoreError
from prefill_bootstrap.shared.events import TableEvent
from tests.conftest import FakeClock, asgi_client
from tests.conftest import cell_body as beat
from tests.conftest import two_cell_rank as rank
from tests.stepped_store import SteppedStore

pytestmark = pytest.mark.anyio


def events(app: Any) -> list[TableEvent]:
    published = app.registry.events.since(0)
    assert isinstance(published, list)
    return published


def kinds(app: Any) -> list[str]:
    return [event.kind for event in events(app)]


async def fill(client: httpx.AsyncClient, **overrides: Any) -> None:
    for tp in range(2):
        assert (await client.put("/route", json=rank(tp, **overrides))).status_code == 200


async def test_new_cells_are_registered_then_the_table_is_complete(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
    first, second, complete = events(app)
    assert [first.kind, second.kind, complete.kind] == ["registered", "registered", "complete"]
    assert first.cell == (0, 0, 0, 0) and second.cell == (0, 0, 1, 0)
    assert second.address is not None and second.address.rank_port == 41001
    assert second.address_version == 1
    assert complete.cell is None and complete.address is None
    assert [event.seq for event in (first, second, complete)] == [1, 2, 3]
    assert {event.instance_id for event in events(app)} == {app.registry.group.instance_id}


async def test_a_same_address_registration_and_a_heartbeat_publish_nothing(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client, lease_seconds=30)
        before = app.registry.events.latest
        assert (await client.put("/route", json=rank(0, lease_seconds=30))).status_code == 200
        assert (await client.post("/heartbeat", json=beat(1))).status_code == 200
    assert app.registry.events.latest == before


async def test_a_cell_at_another_address_moved_with_the_address_it_left(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        assert (await client.put("/route", json=rank(1, port=41107))).status_code == 200
    moved = events(app)[-1]
    assert moved.kind == "moved" and moved.cell == (0, 0, 1, 0)
    assert moved.previous is not None and moved.previous.rank_port == 41001
    assert moved.address is not None and moved.address.rank_port == 41107
    assert moved.address_version == 2
    assert moved.incarnation == f"{moved.instance_id}.1"


async def test_an_expired_lease_and_its_return_are_published_with_the_crossings(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    app = app_factory(clock=clock)
    async with asgi_client(app) as client:
        await fill(client, lease_seconds=10)
        clock.advance(11)
        assert (await client.get("/ready")).status_code == 503
        assert kinds(app)[3:] == ["expired", "expired", "incomplete"]
        assert (await client.post("/heartbeat", json=beat(0))).status_code == 200
        assert kinds(app)[6:] == ["renewed"]
        assert (await client.post("/heartbeat", json=beat(1))).status_code == 200
        assert kinds(app)[7:] == ["renewed", "complete"]
    renewed = events(app)[7]
    assert renewed.cell == (0, 0, 1, 0) and renewed.address_version == 1
    assert renewed.incarnation == renewed.instance_id  # a lease coming back is no move


async def test_an_expired_cell_registering_again_at_its_address_is_renewed(
    app_factory: Callable[..., Any], clock: FakeClock
) -> None:
    app = app_factory(clock=clock)
    async with asgi_client(app) as client:
        await fill(client, lease_seconds=10)
        clock.advance(11)
        await client.get("/ready")
        assert (await client.put("/route", json=rank(0, lease_seconds=10))).status_code == 200
    assert kinds(app)[-1] == "renewed"


async def test_a_refused_registration_is_a_conflict_naming_the_field_and_values(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        refused = rank(1, port=42000, page_size=32)
        assert (await client.put("/route", json=refused)).status_code == 409
    conflict = events(app)[-1]
    assert conflict.kind == "conflict" and conflict.cell == (0, 0, 1, 0)
    assert conflict.address is not None and conflict.address.rank_port == 42000
    assert conflict.detail == "page_size: established 16, offered 32"


async def test_a_reset_names_the_previous_instance_and_the_table_goes_incomplete(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        old = app.registry.group.instance_id
        new = (await client.delete("/prefill_port_table")).json()["instance_id"]
    reset, incomplete = events(app)[-2:]
    assert (reset.kind, reset.detail) == ("reset", f"previous instance {old}")
    assert reset.instance_id == reset.incarnation == new
    assert incomplete.kind == "incomplete" and incomplete.instance_id == new


class FailingStore(MemoryStore):
    """Refuses every write once ``failing`` is set."""

    failing = False

    def write(self, changes: Sequence[Change]) -> None:
        if self.failing:
            raise StateStoreError("disk full")
        super().write(changes)


async def test_a_change_that_could_not_be_made_durable_publishes_nothing() -> None:
    store = FailingStore()
    app = create_app(ServerSettings(state_dir=None), store)
    async with asgi_client(app) as client:
        await fill(client)
        before = app.registry.events.latest
        store.failing = True
        assert (await client.put("/route", json=rank(1, port=41107))).status_code == 503
        assert (await client.delete("/prefill_port_table")).status_code == 503
        assert (await client.post("/deregister", json=beat(0))).status_code == 503
    app.registry.close()
    assert app.registry.events.latest == before


async def test_a_registration_swallowed_by_a_reset_publishes_nothing_of_its_own() -> None:
    store = SteppedStore()
    app = create_app(ServerSettings(state_dir=None), store)
    async with asgi_client(app) as client:
        registering = asyncio.create_task(client.put("/route", json=rank(0)))
        while store.started < 1:
            await asyncio.sleep(0.005)
        resetting = asyncio.create_task(client.delete("/prefill_port_table"))
        await asyncio.sleep(0.05)  # the reset's write is queued behind the registration's
        store.permits.release(10)
        assert (await registering).status_code == 200
        new = (await resetting).json()["instance_id"]
    app.registry.close()
    # Served (and published) in the old instance just before the reset, or not at all: the new
    # instance's feed starts with its reset and shows no cell a restart would not find.
    assert kinds(app)[-1] == "reset"
    assert [event.kind for event in events(app) if event.instance_id == new] == ["reset"]
    assert app.registry.group.table.registered_count == 0
