"""SGLang's bootstrap protocol over HTTP, exactly as SGLang 0.5.23 clients read it.

Every test runs twice (see the ``api`` fixture): through the lean hot path and through the plain
FastAPI routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import cell_query, info_query

pytestmark = pytest.mark.anyio

Registration = Callable[..., dict[str, Any]]


async def register(api: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await api.put("/route", json=body)


async def test_a_registration_is_acknowledged_with_200_ok(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    response = await register(api, registration())
    assert (response.status_code, response.text) == (200, "OK")


async def test_health_answers_ok(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert (response.status_code, response.text) == (200, "OK")


async def test_server_info_is_503_with_sglangs_text_until_every_cell_registered(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    await register(api, registration(attn_tp_rank=0))
    await register(api, registration(attn_tp_rank=0, rank_port=41005))
    response = await api.get("/route", params=info_query())
    assert response.status_code == 503
    assert response.text == "Prefill server not fully registered yet (1 workers registered)."


async def test_server_info_once_complete_has_exactly_the_keys_of_sglang_0_5_23(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    for tp in range(2):
        await register(api, registration(attn_tp_rank=tp, rank_port=41000 + tp))
    response = await api.get("/route", params=info_query())
    assert response.status_code == 200
    assert response.json() == {
        "attn_tp_size": 2,
        "attn_cp_size": 1,
        "dp_size": 1,
        "pp_size": 1,
        "page_size": 16,
        "kv_cache_dtype": "auto",
        "follow_bootstrap_room": False,
        "enable_dsa_cache_layer_split": False,
        "enable_kv_cache_sharding": False,
        "prefill_http_port": 30000,
        "decode_allocation_policy": "early",
    }


async def test_server_info_for_an_older_release_carries_no_key_it_did_not_send(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    newer = (
        "kv_layout",
        "dsv41_spec_layout",
        "enable_dsa_cache_layer_split",
        "enable_kv_cache_sharding",
        "prefill_http_port",
        "decode_allocation_policy",
    )
    for tp in range(2):
        body = registration(attn_tp_rank=tp)
        for key in newer:
            body.pop(key)
        await register(api, body)
    info = (await api.get("/route", params=info_query())).json()
    assert set(info) == {
        "attn_tp_size",
        "attn_cp_size",
        "dp_size",
        "pp_size",
        "page_size",
        "kv_cache_dtype",
        "follow_bootstrap_room",
    }


async def test_a_cell_lookup_answers_the_ranks_address(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    for tp in range(2):
        await register(api, registration(attn_tp_rank=tp, rank_ip="10.0.0.7", rank_port=41000 + tp))
    response = await api.get("/route", params=cell_query(0, 0, 1, 0))
    assert response.status_code == 200
    assert response.json() == {"rank_ip": "10.0.0.7", "rank_port": 41001}


async def test_a_cell_lookup_is_503_while_the_table_is_incomplete(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    await register(api, registration(attn_tp_rank=0))
    response = await api.get("/route", params=cell_query(0, 0, 0, 0))
    assert response.status_code == 503


async def test_an_unknown_cell_is_404_with_sglangs_text(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    for tp in range(2):
        await register(api, registration(attn_tp_rank=tp))
    response = await api.get("/route", params=cell_query(0, 0, 5, 0))
    assert response.status_code == 404
    assert response.text == "Bootstrap info not found for dp_rank=0 cp_rank=0 tp_rank=5 pp_rank=0"


@pytest.mark.parametrize("missing", ["prefill_dp_rank", "target_pp_rank"])
async def test_a_lookup_missing_a_parameter_is_400_with_sglangs_text(
    api: httpx.AsyncClient, missing: str
) -> None:
    params = info_query()
    params.pop(missing)
    response = await api.get("/route", params=params)
    assert (response.status_code, response.text) == (400, "Missing inputs for bootstrap server.")


async def test_a_lookup_with_an_empty_parameter_is_400(api: httpx.AsyncClient) -> None:
    params = {**info_query(), "target_tp_rank": ""}
    response = await api.get("/route", params=params)
    assert response.status_code == 400


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
async def test_other_methods_on_route_are_405(api: httpx.AsyncClient, method: str) -> None:
    response = await api.request(method, "/route")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


async def test_a_registered_room_answers_its_dp_rank(api: httpx.AsyncClient) -> None:
    room = (1 << 63) - 1
    response = await api.post("/register_dp_rank", json={"bootstrap_room": room, "dp_rank": 3})
    assert (response.status_code, response.text) == (200, "OK")
    response = await api.post("/query_dp_ranks", json={"bootstrap_rooms": [room, 12]})
    assert response.status_code == 200
    assert response.json() == {str(room): 3}


async def test_the_latest_room_registration_wins(api: httpx.AsyncClient) -> None:
    await api.post("/register_dp_rank", json={"bootstrap_room": 5, "dp_rank": 1})
    await api.post("/register_dp_rank", json={"bootstrap_room": 5, "dp_rank": 2})
    response = await api.post("/query_dp_ranks", json={"bootstrap_rooms": [5]})
    assert response.json() == {"5": 2}


async def test_a_registration_without_a_content_type_is_still_read_as_json(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    import orjson

    response = await api.put(
        "/route", content=orjson.dumps(registration()), headers={"content-type": ""}
    )
    assert response.status_code == 200


async def test_the_dp_group_follows_system_dp_rank_when_system_dp_is_above_one(
    api: httpx.AsyncClient, registration: Registration
) -> None:
    for dp in range(2):
        for tp in range(2):
            body = registration(
                system_dp_size=2, system_dp_rank=dp, attn_tp_rank=tp, rank_port=42000 + 10 * dp + tp
            )
            assert (await register(api, body)).status_code == 200
    response = await api.get("/route", params=cell_query(1, 0, 1, 0))
    assert response.json() == {"rank_ip": "10.0.0.1", "rank_port": 42011}
    assert (await api.get("/route", params=info_query())).json()["dp_size"] == 2
