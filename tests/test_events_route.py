"""GET /prefill_port_table/events: the change feed as a JSON long poll and as Server-Sent Events.

Most tests drive the ASGI app in process (an SSE response never ends, so they speak ASGI
directly rather than through httpx, which would wait for the end); events are published into
the registry's event log exactly as the table's changes publish them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.server import prepare
from prefill_bootstrap.service.store import MemoryStore
from prefill_bootstrap.service.watchers import KEEPALIVE, RETRY
from prefill_bootstrap.service.watching import accepts_event_stream
from prefill_bootstrap.shared.events import EventPage, TableEvent
from prefill_bootstrap.shared.protocol import RankAddress
from tests.conftest import asgi_client, sglang_registration, wait_for_health

pytestmark = pytest.mark.anyio

PATH = "/prefill_port_table/events"
SSE = {"accept": "text/event-stream"}


def publish(app: Any, kind: str = "registered", tp: int = 0, port: int = 41000) -> TableEvent:
    group = app.registry.group
    return app.registry.events.publish(
        kind,  # type: ignore[arg-type]
        instance_id=group.instance_id,
        incarnation=group.instance_id,
        cell=(0, 0, tp, 0),
        address=RankAddress(rank_ip="10.0.0.1", rank_port=port),
        address_version=1,
    )


class SseCall:
    """One ASGI request to the events route whose body is read as it streams."""

    def __init__(self, app: Any, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.app = app
        self.scope = {
            "type": "http",
            "method": "GET",
            "path": PATH,
            "query_string": query.encode(),
            "headers": [(k.encode(), v.encode()) for k, v in {**SSE, **(headers or {})}.items()],
            "client": ("127.0.0.1", 5555),
        }
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.start: dict[str, Any] | None = None
        self.body = b""
        self.ended = False
        self._grew = asyncio.Event()
        self.task = asyncio.ensure_future(app(self.scope, self.inbox.get, self._send))

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        else:
            self.body += message.get("body", b"")
            self.ended = not message.get("more_body", False)
        self._grew.set()

    async def until(self, done: Callable[[SseCall], bool], timeout: float = 2.0) -> None:
        async def wait() -> None:
            while not done(self):
                self._grew.clear()
                await self._grew.wait()

        await asyncio.wait_for(wait(), timeout)

    def ids(self) -> list[str]:
        return [line[4:] for line in self.body.decode().split("\n") if line.startswith("id: ")]

    def events(self) -> list[TableEvent]:
        return [
            TableEvent.model_validate_json(line[6:])
            for line in self.body.decode().split("\n")
            if line.startswith("data: ")
        ]

    async def leave(self) -> None:
        await self.inbox.put({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, 2)


# -- the JSON long poll --------------------------------------------------------------------------


async def test_a_poll_answers_every_event_after_since_at_once(app_factory: Any) -> None:
    app = app_factory()
    first, second = publish(app, tp=0), publish(app, tp=1)
    stream = app.registry.events.stream
    async with asgi_client(app) as client:
        response = await client.get(PATH, params={"since": f"{stream}:0", "wait": 30})
    page = EventPage.model_validate_json(response.content)
    assert response.status_code == 200
    assert page.events == [first, second]
    assert (page.stream, page.seq) == (stream, 2)
    assert page.instance_id == app.registry.group.instance_id


async def test_a_bare_sequence_number_means_the_current_stream(app_factory: Any) -> None:
    app = app_factory()
    publish(app, tp=0)
    second = publish(app, tp=1)
    async with asgi_client(app) as client:
        page = EventPage.model_validate_json((await client.get(PATH, params={"since": 1})).content)
    assert page.events == [second]


async def test_a_poll_without_since_waits_for_the_next_event_only(app_factory: Any) -> None:
    app = app_factory()
    publish(app)  # before the poll: not its business
    async with asgi_client(app) as client:
        asking = asyncio.ensure_future(client.get(PATH, params={"wait": 5}))
        while len(app.registry.watchers) == 0:
            await asyncio.sleep(0.005)
        nxt = publish(app, tp=3)
        page = EventPage.model_validate_json((await asyncio.wait_for(asking, 2)).content)
    assert page.events == [nxt]
    assert page.seq == 2
    assert len(app.registry.watchers) == 0


async def test_a_poll_that_times_out_answers_an_empty_page_at_the_latest_seq(
    app_factory: Any,
) -> None:
    app = app_factory()
    publish(app)
    async with asgi_client(app) as client:
        response = await client.get(PATH, params={"since": 1, "wait": 0.05})
    page = EventPage.model_validate_json(response.content)
    assert (response.status_code, page.events, page.seq) == (200, [], 1)


async def test_a_parked_poll_whose_client_leaves_is_released(app_factory: Any) -> None:
    app = app_factory()
    scope = {"type": "http", "method": "GET", "path": PATH, "headers": [], "client": None}
    scope["query_string"] = b"wait=30"
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.ensure_future(app(scope, inbox.get, send))
    while len(app.registry.watchers) == 0:
        await asyncio.sleep(0.005)
    await inbox.put({"type": "http.disconnect"})
    await asyncio.wait_for(task, 2)
    assert len(app.registry.watchers) == 0


@pytest.mark.parametrize(
    ("accept", "streams"),
    [
        ("text/event-stream", True),
        ("TEXT/Event-Stream; charset=utf-8", True),
        ("application/json, text/event-stream;q=0.5", True),
        ("text/event-stream;q=0", False),
        ("text/event-stream; q=0.000, application/json", False),
        ("application/json", False),
        ("*/*", False),
        ("application/x-text/event-stream-ish", False),
    ],
)
def test_sse_is_chosen_when_accept_names_text_event_stream_with_a_nonzero_quality(
    accept: str, streams: bool
) -> None:
    """``q=0`` means "not acceptable" (RFC 9110): such a client gets the JSON page."""
    assert accepts_event_stream([(b"accept", accept.encode())]) is streams


@pytest.mark.parametrize("since", ["abc:", ":3", "-1", "1.5", "x" * 70 + ":1"])
async def test_a_malformed_since_is_a_422_naming_query_since(app_factory: Any, since: str) -> None:
    async with asgi_client(app_factory()) as client:
        for headers in ({}, SSE):
            response = await client.get(PATH, params={"since": since}, headers=headers)
            assert response.status_code == 422
            assert response.json()["details"][0]["loc"] == ["query", "since"]
            assert "query.since" in response.json()["message"]


async def test_a_wait_out_of_bounds_is_the_same_422_as_readys(app_factory: Any) -> None:
    async with asgi_client(app_factory()) as client:
        response = await client.get(PATH, params={"wait": "-1"})
    assert response.status_code == 422
    assert response.json()["details"][0]["loc"][:2] == ["query", "wait"]


@pytest.mark.parametrize("form", ["json", "sse"])
@pytest.mark.parametrize("since", ["other-run:1", "25", "1"], ids=["foreign", "ahead", "too-old"])
async def test_a_position_the_history_cannot_honour_is_410_history_gone(
    app_factory: Any, form: str, since: str
) -> None:
    app = app_factory(event_history=16)
    for tp in range(20):  # events 1..4 are gone
        publish(app, tp=tp)
    headers = SSE if form == "sse" else {}
    async with asgi_client(app) as client:
        response = await client.get(PATH, params={"since": since}, headers=headers)
    body = response.json()
    assert response.status_code == 410
    assert response.headers["content-type"] == "application/json"
    assert body["error"] == "history_gone"
    assert body["details"] == [{"stream": app.registry.events.stream, "oldest": 5, "latest": 20}]
    assert "GET /prefill_port_table" in body["message"]


# -- Server-Sent Events ----------------------------------------------------------------------------


async def test_a_stream_starts_with_retry_and_carries_each_event_framed(app_factory: Any) -> None:
    app = app_factory()
    call = SseCall(app)
    await call.until(lambda c: c.body.startswith(RETRY))
    event = publish(app, tp=2)
    await call.until(lambda c: b"data: " in c.body)
    stream = app.registry.events.stream
    assert call.start is not None and call.start["status"] == 200
    headers = dict(call.start["headers"])
    assert headers[b"content-type"] == b"text/event-stream"
    assert headers[b"cache-control"] == b"no-cache"
    assert headers[b"x-accel-buffering"] == b"no"
    assert (
        headers[b"x-sglang-disaggregation-instance-id"] == app.registry.group.instance_id.encode()
    )
    assert call.body == RETRY + b"id: %s:1\nevent: registered\ndata: %s\n\n" % (
        stream.encode(),
        event.model_dump_json().encode(),
    )
    await call.leave()
    assert len(app.registry.watchers) == 0


async def test_after_a_move_the_stream_and_the_page_carry_the_new_incarnation(
    app_factory: Any,
) -> None:
    """The header and the page say the incarnation, not the stable group id: a decode that
    cached addresses under the old one knows they may be stale."""
    app = app_factory()
    async with asgi_client(app) as client:
        await client.put("/route", json=sglang_registration(attn_tp_size=1, rank_port=41000))
        call = SseCall(app)
        await call.until(lambda c: c.body.startswith(RETRY))
        await client.put("/route", json=sglang_registration(attn_tp_size=1, rank_port=41107))
        await call.until(lambda c: any(e.kind == "moved" for e in c.events()))
        page = EventPage.model_validate_json((await client.get(PATH, params={"since": 0})).content)
    group = app.registry.group
    assert group.incarnation == f"{group.instance_id}.1"
    moved = next(e for e in call.events() if e.kind == "moved")
    assert moved.incarnation == page.incarnation == group.incarnation
    assert moved.previous == RankAddress(rank_ip="10.0.0.1", rank_port=41000)
    await call.leave()
    call = SseCall(app)
    await call.until(lambda c: c.start is not None)
    assert call.start is not None
    assert dict(call.start["headers"])[b"x-sglang-disaggregation-instance-id"] == (
        group.incarnation.encode()
    )
    await call.leave()


async def test_last_event_id_resumes_without_a_gap_or_a_duplicate_and_wins_over_since(
    app_factory: Any,
) -> None:
    app = app_factory()
    published = [publish(app, tp=tp) for tp in range(5)]
    stream = app.registry.events.stream
    call = SseCall(app, query="since=0", headers={"last-event-id": f"{stream}:3"})
    await call.until(lambda c: len(c.events()) == 2)
    published.append(publish(app, tp=9))
    await call.until(lambda c: len(c.events()) == 3)
    assert call.events() == published[3:]
    assert call.ids() == [f"{stream}:{seq}" for seq in (4, 5, 6)]
    await call.leave()


async def test_since_starts_a_stream_when_there_is_no_last_event_id(app_factory: Any) -> None:
    app = app_factory()
    published = [publish(app, tp=tp) for tp in range(3)]
    call = SseCall(app, query="since=1")
    await call.until(lambda c: len(c.events()) == 2)
    assert call.events() == published[1:]
    await call.leave()


async def test_a_malformed_last_event_id_is_a_422_naming_the_header(app_factory: Any) -> None:
    async with asgi_client(app_factory()) as client:
        response = await client.get(PATH, headers={**SSE, "last-event-id": "run:x"})
    assert response.status_code == 422
    assert response.json()["details"][0]["loc"] == ["header", "last-event-id"]


async def test_an_idle_stream_gets_keep_alive_comments(app_factory: Any) -> None:
    app = app_factory(keepalive_seconds=0.05)
    call = SseCall(app)
    await call.until(lambda c: c.body.count(KEEPALIVE) >= 2)
    assert call.body.startswith(RETRY)
    await call.leave()


async def test_a_reset_is_an_event_on_the_same_stream_which_goes_on(app_factory: Any) -> None:
    app = app_factory()
    call = SseCall(app)
    await call.until(lambda c: c.body.startswith(RETRY))
    publish(app, "reset")
    after = publish(app, tp=1)
    await call.until(lambda c: len(c.events()) == 2)
    assert [e.kind for e in call.events()] == ["reset", "registered"]
    assert call.events()[1] == after
    assert not call.ended
    await call.leave()


async def test_a_watcher_that_falls_behind_its_buffer_is_dropped_and_others_are_not(
    app_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub only appends and wakes: a watcher whose task has not written for a while holds
    at most its buffer before it is dropped, with one warning; the others get everything."""
    app = app_factory(watcher_buffer_bytes=4096)
    hub = app.registry.watchers
    slow = hub.open(None, "10.9.9.9:1234")
    fast = SseCall(app)
    await fast.until(lambda c: c.body.startswith(RETRY))
    for tp in range(40):  # ~300 bytes each: past 4096 for the watcher nobody drains
        publish(app, tp=tp)
        await fast.until(lambda c, n=tp + 1: len(c.events()) == n)  # this one drains
    assert slow.dropped and slow.closed and slow.pending == []
    assert app.registry.metrics.watchers_dropped == 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "10.9.9.9:1234" in warnings[0].getMessage()
    assert "behind" in warnings[0].getMessage()
    async with asgi_client(app) as client:
        metrics = (await client.get("/metrics")).text
    assert "prefill_bootstrap_watchers_dropped_total 1.0" in metrics
    assert "prefill_bootstrap_watchers 1.0" in metrics
    await fast.leave()


