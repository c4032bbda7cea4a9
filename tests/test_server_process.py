"""The real server process: start-up, durability across kill -9, clean SIGTERM, port clashes,
IPv6, and liveness that never waits on slow disk work."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import orjson
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.server import prepare
from prefill_bootstrap.service.store import Change, MemoryStore
from tests.conftest import ServerProcess, free_port, info_query, sglang_registration

ServerFactory = Callable[..., ServerProcess]


def register(url: str, **overrides: object) -> httpx.Response:
    return httpx.put(f"{url}/route", json=sglang_registration(**overrides), timeout=10)


def table(url: str) -> dict:
    return httpx.get(f"{url}/prefill_port_table", timeout=10).json()


@pytest.mark.timeout(60)
def test_every_acknowledged_registration_survives_kill_9(server: ServerProcess) -> None:
    for tp in range(3):
        assert register(
            server.url, attn_tp_size=4, attn_tp_rank=tp, rank_port=41000 + tp
        ).is_success
    assert register(server.url, attn_tp_size=4, attn_tp_rank=1, rank_port=45001).is_success
    before = table(server.url)

    server.restart()

    after = table(server.url)
    assert after["cells"] == before["cells"]
    assert after["instance_id"] == before["instance_id"]
    assert after["replacements"] == before["replacements"]
    assert after["missing_cells"] == [[0, 0, 3, 0]]
    assert register(server.url, attn_tp_size=4, attn_tp_rank=3, rank_port=41003).is_success
    assert httpx.get(f"{server.url}/ready").status_code == 200


@pytest.mark.timeout(60)
def test_sigterm_stops_the_server_cleanly_and_keeps_the_state(server: ServerProcess) -> None:
    assert register(server.url).is_success
    started = time.monotonic()
    assert server.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5
    server.start()
    assert table(server.url)["registered_cells"] == 1


@pytest.mark.timeout(60)
def test_reset_on_start_begins_a_new_group(server_factory: ServerFactory) -> None:
    first = server_factory()
    assert register(first.url).is_success
    old_instance = table(first.url)["instance_id"]
    first.kill()
    first.extra_args.append("--reset")
    first.start()
    report = table(first.url)
    assert report["registered_cells"] == 0
    assert report["instance_id"] != old_instance


@pytest.mark.timeout(60)
def test_a_port_in_use_is_a_clear_error_naming_host_port_and_flag(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "prefill_bootstrap.cli", "serve",
             "--port", str(port), "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    assert "already in use" in result.stderr


@pytest.mark.timeout(60)
def test_invalid_settings_are_refused_before_serving(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefill_bootstrap.cli", "serve", "--port", "70000"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "port" in result.stderr


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback on this machine")
def test_the_server_listens_on_ipv6(server_factory: ServerFactory) -> None:
    server = server_factory(host="::", port=free_port("::1"), durable=False)
    url = f"http://[::1]:{server.port}"
    assert register(url).is_success
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").text == "OK"  # dual stack
    assert table(url)["registered_cells"] == 1


@pytest.mark.timeout(60)
def test_a_memory_only_server_reports_memory_state(server_factory: ServerFactory) -> None:
    server = server_factory(durable=False)
    assert table(server.url)["state"] == "memory"


@pytest.mark.timeout(60)
def test_a_whole_group_registering_at_once_is_complete_and_durable(server: ServerProcess) -> None:
    async def storm() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            responses = await asyncio.gather(
                *(
                    client.put(
                        "/route",
                        json=sglang_registration(
                            attn_tp_size=8,
                            pp_size=4,
                            attn_dp_size=4,
                            attn_dp_rank=dp,
                            attn_tp_rank=tp,
                            pp_rank=pp,
                            rank_port=20000 + dp * 100 + tp * 10 + pp,
                        ),
                    )
                    for dp in range(4)
                    for tp in range(8)
                    for pp in range(4)
                )
            )
        return [response.status_code for response in responses]

    assert set(asyncio.run(storm())) == {200}
    assert httpx.get(f"{server.url}/route", params=info_query()).status_code == 200
    server.restart()
    assert table(server.url)["registered_cells"] == 128


class SlowStore(MemoryStore):
    """A disk that takes its time: writes block until released."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, changes: Sequence[Change]) -> None:
        self.writing.set()
        self.release.wait(timeout=30)
        super().write(changes)


@pytest.mark.anyio
async def test_health_answers_while_a_registration_waits_on_slow_disk() -> None:
    store = SlowStore()
    store.load()
    app = create_app(ServerSettings(state_dir=None), store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bootstrap") as client:
        pending = asyncio.create_task(client.put("/route", json=sglang_registration()))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        health = await client.get("/health")
        table_report = await client.get("/prefill_port_table")
        elapsed = time.monotonic() - started
        assert health.status_code == 200 and table_report.status_code == 200
        assert not pending.done(), "the registration must not be acknowledged before it is durable"
        assert elapsed < 5
        store.release.set()
        assert (await pending).status_code == 200
    app.registry.close()


class BrokenStore(MemoryStore):
    """A disk that refuses every write."""

    def write(self, changes: Sequence[Change]) -> None:
        raise OSError("No space left on device")


@pytest.mark.anyio
async def test_a_registration_that_cannot_be_made_durable_is_a_503_asking_to_retry() -> None:
    app = create_app(ServerSettings(state_dir=None), BrokenStore())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bootstrap") as client:
        response = await client.put("/route", json=sglang_registration())
        assert response.status_code == 503
        assert response.json()["error"] == "state_not_durable"
        assert "No space left on device" in response.json()["message"]
        assert "retry" in response.json()["message"]
    app.registry.close()


@pytest.mark.timeout(60)
def test_a_graceful_shutdown_answers_the_registrations_still_waiting_for_the_disk() -> None:
    """SIGTERM in the middle of a storm: a rank whose registration is on its way to disk gets
    its OK (and then the connection closes) before the server exits."""
    store = SlowStore()
    server, sock = prepare(ServerSettings(state_dir=None, port=0), store)
    port = sock.getsockname()[1]
    running = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    running.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as rank:
            body = orjson.dumps(sglang_registration())
            rank.sendall(
                b"PUT /route HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            deadline = time.monotonic() + 10
            while not store.writing.is_set():
                assert time.monotonic() < deadline, "the registration never reached the store"
                time.sleep(0.01)
            server.should_exit = True  # what SIGTERM does
            while True:  # the listening socket closes once the shutdown has begun
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "the server never began shutting down"
                time.sleep(0.01)
            store.release.set()
            answer = b""
            while chunk := rank.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nOK")
    finally:
        store.release.set()
        server.should_exit = True
        running.join(timeout=20)
    assert not running.is_alive()
