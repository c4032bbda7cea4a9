"""Hosts made of Linux network namespaces, for tests that must cross a real network.

Each host is a namespace with its own ``lo`` and an ``eth0`` whose peer sits on a bridge inside a
separate hub namespace, so nothing is added to the root namespace's links. While a network
exists, the root namespace routes its subnet to ``unreachable``: a command that forgot
``ip netns exec`` fails here instead of leaving the machine. Names and subnet are unique per run,
so two runs can coexist; ``close()`` kills every process in every namespace, deletes them and
removes the route, also after a failed test.

A host's link can be degraded with named faults (``drop_packets``, ``partition``/``heal``,
``start_delay_relay``): iptables rules inside the namespaces, so they vanish with them.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Direction", "Host", "HttpAnswer", "Network", "netns_unavailable_reason"]

SUBNET_PREFIX = "10.233"  # a /24 inside 10.233.0.0/16 per run; reachable only inside the netns
RELAY = Path(__file__).parent / "netns_relay.py"
Direction = Literal["out", "in", "both"]
"""Which of a host's packets a link fault drops: those it sends, those it receives, or both."""


def netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if shutil.which("curl") is None:
        return "needs curl"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _iptables(namespace: str, *args: str) -> None:
    """One iptables command inside ``namespace``. A missing iptables is an error, not a skip:
    scripts/install-system-deps.sh installs it, so its absence is a broken set-up to fix."""
    if shutil.which("iptables") is None:
        raise RuntimeError(
            "iptables is missing: the network-fault tests need it; run "
            "scripts/install-system-deps.sh as root (make dev does) to install it"
        )
    # -w: the xtables lock is shared by every namespace, so wait for it instead of failing.
    argv = ["ip", "netns", "exec", namespace, "iptables", "-w", "10", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: str

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    hub_port: str
    network: Network = field(repr=False)
    _faults: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def popen(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Any:
        """Start a process inside this host; output goes to ``log``."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.command(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "GLOO_SOCKET_IFNAME": "eth0", **(env or {})},
                start_new_session=True,
            )
        self.network.processes.append(process)
        return process

    def run(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def http(
        self, method: str, url: str, body: str | None = None, timeout: float = 5
    ) -> HttpAnswer | None:
        """One HTTP request from this host (curl inside the namespace); None if it failed."""
        argv = ["curl", "-s", "-X", method, "-m", str(timeout), "-w", "\n%{http_code}", url]
        if body is not None:
            argv += ["-H", "content-type: application/json", "--data-binary", body]
        result = self.run(argv, timeout=timeout + 5)
        if result.returncode != 0:
            return None
        text, _, status = result.stdout.rpartition("\n")
        return HttpAnswer(int(status), text)

    def set_link(self, up: bool) -> None:
        """Cable in or out: the host's port on the hub's bridge."""
        _ip("-n", self.network.hub, "link", "set", self.hub_port, "up" if up else "down")

    # -- link faults -----------------------------------------------------------------------------
    #
    # A packet crossing this host's link is dropped where it arrives: in this host's namespace
    # for what comes in on eth0, in every other host's namespace for what comes from this host.
    # Dropping on the way out (iptables OUTPUT) would not do: the kernel then fails the sender's
    # own connect() or send() at once with EPERM, which no real link does; a lost packet is
    # silence, and the sender learns of it only through TCP's retransmits and its own timeouts.

    def drop_packets(self, probability: float, direction: Direction = "out") -> None:
        """Lose this share of the packets this host sends (``"out"``: what netem ``loss`` on
        its eth0 does, which this kernel lacks), receives (``"in"``) or both, at random
        (``iptables -m statistic --mode random``)."""
        if not 0 < probability < 1:
            raise ValueError(f"probability={probability} must be between 0 and 1")
        self._add_fault(
            "loss",
            ["-m", "statistic", "--mode", "random", "--probability", str(probability)],
            direction,
        )

    def partition(self) -> None:
        """Cut this host off from every other host, both ways, until ``heal()``: its processes
        keep running and its packets leave, but nothing reaches the other side."""
        self._add_fault("partition", [])

    def heal(self) -> None:
        """End a ``partition()``; packet loss set by ``drop_packets`` stays."""
        self._remove_fault("partition")

    def restore_link(self) -> None:
        """Remove every fault from this host's link."""
        for fault in list(self._faults):
            self._remove_fault(fault)

    def start_delay_relay(
        self, listen_port: int, target: str, delay: float, log: Path, timeout: float = 20
    ) -> Any:
        """Start a TCP relay inside this host on ``127.0.0.1:listen_port`` that forwards to
        ``target`` (``host:port``), adding ``delay`` seconds each way; return its process once
        it accepts connections. This kernel has no netem ``delay``; see tests/netns_relay.py
        for what the relay models and what it does not."""
        listen = f"127.0.0.1:{listen_port}"
        argv = [sys.executable, str(RELAY), "--listen", listen, "--target", target,
                "--delay", str(delay)]  # fmt: skip
        process = self.popen(argv, log)
        deadline = time.monotonic() + timeout
        while f"relay listening on {listen}" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the delay relay did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        return process

    def _add_fault(self, fault: str, match: list[str], direction: Direction = "both") -> None:
        if fault in self._faults:
            raise RuntimeError(f"{self.name} already has a {fault} fault; remove it first")
        comment = ["-m", "comment", "--comment", f"pb-{fault}"]
        rules = []
        if direction in ("in", "both"):
            rules.append((self.namespace, ["INPUT", "-i", "eth0", *match, *comment, "-j", "DROP"]))
        if direction in ("out", "both"):
            rules += [
                (peer.namespace, ["INPUT", "-s", self.address, *match, *comment, "-j", "DROP"])
                for peer in self.network.hosts
                if peer is not self
            ]
        self._faults[fault] = []
        for namespace, rule in rules:
            _iptables(namespace, "-I", *rule)
            self._faults[fault].append((namespace, rule))

    def _remove_fault(self, fault: str) -> None:
        for namespace, rule in self._faults.pop(fault, []):
            _iptables(namespace, "-D", *rule)


class Network:
    def __init__(self, hosts: int) -> None:
        self.tag = f"pb{os.getpid() % 10000}{random.randrange(1000):03d}"
        self.subnet_octet = random.randrange(1, 254)
        self.subnet = f"{SUBNET_PREFIX}.{self.subnet_octet}.0/24"
        self.hub = f"{self.tag}-hub"
        self.hosts: list[Host] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._namespaces: list[str] = []
        self._route = False
        try:
            self._build(hosts)
        except BaseException:
            self.close()
            raise

    def _build(self, count: int) -> None:
        _ip("route", "add", "unreachable", self.subnet)
        self._route = True
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for index in range(count):
            namespace = f"{self.tag}-h{index}"
            self._add_namespace(namespace)
            hub_port = f"p{index}"
            address = f"{SUBNET_PREFIX}.{self.subnet_octet}.{index + 1}"
            _ip("-n", self.hub, "link", "add", hub_port, "type", "veth",
                "peer", "name", "eth0", "netns", namespace)  # fmt: skip
            _ip("-n", self.hub, "link", "set", hub_port, "master", "br0")
            _ip("-n", self.hub, "link", "set", hub_port, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            self.hosts.append(Host(f"host{index}", namespace, address, hub_port, self))

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for namespace in reversed(self._namespaces):
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        self._namespaces.clear()
        if self._route:
            subprocess.run(
                ["ip", "route", "del", "unreachable", self.subnet], capture_output=True, check=False
            )
            self._route = False

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
