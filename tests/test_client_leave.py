"""A leased rank leaving cleanly: the keeper stops beating, then deregisters, within a bound;
on a crash, or once another address holds the cell, it leaves the cell to its lease."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.lease import LeaseKeeper
from prefill_bootstrap.shared.protocol import RankRegistration
from tests.conftest import sglang_registration

LEFT = {"cell": [0, 0, 0, 0], "address": {"rank_ip": "10.0.0.1", "rank_port": 41000},
        "registered": 0, "expected": 1, "complete": False, "incarnation": "g1.1"}  # fmt: skip


class Recorder:
    """A server that answers heartbeats (or 409s them) and deregistrations, and remembers."""

    def __init__(self, heartbeat_status: int = 200) -> None:
        self.paths: list[str] = []
        self.heartbeat_status = heartbeat_status
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.paths.append(request.url.path)
        if request.url.path == "/deregister":
            return httpx.Response(200, json=LEFT)
        body = {"error": "lease_not_held", "message": "held by 10.0.0.9:41000"}
        if self.heartbeat_status != 200:
            return httpx.Response(self.heartbeat_status, json=body)
        return httpx.Response(200, json={"lease_expires_at": time.time() + 1})


def keeper(server: Any, lease: float = 0.3) -> LeaseKeeper:
    body = sglang_registration(attn_tp_size=1, rank_ip="10.0.0.1", lease_seconds=lease)
    client = BootstrapClient("http://bootstrap:8998", transport=httpx.MockTransport(server))
    return LeaseKeeper(client, RankRegistration.model_validate(body))


def test_leaving_stops_the_heartbeat_then_deregisters_once() -> None:
    server = Recorder()
    running = keeper(server).start()
    time.sleep(0.25)  # a heartbeat every 0.1 s
    assert running.leave() is True
    time.sleep(0.25)
    assert server.paths[-1] == "/deregister"
    assert server.paths.count("/deregister") == 1
    assert "/heartbeat" in server.paths
    assert running.leave() is False  # already left: nothing more is sent
    assert server.paths.count("/deregister") == 1


def test_a_with_block_leaves_when_it_ends_normally_and_not_when_it_raises() -> None:
    server = Recorder()
    with keeper(server):
        pass
    assert server.paths == ["/deregister"]
    crashed = Recorder()
    with pytest.raises(RuntimeError), keeper(crashed):
        raise RuntimeError("the engine crashed")
    assert "/deregister" not in crashed.paths


def test_a_replaced_rank_does_not_deregister_the_cell_another_address_holds() -> None:
    server = Recorder(heartbeat_status=409)
    running = keeper(server).start()
    deadline = time.monotonic() + 5
    while running.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.leave() is False
    assert "/deregister" not in server.paths


def test_leaving_is_bounded_when_the_server_is_gone() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    running = keeper(refuse, lease=60).start()
    started = time.monotonic()
    assert running.leave(within=0.5) is False  # the client's own policy would retry for 60 s
    assert time.monotonic() - started < 1.5
