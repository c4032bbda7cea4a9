"""The port table as a terminal grid: one row per dp group, one column per (cp, tp, pp).

Pure rendering of a ``TableReport`` into plain text, so it is tested without a terminal and needs
no dependency. A hole in the table is the whole point of looking, so missing cells are spelled
out in the grid and listed by name above it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from prefill_bootstrap.client.addresses import format_host
from prefill_bootstrap.shared.errors import format_cell
from prefill_bootstrap.shared.protocol import Cell, CellReport, TableReport, TopologyReport

__all__ = ["MISSING", "render_table"]

MISSING = "-- missing --"
_GAP = "  "
_LISTED = 8


def _column_label(cp: int, tp: int, pp: int, topology: TopologyReport) -> str:
    parts = []
    if topology.attn_cp_size > 1:
        parts.append(f"cp{cp}")
    parts.append(f"tp{tp}")
    if topology.pp_size > 1:
        parts.append(f"pp{pp}")
    return " ".join(parts)


def _cell_text(cell: CellReport | None) -> str:
    if cell is None:
        return MISSING
    text = f"{format_host(cell.rank_ip)}:{cell.rank_port}"
    if cell.address_version > 1:
        text += f" (address v{cell.address_version})"
    if cell.state == "expired":
        text += " (expired)"
    return text


def _listed(cells: Iterable[Cell], total: int) -> str:
    shown = [format_cell(cell) for cell in itertools.islice(cells, _LISTED)]
    more = f" and {total - _LISTED} more" if total > _LISTED else ""
    return ", ".join(shown) + more


def _header(report: TableReport, url: str | None) -> list[str]:
    where = f" at {url}" if url else ""
    lines = [f"prefill port table{where} (instance {report.instance_id}, state {report.state})"]
    topology = report.topology
    if topology is None:
        lines.append("no rank has registered yet, so the topology is unknown")
        return lines
    lines.append(
        f"topology: dp {topology.dp_size} x cp {topology.attn_cp_size} x tp "
        f"{topology.attn_tp_size} x pp {topology.pp_size} = {report.expected_cells} cells; "
        f"page_size {topology.page_size}, kv_cache_dtype {topology.kv_cache_dtype}"
    )
    counts = f"{report.registered_cells} of {report.expected_cells} cells registered"
    if report.complete:
        lines.append(f"COMPLETE: {counts}")
    else:
        missing = report.missing_cells
        lines.append(f"INCOMPLETE: {counts}; missing {_listed(missing, len(missing))}")
    return lines


def _grid(report: TableReport, topology: TopologyReport, width: int) -> list[str]:
    by_cell = {cell.cell: cell for cell in report.cells}
    columns = list(
        itertools.product(
            range(topology.attn_cp_size), range(topology.attn_tp_size), range(topology.pp_size)
        )
    )
    per_row = len(columns)
    labels = {}
    texts: dict[tuple[int, int], str] = {}
    for dp in range(topology.dp_size):
        filled = 0
        for index, (cp, tp, pp) in enumerate(columns):
            cell = by_cell.get(Cell(dp, cp, tp, pp))
            filled += int(cell is not None and cell.state == "registered")
            texts[dp, index] = _cell_text(cell)
        labels[dp] = f"dp {dp}  {filled}/{per_row}"
    label_width = max(len(label) for label in labels.values())
    widths = [
        max(len(_column_label(*column, topology)), *(len(texts[dp, i]) for dp in labels))
        for i, column in enumerate(columns)
    ]

    chunks: list[list[int]] = [[]]
    used = label_width
    for index, column_width in enumerate(widths):
        if chunks[-1] and used + len(_GAP) + column_width > width:
            chunks.append([])
            used = label_width
        chunks[-1].append(index)
        used += len(_GAP) + column_width

    lines: list[str] = []
    for chunk in chunks:
        heads = [_column_label(*columns[i], topology).ljust(widths[i]) for i in chunk]
        lines.append("")
        lines.append((" " * label_width + _GAP + _GAP.join(heads)).rstrip())
        for dp, label in labels.items():
            row = [texts[dp, i].ljust(widths[i]) for i in chunk]
            lines.append((label.ljust(label_width) + _GAP + _GAP.join(row)).rstrip())
    return lines


def _events(report: TableReport) -> list[str]:
    lines = []
    if report.expired_cells:
        expired = report.expired_cells
        lines.append(f"expired leases: {_listed(expired, len(expired))}")
    if report.replacements:
        latest = report.replacements[-1]
        lines.append(
            f"replacements: {len(report.replacements)} (latest {format_cell(latest.cell)}: "
            f"{format_host(latest.old.rank_ip)}:{latest.old.rank_port} -> "
            f"{format_host(latest.new.rank_ip)}:{latest.new.rank_port})"
        )
    for conflict in report.conflicts[-5:]:
        lines.append(
            f"conflict: {format_host(conflict.rank_ip)}:{conflict.rank_port} offered "
            f"{conflict.field}={conflict.offered!r} for {format_cell(conflict.cell)}, established "
            f"{conflict.established!r} (refused)"
        )
    if len(report.conflicts) > 5:
        lines.append(f"... and {len(report.conflicts) - 5} earlier conflicts")
    return lines


def render_table(report: TableReport, *, url: str | None = None, width: int = 100) -> str:
    """The whole report as text: a summary naming missing cells, then the grid, then events.

    Columns that do not fit in ``width`` characters continue in a second block, row labels
    repeated, rather than wrapping mid-row.
    """
    lines = _header(report, url)
    if report.topology is not None:
        lines.extend(_grid(report, report.topology, width))
    events = _events(report)
    if events:
        lines.append("")
        lines.extend(events)
    return "\n".join(lines) + "\n"
