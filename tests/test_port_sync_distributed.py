"""The original bug, reproduced and fixed, with real ``torch.distributed`` (gloo, CPU).

A world of 2 simulated nodes x 2 ranks. Each node's launcher reserved a *different* local
bootstrap port, and only the leader's port has a server (a real ``prefill-bootstrap serve``
process). Node k hosts dp group k; ranks register as 127.0.0.<k+1> so the table shows which node
a cell came from. Every rank is a spawned process; every test has a hard timeout, and a world
that does not finish is killed rather than left behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, free_port

torch_mp = pytest.importorskip("torch.multiprocessing")

pytestmark = [pytest.mark.torch, pytest.mark.timeout(120)]

NODES = 2
RANKS_PER_NODE = 2
WORLD = NODES * RANKS_PER_NODE
WORLD_DEADLINE = 90.0

# Ranks start from a fork server that imported torch once (a fresh interpreter per rank, as with
# spawn, but without four cold torch imports per world: minutes on a small CI machine).
torch_mp.get_context("forkserver").set_forkserver_preload(["torch.distributed", __name__])


def registration(rank: int) -> dict[str, Any]:
    node = rank // RANKS_PER_NODE
    return {
        "attn_tp_size": RANKS_PER_NODE, "attn_tp_rank": rank % RANKS_PER_NODE,
        "attn_cp_size": 1, "attn_cp_rank": 0,
        "attn_dp_size": NODES, "attn_dp_rank": node,
        "pp_size": 1, "pp_rank": 0,
        "system_dp_size": 1, "system_dp_rank": 0,
        "rank_ip": f"127.0.0.{node + 1}", "rank_port": 50000 + rank,
        "page_size": 16, "kv_cache_dtype": "auto",
    }  # fmt: skip


def _rank_main(rank: int, plan: dict[str, Any]) -> None:
    """One prefill rank (runs in a spawned process); writes its outcome as JSON."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on loopback
    import torch.distributed as dist

    from prefill_bootstrap.client.addresses import bootstrap_url
    from prefill_bootstrap.client.bootstrap import bootstrap_prefill_rank
    from prefill_bootstrap.client.http import BootstrapClient
    from prefill_bootstrap.client.port_sync import sync_auth_token, sync_bootstrap_port
    from prefill_bootstrap.client.retry import RetryPolicy
    from prefill_bootstrap.shared.errors import (
        BootstrapError,
        RegistrationFailed,
        TableIncomplete,
    )

    dist_init_addr = plan["dist_init_addr"]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{dist_init_addr}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    local_port = plan["node_ports"][rank // RANKS_PER_NODE]
    retry = RetryPolicy(deadline=plan["retry_deadline"], attempts=1000, max_backoff=0.5)
    outcome: dict[str, Any] = {"rank": rank}
    try:
        if plan["mode"] == "sync-only":
            group = dist.new_group(plan["group"]) if plan.get("group") else None
            if group is None or rank in plan["group"]:
                outcome["port"] = sync_bootstrap_port(
                    local_port, dist_init_addr=dist_init_addr, nnodes=NODES, group=group
                )
        elif plan["mode"] == "token-only":
            mine = plan["token"] if rank == 0 else None
            outcome["token"] = sync_auth_token(mine, dist_init_addr=dist_init_addr, nnodes=NODES)
        elif plan["mode"] == "bootstrap":
            report = bootstrap_prefill_rank(
                registration(rank),
                local_port=local_port,
                dist_init_addr=dist_init_addr,
                nnodes=NODES,
                wait_timeout=plan["wait_timeout"],
                retry=retry,
                auth_token=plan.get("token") if rank == 0 else None,
                share_auth_token=bool(plan.get("token")),
            )
            outcome["complete"] = report.complete
            # The wait never reads the table (issue 16); read it once to check every address.
            leader = bootstrap_url("127.0.0.1", plan["node_ports"][0])
            with BootstrapClient(leader, retry=retry) as client:
                table = client.table()
            outcome["cells"] = [[*cell.cell, cell.rank_ip, cell.rank_port] for cell in table.cells]
        else:  # "no-sync": steps 2 and 3 only, each rank at <leader>:<its own port>: the bug
            with BootstrapClient(bootstrap_url("127.0.0.1", local_port), retry=retry) as client:
                client.register(registration(rank))
                client.wait_until_complete(plan["wait_timeout"])
            outcome["complete"] = True
    except BootstrapError as exc:
        outcome |= {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, RegistrationFailed):
            outcome["port"] = exc.port
        if isinstance(exc, TableIncomplete):
            outcome["missing"] = [list(cell) for cell in exc.missing]
    Path(plan["results"], f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def run_world(tmp_path: Path, **plan: Any) -> dict[int, dict[str, Any]]:
    """Spawn the world, join it within a deadline (killing it past that), read the outcomes."""
    results = tmp_path / "results"
    results.mkdir()
    plan |= {"dist_init_addr": f"127.0.0.1:{free_port()}", "results": str(results)}
    context = torch_mp.start_processes(
        _rank_main, args=(plan,), nprocs=WORLD, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + WORLD_DEADLINE
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise AssertionError(f"the world did not finish within {WORLD_DEADLINE}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return {rank: json.loads((results / f"rank{rank}.json").read_text()) for rank in range(WORLD)}


@pytest.fixture
def leader_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """The leader's sidecar: the only server in the world."""
    return server_factory(durable=False)


@pytest.fixture
def node_ports(leader_server: ServerProcess) -> list[int]:
    """Each node's local bootstrap port: the leader's has the server, node 1's has nothing."""
    other = free_port()
    assert other != leader_server.port
    return [leader_server.port, other]


def test_every_rank_receives_the_leaders_port_whatever_its_local_port(
    tmp_path: Path, node_ports: list[int]
) -> None:
    outcomes = run_world(tmp_path, mode="sync-only", node_ports=node_ports, retry_deadline=1)
    assert {rank: outcome.get("port") for rank, outcome in outcomes.items()} == dict.fromkeys(
        range(WORLD), node_ports[0]
    )


def test_a_subgroup_takes_the_port_of_its_own_first_rank(
    tmp_path: Path, node_ports: list[int]
) -> None:
    outcomes = run_world(
        tmp_path, mode="sync-only", node_ports=node_ports, retry_deadline=1, group=[2, 3]
    )
    assert outcomes[2]["port"] == outcomes[3]["port"] == node_ports[1]
    assert "port" not in outcomes[0]


def test_with_port_sync_every_rank_registers_and_sees_the_complete_table(
    tmp_path: Path, node_ports: list[int]
) -> None:
    outcomes = run_world(
        tmp_path, mode="bootstrap", node_ports=node_ports, retry_deadline=20, wait_timeout=30
    )
    expected_cells = sorted(
        [0 if r < 2 else 1, 0, r % 2, 0, f"127.0.0.{r // 2 + 1}", 50000 + r] for r in range(WORLD)
    )
    for rank, outcome in outcomes.items():
        assert "error" not in outcome, f"rank {rank}: {outcome.get('message')}"
        assert outcome["complete"] is True
        assert sorted(outcome["cells"]) == expected_cells


def test_without_port_sync_non_leaders_fail_naming_the_refused_port(
    tmp_path: Path, node_ports: list[int]
) -> None:
    outcomes = run_world(
        tmp_path, mode="no-sync", node_ports=node_ports, retry_deadline=2, wait_timeout=6
    )
    refused = node_ports[1]
    for rank in (2, 3):
        outcome = outcomes[rank]
        assert outcome["error"] == "RegistrationFailed", outcome
        assert outcome["port"] == refused
        assert (
            f"nothing listens at 127.0.0.1:{refused}: is {refused} the leader's"
            in (outcome["message"])
        )
        assert "sync_bootstrap_port" in outcome["message"]


def test_without_port_sync_the_leaders_wait_names_exactly_the_missing_cells(
    tmp_path: Path, node_ports: list[int]
) -> None:
    outcomes = run_world(
        tmp_path, mode="no-sync", node_ports=node_ports, retry_deadline=2, wait_timeout=6
    )
    for rank in (0, 1):
        outcome = outcomes[rank]
        assert outcome["error"] == "TableIncomplete", outcome
        assert outcome["missing"] == [[1, 0, 0, 0], [1, 0, 1, 0]]
        assert (
            "2 of 4 cells are missing: (dp=1, cp=0, tp=0, pp=0), (dp=1, cp=0, tp=1, pp=0)"
            in (outcome["message"])
        )
        assert "hosts that did register: 127.0.0.1" in outcome["message"]


def test_every_rank_receives_the_leaders_token(tmp_path: Path, node_ports: list[int]) -> None:
    outcomes = run_world(
        tmp_path, mode="token-only", node_ports=node_ports, retry_deadline=1, token="s3cr3t-é"
    )
    assert {rank: outcome.get("token") for rank, outcome in outcomes.items()} == dict.fromkeys(
        range(WORLD), "s3cr3t-é"
    )


def test_only_the_leader_needs_the_token_to_register_the_whole_group(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory("--auth-token", "group-secret", durable=False)
    outcomes = run_world(
        tmp_path,
        mode="bootstrap",
        node_ports=[server.port, free_port()],
        retry_deadline=20,
        wait_timeout=30,
        token="group-secret",
    )
    for rank, outcome in outcomes.items():
        assert "error" not in outcome, f"rank {rank}: {outcome.get('message')}"
        assert outcome["complete"] is True
