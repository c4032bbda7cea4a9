"""Step 3 at scale (issue 16): ranks parked on ``?wait=`` are answered when, and only when, the
table completes, at their deadline, when the group becomes a new instance, or at shutdown; they
share one answer, and a thousand of them cost the rest of the server nothing noticeable.

Real server processes: the lean door (``hot_protocol.py``) parks long polls only under uvicorn.
Waiters are raw sockets, as thousands of separate ranks would be.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.additions import port_table, ready
from prefill_bootstrap.service.store import MemoryStore
from prefill_bootstrap.service.waiters import WAKE_SLICE_BYTES, Waiters
from prefill_bootstrap.shared.protocol import RankRegistration
from tests.conftest import ServerProcess, asgi_client, sglang_registration

Factory = Callable[..., ServerProcess]
pytestmark = pytest.mark.anyio


def rank(tp: int, size: int = 2, **overrides: object) -> dict:
    return sglang_registration(
        attn_tp_size=size, attn_tp_rank=tp, rank_port=41000 + tp, **overrides
    )


class Waiter:
    """One rank parked on a long poll over a connection of its own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def park(cls, server: ServerProcess, path: str) -> Waiter:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await writer.drain()
        return cls(reader, writer)

    async def answer(self, timeout: float) -> tuple[int, dict, float]:
        """(status, body, seconds until it arrived)."""
        started = time.monotonic()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return int(head[9:12]), json.loads(body), time.monotonic() - started

    def answered_yet(self) -> bool:
        return bool(self.reader._buffer) or self.reader.at_eof()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()


def parked(server: ServerProcess) -> int:
    metrics = httpx.get(f"{server.url}/metrics").text
    return int(float(re.search(r"^prefill_bootstrap_parked_long_polls (\S+)$", metrics, re.M)[1]))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def put(server: ServerProcess, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url) as client:
        return await client.put("/route", json=body)


@pytest.mark.parametrize("path", ["/ready?wait=30", "/prefill_port_table?wait=30"])
async def test_waiters_are_answered_together_when_the_last_cell_registers(
    server: ServerProcess, path: str
) -> None:
    assert (await put(server, rank(0, size=3))).status_code == 200
    waiters = [await Waiter.park(server, path) for _ in range(50)]
    await until(lambda: parked(server) == 50)
    assert (await put(server, rank(1, size=3))).status_code == 200
    await asyncio.sleep(0.2)
    assert parked(server) == 50, "a registration that leaves the table incomplete wakes nobody"
    assert not any(waiter.answered_yet() for waiter in waiters)
    assert (await put(server, rank(2, size=3))).status_code == 200
    answers = [await waiter.answer(timeout=5) for waiter in waiters]
    assert {status for status, _, _ in answers} == {200}
    assert all(body.get("ready", body.get("complete")) is True for _, body, _ in answers)
    assert parked(server) == 0


async def test_a_waiter_is_answered_503_at_its_deadline(server: ServerProcess) -> None:
    await put(server, rank(0))
    waiter = await Waiter.park(server, "/ready?wait=0.5")
    status, body, _ = await waiter.answer(timeout=5)
    assert status == 503
    assert (body["ready"], body["missing_cells"]) == (False, [[0, 0, 1, 0]])


async def test_a_reset_answers_the_waiters_at_once_under_the_new_instance(
    server: ServerProcess,
) -> None:
    await put(server, rank(0))
    old = httpx.get(f"{server.url}/ready").json()["instance_id"]
    waiter = await Waiter.park(server, "/ready?wait=30")
    await until(lambda: parked(server) == 1)
    new = httpx.delete(f"{server.url}/prefill_port_table").json()["instance_id"]
    status, body, waited = await waiter.answer(timeout=5)
    assert (status, body["instance_id"], body["registered_cells"]) == (503, new, 0)
    assert new != old
    assert waited < 2


