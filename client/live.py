"""``prefill-bootstrap table --watch``: the grid, redrawn in place as the table fills.

The grid itself is ``grid.render_table`` (plain text, tested without a terminal); this module only
colours it and redraws it with rich, so the live view and the one-shot view never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.text import Text

from prefill_bootstrap.client.grid import render_table
from prefill_bootstrap.shared.errors import BootstrapError
from prefill_bootstrap.shared.protocol import TableReport

__all__ = ["colourise", "watch_table"]

_STYLES = (
    (r"-- missing --", "bold white on red"),
    (r"\bINCOMPLETE\b", "bold red"),
    (r"\bCOMPLETE\b", "bold green"),
    (r"\(expired\)", "bold yellow"),
    (r"\(address v\d+\)", "yellow"),
    (r"^conflict:.*$", "red"),
)


def colourise(grid: str) -> Text:
    text = Text(grid)
    for pattern, style in _STYLES:
        text.highlight_regex(pattern, style)
    return text


def watch_table(
    fetch: Callable[[], TableReport],
    *,
    url: str,
    interval: float,
    count: int | None = None,
    console: Console | None = None,
) -> None:
    """Redraw every ``interval`` seconds (``count`` times, or until Ctrl-C). A server that stops
    answering is shown as such and polled again, not a reason to quit the view."""
    console = console or Console()
    drawn = 0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while count is None or drawn < count:
            try:
                view = colourise(render_table(fetch(), url=url, width=console.width))
            except BootstrapError as exc:
                view = Text(f"{url}: {exc}", style="bold red")
            stamp = Text(f"\nupdated {time.strftime('%H:%M:%S')}, every {interval:g}s (Ctrl-C)")
            live.update(Text.assemble(view, stamp), refresh=True)
            drawn += 1
            if count is None or drawn < count:
                time.sleep(interval)
