"""``prefill-bootstrap watch`` and ``deregister`` against a scripted server (``feed_fakes``):
the lines they print and their exit codes (0 ok, 1 a bootstrap failure, 2 usage)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from prefill_bootstrap.cli import main
from prefill_bootstrap.client import feed_commands
from prefill_bootstrap.client.event_lines import describe
from prefill_bootstrap.client.feed import Resynced
from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.protocol import TableReport
from tests.feed_fakes import Answer, FeedServer, event, gone, sse, table

URL = "http://bootstrap:8998"
FAST = RetryPolicy(deadline=0.3, attempts=3, initial_backoff=0.01, max_backoff=0.02, jitter=0.0)
A = {"rank_ip": "10.0.1.4", "rank_port": 41003}
B = {"rank_ip": "10.0.1.4", "rank_port": 41107}


def clock(seq: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(1_700_000_000.0 + seq))


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable], None]:
    """``serve(handler)``: the commands' client talks to ``handler`` instead of a network."""

    def install(handler: Callable[[httpx.Request], httpx.Response]) -> None:
        def client(args: object) -> BootstrapClient:
            return BootstrapClient(URL, transport=httpx.MockTransport(handler), retry=FAST)

        monkeypatch.setattr(feed_commands, "client_for", client)

    return install


@pytest.mark.parametrize(
    ("item", "line"),
    [
        (
            event(2, "moved", cell=[1, 0, 3, 0], previous=A, address=B, address_version=2),
            "moved (dp=1, cp=0, tp=3, pp=0) 10.0.1.4:41003 -> 10.0.1.4:41107 (address v2)",
        ),
        (event(3, "left", cell=[0, 0, 1, 0]), "left (dp=0, cp=0, tp=1, pp=0) 10.0.1.4:41003"),
        (event(3, "registered"), "registered (dp=0, cp=0, tp=3, pp=0) 10.0.1.4:41003 (address v1)"),
        (event(4, "expired"), "expired (dp=0, cp=0, tp=0, pp=0) 10.0.1.4:41004"),
        (
            event(4, "left", cell=[0, 0, 0, 0], address={"rank_ip": "fd00::2", "rank_port": 9}),
            "left (dp=0, cp=0, tp=0, pp=0) [fd00::2]:9",
        ),
        (event(5, "renewed"), "renewed (dp=0, cp=0, tp=1, pp=0) 10.0.1.4:41005"),
        (event(6, "incomplete"), "incomplete"),
        (event(7, "complete"), "complete"),
        (
            event(8, "reset", instance_id="g2", detail="previous instance g1"),
            "reset new instance g2 (previous instance g1)",
        ),
        (
            event(9, "conflict", detail="page_size: 16 established, 32 offered"),
            "conflict (dp=0, cp=0, tp=1, pp=0) 10.0.1.4:41009 refused: page_size: 16 "
            "established, 32 offered",
        ),
    ],
)
def test_each_event_reads_as_one_line(item: object, line: str) -> None:
    assert describe(item) == f"{clock(item.seq)} {line}"  # type: ignore[union-attr]


def test_a_resync_line_names_why_the_tables_counts_and_where_it_goes_on() -> None:
    report = TableReport.model_validate(
        table("s2", 7) | {"expected_cells": 16, "registered_cells": 15}
    )
    item = Resynced("history_gone", "g1", "g1.3", "s2", 7, report, time.time())
    assert describe(item).endswith(
        "resynced (history gone): instance g1 (incarnation g1.3), 15/16 cells, incomplete; "
        "watching from s2:7"
    )


def test_watch_prints_a_line_per_event_and_stops_after_count(
    serve: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    serve(FeedServer([Answer(body=sse("s1", event(1), event(2, "left"), event(3)))]))
    assert main(["watch", "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{clock(1)} registered (dp=0, cp=0, tp=1, pp=0) 10.0.1.4:41001 (address v1)",
        f"{clock(2)} left (dp=0, cp=0, tp=2, pp=0) 10.0.1.4:41002",
    ]


def test_watch_json_prints_the_wire_json_and_resyncs_as_kind_resync(
    serve: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    serve(FeedServer([gone(), Answer(body=sse("s2", event(8)))], table=table("s2", 7)))
    assert main(["watch", "--json", "--since", "s1:3", "--count", "2"]) == 0
    resync, moved = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (resync["kind"], resync["reason"], resync["stream"], resync["seq"]) == (
        "resync", "history_gone", "s2", 7
    )  # fmt: skip
    assert resync["table"]["instance_id"] == "g1"
    assert moved == json.loads(event(8).model_dump_json())


def test_watch_exits_1_with_one_line_once_the_server_stays_unreachable(
    serve: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    serve(refuse)
    assert main(["watch", "-q"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prefill-bootstrap watch: watch request to")


def test_a_malformed_since_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["watch", "--since", "s1:-1"])
    assert exited.value.code == 2


DEREGISTER = [
    "deregister",
    "--dp",
    "1",
    "--tp",
    "3",
    "--rank-ip",
    "10.0.1.4",
    "--rank-port",
    "41003",
]


def answer(status: int, body: dict) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body)


def test_deregister_prints_what_left_and_exits_0(
    serve: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    left = {"cell": [1, 0, 3, 0], "address": A, "registered": 15, "expected": 16,
            "complete": False, "incarnation": "g1.4"}  # fmt: skip
    serve(answer(200, left))
    assert main(DEREGISTER) == 0
    assert capsys.readouterr().out == (
        f"deregistered cell (dp=1, cp=0, tp=3, pp=0) at 10.0.1.4:41003 from {URL}: 15 of 16 "
        "cells registered now (incarnation g1.4)\n"
    )


def test_deregister_of_a_cell_nobody_holds_is_already_gone_with_exit_0(
    serve: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    serve(answer(404, {"error": "cell_not_found", "message": "no rank registered it"}))
    assert main(DEREGISTER) == 0
    assert capsys.readouterr().out.rstrip().endswith("already gone")


@pytest.mark.parametrize(
    ("status", "kind", "message"),
    [
        (409, "address_mismatch", "cell (dp=1, cp=0, tp=3, pp=0) is registered at 10.0.1.9:41003"),
        (401, "unauthorized", "a bearer token is required"),
    ],
)
def test_deregister_refused_exits_1_with_the_servers_words(
    serve: Callable, capsys: pytest.CaptureFixture[str], status: int, kind: str, message: str
) -> None:
    serve(answer(status, {"error": kind, "message": message}))
    assert main([*DEREGISTER, "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"HTTP {status}: {message}" in err
