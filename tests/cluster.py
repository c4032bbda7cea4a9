"""A prefill group on namespaced hosts: the leader's server plus real rank processes per host.

Shared by the multi-host tests (tests/test_multihost.py) and the network-fault tests
(tests/test_network_faults.py). Host 0 is the leader: it runs the bootstrap server and the
torch.distributed master. Every rank host runs ``ranks_per_host`` ranks (tests/netns_rank.py):
one pipeline stage per host, ``attn_tp_size = ranks_per_host``, so host ``k`` owns the cells
``(0, 0, tp, k)``. Every host reserves its own local bootstrap port, as a per-host launcher does.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netns import Host, HttpAnswer, Network

__all__ = ["Cluster", "RankProcess"]

TESTS = Path(__file__).parent
RankProcess = tuple[Any, Path]
"""A started rank: its process and its log file (output and log lines, outcome last)."""


@dataclass
class Cluster:
    network: Network
    tmp: Path
    ranks_per_host: int = 2
    rank_hosts: int = 3
    server_port: int = field(default_factory=lambda: random.randrange(20000, 30000))
    master_port: int = field(default_factory=lambda: random.randrange(30000, 32768))
    """Below Linux's ephemeral range (32768-60999): a port in it can already be the local end of
    a rank's outgoing connection in the leader's namespace, and the rendezvous fails with
    EADDRINUSE."""
    local_ports: list[int] = field(default_factory=list)
    server: Any = None

    def __post_init__(self) -> None:
        # Every host reserved its own bootstrap port, as a per-host launcher does.
        self.local_ports = [self.server_port] + [
            self.server_port + 1000 * index for index in range(1, self.rank_hosts)
        ]

    @property
    def leader(self) -> Host:
        return self.network.hosts[0]

    @property
    def url(self) -> str:
        return f"http://{self.leader.address}:{self.server_port}"

    @property
    def world_size(self) -> int:
        return self.ranks_per_host * self.rank_hosts

    def start_server(self) -> None:
        self.server = self.leader.popen(
            [sys.executable, "-m", "prefill_bootstrap.cli", "serve",
             "--host", "0.0.0.0", "--port", str(self.server_port),
             "--state-dir", str(self.tmp / "state")],
            self.tmp / "server.log",
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            answer = self.leader.http("GET", f"{self.url}/health")
            if answer is not None and answer.status == 200:
                return
            assert self.server.poll() is None, (self.tmp / "server.log").read_text()
            time.sleep(0.1)
        raise AssertionError("the leader's server never became healthy")

    def kill_server(self) -> None:
        self.server.kill()
        self.server.wait(timeout=10)

    def start_ranks(
        self,
        *,
        no_sync: bool = False,
        delays: dict[int, float] | None = None,
        per_host: dict[int, dict[str, Any]] | None = None,
        **options: Any,
    ) -> list[RankProcess]:
        """Start every rank of every rank host. ``options`` go to every rank as flags of
        tests/netns_rank.py (``retry_deadline=5`` -> ``--retry-deadline 5``); ``per_host`` adds
        flags for the ranks of one host; ``delays`` is ``per_host`` for ``--delay-register``."""
        ranks = []
        for rank in range(self.world_size):
            index = rank // self.ranks_per_host
            host = self.network.hosts[index]
            argv = [
                sys.executable, str(TESTS / "netns_rank.py"),
                "--rank", str(rank), "--world-size", str(self.world_size),
                "--ranks-per-host", str(self.ranks_per_host),
                "--leader", self.leader.address, "--master-port", str(self.master_port),
                "--local-port", str(self.local_ports[index]), "--host-address", host.address,
            ]  # fmt: skip
            if no_sync:
                argv.append("--no-sync")
            flags = dict(options)
            if delays and index in delays:
                flags["delay_register"] = delays[index]
            flags.update((per_host or {}).get(index, {}))
            for name, value in flags.items():
                argv += [f"--{name.replace('_', '-')}", str(value)]
            log = self.tmp / f"rank{rank}.log"
            ranks.append((host.popen(argv, log), log))
        return ranks

    def results(self, ranks: list[RankProcess], timeout: float = 120) -> list[dict[str, Any]]:
        """Each rank's outcome line (``{"ok": ...}`` or ``{"error": ...}``), in rank order."""
        outcomes = []
        for process, log in ranks:
            process.wait(timeout=timeout)
            lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
            assert lines, f"{log.name} printed no outcome:\n{log.read_text()[-3000:]}"
            outcomes.append(json.loads(lines[-1]))
        return outcomes

    def log_lines(self, rank: int, pattern: str) -> list[str]:
        """The lines of a rank's log that match ``pattern`` (a regular expression)."""
        text = (self.tmp / f"rank{rank}.log").read_text(errors="replace")
        return [line for line in text.splitlines() if re.search(pattern, line)]

    def get(self, path: str, host: Host | None = None) -> HttpAnswer:
        answer = (host or self.leader).http("GET", f"{self.url}{path}")
        assert answer is not None, f"GET {path} failed"
        return answer

    def table(self) -> dict[str, Any]:
        return self.get("/prefill_port_table").json()

    def wait_for_cells(self, count: int, timeout: float = 60) -> None:
        """Poll the table until ``count`` cells are registered."""
        deadline = time.monotonic() + timeout
        while self.table()["registered_cells"] < count:
            assert time.monotonic() < deadline, f"fewer than {count} cells after {timeout}s"
            time.sleep(0.2)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the server's ``/metrics`` (0 when absent)."""
        wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
        sample = f"{name}{{{wanted}}}" if wanted else name
        for line in self.get("/metrics").body.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def ranks_of(self, host_index: int) -> list[int]:
        first = host_index * self.ranks_per_host
        return list(range(first, first + self.ranks_per_host))

    def cells_of(self, host_index: int) -> list[list[int]]:
        return [[0, 0, tp, host_index] for tp in range(self.ranks_per_host)]
