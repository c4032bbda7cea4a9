"""The port table as a pure object: topology, distinct-cell readiness, replacement, conflicts."""

from __future__ import annotations

from typing import Any

import pytest

from prefill_bootstrap.service.table import Outcome, PortTable
from prefill_bootstrap.shared.errors import CellNotFound, TopologyConflict
from prefill_bootstrap.shared.protocol import Cell, RankAddress, RankRegistration
from tests.conftest import sglang_registration


def rank(**overrides: Any) -> RankRegistration:
    return RankRegistration.model_validate(sglang_registration(**overrides))


def register_all(table: PortTable, **sizes: int) -> None:
    dp_size = sizes.get("attn_dp_size", 1)
    for dp in range(dp_size):
        for tp in range(sizes.get("attn_tp_size", 2)):
            for pp in range(sizes.get("pp_size", 1)):
                table.register(
                    rank(
                        attn_dp_rank=dp, attn_tp_rank=tp, pp_rank=pp, rank_port=40000 + tp, **sizes
                    ),
                    now=1.0,
                )


def test_an_empty_table_has_no_topology_and_is_not_complete() -> None:
    table = PortTable()
    assert table.topology is None
    assert table.expected_count is None
    assert not table.is_complete
    assert table.missing_cells() == []


def test_the_first_registration_establishes_the_topology() -> None:
    table = PortTable()
    table.register(rank(attn_tp_size=4, pp_size=2, attn_dp_size=2), now=1.0)
    assert table.topology is not None
    assert table.topology.attn_tp_size == 4
    assert table.topology.pp_size == 2
    assert table.expected_count == 2 * 1 * 4 * 2


def test_the_dp_group_is_the_attention_dp_rank_when_system_dp_is_one() -> None:
    registration = rank(attn_dp_size=4, attn_dp_rank=3, system_dp_size=1, system_dp_rank=0)
    assert registration.cell == Cell(3, 0, 0, 0)
    assert registration.dp_size == 4


def test_the_dp_group_is_the_system_dp_rank_when_system_dp_is_above_one() -> None:
    registration = rank(attn_dp_size=1, attn_dp_rank=0, system_dp_size=4, system_dp_rank=2)
    assert registration.cell == Cell(2, 0, 0, 0)
    assert registration.dp_size == 4


def test_the_table_is_complete_only_when_every_cell_is_filled() -> None:
    table = PortTable()
    table.register(rank(attn_tp_rank=0), now=1.0)
    assert not table.is_complete
    assert table.missing_cells() == [Cell(0, 0, 1, 0)]
    table.register(rank(attn_tp_rank=1), now=2.0)
    assert table.is_complete
    assert table.missing_cells() == []


def test_only_the_registration_that_fills_the_last_cell_completes_the_table() -> None:
    table = PortTable()
    first = table.register(rank(attn_tp_rank=0), now=1.0)
    last = table.register(rank(attn_tp_rank=1), now=2.0)
    again = table.register(rank(attn_tp_rank=1), now=3.0)
    moved = table.register(rank(attn_tp_rank=0, rank_port=41009), now=4.0)
    assert [first.completed, last.completed, again.completed, moved.completed] == [
        False,
        True,
        False,
        False,
    ]


def test_an_expired_cell_registering_again_completes_the_table_again() -> None:
    table = PortTable()
    table.register(rank(attn_tp_rank=0), now=1.0)
    table.register(rank(attn_tp_rank=1, lease_seconds=5.0), now=1.0)
    assert table.expire_leases(now=10.0) == [Cell(0, 0, 1, 0)]
    assert table.register(rank(attn_tp_rank=1, lease_seconds=5.0), now=11.0).completed


def test_registering_the_same_cell_twice_never_counts_twice() -> None:
    table = PortTable()
    table.register(rank(attn_tp_rank=0), now=1.0)
    table.register(rank(attn_tp_rank=0), now=2.0)
    assert table.registered_count == 1
    assert not table.is_complete


def test_a_re_registration_with_the_same_address_changes_nothing_but_the_time() -> None:
    table = PortTable()
    table.register(rank(), now=1.0)
    done = table.register(rank(), now=5.0)
    assert done.outcome is Outcome.SAME
    assert done.record.address_version == 1
    assert done.record.first_registered_at == 1.0
    assert done.record.last_registered_at == 5.0
    assert list(table.replacements) == []


