"""One shape per record kind: ``records.py``'s dicts are exactly what the report models dump.

``/prefill_port_table`` is built from plain dicts for speed, so these tests are what keeps the
dicts and the documented schema (``TableReport`` and its parts) from drifting apart: every field
the model declares is there, nothing else is, and validating then dumping changes nothing.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from prefill_bootstrap.service.records import (
    CELL_COLUMNS,
    cell_from_row,
    cell_row,
    cells_json,
    conflict_from_json,
    conflict_json,
    replacement_from_json,
    replacement_json,
    topology_from_json,
    topology_json,
    topology_report,
)
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.report import readiness, table_report
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import MemoryStore
from prefill_bootstrap.service.table import CellRecord, Conflict, Replacement, Topology
from prefill_bootstrap.shared.protocol import (
    Cell,
    CellReport,
    ConflictReport,
    RankAddress,
    RankRegistration,
    ReadyReport,
    ReplacementReport,
    TableReport,
    TopologyReport,
)
from tests.conftest import FakeClock, sglang_registration

A, B = RankAddress(rank_ip="10.0.0.1", rank_port=41000), RankAddress(rank_ip="::1", rank_port=9)
RECORD = CellRecord(Cell(1, 0, 2, 0), B, 1.5, 2.5, 3, {"future": [1, {"x": None}]}, 30.0, "2b")
REPLACEMENT = Replacement(Cell(1, 0, 2, 0), A, B, 3, 2.5)
CONFLICT = Conflict("page_size", 16, 32, A, Cell(0, 0, 1, 0), 4.0)
TOPOLOGY = Topology(2, 1, 4, 1, 16, "auto", {"load_balance_method": "round_robin"})


def assert_is_the_model_s_dump(model: type[BaseModel], body: dict[str, Any]) -> None:
    """Same keys in the same order, same values, as JSON: the wire bytes cannot differ."""
    dumped = model.model_validate(body).model_dump(mode="json")
    assert list(body) == list(dumped)
    assert orjson.dumps(body) == orjson.dumps(dumped)


@pytest.mark.parametrize("expired", [False, True])
def test_a_cell_is_what_cell_report_declares(expired: bool) -> None:
    [body] = cells_json([RECORD], {RECORD.cell} if expired else (), lambda _: 32.5)
    assert_is_the_model_s_dump(CellReport, body)
    assert body["state"] == ("expired" if expired else "registered")


def test_the_address_version_is_also_served_under_its_deprecated_name() -> None:
    [body] = cells_json([RECORD], (), lambda _: None)
    assert body["generation"] == RECORD.address_version == 3
    assert replacement_json(REPLACEMENT)["generation"] == 3
    assert "generation" not in replacement_json(REPLACEMENT, deprecated_alias=False)
    schema = CellReport.model_json_schema()["properties"]["generation"]
    assert schema["deprecated"] is True and "address_version" in schema["description"]


def test_a_client_reads_a_server_that_sends_only_the_old_name() -> None:
    [body] = cells_json([RECORD], (), lambda _: None)
    del body["address_version"]
    assert CellReport.model_validate(body).address_version == 3
    event = replacement_json(REPLACEMENT)
    del event["address_version"]
    assert ReplacementReport.model_validate(event).address_version == 3


def test_replacements_conflicts_and_topologies_are_what_their_models_declare() -> None:
    assert_is_the_model_s_dump(ReplacementReport, replacement_json(REPLACEMENT))
    assert_is_the_model_s_dump(ConflictReport, conflict_json(CONFLICT))
    assert_is_the_model_s_dump(TopologyReport, topology_report(TOPOLOGY))


def test_the_store_s_forms_read_back_into_the_same_records() -> None:
    assert cell_from_row(dict(zip(CELL_COLUMNS, cell_row(RECORD), strict=True))) == RECORD
    stored = replacement_json(REPLACEMENT, deprecated_alias=False)
    assert replacement_from_json(orjson.loads(orjson.dumps(stored))) == REPLACEMENT
    assert conflict_from_json(orjson.loads(orjson.dumps(conflict_json(CONFLICT)))) == CONFLICT
    assert topology_from_json(orjson.loads(orjson.dumps(topology_json(TOPOLOGY)))) == TOPOLOGY


def test_whole_reports_are_what_table_report_and_ready_report_declare() -> None:
    clock = FakeClock()
    registry = Registry.open(ServerSettings(state_dir=None), MemoryStore(), clock=clock)
    table = registry.group.table
    table.register(RankRegistration(**sglang_registration(lease_seconds=5.0)), clock())
    table.register(
        RankRegistration(**sglang_registration(rank_port=41009, lease_seconds=5.0)), clock()
    )
    with pytest.raises(Exception, match="page_size"):
        table.register(RankRegistration(**sglang_registration(page_size=32)), clock())
    clock.advance(10)
    table.expire_leases(clock())
    try:
        report = table_report(registry)
        assert report["cells"][0]["state"] == "expired" and report["conflicts"]
        assert_is_the_model_s_dump(TableReport, report)
        assert_is_the_model_s_dump(ReadyReport, readiness(registry))
    finally:
        registry.close()
