"""The product's reason to exist, on real (namespaced) hosts: ranks on different hosts with
different local bootstrap ports, one torch.distributed world, one leader-hosted server."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.netns import Network, netns_unavailable_reason

REASON = netns_unavailable_reason()
if REASON and os.environ.get("CI"):
    raise RuntimeError(f"multi-host tests cannot run in CI: {REASON}")
pytest.importorskip("torch")
pytestmark = [
    pytest.mark.netns,
    pytest.mark.torch,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.timeout(180),
]

TESTS = Path(__file__).parent
RANKS_PER_HOST = 2
RANK_HOSTS = 3  # host0 is the leader; host3 is a decode-style reader with no ranks


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Network(RANK_HOSTS + 1) as network:
        yield Cluster(network, tmp_path, ranks_per_host=RANKS_PER_HOST, rank_hosts=RANK_HOSTS)


def test_every_rank_on_every_host_registers_at_the_leaders_port(cluster: Cluster) -> None:
    cluster.start_server()
    reader = cluster.network.hosts[3].popen(
        [sys.executable, str(TESTS / "netns_decode.py"), cluster.url, "90"],
        cluster.tmp / "decode.log",
    )
    started = time.monotonic()
    outcomes = cluster.results(cluster.start_ranks())
    elapsed = time.monotonic() - started
    print(f"\nmission scenario: 6 ranks on 3 hosts bootstrapped in {elapsed:.2f}s wall time")

    assert all(outcome.get("ok") for outcome in outcomes), outcomes
    table = cluster.table()
    assert table["complete"] is True
    assert table["registered_cells"] == RANKS_PER_HOST * RANK_HOSTS
    for cell in table["cells"]:
        assert cell["rank_ip"] == cluster.network.hosts[cell["pp"]].address
        assert cell["rank_port"] == 50000 + cell["pp"] * RANKS_PER_HOST + cell["tp"]

    reader.wait(timeout=60)
    decode = json.loads((cluster.tmp / "decode.log").read_text().splitlines()[-1])
    assert decode["statuses"].get("503", 0) >= 1, decode
    assert decode["info"]["pp_size"] == RANK_HOSTS
    for key, address in decode["cells"].items():
        _, _, tp, pp = map(int, key.split(","))
        assert address == {
            "rank_ip": cluster.network.hosts[pp].address,
            "rank_port": 50000 + pp * RANKS_PER_HOST + tp,
        }
    assert len(decode["cells"]) == RANKS_PER_HOST * RANK_HOSTS


def test_without_port_sync_the_failure_names_the_refused_port_and_the_missing_cells(
    cluster: Cluster,
) -> None:
    cluster.start_server()
    outcomes = cluster.results(cluster.start_ranks(no_sync=True, retry_deadline=4, wait_timeout=8))
    leaders = [o for o in outcomes if o["rank"] < RANKS_PER_HOST]
    workers = [o for o in outcomes if o["rank"] >= RANKS_PER_HOST]
    for outcome in workers:
        index = outcome["rank"] // RANKS_PER_HOST
        assert outcome["error"] == "RegistrationFailed", outcome
        assert f"{cluster.leader.address}:{cluster.local_ports[index]}" in outcome["message"]
        assert "connection refused" in outcome["message"]
    expected_missing = sorted(cluster.cells_of(1) + cluster.cells_of(2))
    for outcome in leaders:
        assert outcome["error"] == "TableIncomplete", outcome
        assert sorted(outcome["missing"]) == expected_missing
    assert sorted(cluster.table()["missing_cells"]) == expected_missing


def test_a_server_killed_mid_registration_restarts_with_every_cell(cluster: Cluster) -> None:
    cluster.start_server()
    ranks = cluster.start_ranks(delays={2: 12.0}, retry_deadline=60, wait_timeout=90)
    deadline = time.monotonic() + 60
    while cluster.table()["registered_cells"] < 4:
        assert time.monotonic() < deadline, "hosts 0 and 1 never registered"
        time.sleep(0.2)
    before = {(c["tp"], c["pp"]): c for c in cluster.table()["cells"]}

    cluster.kill_server()
    cluster.start_server()

    after = {(c["tp"], c["pp"]): c for c in cluster.table()["cells"]}
    assert after == before, "a registered cell was lost across kill -9"
    outcomes = cluster.results(ranks)
    assert all(outcome.get("ok") for outcome in outcomes), outcomes
    final = cluster.table()
    assert final["complete"] is True
    assert all(cell["address_version"] == 1 for cell in final["cells"])


def test_a_worker_whose_link_goes_down_is_named_by_the_leaders_wait(cluster: Cluster) -> None:
    cluster.start_server()
    ranks = cluster.start_ranks(delays={2: 6.0}, retry_deadline=5, wait_timeout=15)
    deadline = time.monotonic() + 60
    while cluster.table()["registered_cells"] < 4:
        assert time.monotonic() < deadline, "hosts 0 and 1 never registered"
        time.sleep(0.2)
    cluster.network.hosts[2].set_link(up=False)
    started = time.monotonic()
    outcomes = cluster.results(ranks)
    for outcome in outcomes[:RANKS_PER_HOST]:
        assert outcome["error"] == "TableIncomplete", outcome
        assert sorted(outcome["missing"]) == cluster.cells_of(2)
        assert cluster.leader.address in outcome["message"]
    for outcome in outcomes[2 * RANKS_PER_HOST :]:
        assert outcome["error"] == "RegistrationFailed", outcome
    assert time.monotonic() - started < 60


def test_a_restarted_rank_replaces_its_cell_and_the_table_stays_ready(cluster: Cluster) -> None:
    cluster.start_server()
    assert all(o.get("ok") for o in cluster.results(cluster.start_ranks()))
    worker = cluster.network.hosts[1]
    body = {
        "attn_tp_size": 2, "attn_tp_rank": 1, "attn_cp_size": 1, "attn_cp_rank": 0,
        "attn_dp_size": 1, "attn_dp_rank": 0, "pp_size": 3, "pp_rank": 1,
        "system_dp_size": 1, "system_dp_rank": 0, "rank_ip": worker.address,
        "rank_port": 51234, "page_size": 16, "kv_cache_dtype": "auto",
    }  # fmt: skip
    answer = worker.http("PUT", f"{cluster.url}/route", json.dumps(body))
    assert answer is not None and (answer.status, answer.body) == (200, "OK")
    table = cluster.table()
    [cell] = [c for c in table["cells"] if (c["tp"], c["pp"]) == (1, 1)]
    assert (cell["rank_port"], cell["address_version"]) == (51234, 2)
    assert table["replacements"][-1]["old"]["rank_port"] == 50003
    assert cluster.get("/ready").status == 200
    lookup = cluster.get(
        "/route?prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=1&target_pp_rank=1",
        host=cluster.network.hosts[3],
    )
    assert lookup.json() == {"rank_ip": worker.address, "rank_port": 51234}
