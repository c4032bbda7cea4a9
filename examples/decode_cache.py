"""A decode-side cache of prefill addresses that drops exactly what went stale.

A decode worker looks up ``rank_ip:rank_port`` per prefill cell and keeps it: asking the bootstrap
server on every request would put it on the hot path. The danger is a cached address of a rank
that moved or left. This cache follows the server's change feed and forgets:

- the one cell of a ``moved`` or ``left`` event (the next request looks it up again);
- everything on a ``reset`` (a new group) or a ``Resynced`` (events were missed, so any entry may
  be stale).

Registrations, expiries, renewals and completeness changes leave cached addresses right, so they
invalidate nothing. ``incarnation`` follows the server's ``X-SGLang-Disaggregation-Instance-ID``:
a decode that also compares that header on its own answers sees the same moments.

Run it against a server to watch it work (Ctrl-C to stop)::

    python examples/decode_cache.py --url http://127.0.0.1:8998
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Iterable

from prefill_bootstrap.client import BootstrapClient, Resynced
from prefill_bootstrap.shared.events import TableEvent
from prefill_bootstrap.shared.protocol import Cell, RankAddress

log = logging.getLogger("decode_cache")

STALE_KINDS = frozenset({"moved", "left"})
"""Events after which one cell's cached address is wrong."""


class DecodeCache:
    """``cell -> "rank_ip:rank_port"``, filled on demand by ``lookup``, emptied by ``apply``.
    Thread-safe: requests read it while the watch thread invalidates it."""

    def __init__(self, lookup: Callable[[Cell], RankAddress]) -> None:
        self._lookup = lookup
        self._addresses: dict[Cell, str] = {}
        self._lock = threading.Lock()
        self._invalidations = 0
        """Bumped by every drop: a lookup that was in flight across one may hold a stale answer."""
        self.incarnation: str | None = None

    def address(self, cell: Cell) -> str:
        with self._lock:
            cached = self._addresses.get(cell)
            invalidations = self._invalidations
        if cached is not None:
            return cached
        found = self._lookup(cell)
        address = f"{found.rank_ip}:{found.rank_port}"
        with self._lock:
            if self._invalidations == invalidations:  # else the answer may predate a move
                self._addresses[cell] = address
        return address

    def cached(self) -> dict[Cell, str]:
        with self._lock:
            return dict(self._addresses)

    def apply(self, item: TableEvent | Resynced) -> list[Cell] | None:
        """Forget what ``item`` made stale: the cells dropped, or None when everything was."""
        self.incarnation = item.incarnation
        if isinstance(item, Resynced) or item.kind == "reset":
            with self._lock:
                self._addresses.clear()
                self._invalidations += 1
            return None
        if item.kind not in STALE_KINDS or item.cell is None:
            return []
        cell = Cell(*item.cell)
        with self._lock:
            dropped = self._addresses.pop(cell, None)
            self._invalidations += 1
        return [cell] if dropped is not None else []

    def follow(self, items: Iterable[TableEvent | Resynced]) -> None:
        """Apply every item of a watch (``client.watch(...)``), logging what was dropped."""
        for item in items:
            dropped = self.apply(item)
            if dropped is None:
                log.info("%s: dropped every cached address", _why(item))
            elif dropped:
                log.info("%s: dropped the cached address of %s", _why(item), dropped[0])


def _why(item: TableEvent | Resynced) -> str:
    return f"resynced ({item.reason})" if isinstance(item, Resynced) else item.kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8998")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with BootstrapClient(args.url) as client:
        cache = DecodeCache(lambda cell: client.lookup(*cell))
        table = client.table()  # read, then watch from the table's position: nothing missed
        since = f"{table.stream}:{table.seq}" if table.stream is not None else None
        for cell in table.cells:
            cache.address(cell.cell)
        log.info("cached %d addresses; watching %s", len(cache.cached()), client.base_url)
        cache.follow(client.watch(since=since))


if __name__ == "__main__":
    main()
