"""Bad input never produces a 500, always gets a JSON error naming the problem, and never changes
the table."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import asgi_client, cell_query, info_query, sglang_registration

pytestmark = pytest.mark.anyio


def nested(depth: int) -> list[Any]:
    """``[[[...]]]``: lists nested ``depth`` levels deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def without(field: str) -> dict[str, Any]:
    body = sglang_registration()
    body.pop(field)
    return body


BAD_REGISTRATIONS: list[tuple[str, Any, int, str]] = [
    ("missing rank_port", without("rank_port"), 422, "rank_port"),
    ("missing attn_tp_size", without("attn_tp_size"), 422, "attn_tp_size"),
    ("missing page_size", without("page_size"), 422, "page_size"),
    ("string size", sglang_registration(attn_tp_size="2"), 422, "attn_tp_size"),
    ("boolean rank", sglang_registration(attn_tp_rank=True), 422, "attn_tp_rank"),
    ("float port", sglang_registration(rank_port=41000.5), 422, "rank_port"),
    ("rank equal to size", sglang_registration(attn_tp_rank=2), 422, "attn_tp_rank"),
    ("pp rank beyond size", sglang_registration(pp_rank=3), 422, "pp_rank"),
    ("cp rank beyond size", sglang_registration(attn_cp_rank=1), 422, "attn_cp_rank"),
    ("dp rank beyond size", sglang_registration(attn_dp_rank=1), 422, "attn_dp_rank"),
    ("system dp rank beyond", sglang_registration(system_dp_rank=1), 422, "system_dp_rank"),
    ("negative rank", sglang_registration(attn_tp_rank=-1), 422, "attn_tp_rank"),
    ("size zero", sglang_registration(pp_size=0), 422, "pp_size"),
    ("negative size", sglang_registration(attn_cp_size=-2), 422, "attn_cp_size"),
    ("port zero", sglang_registration(rank_port=0), 422, "rank_port"),
    ("port too high", sglang_registration(rank_port=65536), 422, "rank_port"),
    ("empty ip", sglang_registration(rank_ip=""), 422, "rank_ip"),
    ("ip with spaces", sglang_registration(rank_ip="10.0.0.1 evil"), 422, "rank_ip"),
    ("ip not a string", sglang_registration(rank_ip=10), 422, "rank_ip"),
    ("ipv6 in brackets", sglang_registration(rank_ip="[::1]"), 422, "without brackets"),
    ("ip with a port", sglang_registration(rank_ip="10.0.0.1:5000"), 422, "rank_port"),
    ("ipv4 out of range", sglang_registration(rank_ip="999.1.1.1"), 422, "not a valid IPv4"),
    ("ip with NUL", sglang_registration(rank_ip="10.0.0.1\u0000"), 422, "rank_ip"),
    ("ip with a control char", sglang_registration(rank_ip="node\u00071"), 422, "rank_ip"),
    ("host with underscore", sglang_registration(rank_ip="node_1"), 422, "RFC 1123"),
    ("host label too long", sglang_registration(rank_ip="a" * 64 + ".x"), 422, "RFC 1123"),
    ("zone with a space", sglang_registration(rank_ip="fe80::1%a b"), 422, "zone"),
    ("page size zero", sglang_registration(page_size=0), 422, "page_size"),
    ("list body", [sglang_registration()], 422, "body"),
    ("null body", None, 422, "body"),
    ("policy not a string", sglang_registration(decode_allocation_policy=3), 422, "decode"),
    ("http port too high", sglang_registration(prefill_http_port=70000), 422, "prefill_http"),
    ("unknown field nested 300 deep", sglang_registration(x=nested(300)), 422, "body.x"),
    ("unknown field nested 33 deep", sglang_registration(x=nested(33)), 422, "body.x"),
    ("unknown field of 17 KiB", sglang_registration(big="y" * 17_000), 422, "body.big"),
    (
        "unknown fields of 80 KiB together",
        sglang_registration(**{f"f{i}": "y" * 10_000 for i in range(8)}),
        422,
        "body.f6",
    ),
    (
        "layout nested 40 deep",
        sglang_registration(dsv41_spec_layout={"a": nested(40)}),
        422,
        "body.dsv41_spec_layout",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [case[1:] for case in BAD_REGISTRATIONS],
    ids=[case[0] for case in BAD_REGISTRATIONS],
)
async def test_a_bad_registration_is_refused_with_a_json_error_naming_the_field(
    api: httpx.AsyncClient, body: Any, status: int, named: str
) -> None:
    before = (await api.get("/prefill_port_table")).json()
    response = await api.put("/route", content=json.dumps(body))  # orjson stops at 254 levels
    assert response.status_code == status
    error = response.json()
    assert error["error"] == "validation_error"
    assert named in error["message"]
    assert error["details"]
    after = (await api.get("/prefill_port_table")).json()
    assert after == before


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"{", b'{"attn_tp_size": 2,,}', b"\xff\xfe"], ids=repr
)
async def test_a_body_that_is_not_json_is_400_invalid_json(
    api: httpx.AsyncClient, raw: bytes
) -> None:
    response = await api.put("/route", content=raw)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"


