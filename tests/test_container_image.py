"""The sidecar image, built here and run for real: buildah builds it offline from a local Debian
base and a wheelhouse (scripts/build-image.sh), podman runs it the way Kubernetes would (no init
process, read-only root filesystem, state on a volume, host network on a loopback port).

Needs root (buildah and podman with the system's container storage). Skipped with a reason when
not root; when root, missing tools are a failure, never a skip, so CI cannot pass by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefill_bootstrap.shared.protocol import (
    DEFAULT_PORT,
    HEALTH_PATH,
    READY_PATH,
    SERVER_INFO_QUERY,
    TABLE_PATH,
)

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
TAG = "localhost/prefill-bootstrap:test"
STATE_DIR = "/var/lib/prefill-bootstrap"
TOOLS = ("buildah", "podman", "runc", "mmdebstrap")
# What podman needs on this kind of machine: runc (no crun) and explicit ulimits.
RUN_FLAGS = (
    "--runtime", "runc",
    "--ulimit", "nofile=1024:20000",
    "--ulimit", "nproc=1024:1024",
)  # fmt: skip
START_DEADLINE = 30.0
STOP_BUDGET = 30  # podman stop sends SIGKILL after this many seconds
STOPS_WITHIN = 10.0


def sh(*command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(pytestconfig: pytest.Config, line: str) -> None:
    """Print past pytest's capture: the build figures belong in the CI log."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[container] {line}", flush=True)


@dataclass(frozen=True)
class Image:
    tag: str
    size_bytes: int
    build_seconds: float

    def inspect(self) -> dict[str, Any]:
        return json.loads(sh("podman", "image", "inspect", self.tag).stdout)[0]


@pytest.fixture(scope="module")
def image(pytestconfig: pytest.Config) -> Image:
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root here (buildah/podman storage)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"container tools missing: {', '.join(missing)}; run `make system-deps` "
            "(scripts/install-system-deps.sh installs them)"
        )
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--tag", TAG],
        capture_output=True,
        text=True,
        timeout=840,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    seconds = time.monotonic() - started
    if built.returncode != 0:
        pytest.fail(f"scripts/build-image.sh failed ({built.returncode}):\n{built.stderr[-6000:]}")
    size = int(sh("podman", "image", "inspect", "--format", "{{.Size}}", TAG).stdout)
    steps = [line for line in built.stderr.splitlines() if line.startswith("build-image:")]
    report(pytestconfig, "\n[container] ".join(steps))
    report(pytestconfig, f"image {TAG}: {size / 1e6:.1f} MB, built in {seconds:.1f} s")
    return Image(TAG, size, seconds)