async def test_a_cell_whose_lease_expired_keeps_the_waiters_parked_until_it_renews(
    server_factory: Factory,
) -> None:
    # The sweep looks for expired leases every 0.1 s here (1 s by default).
    server = server_factory(env={"PREFILL_BOOTSTRAP_LEASE_SWEEP_SECONDS": "0.1"})
    leased = rank(0, size=3, lease_seconds=0.5)
    await put(server, leased)
    waiter = await Waiter.park(server, "/ready?wait=30")
    await until(lambda: httpx.get(f"{server.url}/ready").json()["expired_cells"] == [[0, 0, 0, 0]])
    await put(server, rank(1, size=3))
    await put(server, rank(2, size=3))
    await asyncio.sleep(0.2)
    assert not waiter.answered_yet(), "every cell registered, but one lease expired: incomplete"
    beat = {"dp": 0, "cp": 0, "tp": 0, "pp": 0, "rank_ip": "10.0.0.1", "rank_port": 41000}
    assert httpx.post(f"{server.url}/heartbeat", json=beat).status_code == 200
    status, body, _ = await waiter.answer(timeout=5)
    assert (status, body["ready"]) == (200, True)


async def test_a_waiter_whose_client_left_is_forgotten_at_once(server: ServerProcess) -> None:
    await put(server, rank(0))
    waiters = [await Waiter.park(server, "/ready?wait=300") for _ in range(20)]
    await until(lambda: parked(server) == 20)
    for waiter in waiters:
        waiter.close()
    await until(lambda: parked(server) == 0)


async def test_a_thousand_parked_waiters_do_not_hold_up_health_or_a_registration(
    server: ServerProcess,
) -> None:
    await put(server, rank(0, size=3))
    waiters = [await Waiter.park(server, "/ready?wait=60") for _ in range(1000)]
    await until(lambda: parked(server) == 1000, timeout=30)
    async with httpx.AsyncClient(base_url=server.url) as client:
        started = time.monotonic()
        assert (await client.get("/health")).status_code == 200
        assert (await client.put("/route", json=rank(1, size=3))).status_code == 200
        took = time.monotonic() - started
    # A correctness bound, not a benchmark (bench/waiters.py measures): with waiters woken on
    # every registration, or a scan per waiter, this took seconds.
    assert took < 1.0
    assert parked(server) == 1000
    assert (await put(server, rank(2, size=3))).status_code == 200
    answers = await asyncio.gather(*(waiter.answer(timeout=30) for waiter in waiters))
    assert {status for status, _, _ in answers} == {200}


def test_shutdown_answers_parked_waiters_rather_than_dropping_them(server: ServerProcess) -> None:
    async def scenario() -> tuple[int, dict, float]:
        await put(server, rank(0))
        waiter = await Waiter.park(server, "/ready?wait=60")
        await until(lambda: parked(server) == 1)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        return await waiter.answer(timeout=4)  # under the 5 s graceful-shutdown deadline

    status, body, _ = asyncio.run(scenario())
    assert (status, body["ready"]) == (503, False)


@pytest.mark.parametrize("query", ["wait=-1", "wait=abc", "wait=3601", "wait=nan", "wait="])
@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_bad_wait_is_a_422_naming_the_query_parameter_on_either_door(
    query: str, fast_path: bool
) -> None:
    app = create_app(ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path)
    async with asgi_client(app) as client:
        for path in ("/ready", "/prefill_port_table"):
            response = await client.get(f"{path}?{query}")
            assert response.status_code == 422
            body = response.json()
            assert body["error"] == "validation_error"
            assert body["details"][0]["loc"] == ["query", "wait"]
    app.registry.close()


async def test_every_waiter_gets_the_same_serialised_answer() -> None:
    app = create_app(ServerSettings(state_dir=None), MemoryStore())
    registry = app.registry
    await registry.group.register(RankRegistration(**rank(0, size=1)))
    assert ready(registry, b"", b"").body is ready(registry, b"", b"").body
    assert port_table(registry, b"", b"").body is port_table(registry, b"", b"").body
    registry.close()


