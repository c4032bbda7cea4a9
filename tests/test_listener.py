"""The admission listener: at most ``limit`` new connections in progress, the rest wait in the
listen backlog; slots come back on the first answer, on close, or after ``slot_seconds``."""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from prefill_bootstrap.service.listener import AdmissionListener, Slot
from tests.conftest import ServerProcess, sglang_registration

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class Connection(asyncio.Protocol):
    """A server-side connection that answers (gives its slot back) when the client says so."""

    def __init__(self, slot: Slot, accepted: list[Connection]) -> None:
        self.slot = slot
        self.accepted = accepted
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.append(self)

    def data_received(self, data: bytes) -> None:
        self.slot.heard = True
        if b"answer" in data:
            self.slot.release()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.slot.release()


class Harness:
    def __init__(self, listener: AdmissionListener, port: int, accepted: list[Connection]):
        self.listener = listener
        self.port = port
        self.accepted = accepted
        self.clients: list[asyncio.StreamWriter] = []

    async def connect(self, count: int = 1) -> list[asyncio.StreamWriter]:
        opened = []
        for _ in range(count):
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            opened.append(writer)
        self.clients += opened
        return opened

    async def accepted_count(self, expected: int, within: float = 5.0) -> int:
        """Wait until ``expected`` connections were accepted, then let the loop run a little
        longer, so that one too many would show up too."""
        deadline = time.monotonic() + within
        while len(self.accepted) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for _ in range(10):
            await asyncio.sleep(0.01)
        return len(self.accepted)


@pytest.fixture
async def listening() -> AsyncIterator[Callable[..., Harness]]:
    made: list[tuple[AdmissionListener, socket.socket, Harness]] = []

    def start(
        limit: int, slot_seconds: float = 30.0, silent_seconds: float | None = None
    ) -> Harness:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        accepted: list[Connection] = []
        listener = AdmissionListener(
            sock,
            lambda slot: Connection(slot, accepted),
            limit=limit,
            slot_seconds=slot_seconds,
            # most of these clients stay silent on purpose
            silent_seconds=slot_seconds if silent_seconds is None else silent_seconds,
        )
        listener.start()
        harness = Harness(listener, sock.getsockname()[1], accepted)
        made.append((listener, sock, harness))
        return harness

    yield start
    for listener, sock, harness in made:
        listener.close()
        for writer in harness.clients:
            writer.close()
        for connection in harness.accepted:
            connection.slot.release()
        await listener.wait_closed()
        sock.close()


async def test_no_more_than_the_limit_of_new_connections_are_taken_at_once(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=2)
    await harness.connect(5)
    assert await harness.accepted_count(2) == 2
    assert harness.listener.unanswered == 2


async def test_an_answer_lets_the_next_waiting_connection_in(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=2)
    first, *_ = await harness.connect(5)
    await harness.accepted_count(2)
    first.write(b"answer")
    assert await harness.accepted_count(3) == 3


async def test_an_answered_connection_kept_open_holds_no_slot(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=1)
    [kept] = await harness.connect()
    await harness.accepted_count(1)
    kept.write(b"answer")
    await harness.connect(1)
    assert await harness.accepted_count(2) == 2
    assert not harness.accepted[0].lost


async def test_a_connection_that_closes_gives_its_slot_back(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=1)
    [leaving, _] = await harness.connect(2)
    await harness.accepted_count(1)
    leaving.close()
    assert await harness.accepted_count(2) == 2


async def test_a_client_that_never_sends_loses_its_slot_but_not_its_connection(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=1, slot_seconds=0.3)
    await harness.connect(2)
    assert await harness.accepted_count(1, within=0.1) == 1
    assert await harness.accepted_count(2) == 2
    assert not harness.accepted[0].lost


async def test_a_closed_listener_takes_no_new_connections(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=4)
    await harness.connect(1)
    await harness.accepted_count(1)
    harness.listener.close()
    await harness.connect(2)  # the kernel still completes the handshake: the socket listens
    assert await harness.accepted_count(3, within=0.2) == 1


