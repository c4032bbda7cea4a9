"""Real faults (issue 17): a full disk under a real server process, and the in-memory equivalent.

A registration answered 503 must leave no trace in what the server serves, and a registration
answered 200 must be found after a restart, however the disk failed in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import Change, MemoryStore
from tests.conftest import (
    ServerProcess,
    cell_body,
    cell_query,
    free_port,
    info_query,
    sglang_registration,
)


class FillableStore(MemoryStore):
    """A memory store whose disk can be filled and freed by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def write(self, changes: Sequence[Change]) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(changes)


def pair(tp: int, **overrides: object) -> dict:
    """Rank ``tp`` of a 1 x 2 group."""
    return sglang_registration(attn_tp_size=2, attn_tp_rank=tp, rank_port=41000 + tp, **overrides)


@pytest.fixture(params=["fast-path", "fastapi-only"])
def fillable(request: pytest.FixtureRequest) -> Iterator[tuple[httpx.AsyncClient, FillableStore]]:
    store = FillableStore()
    app = create_app(ServerSettings(state_dir=None), store, fast_path=request.param == "fast-path")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b")
    yield client, store
    app.registry.close()


@pytest.mark.anyio
async def test_a_registration_answered_503_is_never_served(
    fillable: tuple[httpx.AsyncClient, FillableStore],
) -> None:
    client, store = fillable
    assert (await client.put("/route", json=pair(0))).status_code == 200
    store.full = True
    refused = await client.put("/route", json=pair(1))
    assert refused.status_code == 503 and refused.json()["error"] == "state_not_durable"

    assert (await client.get("/ready")).status_code == 503
    assert (await client.get("/route", params=cell_query(0, 0, 1, 0))).status_code == 503
    assert (await client.get("/route", params=info_query())).status_code == 503
    report = (await client.get("/prefill_port_table")).json()
    assert report["registered_cells"] == 1
    assert [cell["tp"] for cell in report["cells"]] == [0]
    assert [record.cell.tp for record in store.load().snapshot.cells] == [0]


@pytest.mark.anyio
async def test_a_reset_answered_503_changes_nothing_served(
    fillable: tuple[httpx.AsyncClient, FillableStore],
) -> None:
    client, store = fillable
    for tp in (0, 1):
        assert (await client.put("/route", json=pair(tp))).status_code == 200
    before = (await client.get("/prefill_port_table")).json()
    store.full = True
    refused = await client.delete("/prefill_port_table")
    assert refused.status_code == 503 and refused.json()["error"] == "state_not_durable"
    assert (await client.get("/prefill_port_table")).json() == before
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/route", params=cell_query(0, 0, 1, 0))).status_code == 200


@pytest.mark.anyio
async def test_a_deregistration_answered_503_leaves_the_cell_served_and_the_incarnation_alone(
    fillable: tuple[httpx.AsyncClient, FillableStore],
) -> None:
    client, store = fillable
    for tp in (0, 1):
        assert (await client.put("/route", json=pair(tp))).status_code == 200
    before = (await client.get("/prefill_port_table")).json()
    store.full = True
    leaving = cell_body(1)
    refused = await client.post("/deregister", json=leaving)
    assert refused.status_code == 503 and refused.json()["error"] == "state_not_durable"
    assert (await client.get("/prefill_port_table")).json() == before
    assert (await client.get("/ready")).status_code == 200
    lookup = await client.get("/route", params=cell_query(0, 0, 1, 0))
    assert lookup.status_code == 200
    assert lookup.headers["x-sglang-disaggregation-instance-id"] == before["incarnation"]
    assert [record.cell.tp for record in store.load().snapshot.cells] == [0, 1]
    store.full = False
    assert (await client.post("/deregister", json=leaving)).status_code == 200
    assert (await client.get("/ready")).status_code == 503


@pytest.mark.anyio
async def test_a_first_registration_answered_503_leaves_no_topology_behind(
    fillable: tuple[httpx.AsyncClient, FillableStore],
) -> None:
    client, store = fillable
    store.full = True
    assert (await client.put("/route", json=pair(0))).status_code == 503
    assert (await client.get("/prefill_port_table")).json()["topology"] is None
    store.full = False
    for tp in (0, 1):
        assert (await client.put("/route", json=pair(tp))).status_code == 200
    stored = store.load().snapshot
    assert stored.topology is not None and stored.topology.expected_cells == 2
    assert len(stored.cells) == 2


@pytest.mark.anyio
async def test_a_retried_registration_after_a_full_disk_is_served_and_stored(
    fillable: tuple[httpx.AsyncClient, FillableStore],
) -> None:
    client, store = fillable
    assert (await client.put("/route", json=pair(0))).status_code == 200
    store.full = True
    assert (await client.put("/route", json=pair(1))).status_code == 503
    store.full = False
    assert (await client.put("/route", json=pair(1))).status_code == 200
    answer = await client.get("/route", params=cell_query(0, 0, 1, 0))
    assert answer.json() == {"rank_ip": "10.0.0.1", "rank_port": 41001}
    assert len(store.load().snapshot.cells) == 2


