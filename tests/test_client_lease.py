"""A leased registration stays alive while its keeper heartbeats, expires when it stops, comes
back after a server reset, and steps aside when another rank took the cell."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


EXIT_PROBE = """
import atexit, sys
registered = []
register = atexit.register
atexit.register = lambda function, *args, **kwargs: (
    getattr(function, "__module__", "").startswith("prefill_bootstrap")
    and registered.append(function),
    register(function, *args, **kwargs),
)[1]

from prefill_bootstrap.client.lease import LeaseKeeper
from prefill_bootstrap.shared.protocol import RankRegistration
from tests.conftest import sglang_registration

class Client:
    def heartbeat(self, registration): pass
    def register(self, registration): pass
    def deregister(self, dp, cp, tp, pp, *, rank_ip, rank_port, within):
        print(f"left tp={tp} within {within:.0f}s", flush=True)
    def close(self): print("closed", flush=True)

print("hooks after import:", len(registered), flush=True)
body = sglang_registration(lease_seconds=600, attn_tp_size=2)
for tp in range(2):
    registration = RankRegistration.model_validate({**body, "attn_tp_rank": tp})
    LeaseKeeper(Client(), registration).start()
print("hooks after two starts:", len(registered), flush=True)
"""


def test_keepers_still_running_leave_at_a_normal_exit_by_a_hook_registered_on_first_start() -> None:
    """Importing the module registers nothing; the first keeper started registers the exit
    hook once, and at a normal exit every keeper still running stops, deregisters its cell
    within the shutdown budget, and closes its client."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "hooks after import: 0",
        "hooks after two starts: 1",
        "left tp=0 within 2s",
        "closed",
        "left tp=1 within 2s",
        "closed",
    ]


def test_a_crash_that_ends_the_interpreter_leaves_the_cells_to_their_leases() -> None:
    root = Path(__file__).resolve().parents[1]
    probe = EXIT_PROBE + "\nraise RuntimeError('the engine crashed')\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 1
    assert done.stdout.splitlines()[2:] == ["closed", "closed"]
