"""Long polls (``?wait=``) that wait for the group to complete, told apart from the group itself.

A waiter's answer can differ only when the group becomes complete or incomplete, or becomes a new
instance; so the waiters are woken on those changes alone, not on each registration of a storm.
"""

from __future__ import annotations

from prefill_bootstrap.service.group import PortGroup
from prefill_bootstrap.service.waiters import OnWake, Parked, Waiters
from prefill_bootstrap.shared.protocol import instance_of

__all__ = ["CompletionWaits"]


class CompletionWaits:
    def __init__(self, group: PortGroup, max_wait_seconds: float) -> None:
        self.group = group
        self.max_wait_seconds = max_wait_seconds
        self.waiters = Waiters()
        self._closing = False
        self._waited_for = self._what_waiters_wait_for()
        group.on_change(self._changed)

    def __len__(self) -> int:
        """Long polls parked right now."""
        return len(self.waiters)

    def must_wait(self, seconds: float, instance: str | None = None) -> bool:
        """Whether a long poll asking to wait ``seconds`` has anything to wait for. One about
        another ``instance`` than the group's (its rank registered before a reset) has not:
        it is answered at once, so the rank learns of the reset. An incarnation of the group's
        instance (the header a rank saw, ``<instance>.<n>``) is that instance: a move is no
        reset."""
        if self._closing or seconds <= 0 or self.max_wait_seconds <= 0:
            return False
        if instance is not None and instance_of(instance) != self.group.instance_id:
            return False
        self.group.expire_leases()  # a lease that ran out since the last sweep counts as missing
        return not self.group.table.is_complete

    async def wait_until_complete(self, seconds: float, instance: str | None = None) -> None:
        """Return once the table is complete or is a new instance, at shutdown, or after
        ``seconds`` (at most ``--max-wait``), whichever comes first."""
        if self.must_wait(seconds, instance):
            await self.waiters.wait(min(seconds, self.max_wait_seconds))

    def park_until_complete(self, seconds: float, on_wake: OnWake) -> Parked:
        """The same for a callback (the lean door): no task per waiter. Call only when
        ``must_wait(seconds)``."""
        return self.waiters.park(min(seconds, self.max_wait_seconds), on_wake)

    def release(self) -> None:
        """At shutdown: every parked long poll answers now, with the table as it stands, and
        none parks from now on (a request pipelined behind one is answered at once too)."""
        self._closing = True
        self.waiters.wake_all()

    def _what_waiters_wait_for(self) -> tuple[str, bool]:
        return self.group.instance_id, self.group.table.is_complete

    def _changed(self) -> None:
        waited_for = self._what_waiters_wait_for()
        if waited_for != self._waited_for:
            self._waited_for = waited_for
            self.waiters.wake_all()
