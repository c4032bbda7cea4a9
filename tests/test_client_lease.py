"""A leased registration stays alive while its keeper heartbeats, expires when it stops, comes
back after a server reset, and steps aside when another rank took the cell."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from prefill_bootstrap.client.bootstrap import bootstrap_prefill_rank
from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.lease import LeaseKeeper, stop_all_lease_keepers
from prefill_bootstrap.shared.errors import RequestRejected
from prefill_bootstrap.shared.protocol import RankRegistration
from tests.conftest import ServerProcess, sglang_registration

pytestmark = pytest.mark.timeout(60)
LEASE = 1.5


def leased(tp: int, port: int = 41000) -> RankRegistration:
    body = sglang_registration(attn_tp_size=1, attn_tp_rank=tp, rank_port=port, lease_seconds=LEASE)
    return RankRegistration.model_validate(body)


def ready(server: ServerProcess) -> int:
    return httpx.get(f"{server.url}/ready", timeout=5).status_code


def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.1)


def test_bootstrap_keeps_a_leased_cell_alive_until_the_keeper_stops(server: ServerProcess) -> None:
    report = bootstrap_prefill_rank(leased(0), local_port=server.port, wait_timeout=10)
    assert report.complete
    time.sleep(LEASE * 2.5)
    assert ready(server) == 200, "the heartbeat should have kept the lease"
    stop_all_lease_keepers()
    eventually(lambda: ready(server) == 503)
    expired = httpx.get(f"{server.url}/prefill_port_table").json()["expired_cells"]
    assert expired == [[0, 0, 0, 0]]


def test_the_keeper_registers_again_after_a_server_reset(server: ServerProcess) -> None:
    registration = leased(0)
    with BootstrapClient(server.url) as client:
        client.register(registration)
    with LeaseKeeper(BootstrapClient(server.url), registration):
        httpx.delete(f"{server.url}/prefill_port_table").raise_for_status()
        eventually(lambda: ready(server) == 200)


def test_the_keeper_stops_when_another_rank_holds_the_cell(server: ServerProcess) -> None:
    with BootstrapClient(server.url) as client:
        client.register(leased(0, port=41000))
        keeper = LeaseKeeper(BootstrapClient(server.url), leased(0, port=41000)).start()
        client.register(leased(0, port=42000))
    eventually(lambda: not keeper.running)
    keeper.stop()
    cell = httpx.get(f"{server.url}/prefill_port_table").json()["cells"][0]
    assert cell["rank_port"] == 42000


def test_a_heartbeat_from_a_replaced_address_is_rejected_with_409(server: ServerProcess) -> None:
    with BootstrapClient(server.url) as client:
        client.register(leased(0, port=42000))
        with pytest.raises(RequestRejected) as caught:
            client.heartbeat(leased(0, port=41000))
    assert caught.value.status_code == 409


def test_a_registration_without_a_lease_has_nothing_to_keep() -> None:
    registration = RankRegistration.model_validate(sglang_registration())
    with pytest.raises(ValueError, match="no lease_seconds"):
        LeaseKeeper(BootstrapClient("127.0.0.1:1"), registration)
