"""The incarnation on ``X-SGLang-Disaggregation-Instance-ID``: it changes exactly when a decode's
cached addresses may be stale (a reset, a cell at another address, a cell that left), survives a
restart, and is never served stale from the answer cache. ``instance_id`` in the JSON stays the
stable group id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import SqliteStore
from prefill_bootstrap.shared.protocol import INSTANCE_HEADER
from tests.conftest import asgi_client, cell_query
from tests.conftest import two_cell_rank as rank

pytestmark = pytest.mark.anyio


async def header(client: httpx.AsyncClient) -> str:
    return (await client.get("/health")).headers[INSTANCE_HEADER]


async def fill(client: httpx.AsyncClient) -> None:
    for tp in range(2):
        assert (await client.put("/route", json=rank(tp))).status_code == 200


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
async def test_the_header_changes_on_a_move_and_not_on_a_same_address_registration(
    app_factory: Callable[..., Any], fast_path: bool
) -> None:
    app = app_factory()
    if not fast_path:
        app = create_app(ServerSettings(state_dir=None), fast_path=False)
    async with asgi_client(app) as client:
        await fill(client)
        group = (await client.get("/prefill_port_table")).json()["instance_id"]
        assert await header(client) == group
        assert (await client.put("/route", json=rank(1))).status_code == 200
        assert await header(client) == group
        moved = await client.put("/route", json=rank(1, port=41107))
        assert moved.status_code == 200
        assert await header(client) == f"{group}.1"
        assert (await client.get("/route", params=cell_query(0, 0, 1, 0))).headers[
            INSTANCE_HEADER
        ] == f"{group}.1"
        await client.put("/route", json=rank(0, port=41200))
        assert await header(client) == f"{group}.2"
        assert (await client.get("/prefill_port_table")).json()["instance_id"] == group
    if not fast_path:
        app.registry.close()


async def test_the_table_answer_is_never_stale_after_a_change(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        before = (await client.get("/prefill_port_table")).json()
        await client.put("/route", json=rank(1, port=41107))
        after = (await client.get("/prefill_port_table")).json()
    group = before["instance_id"]
    assert (before["incarnation"], after["incarnation"]) == (group, f"{group}.1")
    assert before["stream"] == after["stream"] == app.registry.events.stream
    assert (before["seq"], after["seq"]) == (3, 4)  # registered, registered, complete; moved


async def test_the_table_carries_the_position_to_watch_from_without_a_gap(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await client.put("/route", json=rank(0))
        snapshot = (await client.get("/prefill_port_table")).json()
        await client.put("/route", json=rank(1))
    missed = app.registry.events.since(f"{snapshot['stream']}:{snapshot['seq']}")
    assert [event.kind for event in missed] == ["registered", "complete"]


async def test_the_incarnation_survives_a_restart(tmp_path: Path) -> None:
    app = create_app(ServerSettings(state_dir=tmp_path), SqliteStore(tmp_path))
    async with asgi_client(app) as client:
        await fill(client)
        await client.put("/route", json=rank(1, port=41107))
        before = await header(client)
    app.registry.close()
    again = create_app(ServerSettings(state_dir=tmp_path), SqliteStore(tmp_path))
    async with asgi_client(again) as client:
        assert await header(client) == before
        assert before.endswith(".1")
        assert (await client.get("/prefill_port_table")).json()["incarnation"] == before
    again.registry.close()


async def test_state_written_before_incarnations_reads_as_none_changed(tmp_path: Path) -> None:
    app = create_app(ServerSettings(state_dir=tmp_path), SqliteStore(tmp_path))
    async with asgi_client(app) as client:
        await fill(client)
        await client.put("/route", json=rank(1, port=41107))
    app.registry.close()
    store = SqliteStore(tmp_path)
    store._db.execute("DELETE FROM meta WHERE key = 'address_changes'")  # as the last release
    assert store.load().address_changes == 0
    store.close()


async def test_a_reset_makes_a_new_instance_with_no_changes_counted(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        await fill(client)
        await client.put("/route", json=rank(1, port=41107))
        old = await header(client)
        answer = await client.delete("/prefill_port_table")
        new = answer.json()["instance_id"]
        assert new != old.partition(".")[0]
        assert answer.headers[INSTANCE_HEADER] == new == await header(client)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
async def test_a_write_is_acknowledged_under_the_group_id_so_older_rank_clients_keep_working(
    app_factory: Callable[..., Any], fast_path: bool
) -> None:
    """The previous release's rank client keeps the header of its ``PUT /route`` answer and
    takes any ``/ready`` whose ``instance_id`` differs for a reset (it re-registers and waits
    again). A registration after a move must therefore still be acknowledged under the group
    id; the incarnation is for what decodes read."""
    app = (
        app_factory() if fast_path else create_app(ServerSettings(state_dir=None), fast_path=False)
    )
    async with asgi_client(app) as client:
        await fill(client)
        await client.put("/route", json=rank(1, port=41107))
        again = await client.put("/route", json=rank(0, port=41300))
        ready = await client.get("/ready", params={"instance": again.headers[INSTANCE_HEADER]})
        assert ready.status_code == 200
        assert again.headers[INSTANCE_HEADER] == ready.json()["instance_id"]
        assert ready.headers[INSTANCE_HEADER] == f"{ready.json()['instance_id']}.2"
    if not fast_path:
        app.registry.close()


async def test_a_long_poll_under_an_incarnation_of_the_group_still_waits(
    app_factory: Callable[..., Any],
) -> None:
    """A rank that registered after a move holds ``<group>.<n>``: not a reset, so its wait for
    the table to complete is not answered at once."""
    app = app_factory()
    async with asgi_client(app) as client:
        await client.put("/route", json=rank(0))
        assert (await client.put("/route", json=rank(0, port=41107))).status_code == 200
        incarnation = await header(client)
        assert app.registry.waits.must_wait(5, incarnation)
        assert not app.registry.waits.must_wait(5, "another-group")
