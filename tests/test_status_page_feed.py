"""The status page on the change feed, without a browser: the page and its script are served,
the script watches ``/prefill_port_table/events`` and falls back to polling (saying which on the
page), and its event list shows each event's time, kind, cell, addresses and address version.

The list's formatting runs in Node when it is installed (the script exports its pure helpers);
tests/test_status_page.py drives the whole page in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from typing import Any

import pytest

from tests.conftest import asgi_client

NODE = shutil.which("node")
SCRIPT = resources.files("prefill_bootstrap.service") / "ui" / "app.js"


@pytest.mark.anyio
async def test_the_page_shows_the_update_mode_and_a_recent_events_list(
    app_factory: Callable[..., Any],
) -> None:
    async with asgi_client(app_factory()) as client:
        page = await client.get("/ui")
        script = await client.get("/ui/app.js")
    assert page.status_code == 200 and script.status_code == 200
    for element in ('id="mode"', 'id="events"', 'id="event-list"', "/ui/app.js"):
        assert element in page.text


def test_the_script_watches_the_event_stream_and_keeps_polling_as_its_fallback() -> None:
    script = SCRIPT.read_text()
    assert "new EventSource(EVENTS_PATH)" in script
    assert 'const EVENTS_PATH = "/prefill_port_table/events";' in script
    assert "const POLL_MS = 2000;" in script and "startPolling(" in script
    # Each fallback names its reason on the page.
    assert 'typeof EventSource === "undefined"' in script
    assert "reads need the token, which an event stream cannot send" in script
    assert "the event stream keeps failing" in script
    # Every kind on the wire has a listener (SSE named events do not reach onmessage).
    from prefill_bootstrap.shared.events import EVENT_KINDS

    listed = script.split("const EVENT_KINDS = [", 1)[1].split("];", 1)[0]
    assert json.loads(f"[{listed}]") == list(EVENT_KINDS)


def node(expression: str) -> Any:
    """Evaluate ``expression`` with the script's exports in scope as ``page``; its JSON value."""
    assert NODE is not None
    load = f"const page = require({json.dumps(str(SCRIPT))});"
    program = f"{load} console.log(JSON.stringify({expression}));"
    done = subprocess.run(
        [NODE, "-e", program],
        capture_output=True,
        text=True,
        timeout=20,
        env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def event(seq: int, kind: str, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "kind": kind, "instance_id": "g1", "incarnation": "g1",
            "at": 1_800_000_000.0 + seq, "cell": None, "address": None, "previous": None,
            "address_version": None, "detail": None, **fields}  # fmt: skip


needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


@needs_node
def test_a_move_is_listed_with_its_cell_both_addresses_and_its_address_version() -> None:
    moved = event(
        7, "moved", at=1_800_000_184.0, cell=[1, 0, 3, 0], address_version=2,
        address={"rank_ip": "10.0.1.4", "rank_port": 41107},
        previous={"rank_ip": "10.0.1.4", "rank_port": 41003},
    )  # fmt: skip
    left = event(8, "left", cell=[0, 0, 1, 0], address={"rank_ip": "fd00::2", "rank_port": 9})
    reset = event(9, "reset", detail="previous instance g0")
    shown = node(
        f"[{json.dumps(moved)}, {json.dumps(left)}, {json.dumps(reset)}].map(page.describeEvent)"
    )
    assert shown[0] == {
        "time": "08:03:04",
        "kind": "moved",
        "cell": "(dp=1, cp=0, tp=3, pp=0)",
        "addresses": "10.0.1.4:41003 -> 10.0.1.4:41107",
        "version": "v2",
    }
    assert shown[1]["addresses"] == "[fd00::2]:9" and shown[1]["version"] == ""
    assert shown[2]["cell"] == "" and shown[2]["addresses"] == "previous instance g0"


@needs_node
def test_the_list_keeps_the_newest_twenty_events_once_each() -> None:
    events = [event(seq, "registered", cell=[0, 0, seq, 0]) for seq in range(1, 31)]
    program = (
        f"(() => {{ const kept = []; const added = [];"
        f" for (const e of {json.dumps(events + events[-3:])})"
        f" added.push(page.rememberEvent(kept, e, 20));"
        f" return {{seqs: kept.map((e) => e.seq), added: added.filter(Boolean).length}}; }})()"
    )
    result = node(program)
    assert result == {"seqs": list(range(30, 10, -1)), "added": 30}


@needs_node
def test_after_a_server_restart_the_new_runs_events_are_listed_despite_reused_seqs() -> None:
    """A restarted server keeps its instance but numbers a new stream from 1: an event is told
    apart by its SSE id (``<stream>:<seq>``), not by its seq within the instance."""
    before = [{**event(seq, "registered"), "position": f"s1:{seq}"} for seq in range(1, 4)]
    after = [{**event(seq, "moved", at=1_900_000_000.0 + seq), "position": f"s2:{seq}"}
             for seq in range(1, 4)]  # fmt: skip
    program = (
        f"(() => {{ const kept = [];"
        f" const added = {json.dumps(before + after)}.map((e) => page.rememberEvent(kept, e, 20));"
        f" return {{added, kinds: kept.map((e) => e.kind)}}; }})()"
    )
    result = node(program)
    assert result == {"added": [True] * 6, "kinds": ["moved"] * 3 + ["registered"] * 3}
