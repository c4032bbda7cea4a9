"""Long polls parked until the table completes: woken together, once, not on every change.

A start-up storm makes thousands of changes while thousands of ranks wait for the last one.
Waking every waiter on every change (an ``asyncio.Event`` per change) cost O(waiters x changes)
wake-ups, and each woken waiter rebuilt its answer. Here a parked waiter is a callback and a
timer in a dict; the registry wakes them all only when what they wait for can have changed (the
table became complete, or the group's instance changed), or at shutdown. The lean door's
callback writes the shared, already serialised answer straight to its socket: no task, no
coroutine, so the first rank hears within a few writes of the change.

Waking starts on the next event-loop turn (the change that woke them is answered first) and runs
in slices of at most ``WAKE_SLICE`` waiters or ``WAKE_SLICE_BYTES`` of answers per turn, so a
registration or a ``/health`` arriving meanwhile waits for one slice, not for every waiter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["WAKE_SLICE", "WAKE_SLICE_BYTES", "OnWake", "Parked", "Waiters"]

log = logging.getLogger(__name__)

WAKE_SLICE = 256
"""Most waiters answered per event-loop turn when the table completes."""
WAKE_SLICE_BYTES = 4 << 20
"""Most answer bytes written per turn (4096 waiters of a 1 MB table would be 4 GB)."""

OnWake = Callable[[], int | None]
"""A waiter's callback; it may return the bytes it wrote, which pace the slices."""


class Parked:
    """One parked long poll: its callback runs once, woken or at its deadline, unless
    cancelled first (its client went away)."""

    __slots__ = ("_on_wake", "_timer", "_waiters")

    def __init__(self, waiters: Waiters, on_wake: OnWake) -> None:
        self._waiters = waiters
        self._on_wake: OnWake | None = on_wake
        self._timer: asyncio.TimerHandle | None = None

    def run_now(self) -> None:
        """Run its callback now, as if woken."""
        self._run()

    def cancel(self) -> None:
        """Forget it without running its callback."""
        self._on_wake = None
        self._disarm()

    def _run(self) -> int:
        on_wake, self._on_wake = self._on_wake, None
        self._disarm()
        return (on_wake() or 0) if on_wake is not None else 0

    def _disarm(self) -> None:
        self._waiters._parked.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Waiters:
    """The parked long polls of one server (the registry owns it)."""

    def __init__(self) -> None:
        self._parked: dict[Parked, None] = {}  # insertion-ordered: first parked, first answered

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, seconds: float, on_wake: OnWake) -> Parked:
        """Run ``on_wake`` when woken or after ``seconds``, whichever comes first."""
        parked = Parked(self, on_wake)
        parked._timer = asyncio.get_running_loop().call_later(seconds, parked._run)
        self._parked[parked] = None
        return parked

    async def wait(self, seconds: float) -> None:
        """The same for a coroutine (the FastAPI routes): return when woken or after
        ``seconds``; cancelling the coroutine unparks it."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        parked = self.park(seconds, wake)
        try:
            await woken
        finally:
            parked.cancel()

    def wake_all(self) -> int:
        """Answer every waiter parked now, a slice per loop turn; how many there were. Waiters
        parking after this call wait for the next change."""
        batch, self._parked = list(self._parked), {}
        if batch:
            asyncio.get_running_loop().call_soon(_wake_slices, batch, 0)
        return len(batch)


def _wake_slices(batch: list[Parked], start: int) -> None:
    end, written = start, 0
    while end < len(batch) and end - start < WAKE_SLICE and written < WAKE_SLICE_BYTES:
        try:
            written += batch[end]._run()
        except Exception:  # one waiter's failure must not leave the others parked
            log.exception("Answering a parked long poll failed.")
        end += 1
    if end < len(batch):
        asyncio.get_running_loop().call_soon(_wake_slices, batch, end)
