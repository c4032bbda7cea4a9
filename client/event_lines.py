"""What ``prefill-bootstrap watch`` prints for each item of a watch: one readable line, or one
JSON object per line for scripts.

Apart from the command so the wording is tested without a server, and so other tools (the example
decode cache's log lines) can say it the same way.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefill_bootstrap.client.feed import Resynced, WatchItem
from prefill_bootstrap.shared.errors import format_address, format_cell
from prefill_bootstrap.shared.events import TableEvent
from prefill_bootstrap.shared.protocol import RankAddress

__all__ = ["as_json_line", "describe"]


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _address(address: RankAddress | None) -> str:
    return format_address(address.rank_ip, address.rank_port) if address is not None else "?"


def _event(event: TableEvent) -> str:
    kind = event.kind
    if event.cell is None:  # the whole table: complete, incomplete, reset
        if kind == "reset":
            previous = f" ({event.detail})" if event.detail else ""
            return f"reset new instance {event.instance_id}{previous}"
        return f"{kind} ({event.detail})" if event.detail else kind
    where = f"{kind} {format_cell(event.cell)}"
    version = f" (address v{event.address_version})" if event.address_version else ""
    if kind == "moved":
        return f"{where} {_address(event.previous)} -> {_address(event.address)}{version}"
    if kind == "registered":
        return f"{where} {_address(event.address)}{version}"
    if kind == "conflict":
        detail = f": {event.detail}" if event.detail else ""
        return f"{where} {_address(event.address)} refused{detail}"
    return f"{where} {_address(event.address)}"  # expired, renewed, left


def _resynced(item: Resynced) -> str:
    table = item.table
    expected = table.expected_cells if table.expected_cells is not None else "?"
    state = "complete" if table.complete else "incomplete"
    return (
        f"resynced ({item.reason.replace('_', ' ')}): instance {item.instance_id} (incarnation "
        f"{item.incarnation}), {table.registered_cells}/{expected} cells, {state}; watching from "
        f"{item.position}"
    )


def describe(item: WatchItem) -> str:
    """``12:03:04 moved (dp=1, cp=0, tp=3, pp=0) 10.0.1.4:41003 -> 10.0.1.4:41107 (address v2)``:
    local time, the kind, the cell and the addresses."""
    if isinstance(item, Resynced):
        return f"{_clock(item.at)} {_resynced(item)}"
    return f"{_clock(item.at)} {_event(item)}"


def as_json_line(item: WatchItem) -> str:
    """An event exactly as the server sent it (its wire JSON); a resync as ``{"kind": "resync",
    "reason", "instance_id", "incarnation", "stream", "seq", "at", "table"}``."""
    if isinstance(item, TableEvent):
        return item.model_dump_json()
    body: dict[str, Any] = {
        "kind": "resync",
        "reason": item.reason,
        "instance_id": item.instance_id,
        "incarnation": item.incarnation,
        "stream": item.stream,
        "seq": item.seq,
        "at": item.at,
        "table": item.table.model_dump(mode="json"),
    }
    return json.dumps(body, separators=(",", ":"))