async def test_closing_the_hub_ends_every_stream_and_answers_parked_polls(
    app_factory: Any,
) -> None:
    app = app_factory()
    calls = [SseCall(app) for _ in range(3)]
    async with asgi_client(app) as client:
        polling = asyncio.ensure_future(client.get(PATH, params={"wait": 30}))
        while len(app.registry.watchers) < 4:
            await asyncio.sleep(0.005)
        app.registry.watchers.close()
        answer = await asyncio.wait_for(polling, 2)
    for call in calls:
        await asyncio.wait_for(call.task, 2)
        assert call.ended
    assert orjson.loads(answer.content)["events"] == []
    assert len(app.registry.watchers) == 0


async def test_the_fastapi_only_app_streams_the_same_bytes() -> None:
    apps = [
        create_app(ServerSettings(state_dir=None), MemoryStore(), fast_path=fast_path)
        for fast_path in (True, False)
    ]
    bodies = []
    for app in apps:
        call = SseCall(app)
        await call.until(lambda c: c.body.startswith(RETRY))
        publish(app)
        await call.until(lambda c: b"data: " in c.body)
        await call.leave()
        stream = app.registry.events.stream.encode()
        instance = app.registry.group.instance_id.encode()
        bodies.append(call.body.replace(stream, b"S").replace(instance, b"I").split(b'"at":')[0])
        app.registry.close()
    assert bodies[0] == bodies[1]