@pytest.mark.parametrize("path", ["/route", "/register_dp_rank", "/query_dp_ranks"])
async def test_a_body_over_the_cap_is_413_and_changes_nothing(
    api: httpx.AsyncClient, path: str
) -> None:
    method = "PUT" if path == "/route" else "POST"
    response = await api.request(method, path, content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert (await api.get("/prefill_port_table")).json()["registered_cells"] == 0


async def test_a_topology_conflict_is_409_naming_field_established_and_offered(
    api: httpx.AsyncClient,
) -> None:
    await api.put("/route", json=sglang_registration(attn_tp_size=4))
    before = (await api.get("/prefill_port_table")).json()
    response = await api.put("/route", json=sglang_registration(attn_tp_size=8, attn_tp_rank=5))
    assert response.status_code == 409
    error = response.json()
    assert error["error"] == "topology_conflict"
    assert error["details"] == [{"field": "attn_tp_size", "established": 4, "offered": 8}]
    assert "attn_tp_size=8" in error["message"] and "attn_tp_size=4" in error["message"]
    after = (await api.get("/prefill_port_table")).json()
    assert after["cells"] == before["cells"]
    assert after["topology"] == before["topology"]
    assert [c["field"] for c in after["conflicts"]] == ["attn_tp_size"]


async def test_a_differing_dsv41_layout_is_a_conflict(api: httpx.AsyncClient) -> None:
    await api.put("/route", json=sglang_registration(dsv41_spec_layout={"a": 1}))
    response = await api.put(
        "/route", json=sglang_registration(attn_tp_rank=1, dsv41_spec_layout={"a": 2})
    )
    assert response.status_code == 409
    assert response.json()["details"][0]["field"] == "dsv41_spec_layout"


BAD_LOOKUPS = [
    ("letters", {**info_query(), "prefill_dp_rank": "zero"}, 422),
    ("float", {**info_query(), "target_tp_rank": "1.5"}, 422),
    ("underscore digits", {**cell_query(0, 0, 0, 0), "target_pp_rank": "1_0"}, 422),
    ("mixed minus one", {**cell_query(0, 0, 0, 0), "target_tp_rank": "-1"}, 422),
    ("minus two", {**cell_query(0, 0, 0, 0), "prefill_dp_rank": "-2"}, 422),
    ("huge", {**cell_query(0, 0, 0, 0), "prefill_dp_rank": "9" * 5000}, 422),
]


@pytest.mark.parametrize(
    ("params", "status"), [case[1:] for case in BAD_LOOKUPS], ids=[c[0] for c in BAD_LOOKUPS]
)
async def test_a_malformed_lookup_is_refused_with_a_json_error(
    api: httpx.AsyncClient, params: dict[str, str], status: int
) -> None:
    response = await api.get("/route", params=params)
    assert response.status_code == status
    assert response.json()["error"] == "validation_error"


BAD_ROOMS: list[tuple[str, str, Any, int]] = [
    ("no room", "/register_dp_rank", {"dp_rank": 1}, 422),
    ("no dp rank", "/register_dp_rank", {"bootstrap_room": 1}, 422),
    ("string room", "/register_dp_rank", {"bootstrap_room": "1", "dp_rank": 1}, 422),
    ("negative room", "/register_dp_rank", {"bootstrap_room": -1, "dp_rank": 1}, 422),
    ("room over 63 bits", "/register_dp_rank", {"bootstrap_room": 1 << 63, "dp_rank": 1}, 422),
    ("negative dp", "/register_dp_rank", {"bootstrap_room": 1, "dp_rank": -1}, 422),
    ("bool dp", "/register_dp_rank", {"bootstrap_room": 1, "dp_rank": True}, 422),
    ("dp beyond any size", "/register_dp_rank", {"bootstrap_room": 1, "dp_rank": 1 << 40}, 422),
    ("list body", "/register_dp_rank", [1, 2], 422),
    ("no rooms", "/query_dp_ranks", {}, 422),
    ("rooms not a list", "/query_dp_ranks", {"bootstrap_rooms": 5}, 422),
    ("a bad room", "/query_dp_ranks", {"bootstrap_rooms": [1, "x"]}, 422),
    ("too many rooms", "/query_dp_ranks", {"bootstrap_rooms": [1] * 65537}, 422),
]


@pytest.mark.parametrize(
    ("path", "body", "status"), [c[1:] for c in BAD_ROOMS], ids=[c[0] for c in BAD_ROOMS]
)
async def test_a_malformed_room_request_is_refused_with_a_json_error(
    api: httpx.AsyncClient, path: str, body: Any, status: int
) -> None:
    response = await api.post(path, content=orjson.dumps(body))
    assert response.status_code == status
    assert response.json()["error"] == "validation_error"


@pytest.mark.parametrize("path", ["/register_dp_rank", "/query_dp_ranks"])
async def test_a_room_request_that_is_not_json_is_400(api: httpx.AsyncClient, path: str) -> None:
    response = await api.post(path, content=b"{oops")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"


async def test_an_unknown_path_is_a_json_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("wait", ["-1", "abc", "99999"])
async def test_a_bad_wait_parameter_is_422(api: httpx.AsyncClient, wait: str) -> None:
    response = await api.get("/prefill_port_table", params={"wait": wait})
    assert response.status_code == 422
    assert "wait" in response.json()["message"]


async def test_unknown_fields_within_their_bounds_are_kept_stored_and_shown(
    api: httpx.AsyncClient,
) -> None:
    extra = {"x": nested(32), "note": "n" * 15_000}
    assert (await api.put("/route", json=sglang_registration(**extra))).status_code == 200
    report = await api.get("/prefill_port_table")
    assert report.status_code == 200
    assert report.json()["cells"][0]["extra"] == extra


async def test_a_deeply_nested_unknown_field_does_not_poison_the_table(
    api: httpx.AsyncClient,
) -> None:
    poisoned = sglang_registration(attn_tp_rank=1, rank_port=41001, x=nested(300))
    assert (await api.put("/route", json=poisoned)).status_code == 422
    for tp in (0, 1):
        body = sglang_registration(attn_tp_rank=tp, rank_port=41000 + tp)
        assert (await api.put("/route", json=body)).status_code == 200
    assert (await api.get("/prefill_port_table")).status_code == 200
    assert (await api.get("/ready")).status_code == 200


async def test_a_group_past_the_cell_cap_is_422_naming_the_sizes_and_the_cap(
    api: httpx.AsyncClient,
) -> None:
    body = sglang_registration(attn_dp_size=1024, attn_tp_size=1024, pp_size=1024)
    response = await api.put("/route", json=body)
    assert response.status_code == 422
    message = response.json()["message"]
    for named in ("attn_dp_size=1024", "attn_tp_size=1024", "pp_size=1024", "16384"):
        assert named in message
    assert "--max-cells" in message
    assert (await api.get("/prefill_port_table")).json()["topology"] is None


async def test_the_cell_cap_is_configurable_and_inclusive(app_factory: Any) -> None:
    app = app_factory(max_cells=8)
    async with asgi_client(app) as client:
        at_cap = await client.put("/route", json=sglang_registration(attn_tp_size=8))
        assert at_cap.status_code == 200
    app = app_factory(max_cells=7)
    async with asgi_client(app) as client:
        past = await client.put("/route", json=sglang_registration(attn_tp_size=8))
        assert past.status_code == 422


async def test_answers_about_the_largest_group_list_a_bounded_number_of_missing_cells(
    api: httpx.AsyncClient,
) -> None:
    body = sglang_registration(attn_tp_size=16384, attn_tp_rank=16383)
    assert (await api.put("/route", json=body)).status_code == 200
    for path in ("/ready", "/prefill_port_table"):
        report = (await api.get(path)).json()
        assert len(report["missing_cells"]) == 1000
        assert report["missing_cells"][:2] == [[0, 0, 0, 0], [0, 0, 1, 0]]
        assert report["missing_count"] == 16383
    metrics = (await api.get("/metrics")).text
    assert "prefill_bootstrap_missing_cells 16383.0" in metrics


@pytest.mark.parametrize(
    ("offered", "served"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("FD00::0001", "fd00::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        (
            "prefill-0.prefill.default.svc.cluster.local",
            "prefill-0.prefill.default.svc.cluster.local",
        ),
    ],
)
async def test_ip_literals_are_served_normalised_and_host_names_as_given(
    api: httpx.AsyncClient, offered: str, served: str
) -> None:
    body = sglang_registration(attn_tp_size=1, rank_ip=offered)
    assert (await api.put("/route", json=body)).status_code == 200
    answer = await api.get("/route", params=cell_query(0, 0, 0, 0))
    assert answer.json() == {"rank_ip": served, "rank_port": 41000}
