"""The server under test: a real ``prefill-bootstrap serve`` process, pinned to its own core.

Every storm repetition gets a fresh process and a fresh temporary state directory (durable state
on, as in production), so no run inherits another's table, page cache warmth aside. The server is
pinned to core 0 with ``taskset`` and the load generator (this process) to core 1 when the machine
has two cores, so neither steals the other's CPU.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Pinning",
    "Server",
    "core_busy",
    "core_times",
    "cpu_seconds",
    "free_port",
    "memory_mb",
    "pin_load_generator",
    "raise_fd_limit",
]

START_DEADLINE = 30.0


class Pinning(NamedTuple):
    server_cpus: str | None
    """The ``taskset -c`` list for servers, or None when there is one core to share."""
    description: str


def pin_load_generator() -> Pinning:
    """Pin this process (the load generator) to core 1 and reserve core 0 for the server.

    Decided once, before pinning: a server started later must not inherit this process's
    affinity, or server and load generator would share core 1.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2 and {0, 1} <= set(cores) and shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
        return Pinning("0", "server on core 0, load generator on core 1")
    return Pinning(None, "not pinned (fewer than two cores, or no taskset)")


def raise_fd_limit(wanted: int = 16384) -> int:
    """A 4096-rank storm holds 4096 sockets at once on each side; the server inherits this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB (10^6 bytes), from /proc."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024 / 1e6
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) clock ticks so far, from /proc/stat. Busy includes other
    tenants and the kernel's softirq work for loopback TCP, which no process is charged for."""
    times: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(value) for value in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            times[name] = (sum(ticks) - idle, sum(ticks))
    return times


def core_busy(before: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Percent busy per core since ``before`` (a ``core_times()`` reading)."""
    busy: dict[str, float] = {}
    for name, (used, total) in core_times().items():
        used0, total0 = before.get(name, (0, 0))
        busy[name] = round(100 * (used - used0) / max(total - total0, 1), 1)
    return busy


def _check_source(environment: dict[str, str], cwd: Path, source: Path) -> None:
    """Prove the server will run ``source``'s code: an editable install of another checkout
    answers for any module the path does not, silently."""
    where = subprocess.run(
        [sys.executable, "-c", "import prefill_bootstrap.service.table as t; print(t.__file__)"],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(source.resolve()):
        raise RuntimeError(f"--server-source {source}: the server would run {where} instead")


def _health_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@dataclass
class Server:
    """One server process on a free loopback port with its own temporary state directory."""

    extra_args: list[str] = field(default_factory=list)
    cpus: str | None = None
    """``taskset -c`` list (see ``pin_load_generator``); None inherits this process's cores."""
    durable: bool = True
    source: Path | None = None
    """Another checkout to run the server from (its ``client/`` and ``service/``), so the same
    benchmark measures the code before a change beside the code after it."""
    affinity: list[int] = field(default_factory=list)
    """The cores the running server may use, read back from the kernel."""
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    healthy_after: float = 0.0
    _workdir: tempfile.TemporaryDirectory[str] | None = None

    def command(self) -> list[str]:
        assert self._workdir is not None
        state_dir = str(Path(self._workdir.name) / "state") if self.durable else ""
        command = [
            sys.executable,
            "-m",
            self._cli_module(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            state_dir,
            *self.extra_args,
        ]
        return ["taskset", "-c", self.cpus, *command] if self.cpus else command

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None
        return Path(self._workdir.name) / "server.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid  # taskset execs the server, so this is the server itself

    def start(self) -> Server:
        """Start and poll ``/health`` every 2 ms; ``healthy_after`` is start to first 200."""
        self._workdir = tempfile.TemporaryDirectory(prefix="prefill-bootstrap-bench-")
        self.port = free_port()
        with self.log_path.open("wb") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self._workdir.name,  # not a checkout: `-m` puts the cwd first on the path
            )
        deadline = self.started_at + START_DEADLINE
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            if _health_ok(self.port):
                self.healthy_after = time.perf_counter() - self.started_at
                self.affinity = sorted(os.sched_getaffinity(self.pid))
                return self
            time.sleep(0.002)
        self.stop()
        raise RuntimeError(f"server not healthy within {START_DEADLINE}s:\n{self.logs()}")

    def _environment(self) -> dict[str, str] | None:
        """With ``source``, a package laid out as the editable install lays it out, first on
        the path: Python's path finder runs before the editable install's finder."""
        if self.source is None:
            return None
        assert self._workdir is not None
        root = Path(self._workdir.name) / "source"
        package = root / "prefill_bootstrap"
        package.mkdir(parents=True)
        for path in (self.source / "prefill_bootstrap").glob("*.py"):
            (package / path.name).symlink_to(path)
        for name in ("client", "service", "shared"):
            if (self.source / name).is_dir():  # shared/ exists from issue 15 on
                (package / name).symlink_to(self.source / name, target_is_directory=True)
        environment = {**os.environ, "PYTHONPATH": str(root)}
        _check_source(environment, Path(self._workdir.name), self.source)
        return environment

    def _cli_module(self) -> str:
        """The command's module: ``prefill_bootstrap.cli``, or where checkouts before issue 15
        (run with ``--server-source``) kept it."""
        if self.source is not None and not (self.source / "prefill_bootstrap" / "cli.py").exists():
            return "prefill_bootstrap.client.cli"
        return "prefill_bootstrap.cli"

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM (the graceful path production uses), SIGKILL if it hangs; then clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
