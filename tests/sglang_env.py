"""Run real SGLang from pytest: the per-version envs and the harness processes in tests/sglang/.

- `sglang_python(version)`: the env's python, built by scripts/sglang-test-env.sh if needed (the
  script is the one place that knows how; a built env answers in well under a second).
- `run_rank_world(version, configs, envs)`: one process per rank (tests/sglang/rank.py), each
  with its own environment, under one deadline; returns every rank's JSON result and output.
- `sglang_bootstrap_server(version)`: SGLang's own bootstrap server on a free port, serving
  once its /health answers.
- `free_ports(n)`: distinct free loopback ports.

The harness and its facts: tests/sglang/README.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

__all__ = [
    "HARNESS_DIR",
    "SGLANG_VERSIONS",
    "BootstrapServer",
    "RankResult",
    "free_ports",
    "run_rank_world",
    "sglang_bootstrap_server",
    "sglang_python",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
HARNESS_DIR = REPO_ROOT / "tests" / "sglang"
ENV_SCRIPT = REPO_ROOT / "scripts" / "sglang-test-env.sh"

# A version is supported when its pinned requirements file exists (the Makefile checks the same);
# which of them the tests run is TEST_SGLANG_RELEASES (the Makefile's SGLANG_RELEASES).
SUPPORTED_VERSIONS = frozenset(
    path.name.removeprefix("requirements-").removesuffix(".txt")
    for path in HARNESS_DIR.glob("requirements-0*.txt")
)
DEFAULT_RELEASES = "0.5.11 0.5.23"
SGLANG_VERSIONS: tuple[str, ...] = tuple(
    os.environ.get("TEST_SGLANG_RELEASES", DEFAULT_RELEASES).split()
)
if unknown := set(SGLANG_VERSIONS) - SUPPORTED_VERSIONS:
    raise RuntimeError(
        f"TEST_SGLANG_RELEASES names {sorted(unknown)}, which have no pinned requirements in "
        f"{HARNESS_DIR} (supported: {sorted(SUPPORTED_VERSIONS)})"
    )

# Inherited variables that would change what a rank does: every process starts without them
# and gets only what the test gives it.
_SCRUBBED_PREFIXES = ("PREFILL_BOOTSTRAP_", "SGLANG_", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@functools.cache
def sglang_python(version: str) -> Path:
    """The python of the SGLang `version` test env, building the env first if needed.

    A plain `pytest` in a checkout whose envs were never built skips (a build takes minutes and
    needs the package index); `make test` builds them first and says which to run.
    """
    env = REPO_ROOT / ".cache" / "sglang-envs" / version
    if not (env / ".stamp").exists() and "TEST_SGLANG_RELEASES" not in os.environ:
        pytest.skip(f"the SGLang {version} test env is not built: run `make sglang-envs` first")
    done = subprocess.run(
        ["bash", str(ENV_SCRIPT), version],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{ENV_SCRIPT.name} {version} failed (exit {done.returncode}):\n"
            f"{done.stdout}{done.stderr}"
        )
    return REPO_ROOT / ".cache" / "sglang-envs" / version / "bin" / "python"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the kernel reports free (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def _base_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(
        HF_HUB_OFFLINE="1",
        SGLANG_HOST_IP="127.0.0.1",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        # one gloo world of several processes on two cores: keep each process single-threaded
        OMP_NUM_THREADS="1",
    )
    env.update(extra or {})
    return env


@dataclass
class RankResult:
    """What one rank process left: its JSON result (None if it printed none) and its output."""

    index: int
    config: dict[str, Any]
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    result: dict[str, Any] | None = field(default=None)

    @property
    def ok(self) -> bool:
        return bool(self.result and self.result.get("ok"))

    def describe(self) -> str:
        """A paragraph for assertion messages: the rank, how it ended, its stderr's tail."""
        how = "killed at the deadline" if self.timed_out else f"exit {self.returncode}"
        tail = "\n".join(self.stderr.splitlines()[-40:])
        return f"rank process {self.index} ({how}), result {self.result}:\n{tail}"


