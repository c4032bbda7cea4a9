"""``wait_until_ready``: the completeness wait a rank runs, at our server or at SGLang's own.

Our server is the real app in memory. SGLang's built-in server is scripted here with the answers
its code gives (no ``/prefill_port_table``: aiohttp's 404; ``GET /route`` with all ranks -1: 503
"(N workers registered)" until complete, then the server info); tests/test_sglang_plugin.py runs
the same wait against the real SGLang class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from prefill_bootstrap.client.http import AsyncBootstrapClient, BootstrapClient
from prefill_bootstrap.client.readiness import BUILTIN_SERVER
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import (
    ConfigurationError,
    GroupReset,
    PortTableUnavailable,
    TableIncomplete,
)
from tests.conftest import sglang_registration

URL = "http://bootstrap:8998"
FAST = RetryPolicy(deadline=0.5, attempts=3, initial_backoff=0.01, max_backoff=0.05, jitter=0.0)
INFO = {
    "attn_tp_size": 2,
    "attn_cp_size": 1,
    "dp_size": 2,
    "pp_size": 1,
    "page_size": 16,
    "kv_cache_dtype": "auto",
    "follow_bootstrap_room": True,
}


def builtin_server(registered_after: list[int], expected: int = 4) -> httpx.MockTransport:
    """SGLang's built-in server whose count of registrations grows poll by poll."""
    counts = iter(registered_after)
    last = [0]

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/route":
            return httpx.Response(404, text="404: Not Found")
        last[0] = next(counts, last[0])
        if last[0] >= expected:
            return httpx.Response(200, json=INFO)
        return httpx.Response(
            503, text=f"Prefill server not fully registered yet ({last[0]} workers registered)."
        )

    return httpx.MockTransport(answer)


def test_at_our_server_the_wait_answers_once_every_cell_is_registered(
    app_factory: Callable[..., Any], blocking_transport: Callable[[Any], httpx.BaseTransport]
) -> None:
    client = BootstrapClient(URL, transport=blocking_transport(app_factory()), retry=FAST)
    for tp in (0, 1):
        client.register(sglang_registration(attn_tp_rank=tp, rank_port=41000 + tp))
    ready = client.wait_until_ready(2.0)
    assert (ready.server, ready.expected_cells, ready.registered_cells) == (
        "prefill-bootstrap",
        2,
        2,
    )


def test_at_our_server_an_incomplete_group_names_the_missing_cell(
    app_factory: Callable[..., Any], blocking_transport: Callable[[Any], httpx.BaseTransport]
) -> None:
    client = BootstrapClient(URL, transport=blocking_transport(app_factory()), retry=FAST)
    client.register(sglang_registration(attn_tp_rank=0))
    with pytest.raises(TableIncomplete) as caught:
        client.wait_until_ready(0.2)
    assert caught.value.missing == [(0, 0, 1, 0)]


POLL = 0.02


def test_at_sglangs_server_the_wait_polls_the_server_info_until_it_answers() -> None:
    client = BootstrapClient(URL, transport=builtin_server([1, 3, 4]), retry=FAST)
    ready = client.wait_until_ready(10.0, builtin_poll_interval=POLL)
    assert (ready.server, ready.expected_cells) == (BUILTIN_SERVER, 4)
    assert ready.registered_cells is None  # that server counts registrations, not cells


def test_at_sglangs_server_an_incomplete_group_says_how_many_registrations_for_how_many() -> None:
    client = BootstrapClient(URL, transport=builtin_server([3]), retry=FAST)
    with pytest.raises(TableIncomplete) as caught:
        client.wait_until_ready(0.3, expected_cells=4, builtin_poll_interval=POLL)
    error = caught.value
    assert (error.registered_count, error.expected, error.missing) == (3, 4, [])
    assert f"3 registrations for 4 cells; {BUILTIN_SERVER} does not say which" in str(error)


def test_a_token_a_header_cannot_carry_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BootstrapClient(URL, auth_token="s3cret\nX-Injected: 1")
    assert "s3cret" not in str(caught.value)


def test_the_table_of_a_server_without_one_is_a_clear_error_not_a_retry() -> None:
    client = BootstrapClient(URL, transport=builtin_server([0]), retry=FAST)
    with pytest.raises(PortTableUnavailable, match="speaks only SGLang's bootstrap protocol"):
        client.table()


@pytest.mark.anyio
async def test_the_async_client_waits_at_sglangs_server_the_same_way() -> None:
    transport = builtin_server([2, 4])

    async def answer(request: httpx.Request) -> httpx.Response:
        return transport.handle_request(request)

    async with AsyncBootstrapClient(
        URL, transport=httpx.MockTransport(answer), retry=FAST
    ) as client:
        ready = await client.wait_until_ready(10.0, builtin_poll_interval=POLL)
    assert ready.server == BUILTIN_SERVER


def test_a_reset_after_registering_is_not_mistaken_for_a_complete_group(
    app_factory: Callable[..., Any], blocking_transport: Callable[[Any], httpx.BaseTransport]
) -> None:
    transport = blocking_transport(app_factory())
    rank = BootstrapClient(URL, transport=transport, retry=FAST)
    operator = BootstrapClient(URL, transport=transport, retry=FAST)
    rank.register(sglang_registration(attn_tp_rank=0))
    httpx.Client(transport=transport, base_url=URL).delete("/prefill_port_table")
    operator.register(sglang_registration(attn_tp_size=1, attn_tp_rank=0, rank_port=42000))
    with pytest.raises(GroupReset) as caught:
        rank.wait_until_ready(2.0)
    assert caught.value.now != caught.value.registered_under
    assert "register again" in str(caught.value)


def test_a_rank_waiting_through_a_reset_registers_again_and_sees_its_group_complete(
    app_factory: Callable[..., Any], blocking_transport: Callable[[Any], httpx.BaseTransport]
) -> None:
    transport = blocking_transport(app_factory())
    rank = BootstrapClient(URL, transport=transport, retry=FAST)
    mine = sglang_registration(attn_tp_rank=0)
    rank.register(mine)
    httpx.Client(transport=transport, base_url=URL).delete("/prefill_port_table")
    BootstrapClient(URL, transport=transport, retry=FAST).register(
        sglang_registration(attn_tp_rank=1, rank_port=41001)
    )
    ready = rank.wait_as_registered([mine], 5.0)
    assert (ready.complete, ready.registered_cells) == (True, 2)
    table = rank.table()
    assert table.instance_id == ready.instance_id
    assert sorted((cell.tp, cell.rank_port) for cell in table.cells) == [(0, 41000), (1, 41001)]