class OutOfFiles:
    """A listening socket whose first accept fails as if the process ran out of descriptors."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failures = 1

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


async def test_running_out_of_descriptors_pauses_accepting_for_a_second_then_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    accepted: list[Connection] = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        listener = AdmissionListener(
            OutOfFiles(sock),  # type: ignore[arg-type]
            lambda slot: Connection(slot, accepted),
            limit=4,
        )
        listener.start()
        harness = Harness(listener, sock.getsockname()[1], accepted)
        try:
            await harness.connect(1)
            assert await harness.accepted_count(1, within=0.3) == 0
            assert await harness.accepted_count(1, within=3) == 1
        finally:
            listener.close()
            for writer in harness.clients:
                writer.close()
            await listener.wait_closed()
    assert "Too many open files; retrying in 1s (raise the open file limit" in caplog.text


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        AdmissionListener(socket.socket(), lambda slot: asyncio.Protocol(), limit=0)


# -- the real server -------------------------------------------------------------------------


def _health_within(server: ServerProcess, path: str, seconds: float) -> int:
    with socket.create_connection(("127.0.0.1", server.port), timeout=seconds) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        return int(sock.recv(65536)[9:12])


@pytest.mark.parametrize("path", ["/health", "/ready"])  # hot path, and FastAPI's
def test_a_kept_alive_connection_answered_by_the_server_frees_the_only_slot(
    server_factory: Callable[..., ServerProcess], path: str
) -> None:
    server = server_factory("--accept-limit", "1")
    with httpx.Client(base_url=server.url) as kept_alive:
        assert kept_alive.get(path).status_code in (200, 503)
        # Were the slot still held, this would wait for the 2 s slot timeout (or uvicorn's 5 s
        # keep-alive timeout), and time out first.
        assert _health_within(server, path, seconds=1) in (200, 503)


def test_a_long_poll_does_not_hold_the_only_slot(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory("--accept-limit", "1", durable=False)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as polling:
        polling.sendall(b"GET /prefill_port_table?wait=30 HTTP/1.1\r\nhost: x\r\n\r\n")
        # The table stays empty, so the poll waits 30 s; were its slot held until then (or the
        # 2 s slot timeout), this would time out first.
        assert _health_within(server, "/health", seconds=1) == 200


async def test_a_storm_far_larger_than_the_limit_registers_every_rank(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory("--accept-limit", "4")
    bodies = [
        sglang_registration(attn_tp_size=8, pp_size=8, attn_tp_rank=tp, pp_rank=pp)
        for tp in range(8)
        for pp in range(8)
    ]
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
        answers = await asyncio.gather(*(client.put("/route", json=body) for body in bodies))
        assert [answer.status_code for answer in answers] == [200] * 64
        assert (await client.get("/ready")).status_code == 200


async def test_a_silent_new_connection_gives_its_slot_back_early_but_a_talking_one_keeps_it(
    listening: Callable[..., Harness],
) -> None:
    harness = listening(limit=1, silent_seconds=0.2)
    [talking] = await harness.connect(1)
    talking.write(b"a request still in progress")
    await harness.accepted_count(1)
    await harness.connect(1)
    assert await harness.accepted_count(2, within=1.0) == 1, "a talking client keeps its slot"
    talking.write(b"answer")
    assert await harness.accepted_count(2) == 2
    await harness.connect(1)
    assert await harness.accepted_count(3, within=3.0) == 3, "the silent one gave its slot back"
    assert not harness.accepted[1].lost


async def test_idle_connections_do_not_hold_a_new_request_for_long(
    server_factory: Callable[..., ServerProcess],
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"needs 2048 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    server = server_factory()  # started after raising the limit: it inherits it
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1000)]
    try:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(f"{server.url}/health")).status_code == 200
        assert time.monotonic() - started < 4  # was ~8 s: four windows of 256 held 2 s each
    finally:
        for sock in idle:
            sock.close()
