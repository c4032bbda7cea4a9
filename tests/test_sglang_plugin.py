"""The SGLang plugin inside real SGLang releases: real ``CommonKVManager``s in a gloo world.

Every rank is a process of a test-only SGLang env (scripts/sglang-test-env.sh) that runs
SGLang's own ``load_plugins()`` and then builds the release's real ``CommonKVManager`` in prefill
mode (tests/sglang/rank.py), so the registration path under test is the release's own code.

The group: 2 nodes x 2 ranks, tp 4 (cell tp = world rank). Each node has its own local bootstrap
port, as a launcher that reserves a free port per host gives it; the server listens on the
leader's. Node 0's ranks have address 127.0.0.1, node 1's 127.0.0.2.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from prefill_bootstrap.shared.protocol import TableReport
from tests.conftest import ServerProcess
from tests.sglang_env import (
    SGLANG_VERSIONS,
    RankResult,
    free_ports,
    run_rank_world,
    sglang_bootstrap_server,
)

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(600)]

EVERY_RELEASE = SGLANG_VERSIONS
"""Each shape: 0.5.11 (no port sync of its own), 0.5.12 (the first with it), 0.5.23 (current)."""
FAULT_RELEASES = tuple(v for v in SGLANG_VERSIONS if v != "0.5.12")
"""The cases with SGLang's own server run on the oldest and the newest release (0.5.12 shares
0.5.11's shape): each release's server is its own code."""
NEWEST_RELEASE = tuple(
    sorted(SGLANG_VERSIONS, key=lambda v: tuple(int(part) for part in v.split(".")))[-1:]
)
"""Rank failures (unreachable server, a rank that never starts) are our code's once the release
has built its rows, which every shape test checks per release: they run on the newest only."""
NODE_IPS = ("127.0.0.1", "127.0.0.2")
TP = 4
PLUGIN_ON = {
    "PREFILL_BOOTSTRAP_SGLANG": "1",
    "PREFILL_BOOTSTRAP_RETRY_DEADLINE_SECONDS": "20",
    "PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS": "60",
}
SHORT_WAIT = {"PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS": "6"}


def prefill_world(
    leader_port: int,
    other_port: int,
    *,
    processes: int = 4,
    env: dict[str, str] | None = None,
    node_env: dict[int, dict[str, str]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Configs and environments of a 2-node world; rank r fills cell tp=r of a tp-4 group, so a
    world of 3 processes leaves cell tp=3 to a rank that never starts."""
    init_port = free_ports(1)[0]
    configs, envs = [], []
    for rank in range(processes):
        node = rank // 2
        configs.append(
            {
                "world_size": processes,
                "rank": rank,
                "init_port": init_port,
                "bootstrap_port": (leader_port, other_port)[node],
                "nnodes": 2,
                "node_rank": node,
                "sizes": {"dp": 1, "cp": 1, "tp": TP, "pp": 1},
                "cell": {"dp": 0, "cp": 0, "tp": rank, "pp": 0},
            }
        )
        envs.append(
            {"SGLANG_HOST_IP": NODE_IPS[node], **(env or {}), **(node_env or {}).get(node, {})}
        )
    return configs, envs


def run_world(release: str, configs: list[dict[str, Any]], envs: list[dict[str, str]]) -> list:
    return run_rank_world(release, configs, envs, timeout=240)


def table_of(server: ServerProcess) -> TableReport:
    return TableReport.model_validate_json(httpx.get(f"{server.url}/prefill_port_table").content)


def explain(results: list[RankResult]) -> str:
    return "\n\n".join(result.describe() for result in results)


def error_of(result: RankResult) -> tuple[str, str]:
    assert result.result is not None, result.describe()
    return result.result.get("error_type", ""), result.result.get("error", "")


