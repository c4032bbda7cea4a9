"""``prefill-bootstrap register | wait | table`` against a real server process.

Exit codes: 0 ok, 1 a bootstrap failure with a one-line reason on stderr, 2 bad usage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from prefill_bootstrap.cli import main
from prefill_bootstrap.client.commands import REGISTRATION_FLAGS
from prefill_bootstrap.client.grid import MISSING
from prefill_bootstrap.shared.protocol import RankRegistration, TableReport
from tests.conftest import ServerProcess, free_port

pytestmark = pytest.mark.timeout(60)

Run = Callable[..., int]


@pytest.fixture
def bootstrap(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(durable=False)


def register_args(url: str, dp: int, tp: int, *extra: str) -> list[str]:
    return [
        "register", "--url", url, "-q",
        "--attn-dp-size", "2", "--attn-dp-rank", str(dp),
        "--attn-tp-size", "2", "--attn-tp-rank", str(tp),
        "--rank-ip", f"10.0.0.{dp + 1}", "--rank-port", str(41000 + tp),
        "--page-size", "16", "--kv-cache-dtype", "auto",
        *extra,
    ]  # fmt: skip


def test_register_prints_the_registered_cell_and_exits_0(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(register_args(bootstrap.url, dp=1, tp=0)) == 0
    assert capsys.readouterr().out == (
        f"registered cell (dp=1, cp=0, tp=0, pp=0) as 10.0.0.2:41000 at {bootstrap.url}\n"
    )


def test_table_shows_registered_and_missing_cells_row_by_row(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    main(register_args(bootstrap.url, dp=0, tp=0))
    main(register_args(bootstrap.url, dp=0, tp=1))
    main(register_args(bootstrap.url, dp=1, tp=0))
    capsys.readouterr()
    assert main(["table", "--url", bootstrap.url]) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE: 3 of 4 cells registered; missing (dp=1, cp=0, tp=1, pp=0)" in out
    assert "dp 0  2/2  10.0.0.1:41000  10.0.0.1:41001" in out
    assert f"dp 1  1/2  10.0.0.2:41000  {MISSING}" in out


def test_table_json_is_the_table_report_for_scripts(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    main(register_args(bootstrap.url, dp=0, tp=1))
    capsys.readouterr()
    assert main(["table", "--url", bootstrap.url, "--json"]) == 0
    report = TableReport.model_validate_json(capsys.readouterr().out)
    assert report.missing_cells == [(0, 0, 0, 0), (1, 0, 0, 0), (1, 0, 1, 0)]


def test_wait_exits_0_once_every_cell_is_registered(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    for dp in (0, 1):
        for tp in (0, 1):
            main(register_args(bootstrap.url, dp=dp, tp=tp))
    capsys.readouterr()
    assert main(["wait", "--url", bootstrap.url, "--timeout", "5"]) == 0
    instance = httpx.get(f"{bootstrap.url}/ready").json()["instance_id"]
    assert capsys.readouterr().out == (
        f"prefill port table at {bootstrap.url} is complete: 4 of 4 cells registered "
        f"(instance {instance})\n"
    )


def test_wait_exits_1_with_one_line_naming_the_missing_cells(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    main(register_args(bootstrap.url, dp=0, tp=0))
    capsys.readouterr()
    assert main(["wait", "--url", bootstrap.url, "--timeout", "0.3", "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"prefill-bootstrap wait: prefill port table at {bootstrap.url}")
    assert (
        "3 of 4 cells are missing: (dp=0, cp=0, tp=1, pp=0), (dp=1, cp=0, tp=0, pp=0), "
        "(dp=1, cp=0, tp=1, pp=0)" in lines[0]
    )


def test_register_to_a_port_without_server_exits_1_naming_the_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    url = f"127.0.0.1:{port}"
    assert main([*register_args(url, dp=0, tp=0), "--retry-deadline", "0.5"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"prefill-bootstrap register: registration to http://{url}/route")
    assert f"is {port} the leader's bootstrap port" in lines[0]


def test_register_logs_each_failed_attempt_unless_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"127.0.0.1:{free_port()}"
    args = [a for a in register_args(url, dp=0, tp=0) if a != "-q"]
    assert main([*args, "--retry-deadline", "0.3", "--retry-attempts", "2"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert "(attempt 1 of 2" in lines[0] and "retrying in" in lines[0]
    assert "(attempt 2 of 2" in lines[1] and "giving up" in lines[1]


def test_a_registration_the_server_refuses_exits_1_with_the_servers_message(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    main(register_args(bootstrap.url, dp=0, tp=0))
    assert main(register_args(bootstrap.url, 0, 1, "--page-size", "32")) == 1
    err = capsys.readouterr().err
    assert "HTTP 409: page_size=32 contradicts the established page_size=16" in err


def test_optional_and_future_fields_reach_the_server(
    bootstrap: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "register", "--url", bootstrap.url, "--rank-ip", "10.0.0.1", "--rank-port", "41000",
        "--load-balance-method", "follow_bootstrap_room", "--enable-kv-cache-sharding",
        "--dsv41-spec-layout", '{"blocks": 2}', "--prefill-http-port", "30000",
        "--field", "future_key=7",
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    main(["table", "--url", bootstrap.url, "--json"])
    report = TableReport.model_validate_json(capsys.readouterr().out)
    info = report.server_info or {}
    assert info["follow_bootstrap_room"] is True
    assert info["enable_kv_cache_sharding"] is True
    assert info["dsv41_spec_layout"] == {"blocks": 2}
    assert info["prefill_http_port"] == 30000
    assert report.cells[0].extra == {"future_key": 7}


def test_every_registration_field_has_a_register_flag() -> None:
    assert set(RankRegistration.model_fields) == REGISTRATION_FLAGS


def test_a_rank_outside_its_size_is_a_usage_error_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(register_args("127.0.0.1:1", dp=0, tp=2))
    assert caught.value.code == 2
    assert "attn_tp_rank: attn_tp_rank=2 is outside attn_tp_size=2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["register", "--rank-port", "41000"],
        ["table", "--url", "http://10.0.0.1:8998/route"],
        ["wait", "--timeout", "soon"],
        ["table", "--retry-attempts", "0"],
    ],
    ids=["missing rank ip", "url with a path", "timeout not a number", "zero attempts"],
)
def test_bad_usage_exits_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_server_url_and_token_come_from_the_environment(
    server_factory: Callable[..., ServerProcess],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = server_factory("--auth-token", "s3cret", durable=False)
    monkeypatch.setenv("PREFILL_BOOTSTRAP_URL", server.url)
    monkeypatch.setenv("PREFILL_BOOTSTRAP_AUTH_TOKEN", "s3cret")
    args = [a for a in register_args(server.url, dp=0, tp=0) if a not in ("--url", server.url)]
    assert main(args) == 0
    assert f"at {server.url}" in capsys.readouterr().out


def test_a_missing_token_is_refused_at_once_with_exit_1(
    server_factory: Callable[..., ServerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    server = server_factory("--auth-token", "s3cret", durable=False)
    assert main(register_args(server.url, dp=0, tp=0)) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_the_installed_command_reports_an_incomplete_table_with_exit_1(
    bootstrap: ServerProcess,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefill_bootstrap.cli", "wait", "--url", bootstrap.url,
         "--timeout", "0.2", "-q"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "no rank has registered yet" in result.stderr


def test_the_installed_command_prints_json_the_table_report_accepts(
    bootstrap: ServerProcess,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefill_bootstrap.cli", "table", "--url", bootstrap.url,
         "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout)["registered_cells"] == 0
