"""Our additions: the port table report, readiness, long polls, reset and the OpenAPI schema."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from prefill_bootstrap.shared.protocol import TableReport
from tests.conftest import sglang_registration

pytestmark = pytest.mark.anyio


async def register_cells(api: httpx.AsyncClient, *tps: int, **overrides: object) -> None:
    for tp in tps:
        body = sglang_registration(attn_tp_rank=tp, rank_port=41000 + tp, **overrides)
        response = await api.put("/route", json=body)
        assert response.status_code == 200, response.text


async def test_the_report_of_an_empty_server_says_nothing_is_known(api: httpx.AsyncClient) -> None:
    report = (await api.get("/prefill_port_table")).json()
    assert report["complete"] is False
    assert report["topology"] is None
    assert report["expected_cells"] is None
    assert report["registered_cells"] == 0
    assert report["missing_cells"] == []
    assert report["state"] == "memory"


async def test_the_report_follows_its_documented_schema(api: httpx.AsyncClient) -> None:
    await register_cells(api, 0, attn_tp_size=4, attn_dp_size=2, pp_size=2)
    TableReport.model_validate((await api.get("/prefill_port_table")).json())


async def test_the_report_lists_missing_cells_and_per_row_completeness(
    api: httpx.AsyncClient,
) -> None:
    await register_cells(api, 0, 1, attn_tp_size=2, attn_dp_size=2)
    report = (await api.get("/prefill_port_table")).json()
    assert report["expected_cells"] == 4
    assert report["registered_cells"] == 2
    assert report["missing_cells"] == [[1, 0, 0, 0], [1, 0, 1, 0]]
    assert report["rows"] == [
        {"dp": 0, "expected": 2, "registered": 2, "complete": True},
        {"dp": 1, "expected": 2, "registered": 0, "complete": False},
    ]
    assert report["server_info"] is None


async def test_the_report_shows_each_cell_with_address_times_and_address_version(
    api: httpx.AsyncClient,
) -> None:
    await register_cells(api, 0)
    await api.put("/route", json=sglang_registration(rank_port=43000))
    report = (await api.get("/prefill_port_table")).json()
    [cell] = report["cells"]
    assert (cell["dp"], cell["cp"], cell["tp"], cell["pp"]) == (0, 0, 0, 0)
    assert (cell["rank_ip"], cell["rank_port"], cell["address_version"]) == ("10.0.0.1", 43000, 2)
    assert cell["last_registered_at"] >= cell["first_registered_at"] > 0
    [replacement] = report["replacements"]
    assert replacement["old"] == {"rank_ip": "10.0.0.1", "rank_port": 41000}
    assert replacement["new"] == {"rank_ip": "10.0.0.1", "rank_port": 43000}


async def test_ready_is_503_with_the_missing_cells_until_complete(api: httpx.AsyncClient) -> None:
    await register_cells(api, 1)
    response = await api.get("/ready")
    assert response.status_code == 503
    assert response.json()["missing_cells"] == [[0, 0, 0, 0]]
    await register_cells(api, 0)
    response = await api.get("/ready")
    assert response.status_code == 200
    assert response.json()["ready"] is True


async def test_a_replaced_cell_keeps_the_table_ready(api: httpx.AsyncClient) -> None:
    await register_cells(api, 0, 1)
    await api.put("/route", json=sglang_registration(attn_tp_rank=1, rank_port=49999))
    assert (await api.get("/ready")).status_code == 200


async def test_a_long_poll_returns_as_soon_as_the_table_completes(api: httpx.AsyncClient) -> None:
    await register_cells(api, 0)
    waiting = asyncio.create_task(api.get("/prefill_port_table", params={"wait": 30}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await register_cells(api, 1)
    report = (await asyncio.wait_for(waiting, 10)).json()
    assert report["complete"] is True


async def test_a_long_poll_answers_the_incomplete_table_at_its_deadline(
    api: httpx.AsyncClient,
) -> None:
    await register_cells(api, 0)
    response = await api.get("/ready", params={"wait": 0.2})
    assert response.status_code == 503


async def test_delete_resets_the_table_and_starts_a_new_instance(api: httpx.AsyncClient) -> None:
    await register_cells(api, 0, 1)
    old = (await api.get("/prefill_port_table")).json()["instance_id"]
    response = await api.delete("/prefill_port_table")
    assert response.status_code == 200
    report = (await api.get("/prefill_port_table")).json()
    assert report["instance_id"] == response.json()["instance_id"] != old
    assert report["registered_cells"] == 0
    assert report["topology"] is None
    await register_cells(api, 0, attn_tp_size=8)
    assert (await api.get("/prefill_port_table")).json()["expected_cells"] == 8


async def test_the_openapi_schema_documents_every_route(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths["/route"]) == {"get", "put"}
    for path in ("/register_dp_rank", "/query_dp_ranks"):
        assert "requestBody" in paths[path]["post"]
    for path in ("/health", "/ready", "/prefill_port_table"):
        assert "get" in paths[path]
    assert "delete" in paths["/prefill_port_table"]
    put_body = paths["/route"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    current, gen2, gen1 = put_body["anyOf"]
    assert "attn_cp_size" in current["required"]
    assert "role" in gen2["required"] and "engine_rank" in gen1["required"]
    lookup_params = {param["name"] for param in paths["/route"]["get"]["parameters"]}
    assert {"prefill_dp_rank", "engine_rank", "target_dp_group"} <= lookup_params