@pytest.fixture
def leader(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """Our server on node 0's local bootstrap port (the leader's)."""
    return server_factory()


@pytest.fixture
def other_port() -> int:
    """Node 1's local bootstrap port: different from the leader's, and nothing listens there."""
    return free_ports(1)[0]


# -- (a) the bug, reproduced --------------------------------------------------------------------


@pytest.mark.skipif("0.5.11" not in SGLANG_VERSIONS, reason="needs the SGLang 0.5.11 test env")
def test_without_the_plugin_0_5_11_loses_the_other_nodes_rows_and_carries_on(
    leader: ServerProcess, other_port: int
) -> None:
    results = run_world("0.5.11", *prefill_world(leader.port, other_port))
    assert all(result.ok for result in results), explain(results)  # nobody failed...
    table = table_of(leader)
    assert table.missing_cells == [(0, 0, 2, 0), (0, 0, 3, 0)]  # ...and node 1 is not there
    for result in results[2:]:
        assert f"host='127.0.0.1', port={other_port}" in result.stderr  # requests' wording
        assert "failed to register to bootstrap server" in result.stderr


# -- (b) the fix --------------------------------------------------------------------------------


@pytest.mark.parametrize("release", EVERY_RELEASE)
def test_with_the_plugin_the_table_completes_with_every_ranks_address(
    release: str, leader: ServerProcess, other_port: int
) -> None:
    results = run_world(release, *prefill_world(leader.port, other_port, env=PLUGIN_ON))
    assert all(result.ok for result in results), explain(results)
    assert {result.result["bootstrap_port"] for result in results} == {leader.port}
    table = table_of(leader)
    assert table.complete
    assert {cell.tp: (cell.rank_ip, cell.rank_port) for cell in table.cells} == {
        rank: (result.result["rank_ip"], result.result["rank_port"])
        for rank, result in enumerate(results)
    }
    assert [result.result["rank_ip"] for result in results] == [
        *NODE_IPS[:1] * 2,
        *NODE_IPS[1:] * 2,
    ]
    for result in results:  # the plugin did it, not the release's own port sync
        assert f"SGLang plugin is on for SGLang {release}" in result.stderr
        assert f"sees the port table at {leader.url} complete: 4 of 4 cells" in result.stderr


class Recorder(BaseHTTPRequestHandler):
    """A bootstrap server that keeps every registration body as sent, and is always complete."""

    bodies: list[dict[str, Any]]

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        self.server.bodies.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self._answer(200, b"OK", "text/plain")

    def do_GET(self) -> None:
        if self.path.startswith("/route"):
            info = {"attn_tp_size": TP, "attn_cp_size": 1, "dp_size": 1, "pp_size": 1}
            self._answer(200, json.dumps(info).encode(), "application/json")
        else:
            self._answer(404, b"404: Not Found", "text/plain")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("release", EVERY_RELEASE)
def test_the_plugin_sends_exactly_the_body_the_stock_release_sends(
    release: str, recorder: ThreadingHTTPServer
) -> None:
    """One node of two ranks at the recorder: rank 0 with the plugin on, rank 1 stock (a single
    node has no collective, so the two may differ). Their bodies differ only in their cell and
    their own KV port."""
    port = recorder.server_address[1]
    configs, envs = prefill_world(port, port, processes=2)
    for config in configs:
        config["nnodes"], config["node_rank"] = 1, 0
    envs[0].update(PLUGIN_ON)
    results = run_world(release, configs, envs)
    assert all(result.ok for result in results), explain(results)
    plugin, stock = sorted(recorder.bodies, key=lambda body: body["attn_tp_rank"])  # type: ignore[attr-defined]
    assert plugin.keys() == stock.keys()
    own = ("attn_tp_rank", "rank_port")
    assert {k: v for k, v in plugin.items() if k not in own} == {
        k: v for k, v in stock.items() if k not in own
    }
    assert (plugin["rank_port"], stock["rank_port"]) == tuple(
        r.result["rank_port"] for r in results
    )


# -- (c) a node that cannot reach the server ----------------------------------------------------


@pytest.mark.parametrize("release", NEWEST_RELEASE)
def test_with_the_plugin_ranks_that_cannot_reach_the_server_fail_naming_url_and_port(
    release: str, leader: ServerProcess, other_port: int
) -> None:
    unreachable = free_ports(1)[0]
    deadline = 3.0
    node1 = {
        "PREFILL_BOOTSTRAP_URL": f"http://127.0.0.1:{unreachable}",
        "PREFILL_BOOTSTRAP_RETRY_DEADLINE_SECONDS": str(deadline),
    }
    world = prefill_world(
        leader.port, other_port, env={**PLUGIN_ON, **SHORT_WAIT}, node_env={1: node1}
    )
    results = run_world(release, *world)
    for result in results[2:]:
        kind, message = error_of(result)
        assert kind == "prefill_bootstrap.shared.errors.RegistrationFailed", result.describe()
        assert f"registration to http://127.0.0.1:{unreachable}/route failed after" in message
        assert f"nothing listens at 127.0.0.1:{unreachable}" in message
        elapsed = float(re.search(r"attempt\(s\) over ([\d.]+)s", message).group(1))
        assert elapsed <= deadline + 1.0
    for result in results[:2]:
        kind, message = error_of(result)
        assert kind == "prefill_bootstrap.shared.errors.TableIncomplete", result.describe()
        assert "2 of 4 cells are missing: (dp=0, cp=0, tp=2, pp=0), (dp=0, cp=0, tp=3, pp=0)" in (
            message
        )


# -- (d) a rank that never registers ------------------------------------------------------------


@pytest.mark.parametrize("release", NEWEST_RELEASE)
def test_with_the_plugin_the_other_ranks_name_exactly_the_cell_that_never_registered(
    release: str, leader: ServerProcess, other_port: int
) -> None:
    world = prefill_world(leader.port, other_port, processes=3, env={**PLUGIN_ON, **SHORT_WAIT})
    results = run_world(release, *world)
    for result in results:
        kind, message = error_of(result)
        assert kind == "prefill_bootstrap.shared.errors.TableIncomplete", result.describe()
        assert "1 of 4 cells are missing: (dp=0, cp=0, tp=3, pp=0);" in message
        assert "hosts that did register: 127.0.0.1, 127.0.0.2" in message


# -- (e) the same wait against SGLang's own bootstrap server ------------------------------------


@pytest.mark.parametrize("release", FAULT_RELEASES)
def test_with_the_plugin_the_wait_works_against_sglangs_own_server(
    release: str, other_port: int
) -> None:
    with sglang_bootstrap_server(release) as server:
        results = run_world(release, *prefill_world(server.port, other_port, env=PLUGIN_ON))
        answered = subprocess.run(
            [sys.executable, "-m", "prefill_bootstrap.cli", "wait", "--url", server.url,
             "--timeout", "10"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert all(result.ok for result in results), explain(results)
    for result in results:
        assert f"sees the prefill group at {server.url} (SGLang's built-in" in result.stderr
    assert sorted((cell["rank_ip"], cell["rank_port"]) for cell in server.cells or []) == sorted(
        (result.result["rank_ip"], result.result["rank_port"]) for result in results
    )
    assert (answered.returncode, answered.stdout) == (
        0,
        f"prefill group at {server.url} is complete (SGLang's built-in bootstrap server "
        "answered)\n",
    )


@pytest.mark.parametrize("release", FAULT_RELEASES)
def test_with_the_plugin_an_incomplete_group_at_sglangs_own_server_fails_loudly(
    release: str, other_port: int
) -> None:
    with sglang_bootstrap_server(release) as server:
        world = prefill_world(server.port, other_port, processes=3, env={**PLUGIN_ON, **SHORT_WAIT})
        results = run_world(release, *world)
    for result in results:
        kind, message = error_of(result)
        assert kind == "prefill_bootstrap.shared.errors.TableIncomplete", result.describe()
        assert (
            "3 registrations for 4 cells; SGLang's built-in bootstrap server does not say which"
            in message
        )
