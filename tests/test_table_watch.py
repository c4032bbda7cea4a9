"""``prefill-bootstrap table --watch`` in a real terminal (tmux): the grid shows the missing cell,
then redraws in place as COMPLETE once the last rank registers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from prefill_bootstrap.client.live import colourise
from tests.conftest import ServerProcess, sglang_registration

TMUX = shutil.which("tmux")


def test_the_colours_mark_missing_cells_and_the_verdict() -> None:
    text = colourise("INCOMPLETE: 1 of 2\ndp 0  1/2  10.0.0.1:41000  -- missing --\n")
    styled = {text.plain[span.start : span.end]: str(span.style) for span in text.spans}
    assert styled["-- missing --"] == "bold white on red"
    assert styled["INCOMPLETE"] == "bold red"


def capture(session: str) -> str:
    result = subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
    )
    return result.stdout


def wait_for_screen(session: str, wanted: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = capture(session)
        if wanted in screen:
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{wanted!r} never appeared on screen:\n{screen}")


@pytest.mark.timeout(60)
@pytest.mark.skipif(TMUX is None and not os.environ.get("CI"), reason="tmux is not installed")
def test_the_live_grid_redraws_in_place_when_the_table_completes(server: ServerProcess) -> None:
    httpx.put(f"{server.url}/route", json=sglang_registration(attn_tp_rank=0)).raise_for_status()
    session = f"pb-{uuid.uuid4().hex[:8]}"
    command = (
        f"{sys.executable} -m prefill_bootstrap.cli table --url {server.url} --watch --interval 0.2"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "30", command], check=True
    )
    try:
        screen = wait_for_screen(session, "INCOMPLETE")
        assert "-- missing --" in screen
        assert "10.0.0.1:41000" in screen
        httpx.put(
            f"{server.url}/route", json=sglang_registration(attn_tp_rank=1, rank_port=41001)
        ).raise_for_status()
        screen = wait_for_screen(session, "COMPLETE: 2 of 2")
        assert "-- missing --" not in screen
        assert "10.0.0.1:41001" in screen
        assert screen.count("prefill port table") == 1, "redrawn in place, not appended"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


@pytest.mark.timeout(60)
def test_watch_with_a_count_stops_by_itself(server: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefill_bootstrap.cli", "table", "--url", server.url,
         "--watch", "--interval", "0.1", "--count", "2"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no rank has registered yet" in result.stdout
