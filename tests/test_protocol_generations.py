"""Every SGLang bootstrap protocol generation, replayed from golden exchanges written from the
released wheels (tests/golden/README.md names the releases and functions read)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import asgi_client, sglang_registration

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(GOLDEN.glob("gen*.json"))


def check(exchange: dict[str, Any], response: httpx.Response) -> None:
    expected = exchange["response"]
    where = f"{exchange['name']}: {response.status_code} {response.text[:300]}"
    assert response.status_code == expected["status"], where
    if "text" in expected:
        assert response.text == expected["text"], where
    if "json" in expected:
        body = response.json()
        if expected.get("json_match", "exact") == "subset":
            assert {key: body.get(key) for key in expected["json"]} == expected["json"], where
            assert set(expected["json"]) <= set(body), where
        else:
            assert body == expected["json"], where


@pytest.mark.parametrize("golden", FILES, ids=[path.stem for path in FILES])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-only"])
async def test_the_server_answers_every_golden_exchange(
    app_factory: Callable[..., Any], golden: Path, fast_path: bool
) -> None:
    scenario = json.loads(golden.read_text())
    app = app_factory()
    app.serve_hot_routes = fast_path
    async with asgi_client(app) as client:
        for exchange in scenario["exchanges"]:
            request = exchange["request"]
            response = await client.request(
                request["method"],
                request["path"],
                params=request.get("query"),
                json=request.get("json"),
            )
            check(exchange, response)


def gen1(engine_rank: int, **overrides: Any) -> dict[str, Any]:
    body = {"role": "Prefill", "tp_size": 4, "dp_size": 2, "rank_ip": "10.0.0.1",
            "rank_port": 41000 + engine_rank, "engine_rank": engine_rank}  # fmt: skip
    return {**body, **overrides}


def gen2(tp: int, pp: int, **overrides: Any) -> dict[str, Any]:
    body = {"role": "Prefill", "attn_tp_size": 2, "attn_tp_rank": tp, "attn_dp_size": 1,
            "attn_dp_rank": 0, "pp_size": 2, "pp_rank": pp, "system_dp_size": 1,
            "system_dp_rank": 0, "rank_ip": "10.0.0.2",
            "rank_port": 42000 + 10 * pp + tp}  # fmt: skip
    return {**body, **overrides}


async def test_the_table_shows_which_generation_each_cell_registered_with(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        await client.put("/route", json=gen2(0, 0))
        await client.put("/route", json=gen2(1, 0, page_size=16))
        body = sglang_registration(pp_size=2, pp_rank=1, page_size=None, kv_cache_dtype=None)
        assert (await client.put("/route", json=body)).status_code == 200
        report = (await client.get("/prefill_port_table")).json()
    protocols = {(c["tp"], c["pp"]): c["protocol"] for c in report["cells"]}
    assert protocols == {(0, 0): "2a", (1, 0): "2b", (0, 1): "3"}


async def test_a_gen3_decode_reads_a_table_a_gen2_prefill_filled(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        for tp in range(2):
            for pp in range(2):
                await client.put("/route", json=gen2(tp, pp, page_size=64))
        info = await client.get(
            "/route",
            params={
                "prefill_dp_rank": "-1",
                "prefill_cp_rank": "-1",
                "target_tp_rank": "-1",
                "target_pp_rank": "-1",
            },
        )
    assert info.status_code == 200
    assert info.json() == {
        "attn_tp_size": 2, "attn_cp_size": 1, "dp_size": 1, "pp_size": 2, "page_size": 64,
        "kv_cache_dtype": None, "follow_bootstrap_room": True,
    }  # fmt: skip


async def test_a_gen2_decode_reads_a_table_a_gen3_prefill_filled(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        for tp in range(2):
            await client.put("/route", json=sglang_registration(attn_tp_rank=tp))
        params = {"engine_rank": "-1", "target_dp_group": "-1", "target_pp_rank": "-1"}
        info = await client.get("/route", params=params)
        cell = await client.get(
            "/route", params={"engine_rank": "1", "target_dp_group": "0", "target_pp_rank": "0"}
        )
    assert info.json() == {
        "prefill_attn_tp_size": 2, "prefill_dp_size": 1, "prefill_pp_size": 1,
        "prefill_page_size": 16,
    }  # fmt: skip
    assert cell.json() == {"rank_ip": "10.0.0.1", "rank_port": 41000}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attn_cp_size": 2}, "attn_cp_size=2"),
        ({"attn_dp_size": 2, "load_balance_method": "round_robin"}, "load_balance_method"),
    ],
)
async def test_an_older_decode_is_refused_when_the_group_needs_what_it_cannot_address(
    app_factory: Callable[..., Any], overrides: dict[str, Any], field: str
) -> None:
    async with asgi_client(app_factory()) as client:
        await client.put("/route", json=sglang_registration(**overrides))
        for params in (
            {"engine_rank": "-1", "target_dp_group": "-1"},
            {"engine_rank": "0", "target_dp_group": "0", "target_pp_rank": "0"},
        ):
            response = await client.get("/route", params=params)
            assert response.status_code == 409
            assert response.json()["error"] == "topology_not_addressable"
            assert field in response.json()["message"]


async def test_a_gen1_decode_is_refused_a_pipeline_parallel_prefill(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        await client.put("/route", json=sglang_registration(pp_size=2))
        response = await client.get("/route", params={"engine_rank": "-1", "target_dp_group": "-1"})
    assert response.status_code == 409
    assert "pp_size=2" in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (gen1(0, tp_size=3), "tp_size=3 is not a multiple of dp_size=2"),
        (gen1(5), "engine_rank=5 is outside tp_size=4"),
        (gen1(0, rank_port="x"), "rank_port"),
        (gen2(2, 0), "attn_tp_rank"),
        (gen2(0, 0, page_size=0), "page_size"),
    ],
)
async def test_bad_older_registrations_are_422_naming_the_problem(
    app_factory: Callable[..., Any], body: dict[str, Any], named: str
) -> None:
    async with asgi_client(app_factory()) as client:
        response = await client.put("/route", json=body)
        assert response.status_code == 422
        assert named in response.json()["message"]
        assert (await client.get("/prefill_port_table")).json()["registered_cells"] == 0


@pytest.mark.parametrize("field", [{"kv_cache_dtype": "fp8"}, {"attn_cp_rank": 0}])
async def test_an_older_registration_carrying_a_current_field_is_mapped_not_a_500(
    api: httpx.AsyncClient, field: dict[str, Any]
) -> None:
    """Gen 2 never sent these, but its unknown fields are kept: one the current shape declares
    is the mapping's to set (cp 0, no dtype), not a second value for it."""
    response = await api.put("/route", json=gen2(0, 0, **field))
    assert response.status_code == 200, response.text
    [cell] = (await api.get("/prefill_port_table")).json()["cells"]
    assert (cell["cp"], cell["protocol"]) == (0, "2a")


