"""Fuzzing: generated requests against the server's own OpenAPI schema, and generated
registration sequences against the pure table. No input may produce a 5xx, every 4xx outside
SGLang's fixed texts has the JSON error shape, and the table's invariants always hold."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import MemoryStore
from prefill_bootstrap.service.table import PortTable
from prefill_bootstrap.shared.errors import TopologyConflict
from prefill_bootstrap.shared.protocol import RankRegistration

EXAMPLES_PER_OPERATION = 300
SGLANG_TEXT_ERRORS = (b"Missing inputs for bootstrap server.", b"Prefill server not fully", b"Boot")

fuzzed_app = create_app(ServerSettings(state_dir=None, max_wait_seconds=0), MemoryStore())
schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
requests_sent = {"count": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_request_count() -> Any:
    yield
    count = requests_sent["count"]
    if count:
        assert count >= 2000, f"only {count} generated requests were sent"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_generated_request_gets_a_server_error(case: schemathesis.Case) -> None:
    response = case.call()
    requests_sent["count"] += 1
    not_ready = response.status_code == 503 and case.path in ("/ready", "/route")
    assert response.status_code < 500 or not_ready, (case.method, case.path, response.text)
    if 400 <= response.status_code < 500 and not response.content.startswith(SGLANG_TEXT_ERRORS):
        body = response.json()
        assert set(body) == {"error", "message", "details"}, body
        assert body["message"]


sizes = st.integers(min_value=1, max_value=3)


@st.composite
def registrations(draw: st.DrawFn) -> dict[str, Any]:
    tp_size, pp_size, dp_size = draw(sizes), draw(sizes), draw(sizes)
    return {
        "attn_tp_size": tp_size,
        "attn_tp_rank": draw(st.integers(0, tp_size - 1)),
        "attn_cp_size": 1,
        "attn_cp_rank": 0,
        "attn_dp_size": dp_size,
        "attn_dp_rank": draw(st.integers(0, dp_size - 1)),
        "pp_size": pp_size,
        "pp_rank": draw(st.integers(0, pp_size - 1)),
        "system_dp_size": 1,
        "system_dp_rank": 0,
        "rank_ip": draw(st.sampled_from(["10.0.0.1", "10.0.0.2", "fe80::1"])),
        "rank_port": draw(st.integers(1, 65535)),
        "page_size": draw(st.sampled_from([None, 16, 64])),
        "kv_cache_dtype": draw(st.sampled_from([None, "auto", "fp8_e4m3"])),
    }


@given(st.lists(registrations(), min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_the_table_invariants_hold_for_any_registration_sequence(
    sequence: list[dict[str, Any]],
) -> None:
    table = PortTable()
    for now, body in enumerate(sequence):
        before = table.snapshot()
        try:
            table.register(RankRegistration.model_validate(body), now=float(now))
        except TopologyConflict:
            after = table.snapshot()
            assert (after.topology, after.cells) == (before.topology, before.cells)
        records = table.records()
        assert table.registered_count == len(records) == len({r.cell for r in records})
        expected = table.expected_count
        assert expected is not None
        assert table.registered_count + len(table.missing_cells()) == expected
        assert table.is_complete == (not table.missing_cells())
        assert all(record.address_version >= 1 for record in records)
