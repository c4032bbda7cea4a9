"""The watch iterator against a real server that is killed and restarted mid-watch.

The in-process tests (test_client_watch.py) script each reconnect rule against a fake; this one
shows the rules hold against the real thing: the stream breaks, the restarted server has a new
stream (its history was in memory), so the watcher resynchronises from the durable table and
then goes on seeing every change, in order, on the new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from prefill_bootstrap.client.feed import Resynced, WatchItem
from prefill_bootstrap.client.http import AsyncBootstrapClient, BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.events import TableEvent
from prefill_bootstrap.shared.protocol import TableReport
from tests.conftest import ServerProcess, sglang_registration

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]

PATIENT = RetryPolicy(deadline=30.0, attempts=300, initial_backoff=0.05, max_backoff=0.3)
SOON = 15.0


async def _follow(items: AsyncIterator[WatchItem], into: asyncio.Queue[WatchItem]) -> None:
    async with contextlib.aclosing(items):  # type: ignore[type-var]
        async for item in items:
            into.put_nowait(item)


async def _next(received: asyncio.Queue[WatchItem]) -> WatchItem:
    return await asyncio.wait_for(received.get(), SOON)


async def _event(received: asyncio.Queue[WatchItem]) -> TableEvent:
    item = await _next(received)
    assert isinstance(item, TableEvent), item
    return item


async def test_a_watcher_resyncs_after_its_server_is_killed_and_restarted_then_sees_every_change(
    server: ServerProcess,
) -> None:
    rank = BootstrapClient(server.url, retry=PATIENT)  # blocking calls, run off the loop
    rank.register(sglang_registration(attn_tp_rank=0, rank_port=41000))
    rank.register(sglang_registration(attn_tp_rank=1, rank_port=41001))
    async with AsyncBootstrapClient(server.url, retry=PATIENT) as watcher:
        table = await watcher.table()
        received: asyncio.Queue[WatchItem] = asyncio.Queue()
        items = watcher.watch(since=f"{table.stream}:{table.seq}", idle_timeout=5.0)
        following = asyncio.ensure_future(_follow(items, received))
        try:
            await _watch_through_a_restart(server, rank, table, received)
        finally:
            following.cancel()  # the iterator is endless: the test ends it
            with contextlib.suppress(asyncio.CancelledError):
                await following
            rank.close()


async def _watch_through_a_restart(
    server: ServerProcess,
    rank: BootstrapClient,
    table: TableReport,
    received: asyncio.Queue[WatchItem],
) -> None:
    await asyncio.to_thread(rank.register, sglang_registration(attn_tp_rank=1, rank_port=41107))
    moved = await _event(received)
    assert (moved.kind, moved.cell, moved.address.rank_port) == ("moved", (0, 0, 1, 0), 41107)
    assert moved.previous is not None and moved.previous.rank_port == 41001
    assert moved.seq == table.seq + 1 and moved.incarnation == f"{table.instance_id}.1"

    await asyncio.to_thread(server.restart)  # kill -9, then the same port and state directory

    resynced = await _next(received)
    assert isinstance(resynced, Resynced), resynced
    assert resynced.stream != table.stream  # a new server run, a new stream
    assert resynced.instance_id == table.instance_id  # the same group, from the durable state
    assert resynced.incarnation == moved.incarnation  # the move survived the restart
    assert resynced.table.registered_cells == 2
    assert {(c.tp, c.rank_port) for c in resynced.table.cells} == {(0, 41000), (1, 41107)}

    await asyncio.to_thread(rank.register, sglang_registration(attn_tp_rank=0, rank_port=42000))
    assert moved.address is not None
    await asyncio.to_thread(
        rank.deregister, 0, 0, 1, 0, rank_ip=moved.address.rank_ip, rank_port=41107
    )
    after = [await _event(received) for _ in range(3)]
    assert [(e.kind, e.cell) for e in after] == [
        ("moved", (0, 0, 0, 0)),
        ("left", (0, 0, 1, 0)),
        ("incomplete", None),
    ]
    assert [e.seq for e in after] == [resynced.seq + 1, resynced.seq + 2, resynced.seq + 3]
    assert after[-1].incarnation == f"{table.instance_id}.3"
    assert received.empty()
