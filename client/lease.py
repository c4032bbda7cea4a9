"""Keep a leased registration alive: a background thread that heartbeats until stopped.

A rank that registers with ``lease_seconds`` must renew its cell, or the server counts it as
missing (a crashed rank then shows up as a hole instead of a stale address). Heartbeats go out
three times per lease so one lost beat never expires the cell. If the server forgot the cell (a
reset), the keeper registers it again; if another address holds it now (this rank was replaced),
the keeper stops: renewing would be wrong and re-registering would steal the cell back.

A rank that goes away cleanly also leaves the table (``POST /deregister``), so decodes and
watchers learn at once instead of after the lease runs out: ``leave()``, the keeper's ``with``
block ending without an exception, ``stop_all_lease_keepers(deregister=True)``, and the
interpreter exiting normally (``sys.exit`` included). Not on a crash: an exception that ends the
interpreter or the ``with`` block, a signal that kills the process, a keeper stopped because
another address holds the cell. Then the lease expires as before. Leaving is best effort and
bounded (``LEAVE_SECONDS`` in all at exit), so a dead server never holds up a shutdown.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from typing import Any

from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.shared.errors import BootstrapError, CellNotFound, RequestRejected
from prefill_bootstrap.shared.protocol import RankRegistration

__all__ = ["LEAVE_SECONDS", "LeaseKeeper", "stop_all_lease_keepers"]

log = logging.getLogger(__name__)

LEAVE_SECONDS = 2.0
"""How long a clean shutdown spends stopping its keepers and deregistering, retries included."""


class _RunningKeepers:
    """The keepers started and not stopped yet: the process stops them as it exits, so their
    clients close and no thread beats on past the interpreter's shutdown. The exit hook is
    registered when the first keeper starts, not when this module is imported."""

    def __init__(self) -> None:
        self._keepers: dict[LeaseKeeper, None] = {}  # in start order: exit leaves in that order
        self._lock = threading.Lock()
        self._stop_at_exit = False

    def add(self, keeper: LeaseKeeper) -> None:
        with self._lock:
            if not self._stop_at_exit:
                atexit.register(self.at_exit)
                self._stop_at_exit = True
            self._keepers[keeper] = None

    def discard(self, keeper: LeaseKeeper) -> None:
        with self._lock:
            self._keepers.pop(keeper, None)

    def stop_all(self, deregister: bool = False) -> None:
        with self._lock:
            keepers = list(self._keepers)
        deadline = time.monotonic() + LEAVE_SECONDS
        for keeper in keepers:
            if deregister:
                keeper.leave(within=max(0.0, deadline - time.monotonic()))
            else:
                keeper.stop()

    def at_exit(self) -> None:
        """Leave on a normal exit; only stop when an uncaught exception ends the interpreter
        (Python records it as ``sys.last_value`` before running the exit hooks)."""
        self.stop_all(deregister=getattr(sys, "last_value", None) is None)


_RUNNING = _RunningKeepers()


class LeaseKeeper:
    def __init__(self, client: BootstrapClient, registration: RankRegistration) -> None:
        if registration.lease_seconds is None:
            raise ValueError("the registration has no lease_seconds: there is nothing to keep")
        self.client = client
        self.registration = registration
        self.interval = registration.lease_seconds / 3
        self._stop = threading.Event()
        self._replaced = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"lease-keeper {registration.cell}", daemon=True
        )

    def start(self) -> LeaseKeeper:
        _RUNNING.add(self)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and close the client, leaving the cell to its lease; safe to call twice
        and from ``atexit``."""
        self._halt(timeout)
        self._closed = True
        self.client.close()

    def _halt(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        _RUNNING.discard(self)

    def leave(self, within: float = LEAVE_SECONDS) -> bool:
        """A clean shutdown: stop beating first (so no heartbeat races the removal), then
        deregister the cell, all within ``within`` seconds. Best effort: a failure is logged and
        the lease expires as it would have. True if the cell is out of the table (404, already
        gone, counts)."""
        deadline = time.monotonic() + within
        self._halt(within / 2)
        if self._closed or self._replaced:  # stopped before, or another address holds the cell
            self.stop(0)
            return False
        reg = self.registration
        cell = reg.cell
        try:
            left = self.client.deregister(
                *cell, rank_ip=reg.rank_ip, rank_port=reg.rank_port,
                within=max(0.0, deadline - time.monotonic()),
            )  # fmt: skip
        except Exception as exc:  # best effort on a shutdown path: never stop the others
            log.warning(
                "Could not deregister cell %s as it shuts down (%s); the server drops it when "
                "its lease of %gs runs out.", cell, exc, reg.lease_seconds,
            )  # fmt: skip
            return False
        finally:
            self.stop(0)
        if left is None:
            log.info("Cell %s was already gone from the table as its rank shut down.", cell)
        else:
            log.info(
                "Cell %s left the table as its rank shut down (%d of %s cells registered now).",
                cell, left.registered, left.expected if left.expected is not None else "?",
            )  # fmt: skip
        return True

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        if exc_type is None:
            self.leave()
        else:
            self.stop()  # a crash leaves the cell to its lease

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.client.heartbeat(self.registration)
            except CellNotFound:
                log.warning(
                    "The server no longer knows cell %s; registering it again.",
                    self.registration.cell,
                )
                self._register_again()
            except RequestRejected as exc:
                if exc.status_code == 409:
                    log.error("Stopping the heartbeat of cell %s: %s", self.registration.cell, exc)
                    self._replaced = True
                    self._stop.set()
                else:
                    log.warning("Heartbeat of cell %s refused: %s", self.registration.cell, exc)
            except BootstrapError as exc:
                log.warning("Heartbeat of cell %s failed: %s", self.registration.cell, exc)

    def _register_again(self) -> None:
        if self._stop.is_set():  # leaving: the 404 may be our own deregistration
            return
        try:
            self.client.register(self.registration)
        except BootstrapError as exc:
            log.warning("Could not register cell %s again: %s", self.registration.cell, exc)


def stop_all_lease_keepers(deregister: bool = False) -> None:
    """Stop every keeper still running; with ``deregister``, leave the table too (what a normal
    interpreter exit does, within ``LEAVE_SECONDS`` in all)."""
    _RUNNING.stop_all(deregister)