def test_a_re_registration_with_a_new_address_replaces_it_and_bumps_the_address_version() -> None:
    table = PortTable()
    table.register(rank(rank_port=41000), now=1.0)
    done = table.register(rank(rank_port=41002), now=2.0)
    assert done.outcome is Outcome.REPLACED
    assert done.previous == RankAddress(rank_ip="10.0.0.1", rank_port=41000)
    assert table.lookup(Cell(0, 0, 0, 0)).address.rank_port == 41002
    assert table.lookup(Cell(0, 0, 0, 0)).address_version == 2
    [replacement] = table.replacements
    assert (replacement.old.rank_port, replacement.new.rank_port) == (41000, 41002)


@pytest.mark.parametrize(
    ("field", "established", "offered"),
    [
        ("attn_tp_size", 2, 4),
        ("attn_cp_size", 1, 2),
        ("pp_size", 1, 2),
        ("page_size", 16, 32),
        ("kv_cache_dtype", "auto", "fp8_e5m2"),
        ("decode_allocation_policy", "early", "late"),
    ],
)
def test_a_contradicting_topology_is_refused_and_leaves_the_table_unchanged(
    field: str, established: Any, offered: Any
) -> None:
    table = PortTable()
    table.register(rank(**{field: established}), now=1.0)
    before = table.snapshot()
    with pytest.raises(TopologyConflict) as caught:
        table.register(rank(attn_tp_rank=1, **{field: offered}), now=2.0)
    assert (caught.value.field, caught.value.established, caught.value.offered) == (
        field,
        established,
        offered,
    )
    assert table.snapshot().cells == before.cells
    assert table.snapshot().topology == before.topology
    assert [c.field for c in table.conflicts] == [field]


def test_a_dp_size_conflict_names_dp_size() -> None:
    table = PortTable()
    table.register(rank(attn_dp_size=2), now=1.0)
    with pytest.raises(TopologyConflict, match="dp_size=4 contradicts the established dp_size=2"):
        table.register(rank(attn_dp_size=4), now=2.0)


def test_an_unknown_page_size_is_filled_by_the_first_rank_that_knows_it() -> None:
    table = PortTable()
    table.register(rank(page_size=None, kv_cache_dtype=None), now=1.0)
    table.register(rank(attn_tp_rank=1, page_size=64, kv_cache_dtype="bf16"), now=2.0)
    assert table.topology is not None
    assert (table.topology.page_size, table.topology.kv_cache_dtype) == (64, "bf16")


def test_looking_up_an_unregistered_cell_raises_cell_not_found() -> None:
    table = PortTable()
    table.register(rank(), now=1.0)
    with pytest.raises(CellNotFound, match=r"\(dp=0, cp=0, tp=1, pp=0\)"):
        table.lookup(Cell(0, 0, 1, 0))


def test_missing_cells_are_listed_in_dp_cp_tp_pp_order() -> None:
    table = PortTable()
    table.register(rank(attn_dp_size=2, attn_tp_size=2, pp_size=2, attn_tp_rank=1), now=1.0)
    missing = table.missing_cells()
    assert len(missing) == 7
    assert missing == sorted(missing)
    assert Cell(0, 0, 1, 0) not in missing


def test_row_counts_cover_every_dp_group_even_empty_ones() -> None:
    table = PortTable()
    table.register(rank(attn_dp_size=3, attn_dp_rank=1), now=1.0)
    assert table.row_counts() == {0: 0, 1: 1, 2: 0}


def test_server_info_carries_the_base_keys_and_only_the_optional_keys_registrations_carried() -> (
    None
):
    old_release = {
        key: value
        for key, value in sglang_registration().items()
        if key
        not in (
            "kv_layout",
            "dsv41_spec_layout",
            "enable_dsa_cache_layer_split",
            "enable_kv_cache_sharding",
            "prefill_http_port",
            "decode_allocation_policy",
            "load_balance_method",
        )
    }
    table = PortTable()
    table.register(RankRegistration.model_validate(old_release), now=1.0)
    assert table.server_info() == {
        "attn_tp_size": 2,
        "attn_cp_size": 1,
        "dp_size": 1,
        "pp_size": 1,
        "page_size": 16,
        "kv_cache_dtype": "auto",
        "follow_bootstrap_room": True,
    }