@dataclass
class Sidecar:
    """One container of the image on a loopback port, with a named volume for its state."""

    image: Image
    name: str
    volume: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *, init: bool = False) -> Sidecar:
        sh(
            "podman", "run", "--detach", "--name", self.name, *RUN_FLAGS,
            "--network", "host",  # the server binds a free loopback port of this machine
            *(["--init"] if init else []),
            "--read-only",
            "--health-interval", "disable",  # no systemd timers here; run checks by hand
            "--volume", f"{self.volume}:{STATE_DIR}",
            "--env", "PREFILL_BOOTSTRAP_HOST=127.0.0.1",
            "--env", f"PREFILL_BOOTSTRAP_PORT={self.port}",
            self.image.tag,
        )  # fmt: skip
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        last: object = None
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(self.url + HEALTH_PATH, timeout=1.0)
                if answer.status_code == 200:
                    return
                last = answer
            except httpx.HTTPError as exc:
                last = exc
            if self.state()["Status"] not in ("running", "created", "configured"):
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy ({last}); logs:\n{self.logs()}")

    def state(self) -> dict[str, Any]:
        return json.loads(sh("podman", "inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        result = sh("podman", "logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("podman", "exec", self.name, *command, check=check)

    def stop(self) -> float:
        started = time.monotonic()
        sh("podman", "stop", "--time", str(STOP_BUDGET), self.name, timeout=STOP_BUDGET + 30)
        return time.monotonic() - started

    def remove(self) -> None:
        sh("podman", "rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
def sidecars(image: Image) -> Iterator[Any]:
    """Start containers of the image; they share one fresh volume. All removed at teardown."""
    token = uuid.uuid4().hex[:8]
    volume = f"prefill-bootstrap-test-{token}"
    started: list[Sidecar] = []

    def start(*, init: bool = False) -> Sidecar:
        name = f"prefill-bootstrap-test-{token}-{len(started)}"
        sidecar = Sidecar(image, name, volume, free_port())
        started.append(sidecar)
        return sidecar.run(init=init)

    yield start
    for sidecar in started:
        sidecar.remove()
    sh("podman", "volume", "rm", "--force", volume, check=False)


def register_group(url: str, registration: Any) -> None:
    """Both ranks of a tp=2 group register, as SGLang 0.5.23 prefill ranks do."""
    for tp in (0, 1):
        body = registration(attn_tp_rank=tp, rank_ip="10.0.0.1", rank_port=41000 + tp)
        answer = httpx.put(f"{url}/route", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.text == "OK"


# --- the image ------------------------------------------------------------------------------


def test_the_image_is_configured_as_the_sidecar(image: Image) -> None:
    inspected = image.inspect()
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert f"{DEFAULT_PORT}/tcp" in config["ExposedPorts"]
    assert STATE_DIR in config["Volumes"]
    assert config["Entrypoint"] == ["prefill-bootstrap"]
    assert config["Cmd"] == ["serve"]
    assert f"PREFILL_BOOTSTRAP_PORT={DEFAULT_PORT}" in config["Env"]
    assert HEALTH_PATH in " ".join(inspected["Healthcheck"]["Test"])


def test_the_image_carries_the_server_and_not_torch(image: Image) -> None:
    probe = (
        "import importlib.util as u, prefill_bootstrap.service as s;"
        "assert u.find_spec('torch') is None, 'torch is in the image';"
        "print(s.__name__)"
    )
    result = sh(
        "podman", "run", "--rm", *RUN_FLAGS, "--network", "none",
        "--entrypoint", "python3", image.tag, "-c", probe,
    )  # fmt: skip
    assert result.stdout.strip() == "prefill_bootstrap.service"


# --- a running container --------------------------------------------------------------------


def test_the_server_runs_as_pid_1_under_a_non_root_user(sidecars: Any) -> None:
    sidecar = sidecars()
    assert sidecar.exec("id", "-u").stdout.strip() == "10001"
    status = sidecar.exec("cat", "/proc/1/status").stdout
    (uids,) = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    assert set(uids) == {"10001"}
    assert "prefill-bootstrap" in sidecar.exec("cat", "/proc/1/cmdline").stdout


def test_health_answers_and_the_images_healthcheck_passes(sidecars: Any) -> None:
    sidecar = sidecars()
    answer = httpx.get(sidecar.url + HEALTH_PATH, timeout=5)
    assert (answer.status_code, answer.text) == (200, "OK")
    sh("podman", "healthcheck", "run", sidecar.name)


def test_a_registration_round_trip_works(sidecars: Any, registration: Any) -> None:
    sidecar = sidecars()
    assert httpx.get(sidecar.url + READY_PATH, timeout=5).status_code == 503
    register_group(sidecar.url, registration)

    info = httpx.get(f"{sidecar.url}/route", params=SERVER_INFO_QUERY, timeout=5)
    assert info.status_code == 200, info.text
    assert info.json()["attn_tp_size"] == 2
    cell = {"prefill_dp_rank": 0, "prefill_cp_rank": 0, "target_tp_rank": 1, "target_pp_rank": 0}
    address = httpx.get(f"{sidecar.url}/route", params=cell, timeout=5)
    assert address.json() == {"rank_ip": "10.0.0.1", "rank_port": 41001}
    assert httpx.get(sidecar.url + READY_PATH, timeout=5).status_code == 200
    table = httpx.get(sidecar.url + TABLE_PATH, timeout=5).json()
    assert table["complete"] is True
    assert table["state"] == "sqlite"


def test_the_table_survives_a_new_container_on_the_same_volume(
    sidecars: Any, registration: Any
) -> None:
    first = sidecars()
    register_group(first.url, registration)
    before = httpx.get(first.url + TABLE_PATH, timeout=5).json()
    first.stop()
    first.remove()

    second = sidecars()
    after = httpx.get(second.url + TABLE_PATH, timeout=5).json()
    assert after["complete"] is True
    assert after["instance_id"] == before["instance_id"]
    assert [(c["tp"], c["rank_port"]) for c in after["cells"]] == [(0, 41000), (1, 41001)]


@pytest.mark.parametrize("init", [False, True], ids=["server as pid 1", "under --init"])
def test_sigterm_stops_the_server_within_seconds(sidecars: Any, init: bool) -> None:
    sidecar = sidecars(init=init)
    seconds = sidecar.stop()
    state = sidecar.state()
    assert seconds < STOPS_WITHIN, f"took {seconds:.1f} s: SIGTERM was ignored until SIGKILL"
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']}; logs:\n{sidecar.logs()}"


def test_the_server_runs_on_a_read_only_root_writing_only_its_volume(
    sidecars: Any, registration: Any
) -> None:
    sidecar = sidecars()
    register_group(sidecar.url, registration)
    refused = sidecar.exec("touch", "/opt/prefill-bootstrap/written", check=False)
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr
    assert sidecar.exec("ls", STATE_DIR).stdout.strip(), "no state written to the volume"
