"""``prefill-bootstrap doctor`` against each failure mode: verdict, fix and exit code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from prefill_bootstrap.client.doctor import DoctorOptions, diagnose, healthy
from tests.conftest import ServerProcess, free_port, sglang_registration

pytestmark = pytest.mark.timeout(60)
ServerFactory = Callable[..., ServerProcess]


def doctor(*args: str) -> tuple[int, dict[str, Any], str]:
    command = [sys.executable, "-m", "prefill_bootstrap.cli", "doctor", *args]
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=30)
    text = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert as_json.returncode == text.returncode
    return as_json.returncode, json.loads(as_json.stdout), text.stdout


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {check["step"]: check["status"] for check in report["checks"]}


def register(server: ServerProcess, **overrides: Any) -> httpx.Response:
    return httpx.put(f"{server.url}/route", json=sglang_registration(**overrides), timeout=10)


def test_a_complete_table_reached_at_the_leaders_port_is_fine(server: ServerProcess) -> None:
    for tp in range(2):
        register(server, attn_tp_rank=tp)
    code, report, text = doctor(
        "--url", f"127.0.0.1:{server.port}", "--bootstrap-port", str(server.port)
    )
    assert code == 0, text
    assert report["ok"] is True
    assert set(statuses(report).values()) == {"ok"}
    assert "verdict: everything looks fine" in text


def test_a_server_that_is_down_fails_at_connect_and_skips_the_rest() -> None:
    port = free_port()
    code, report, text = doctor("--url", f"127.0.0.1:{port}")
    assert code == 1
    assert statuses(report)["connect"] == "fail"
    assert statuses(report)["health"] == statuses(report)["table"] == "skip"
    assert "connection refused" in text and "prefill-bootstrap serve" in text


def test_a_node_whose_port_differs_from_the_leaders_is_the_classic_mistake(
    server: ServerProcess,
) -> None:
    wrong = free_port()
    code, report, text = doctor(
        "--dist-init-addr",
        "127.0.0.1:5000",
        "--nnodes",
        "2",
        "--bootstrap-port",
        str(wrong),
        "--url",
        server.url,
    )
    assert code == 1
    assert statuses(report)["port"] == "fail"
    assert f"bootstrap port {wrong} differs from the leader's server port {server.port}" in text
    assert "sync_bootstrap_port" in text


def test_an_incomplete_table_names_the_missing_cells(server: ServerProcess) -> None:
    register(server, attn_tp_size=4, attn_tp_rank=0)
    code, report, text = doctor("--url", server.url)
    assert code == 1
    assert statuses(report)["table"] == "fail"
    assert "3 of 4 cells missing" in text
    assert "(dp=0, cp=0, tp=3, pp=0)" in text
    assert "hosts that registered: 10.0.0.1" in text


def test_a_topology_conflict_is_reported_with_both_values(server: ServerProcess) -> None:
    for tp in range(2):
        register(server, attn_tp_rank=tp)
    assert register(server, attn_tp_size=8).status_code == 409
    code, report, text = doctor("--url", server.url)
    assert code == 1
    assert statuses(report)["conflicts"] == "warn"
    assert "attn_tp_size=8" in text and "established 2" in text


def test_a_server_that_needs_a_token_is_reported_and_the_token_checked(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--auth-token", "s3cret", durable=False)
    code, report, text = doctor("--url", server.url)
    assert code == 1
    assert statuses(report)["token"] == "fail"
    assert "requires a bearer token" in text
    code, report, _ = doctor("--url", server.url, "--auth-token", "wrong")
    assert statuses(report)["token"] == "fail"
    _, report, _ = doctor("--url", server.url, "--auth-token", "s3cret")
    assert statuses(report)["token"] == "ok"
    assert httpx.get(f"{server.url}/prefill_port_table").json()["registered_cells"] == 0


def test_an_empty_server_is_a_warning_not_a_pass(server: ServerProcess) -> None:
    code, report, text = doctor("--url", server.url)
    assert code == 1
    assert statuses(report)["table"] == "warn"
    assert "no rank has registered yet" in text


def test_an_unresolvable_leader_name_fails_first() -> None:
    # An injected name service: a real lookup of a bogus name would leave the machine.
    def no_such_name(host: str, port: int) -> str:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    options = DoctorOptions(dist_init_addr="leader.example:5000", bootstrap_port=8998, nnodes=2)
    checks = {check.step: check for check in diagnose(options, resolve=no_such_name)}
    assert checks["resolve"].status == "fail"
    assert "leader.example does not resolve" in checks["resolve"].detail
    assert checks["connect"].status == "skip"
    assert not healthy(list(checks.values()))