def test_server_info_of_a_current_release_matches_sglang_0_5_23() -> None:
    table = PortTable()
    table.register(rank(), now=1.0)
    assert table.server_info() == {
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


def test_follow_bootstrap_room_is_true_when_the_method_says_so() -> None:
    table = PortTable()
    table.register(rank(load_balance_method="follow_bootstrap_room"), now=1.0)
    assert table.server_info()["follow_bootstrap_room"] is True  # type: ignore[index]


def test_unknown_registration_fields_are_kept_on_the_cell() -> None:
    table = PortTable()
    done = table.register(rank(shiny_new_field={"x": 1}), now=1.0)
    assert done.record.extra == {"shiny_new_field": {"x": 1}}


def test_every_change_bumps_the_version() -> None:
    table = PortTable()
    versions = [table.version]
    table.register(rank(), now=1.0)
    versions.append(table.version)
    table.register(rank(), now=2.0)
    versions.append(table.version)
    assert versions == sorted(set(versions))


def test_a_snapshot_restores_an_equal_table() -> None:
    table = PortTable()
    register_all(table, attn_tp_size=2, pp_size=2)
    table.register(rank(pp_size=2, rank_port=45000), now=3.0)
    restored = PortTable.restore(table.snapshot())
    assert restored.snapshot() == table.snapshot()
    assert restored.is_complete


def test_a_planned_registration_is_served_only_once_committed() -> None:
    table = PortTable()
    planned = table.plan(rank(attn_tp_rank=0), now=1.0)
    assert table.topology is None and table.registered_count == 0
    assert table.in_flight == 1
    done = table.commit(planned)
    assert done.topology_changed and table.lookup(Cell(0, 0, 0, 0)) == done.record
    assert table.in_flight == 0


def test_an_abandoned_plan_leaves_nothing_behind() -> None:
    table = PortTable()
    table.abandon(table.plan(rank(attn_tp_rank=0), now=1.0))
    assert table.topology is None and table.registered_count == 0 and table.in_flight == 0
    again = table.plan(rank(attn_tp_rank=0), now=2.0)
    assert again.topology_changed and again.outcome is Outcome.NEW


def test_a_plan_in_flight_establishes_the_topology_for_the_plans_behind_it() -> None:
    table = PortTable()
    table.plan(rank(attn_tp_size=2, attn_tp_rank=0), now=1.0)
    with pytest.raises(TopologyConflict):
        table.plan(rank(attn_tp_size=4, attn_tp_rank=1), now=1.0)


def test_a_state_stored_without_its_topology_heals_on_the_next_registration() -> None:
    """Servers before issue 17's fix could store cells but lose the topology for good."""
    from prefill_bootstrap.service.table import Snapshot

    old = PortTable()
    for tp in range(3):
        old.register(rank(attn_tp_size=4, attn_tp_rank=tp, rank_port=41000 + tp), now=1.0)
    table = PortTable.restore(Snapshot(None, old.snapshot().cells))
    assert table.expected_count is None and not table.is_complete
    done = table.register(rank(attn_tp_size=4, attn_tp_rank=3, rank_port=41003), now=2.0)
    assert done.topology_changed and done.completed
    assert table.missing_cells() == [] and table.missing_count == 0


def test_a_lease_renewed_after_it_expired_expires_again_when_it_runs_out_again() -> None:
    table = PortTable()
    leased = rank(attn_tp_rank=1, rank_port=40001, lease_seconds=5.0)
    table.register(rank(attn_tp_rank=0), now=0.0)
    table.register(leased, now=0.0)
    assert table.expire_leases(now=4.9) == []
    assert table.expire_leases(now=5.0) == [Cell(0, 0, 1, 0)]
    table.renew(Cell(0, 0, 1, 0), RankAddress(rank_ip=leased.rank_ip, rank_port=40001), now=6.0)
    assert table.is_complete
    assert table.expire_leases(now=10.9) == []
    assert table.expire_leases(now=11.0) == [Cell(0, 0, 1, 0)]


def test_renewals_keep_a_lease_alive_however_often_expiry_is_checked() -> None:
    table = PortTable()
    leased = rank(attn_tp_rank=1, rank_port=40001, lease_seconds=3.0)
    table.register(rank(attn_tp_rank=0), now=0.0)
    table.register(leased, now=0.0)
    address = RankAddress(rank_ip=leased.rank_ip, rank_port=40001)
    for second in range(1, 30):
        table.renew(Cell(0, 0, 1, 0), address, now=float(second))
        assert table.expire_leases(now=second + 2.9) == []
    assert table.expire_leases(now=32.0) == [Cell(0, 0, 1, 0)]
