"""A store whose writes the test releases: a change caught between planning and being durable.

Apart from ``conftest.py`` on purpose: that module imports nothing of the server at load time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from prefill_bootstrap.service.store import Change, MemoryStore


class SteppedStore(MemoryStore):
    """Each write waits for a permit of its own: a test lets them finish when it chooses (a
    change caught between planning and its durable write, e.g. while a reset lands)."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)
        self.started = 0

    def write(self, changes: Sequence[Change]) -> None:
        self.started += 1
        self.permits.acquire(timeout=30)
        super().write(changes)
