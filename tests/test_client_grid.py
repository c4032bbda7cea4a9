"""The terminal grid of ``prefill-bootstrap table``: pure rendering of a TableReport."""

from __future__ import annotations

import itertools
from typing import Any

from prefill_bootstrap.client.grid import MISSING, render_table
from prefill_bootstrap.shared.protocol import TableReport


def report(
    dp: int = 2,
    cp: int = 1,
    tp: int = 2,
    pp: int = 1,
    registered: dict[tuple[int, int, int, int], str] | None = None,
    **fields: Any,
) -> TableReport:
    """A report of a dp x cp x tp x pp group where ``registered`` maps cells to ``ip:port``."""
    registered = registered or {}
    every = list(itertools.product(range(dp), range(cp), range(tp), range(pp)))
    cells = []
    for cell, address in registered.items():
        ip, _, port = address.rpartition(":")
        cells.append(
            {
                **dict(zip(("dp", "cp", "tp", "pp"), cell, strict=True)),
                "rank_ip": ip.strip("[]"),
                "rank_port": int(port),
                "first_registered_at": 1.0,
                "last_registered_at": 1.0,
                "address_version": 1,
            }
        )
    body: dict[str, Any] = {
        "instance_id": "c0ffee",
        "complete": len(registered) == len(every),
        "topology": {
            "dp_size": dp,
            "attn_cp_size": cp,
            "attn_tp_size": tp,
            "pp_size": pp,
            "page_size": 16,
            "kv_cache_dtype": "auto",
        },
        "expected_cells": len(every),
        "registered_cells": len(registered),
        "missing_cells": [list(cell) for cell in every if cell not in registered],
        "rows": [],
        "cells": cells,
        "replacements": [],
        "conflicts": [],
        "server_info": None,
        "state": "memory",
    }
    body.update(fields)
    return TableReport.model_validate(body)


PARTIAL = report(
    registered={
        (0, 0, 0, 0): "10.0.0.1:41000",
        (0, 0, 1, 0): "10.0.0.1:41001",
        (1, 0, 0, 0): "10.0.0.2:41000",
    }
)


def test_a_partial_table_names_its_missing_cells_above_the_grid() -> None:
    text = render_table(PARTIAL, url="http://10.0.0.1:8998")
    lines = text.splitlines()
    assert lines[0] == "prefill port table at http://10.0.0.1:8998 (instance c0ffee, state memory)"
    assert lines[1] == (
        "topology: dp 2 x cp 1 x tp 2 x pp 1 = 4 cells; page_size 16, kv_cache_dtype auto"
    )
    assert lines[2] == "INCOMPLETE: 3 of 4 cells registered; missing (dp=1, cp=0, tp=1, pp=0)"


def test_each_dp_group_is_a_row_counting_its_registered_cells() -> None:
    lines = render_table(PARTIAL).splitlines()
    assert lines[-3:] == [
        "           tp0             tp1",
        "dp 0  2/2  10.0.0.1:41000  10.0.0.1:41001",
        f"dp 1  1/2  10.0.0.2:41000  {MISSING}",
    ]


def test_a_complete_table_says_so() -> None:
    full = report(tp=1, dp=1, registered={(0, 0, 0, 0): "10.0.0.1:41000"})
    assert "COMPLETE: 1 of 1 cells registered" in render_table(full)
    assert MISSING not in render_table(full)


def test_an_empty_table_says_the_topology_is_unknown() -> None:
    empty = report(topology=None, expected_cells=None, missing_cells=[], complete=False)
    text = render_table(empty)
    assert "no rank has registered yet, so the topology is unknown" in text
    assert "dp 0" not in text


def test_columns_name_cp_and_pp_only_when_the_group_uses_them() -> None:
    text = render_table(report(dp=1, cp=2, tp=1, pp=2))
    assert "cp0 tp0 pp0" in text
    assert "cp1 tp0 pp1" in text


def test_ipv6_addresses_are_bracketed_before_the_port() -> None:
    text = render_table(report(dp=1, tp=1, registered={(0, 0, 0, 0): "[fd00::1]:41000"}))
    assert "[fd00::1]:41000" in text


def test_columns_that_do_not_fit_continue_in_a_second_block_with_row_labels_repeated() -> None:
    text = render_table(report(dp=2, tp=8), width=60)
    blocks = text.split("\n\n")[1:]
    assert len(blocks) >= 2
    for block in blocks:
        rows = block.splitlines()
        assert [row[:4] for row in rows[1:]] == ["dp 0", "dp 1"]
        assert all(len(row) <= 60 for row in rows)


def test_many_missing_cells_are_summarised_with_a_count_of_the_rest() -> None:
    text = render_table(report(dp=4, tp=8))
    assert "missing (dp=0, cp=0, tp=0, pp=0)" in text
    assert "and 24 more" in text


def test_replaced_cells_show_their_address_version_and_the_latest_replacement() -> None:
    base = report(dp=1, tp=1, registered={(0, 0, 0, 0): "10.0.0.1:41009"}).model_dump()
    base["cells"][0]["address_version"] = 2
    base["replacements"] = [
        {
            "cell": (0, 0, 0, 0),
            "old": {"rank_ip": "10.0.0.1", "rank_port": 41000},
            "new": {"rank_ip": "10.0.0.1", "rank_port": 41009},
            "address_version": 2,
            "at": 2.0,
        }
    ]
    replaced = TableReport.model_validate(base)
    text = render_table(replaced)
    assert "10.0.0.1:41009 (address v2)" in text
    assert (
        "replacements: 1 (latest (dp=0, cp=0, tp=0, pp=0): 10.0.0.1:41000 -> 10.0.0.1:41009)"
        in (text)
    )


def test_refused_conflicts_are_listed_under_the_grid() -> None:
    conflict = {
        "field": "attn_tp_size",
        "established": 2,
        "offered": 4,
        "rank_ip": "10.0.0.3",
        "rank_port": 41000,
        "cell": (0, 0, 0, 0),
        "at": 3.0,
    }
    text = render_table(report(conflicts=[conflict]))
    assert (
        "conflict: 10.0.0.3:41000 offered attn_tp_size=4 for (dp=0, cp=0, tp=0, pp=0), "
        "established 2 (refused)"
    ) in text
