"""A configured token guards every write (and reads on request); nothing changes without it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import asgi_client, sglang_registration

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"
GOOD = {"authorization": f"Bearer {TOKEN}"}

WRITES = [
    ("PUT", "/route", sglang_registration()),
    ("POST", "/register_dp_rank", {"bootstrap_room": 1, "dp_rank": 0}),
    ("POST", "/heartbeat", {"dp": 0, "cp": 0, "tp": 0, "pp": 0, "rank_ip": "a", "rank_port": 1}),
    ("DELETE", "/prefill_port_table", None),
    ("POST", "/deregister", {"dp": 0, "cp": 0, "tp": 1, "pp": 0, "rank_ip": "10.0.0.1",
                             "rank_port": 41000}),
]  # fmt: skip
READS = [
    ("GET", "/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1"),
    ("GET", "/ready"),
    ("GET", "/prefill_port_table"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[w[1] for w in WRITES])
@pytest.mark.parametrize("offered", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
async def test_a_write_without_the_right_token_is_401_and_changes_nothing(
    app_factory: Callable[..., Any], method: str, path: str, body: Any, offered: str | None
) -> None:
    app = app_factory(auth_token=TOKEN)
    headers = {"authorization": offered} if offered else {}
    async with asgi_client(app) as client:
        await client.put("/route", json=sglang_registration(attn_tp_rank=1), headers=GOOD)
        before = (await client.get("/prefill_port_table")).json()
        response = await client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
        assert "Authorization: Bearer" in response.json()["message"]
        assert (await client.get("/prefill_port_table")).json() == before
        rooms = await client.post("/query_dp_ranks", json={"bootstrap_rooms": [1]})
        assert rooms.json() == {}


async def test_a_write_with_the_token_succeeds(app_factory: Callable[..., Any]) -> None:
    app = app_factory(auth_token=TOKEN)
    async with asgi_client(app, **GOOD) as client:
        assert (await client.put("/route", json=sglang_registration())).status_code == 200
        response = await client.post("/register_dp_rank", json={"bootstrap_room": 1, "dp_rank": 0})
        assert response.status_code == 200


@pytest.mark.parametrize(("method", "path"), READS, ids=[r[1] for r in READS])
async def test_reads_stay_open_by_default_so_unmodified_decoders_work(
    app_factory: Callable[..., Any], method: str, path: str
) -> None:
    app = app_factory(auth_token=TOKEN)
    async with asgi_client(app) as client:
        response = await client.request(method, path)
        assert response.status_code != 401


@pytest.mark.parametrize(("method", "path"), READS, ids=[r[1] for r in READS])
async def test_reads_need_the_token_when_auth_reads_is_on(
    app_factory: Callable[..., Any], method: str, path: str
) -> None:
    app = app_factory(auth_token=TOKEN, auth_reads=True)
    async with asgi_client(app) as client:
        assert (await client.request(method, path)).status_code == 401
        assert (await client.request(method, path, headers=GOOD)).status_code != 401


async def test_health_stays_open_for_probes_even_with_auth_reads(
    app_factory: Callable[..., Any],
) -> None:
    app = app_factory(auth_token=TOKEN, auth_reads=True)
    async with asgi_client(app) as client:
        assert (await client.get("/health")).status_code == 200


async def test_without_a_configured_token_writes_are_open(app_factory: Callable[..., Any]) -> None:
    app = app_factory()
    async with asgi_client(app) as client:
        assert (await client.put("/route", json=sglang_registration())).status_code == 200


async def test_the_token_never_appears_in_the_logs(
    app_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    app = app_factory(auth_token=TOKEN)
    caplog.set_level("DEBUG")
    async with asgi_client(app) as client:
        await client.put(
            "/route", json=sglang_registration(), headers={"authorization": "Bearer x"}
        )
        await client.put("/route", json=sglang_registration(), headers=GOOD)
    assert "Refused PUT /route" in caplog.text
    assert TOKEN not in caplog.text


def test_the_settings_never_show_the_token() -> None:
    from prefill_bootstrap.service import ServerSettings

    settings = ServerSettings(auth_token=TOKEN)
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings.model_dump())


def test_sglangs_proposed_environment_variable_sets_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefill_bootstrap.service import ServerSettings

    monkeypatch.delenv("PREFILL_BOOTSTRAP_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN", "from-sglang")
    token = ServerSettings().auth_token
    assert token is not None and token.get_secret_value() == "from-sglang"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive(
    app_factory: Callable[..., Any], scheme: str
) -> None:
    app = app_factory(auth_token=TOKEN)
    async with asgi_client(app, authorization=f"{scheme} {TOKEN}") as client:
        assert (await client.put("/route", json=sglang_registration())).status_code == 200
    async with asgi_client(app, authorization=f"{scheme} {TOKEN}x") as client:
        assert (await client.put("/route", json=sglang_registration())).status_code == 401