async def test_a_pinned_server_refuses_other_generations_clearly(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory(protocol="3")) as client:
        response = await client.put("/route", json=gen1(0))
        assert response.status_code == 422
        assert response.json()["error"] == "protocol_mismatch"
        assert "--protocol" in response.json()["message"]
        lookup = await client.get("/route", params={"engine_rank": "0", "target_dp_group": "0"})
        assert lookup.status_code == 422  # one kind, one status: as the registration above
        assert lookup.json()["error"] == "protocol_mismatch"
        assert "--protocol" in lookup.json()["message"]
        assert (await client.put("/route", json=sglang_registration())).status_code == 200


async def test_a_gen1_registration_fills_cp0_pp0_of_its_dp_group(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        await client.put("/route", json=gen1(3))
        report = (await client.get("/prefill_port_table")).json()
    [cell] = report["cells"]
    assert (cell["dp"], cell["cp"], cell["tp"], cell["pp"]) == (1, 0, 1, 0)
    assert report["topology"]["attn_tp_size"] == 2 and report["topology"]["dp_size"] == 2


def test_a_real_server_answers_every_golden_exchange_on_its_lean_door(server: Any) -> None:
    """The third door: requests answered inside uvicorn's parser (hot_protocol.py), over real
    keep-alive connections, with a reset between the scenarios."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for golden in FILES:
            assert client.delete("/prefill_port_table").status_code == 200
            for exchange in json.loads(golden.read_text())["exchanges"]:
                request = exchange["request"]
                response = client.request(
                    request["method"],
                    request["path"],
                    params=request.get("query"),
                    json=request.get("json"),
                )
                check(exchange, response)