class FirstWriteFails(MemoryStore):
    """The first write blocks until released, then fails; every later write succeeds."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()
        self.writes = 0

    def write(self, changes: Sequence[Change]) -> None:
        self.writes += 1
        if self.writes == 1:
            self.writing.set()
            self.release.wait(timeout=30)
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(changes)


@pytest.mark.anyio
async def test_a_registration_queued_behind_a_failed_first_one_stores_the_topology() -> None:
    store = FirstWriteFails()
    app = create_app(ServerSettings(state_dir=None), store)
    table = app.registry.group.table
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as c:
        first = asyncio.create_task(c.put("/route", json=pair(0)))
        await poll(lambda: store.writing.is_set())
        second = asyncio.create_task(c.put("/route", json=pair(1)))
        await poll(lambda: table.in_flight == 2)
        store.release.set()
        assert (await first).status_code == 503
        assert (await second).status_code == 200
        assert (await c.put("/route", json=pair(0))).status_code == 200
        assert (await c.get("/ready")).status_code == 200
    app.registry.close()
    stored = store.load().snapshot
    assert stored.topology is not None and stored.topology.expected_cells == 2
    assert len(stored.cells) == 2


async def poll(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.005)


# -- a real server on a small tmpfs -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only): the state directory lives here and the test fills it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the disk is full; the file is the test's to delete."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (65536, 1):  # then the last few bytes, one at a time
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    return filler


@pytest.fixture
def disk_server(small_disk: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        host="127.0.0.1",
        port=free_port(),
        state_dir=small_disk / "state",
        log_path=tmp_path / "server.log",
    )
    yield server
    server.kill()


def put(server: ServerProcess, body: dict) -> httpx.Response:
    return httpx.put(f"{server.url}/route", json=body, timeout=10)


def get(server: ServerProcess, path: str, **params: str) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", params=params, timeout=10)


@pytest.mark.timeout(90)
def test_on_a_full_disk_the_refused_rank_is_not_served_and_a_restart_agrees(
    disk_server: ServerProcess, small_disk: Path
) -> None:
    disk_server.start()
    assert put(disk_server, pair(0)).status_code == 200
    filler = fill(small_disk)
    refused = put(disk_server, pair(1))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "state_not_durable"
    assert get(disk_server, "/ready").status_code == 503
    assert get(disk_server, "/route", **cell_query(0, 0, 1, 0)).status_code == 503
    assert get(disk_server, "/prefill_port_table").json()["registered_cells"] == 1

    filler.unlink()
    disk_server.restart()
    report = get(disk_server, "/prefill_port_table").json()
    assert report["registered_cells"] == 1 and report["expected_cells"] == 2
    assert put(disk_server, pair(1)).status_code == 200
    assert get(disk_server, "/route", **cell_query(0, 0, 1, 0)).json()["rank_port"] == 41001


@pytest.mark.timeout(90)
def test_a_group_registered_after_a_full_disk_at_the_first_registration_survives_a_restart(
    disk_server: ServerProcess, small_disk: Path
) -> None:
    disk_server.start()
    filler = fill(small_disk)
    assert put(disk_server, pair(0)).status_code == 503
    filler.unlink()
    for tp in (0, 1):
        assert put(disk_server, pair(tp)).status_code == 200

    disk_server.restart()
    report = get(disk_server, "/prefill_port_table").json()
    assert report["topology"] is not None and report["expected_cells"] == 2
    assert report["registered_cells"] == 2
    assert get(disk_server, "/ready").status_code == 200
    assert get(disk_server, "/route", **info_query()).status_code == 200


@pytest.mark.anyio
async def test_a_burst_of_failed_writes_is_logged_once_with_its_cause_and_counted(
    fillable: tuple[httpx.AsyncClient, FillableStore], caplog: pytest.LogCaptureFixture
) -> None:
    client, store = fillable
    store.full = True
    with caplog.at_level(logging.INFO, logger="prefill_bootstrap"):
        for _ in range(3):
            assert (await client.put("/route", json=pair(0))).status_code == 503
        store.full = False
        assert (await client.put("/route", json=pair(0))).status_code == 200
        store.full = True
        assert (await client.put("/route", json=pair(1))).status_code == 503
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, [r.getMessage() for r in errors]
    assert "No space left on device" in errors[0].getMessage()
    assert any("writable again after 3 failed writes" in r.getMessage() for r in caplog.records)
    metrics = (await client.get("/metrics")).text
    assert "prefill_bootstrap_state_write_failures_total 4.0" in metrics