def run_rank_world(
    version: str,
    configs: Sequence[Mapping[str, Any]],
    envs: Sequence[Mapping[str, str] | None] | None = None,
    *,
    timeout: float = 90.0,
) -> list[RankResult]:
    """Run one tests/sglang/rank.py process per config, all at once; wait for all, or the deadline.

    `envs[i]` is added to process i's environment (which starts from this process's, without
    PREFILL_BOOTSTRAP_* / SGLANG_* variables). At the deadline every process still running is
    killed (with its children) and reported with `timed_out=True`; this never hangs.
    """
    if envs is not None and len(envs) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(envs)} environments")
    python = sglang_python(version)
    deadline = time.monotonic() + timeout
    with (
        tempfile.TemporaryDirectory(prefix="sglang-world-") as tmp,
        contextlib.ExitStack() as files,
    ):
        running = []
        try:
            for index, config in enumerate(configs):
                config_path = Path(tmp, f"rank{index}.json")
                config_path.write_text(json.dumps(dict(config)))
                out = files.enter_context(Path(tmp, f"rank{index}.out").open("w+"))
                err = files.enter_context(Path(tmp, f"rank{index}.err").open("w+"))
                proc = subprocess.Popen(
                    [str(python), str(HARNESS_DIR / "rank.py"), str(config_path)],
                    cwd=HARNESS_DIR,
                    env=_base_env(envs[index] if envs else None),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
                running.append((index, dict(config), proc, out, err))
            timed_out = set()
            for index, _, proc, _, _ in running:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out.add(index)
                    _kill_group(proc)
            return [
                _rank_result(index, config, proc, out, err, index in timed_out)
                for index, config, proc, out, err in running
            ]
        finally:
            for _, _, proc, _, _ in running:
                if proc.poll() is None:
                    _kill_group(proc)


def _rank_result(index, config, proc, out, err, timed_out: bool) -> RankResult:
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    result = None
    lines = stdout.strip().splitlines()
    if lines:
        with contextlib.suppress(json.JSONDecodeError):
            result = json.loads(lines[-1])
    return RankResult(index, config, proc.returncode, stdout, stderr, timed_out, result)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class BootstrapServer:
    """SGLang's bootstrap server run by `sglang_bootstrap_server`; `cells` is set once it ends."""

    host: str
    port: int
    process: subprocess.Popen
    cells: list[dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.contextmanager
def sglang_bootstrap_server(
    version: str,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
) -> Iterator[BootstrapServer]:
    """SGLang's own `CommonKVBootstrapServer` on `port` (a free one by default), serving.

    Entered once GET /health answers 200 (polled under `timeout`); on exit it gets SIGTERM and
    `cells` holds the registrations it kept (SGLang's server has no route that lists them).
    """
    python = sglang_python(version)
    port = port or free_ports(1, host)[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [str(python), str(HARNESS_DIR / "bootstrap_server.py"), host, str(port)],
            cwd=HARNESS_DIR,
            env=_base_env(None),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        server = BootstrapServer(host, port, proc)
        try:
            _wait_healthy(server, err, time.monotonic() + timeout)
            yield server
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
            out.seek(0)
            lines = out.read().strip().splitlines()
            if lines:
                with contextlib.suppress(json.JSONDecodeError):
                    server.cells = json.loads(lines[-1])["cells"]


def _wait_healthy(server: BootstrapServer, err, deadline: float) -> None:
    with httpx.Client(timeout=1.0) as client:
        while True:
            if server.process.poll() is not None:
                err.seek(0)
                raise RuntimeError(
                    f"SGLang's bootstrap server on {server.url} exited "
                    f"({server.process.returncode}) before serving:\n{err.read()[-4000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{server.url}/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                err.seek(0)
                raise TimeoutError(
                    f"SGLang's bootstrap server on {server.url} did not answer /health in time "
                    f"(a port clash ends its server thread silently):\n{err.read()[-4000:]}"
                )
            time.sleep(0.05)  # poll interval, not a wait for readiness
