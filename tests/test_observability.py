"""Instance id on every response, Prometheus metrics after a known sequence, JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefill_bootstrap.service.logs import JsonFormatter, redact_query
from tests.conftest import ServerProcess, asgi_client, cell_query, sglang_registration

pytestmark = pytest.mark.anyio

HEADER = "x-sglang-disaggregation-instance-id"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/route?prefill_dp_rank=0"),
        ("GET", "/prefill_port_table"),
        ("POST", "/query_dp_ranks"),
        ("GET", "/nope"),
        ("PUT", "/route"),
    ],
)
async def test_every_response_carries_the_instance_id(
    app_factory: Callable[..., Any], method: str, path: str
) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        response = await client.request(method, path)
        assert response.headers[HEADER] == app.registry.instance_id


async def test_the_instance_id_changes_on_reset(app_factory: Callable[..., Any]) -> None:
    async with asgi_client(app_factory()) as client:
        before = (await client.get("/health")).headers[HEADER]
        reset = await client.delete("/prefill_port_table")
        after = (await client.get("/health")).headers[HEADER]
        assert before != after == reset.json()["instance_id"] == reset.headers[HEADER]


async def test_metrics_count_a_known_sequence_of_requests(app_factory: Callable[..., Any]) -> None:
    app = app_factory(room_capacity=2, auth_token="t")
    auth = {"authorization": "Bearer t"}
    async with asgi_client(app) as client:
        await client.put("/route", json=sglang_registration(attn_tp_rank=0), headers=auth)
        await client.get("/route", params=cell_query(0, 0, 0, 0))  # 503: incomplete
        await client.put("/route", json=sglang_registration(attn_tp_rank=0), headers=auth)  # same
        await client.put(
            "/route", json=sglang_registration(attn_tp_rank=0, rank_port=1), headers=auth
        )  # replaced
        await client.put("/route", json=sglang_registration(attn_tp_size=4), headers=auth)
        await client.put("/route", json=sglang_registration(rank_port=0), headers=auth)
        await client.put("/route", content=b"{", headers=auth)
        await client.put("/route", json=sglang_registration())  # no token
        for room in range(3):
            await client.post(
                "/register_dp_rank", json={"bootstrap_room": room, "dp_rank": 0}, headers=auth
            )
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    registrations = {
        outcome: found[("prefill_bootstrap_registrations_total", (("outcome", outcome),))]
        for outcome in ("new", "same", "replaced", "conflict", "invalid", "unauthorized")
    }
    assert registrations == {
        "new": 1, "same": 1, "replaced": 1, "conflict": 1, "invalid": 2, "unauthorized": 1,
    }  # fmt: skip
    assert found[("prefill_bootstrap_expected_cells", ())] == 2
    assert found[("prefill_bootstrap_registered_cells", ())] == 1
    assert found[("prefill_bootstrap_missing_cells", ())] == 1
    assert found[("prefill_bootstrap_ready", ())] == 0
    assert found[("prefill_bootstrap_not_ready_responses_total", ())] == 1
    assert found[("prefill_bootstrap_unauthorized_requests_total", ())] == 1
    assert found[("prefill_bootstrap_rooms", ())] == 2
    assert found[("prefill_bootstrap_room_evictions_total", ())] == 1
    route_count = (
        "prefill_bootstrap_request_duration_seconds_count",
        (("method", "PUT"), ("route", "/route")),
    )
    assert found[route_count] == 7


async def test_unknown_paths_share_one_metrics_label(app_factory: Callable[..., Any]) -> None:
    async with asgi_client(app_factory()) as client:
        for index in range(5):
            await client.get(f"/random-{index}")
        text = (await client.get("/metrics")).text
    assert "random-" not in text
    assert 'route="other"' in text


def test_json_log_lines_are_one_object_with_level_logger_and_message() -> None:
    record = logging.LogRecord(
        "prefill_bootstrap.service.registry",
        logging.INFO,
        __file__,
        1,
        "Registered %s.",
        ("x",),
        None,
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info"
    assert line["logger"] == "prefill_bootstrap.service.registry"
    assert line["message"] == "Registered x."


async def test_a_storm_logs_the_table_complete_once_however_its_commits_are_batched(
    app_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Group commit acknowledges many registrations after the table is already complete; the
    completion (and the memory release it schedules) belongs to the one that filled it."""
    app = app_factory()
    bodies = [
        sglang_registration(attn_tp_size=8, pp_size=4, attn_tp_rank=tp, pp_rank=pp)
        for tp in range(8)
        for pp in range(4)
    ]
    caplog.set_level(logging.INFO, logger="prefill_bootstrap.service")
    async with asgi_client(app) as client:
        answers = await asyncio.gather(*(client.put("/route", json=body) for body in bodies))
    assert [answer.status_code for answer in answers] == [200] * 32
    completions = [r for r in caplog.records if r.getMessage().startswith("The port table is")]
    assert [r.getMessage() for r in completions] == [
        "The port table is complete: all 32 cells registered."
    ]


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/health", "/health"),
        ("/route?prefill_dp_rank=0&target_tp_rank=1", "/route?prefill_dp_rank=0&target_tp_rank=1"),
        ("/ready?token=abc&wait=1", "/ready?token=REDACTED&wait=1"),
        (
            "/x?access_token=a&API_KEY=b&Authorization=c",
            "/x?access_token=REDACTED&API_KEY=REDACTED&Authorization=REDACTED",
        ),
        (
            "/x?password=p&client_secret=s&sig=z&flag",
            "/x?password=REDACTED&client_secret=REDACTED&sig=REDACTED&flag",
        ),
        ("/x?%74oken=encoded", "/x?%74oken=REDACTED"),
    ],
)
def test_credential_like_query_values_are_redacted(target: str, logged: str) -> None:
    assert redact_query(target) == logged


def test_the_access_log_never_shows_a_token_sent_in_the_query(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory("--access-log")
    response = httpx.get(f"{server.url}/health?token=hunter2&note=kept", timeout=10)
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while "GET /health" not in server.logs():
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.02)
    assert "hunter2" not in server.logs()
    assert "/health?token=REDACTED&note=kept" in server.logs()