# -- over real sockets ---------------------------------------------------------------------------

SSE_REQUEST = (
    b"GET /prefill_port_table/events HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n"
)


def _open_stream(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(SSE_REQUEST)
    return sock


def _read_until(sock: socket.socket, needle: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + 10
    while needle not in seen:
        assert time.monotonic() < deadline, seen[-200:]
        chunk = sock.recv(1 << 16)
        assert chunk, "the stream closed"
        seen += chunk


@pytest.mark.timeout(60)
def test_sigterm_ends_three_open_streams_and_exits_within_two_seconds(server: Any) -> None:
    streams = [_open_stream(server.port) for _ in range(3)]
    for sock in streams:
        _read_until(sock, b"retry: 2000\n\n", bytearray())
    started = time.monotonic()
    assert server.terminate(timeout=10) == 0
    assert time.monotonic() - started < 2.0
    for sock in streams:  # each ended with the last chunk, then closed
        seen = bytearray()
        while chunk := sock.recv(1 << 16):
            seen += chunk
        assert seen.endswith(b"0\r\n\r\n")
        sock.close()


@pytest.mark.timeout(60)
def test_a_stalled_reader_is_dropped_while_others_get_every_event_and_registrations_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = ServerSettings(state_dir=None, port=0, watcher_buffer_bytes=65536)
    server, listening = prepare(settings, MemoryStore())
    port = listening.getsockname()[1]
    box: dict[str, Any] = {}

    async def serve() -> None:
        box["loop"] = asyncio.get_running_loop()
        await server.serve(sockets=[listening])

    running = threading.Thread(target=asyncio.run, args=(serve(),))
    running.start()
    app = server.config.app
    try:
        wait_for_health(f"http://127.0.0.1:{port}", time.monotonic() + 10)
        stalled = _open_stream(port, rcvbuf=4096)
        reader = _open_stream(port)
        seen = bytearray()
        _read_until(reader, b"retry: 2000\n\n", seen)
        _read_until(stalled, b"retry: 2000\n\n", bytearray())  # then never read again
        detail = "x" * 2000
        group = app.registry.group

        def burst(first: int) -> None:
            for n in range(first, first + 10):
                app.registry.events.publish(
                    "conflict",
                    instance_id=group.instance_id,
                    incarnation="i",
                    detail=f"{n}{detail}",
                )

        slowest, published = 0.0, 0
        stream = app.registry.events.stream.encode()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            while app.registry.metrics.watchers_dropped == 0:  # kernel buffers fill first
                assert published < 20_000, "the stalled reader was never dropped"
                box["loop"].call_soon_threadsafe(burst, published)
                published += 10
                if published % 400 == 0:
                    began = time.monotonic()
                    body = sglang_registration(attn_tp_size=4, attn_tp_rank=published // 400 % 4)
                    assert client.put("/route", json=body).status_code == 200
                    slowest = max(slowest, time.monotonic() - began)
                _read_until(reader, b"id: %s:%d\n" % (stream, published), seen)
            metrics = client.get("/metrics").text
        assert seen.count(b"\nevent: conflict\n") == published  # every event, in order
        assert app.registry.metrics.watchers_dropped == 1
        assert "prefill_bootstrap_watchers 1.0" in metrics
        assert slowest < 1.0
        assert "fell" in caplog.text and "behind" in caplog.text
        with pytest.raises(ConnectionResetError):  # aborted: not left open holding buffers
            while stalled.recv(1 << 20):
                pass
            raise ConnectionResetError  # or closed cleanly after what was buffered
        stalled.close()
        reader.close()
    finally:
        server.should_exit = True
        running.join(timeout=20)
    assert not running.is_alive()
