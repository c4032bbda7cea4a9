"""Shared fixtures: registration bodies, the app over ASGI, and real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefill_bootstrap.shared.protocol import SERVER_INFO_QUERY

SERVER_START_DEADLINE = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sglang_registration(**overrides: Any) -> dict[str, Any]:
    """A ``PUT /route`` body exactly as an SGLang 0.5.23 prefill rank sends it, for an engine
    started with an explicit ``--load-balance-method`` (a default prefill resolves "auto" to
    "follow_bootstrap_room" before registering; tests/golden/gen3.json has that case)."""
    body: dict[str, Any] = {
        "attn_tp_size": 2,
        "attn_tp_rank": 0,
        "attn_cp_size": 1,
        "attn_cp_rank": 0,
        "attn_dp_size": 1,
        "attn_dp_rank": 0,
        "pp_size": 1,
        "pp_rank": 0,
        "system_dp_size": 1,
        "system_dp_rank": 0,
        "rank_ip": "10.0.0.1",
        "rank_port": 41000,
        "page_size": 16,
        "kv_cache_dtype": "auto",
        "kv_layout": None,
        "dsv41_spec_layout": None,
        "load_balance_method": "auto",
        "enable_dsa_cache_layer_split": False,
        "enable_kv_cache_sharding": False,
        "prefill_http_port": 30000,
        "decode_allocation_policy": "early",
    }
    body.update(overrides)
    return body


@pytest.fixture
def registration() -> Callable[..., dict[str, Any]]:
    return sglang_registration


def info_query() -> dict[str, str]:
    return dict(SERVER_INFO_QUERY)


def cell_query(dp: int, cp: int, tp: int, pp: int) -> dict[str, str]:
    return {
        "prefill_dp_rank": str(dp),
        "prefill_cp_rank": str(cp),
        "target_tp_rank": str(tp),
        "target_pp_rank": str(pp),
    }


@pytest.fixture(params=["fast-path", "fastapi-only"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """The server in memory behind ``httpx.ASGITransport``.

    Parametrised so every API test runs against both the lean hot path and the plain FastAPI
    routes: the two must answer identically.
    """
    from prefill_bootstrap.service import ServerSettings, create_app
    from prefill_bootstrap.service.store import MemoryStore

    app = create_app(
        ServerSettings(state_dir=None), MemoryStore(), fast_path=request.param == "fast-path"
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bootstrap") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client
    app.registry.close()


def two_cell_rank(tp: int, port: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Cell (0, 0, tp, 0) of ``sglang_registration``'s two-cell group, at 10.0.0.1:<port>
    (41000 + tp unless given): the group the change-feed tests move cells of."""
    return sglang_registration(attn_tp_rank=tp, rank_port=port or 41000 + tp, **overrides)


def cell_body(tp: int, port: int | None = None) -> dict[str, Any]:
    """The heartbeat's and the deregistration's body naming ``two_cell_rank``'s cell."""
    return {"dp": 0, "cp": 0, "tp": tp, "pp": 0, "rank_ip": "10.0.0.1",
            "rank_port": port or 41000 + tp}  # fmt: skip


class FakeClock:
    """Unix seconds that only move when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app_factory() -> Iterator[Callable[..., Any]]:
    """Build in-memory apps with chosen settings; every one is closed at teardown."""
    from prefill_bootstrap.service import ServerSettings, create_app
    from prefill_bootstrap.service.store import MemoryStore

    built: list[Any] = []

    def build(*, clock: Callable[[], float] | None = None, **settings: Any) -> Any:
        options = {"clock": clock} if clock else {}
        app = create_app(ServerSettings(state_dir=None, **settings), MemoryStore(), **options)
        built.append(app)
        return app

    yield build
    for app in built:
        app.registry.close()


def asgi_client(app: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bootstrap", headers=headers
    )


class BlockingASGITransport(httpx.BaseTransport):
    """Serve a blocking ``httpx.Client`` from an in-memory ASGI app (httpx only ships the async
    transport): each request runs on one event loop in a helper thread, so long polls and
    registrations from several clients meet on the same app state."""

    def __init__(self, app: Any, portal: Any) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            inner = httpx.Request(
                request.method, request.url, headers=request.headers, content=request.read()
            )
            response = await self._inner.handle_async_request(inner)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return self._portal.call(send)


@pytest.fixture
def blocking_transport() -> Iterator[Callable[[Any], BlockingASGITransport]]:
    """``blocking_transport(app)``: a transport for ``BootstrapClient`` over an in-memory app."""
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        yield lambda app: BlockingASGITransport(app, portal)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, deadline: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``/health`` until it answers 200; fail with the server's output if it never does."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"server at {url} not healthy before the deadline: {last}")


@dataclass
class ServerProcess:
    """A real ``prefill-bootstrap serve`` subprocess on a loopback port."""

    host: str
    port: int
    state_dir: Path | None
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set for the server on top of this process's."""
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "prefill_bootstrap.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir) if self.state_dir else "",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> ServerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()
        if wait:
            wait_for_health(self.url, time.monotonic() + SERVER_START_DEADLINE, self.process)
        return self

    def kill(self) -> None:
        """``kill -9``: no shutdown hooks, no flush; what was acknowledged must survive."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 10) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def restart(self) -> ServerProcess:
        self.kill()
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; every one still running is killed at teardown."""
    started: list[ServerProcess] = []

    def start(
        *extra_args: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        durable: bool = True,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        index = len(started)
        server = ServerProcess(
            host=host,
            port=port or free_port(host),
            state_dir=tmp_path / f"state-{index}" if durable else None,
            log_path=tmp_path / f"server-{index}.log",
            extra_args=list(extra_args),
            env=env or {},
        )
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One real durable server on a free loopback port."""
    return server_factory()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fuzzing and kill -9 figures in every run's summary (CI logs included)."""
    fuzz = sys.modules.get("tests.test_fuzz")
    count = getattr(fuzz, "requests_sent", {}).get("count", 0) if fuzz else 0
    if count:
        terminalreporter.write_line(
            f"fuzzing: schemathesis sent {count} generated requests, 0 server errors"
        )
    checker = sys.modules.get("tests.acknowledged")
    figures = getattr(checker, "figures", {})
    if figures.get("kills"):
        terminalreporter.write_line(
            f"kill -9 storms: {figures['kills']} kills inside the answer window, "
            f"{figures['kills_after_answers']} after the last answer; "
            f"{figures['acknowledged_checked']} acknowledged writes checked after restarts, "
            f"{figures['unknown']} unanswered; {figures['violations']} violations"
        )
    if figures.get("machine_steps"):
        terminalreporter.write_line(
            f"stateful test: {figures['machine_steps']} steps, {figures['machine_restarts']} "
            f"kill -9 restarts ({figures['machine_in_flight']} with a registration on the wire, "
            f"{figures['machine_in_flight_applied']} of them applied), {figures['bad_inputs']} "
            "bad inputs; served == acknowledged model after every step"
        )