async def test_waiters_parked_after_a_wake_wait_for_the_next_one() -> None:
    waiters = Waiters()
    woken: list[str] = []
    waiters.park(30, lambda: woken.append("first"))
    assert waiters.wake_all() == 1
    waiters.park(30, lambda: woken.append("second"))
    await asyncio.sleep(0)
    assert woken == ["first"]
    assert len(waiters) == 1


async def test_a_request_pipelined_behind_a_long_poll_ends_its_wait_and_both_are_answered_in_order(
    server: ServerProcess,
) -> None:
    """uvicorn stops reading a connection with a request queued, so a parked poll would not
    notice its client leaving: the pipelined request ends the wait instead."""
    await put(server, rank(0))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"GET /ready?wait=300 HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    await writer.drain()
    status, body, waited = await Waiter(reader, writer).answer(timeout=5)
    assert (status, body["ready"]) == (503, False)
    assert waited < 2
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await reader.readexactly(2) == b"OK"
    assert parked(server) == 0
    writer.close()


@pytest.mark.parametrize(
    "head",
    [
        "GET /ready?wait=300 HTTP/1.0\r\n\r\n",
        "GET /ready?wait=300 HTTP/1.1\r\nConnection: close\r\n\r\n",
    ],
)
async def test_a_wait_answered_by_the_asgi_door_is_forgotten_when_its_client_leaves(
    server: ServerProcess, head: str
) -> None:
    await put(server, rank(0))
    connections = []
    for _ in range(20):
        _, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(head.encode())
        await writer.drain()
        connections.append(writer)
    await until(lambda: parked(server) == 20)
    for writer in connections:
        writer.transport.abort()
    await until(lambda: parked(server) == 0)


def test_shutdown_answers_every_pipelined_wait_and_exits_promptly(server: ServerProcess) -> None:
    wait = b"GET /ready?wait=120 HTTP/1.1\r\nHost: t\r\n\r\n"

    async def scenario() -> list[int]:
        await put(server, rank(0))
        connections = [await asyncio.open_connection(server.host, server.port) for _ in range(10)]
        for _, writer in connections:
            writer.write(wait + wait)
            await writer.drain()
        await until(lambda: parked(server) == 10)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        statuses = []
        for reader, writer in connections:
            for _ in range(2):
                statuses.append((await Waiter(reader, writer).answer(timeout=4))[0])
        return statuses

    assert asyncio.run(scenario()) == [503] * 20
    assert server.process is not None
    assert server.process.wait(timeout=4) == 0


async def test_wake_ups_are_paced_by_the_bytes_they_write() -> None:
    waiters = Waiters()
    answered: list[int] = []
    for index in range(10):
        waiters.park(30, lambda index=index: answered.append(index) or WAKE_SLICE_BYTES // 2)
    waiters.wake_all()
    assert answered == [], "the change that woke them is answered first"
    await asyncio.sleep(0)
    assert answered == [0, 1], "a few megabytes per event-loop turn, then /health's turn"
    for _ in range(5):
        await asyncio.sleep(0)
    assert answered == list(range(10))


async def test_a_long_poll_about_an_instance_that_was_reset_is_answered_at_once(
    server: ServerProcess,
) -> None:
    await put(server, rank(0))
    old = httpx.get(f"{server.url}/ready").json()["instance_id"]
    new = httpx.delete(f"{server.url}/prefill_port_table").json()["instance_id"]
    for path in ("/ready", "/prefill_port_table"):
        stale = await Waiter.park(server, f"{path}?wait=30&instance={old}")
        _, body, waited = await stale.answer(timeout=5)
        assert (body["instance_id"], waited < 1) == (new, True)
        current = await Waiter.park(server, f"{path}?wait=0.3&instance={new}")
        assert (await current.answer(timeout=5))[2] >= 0.25, "about the current group: it waits"
