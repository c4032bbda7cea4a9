"""Keep a leased registration alive: a background thread that heartbeats until stopped.

A rank that registers with ``lease_seconds`` must renew its cell, or the server counts it as
missing (a crashed rank then shows up as a hole instead of a stale address). Heartbeats go out
three times per lease so one lost beat never expires the cell. If the server forgot the cell (a
reset), the keeper registers it again; if another address holds it now (this rank was replaced),
the keeper stops: renewing would be wrong and re-registering would steal the cell back.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.shared.errors import BootstrapError, CellNotFound, RequestRejected
from prefill_bootstrap.shared.protocol import RankRegistration

__all__ = ["LeaseKeeper", "stop_all_lease_keepers"]

log = logging.getLogger(__name__)


class _RunningKeepers:
    """The keepers started and not stopped yet: the process stops them as it exits, so their
    clients close and no thread beats on past the interpreter's shutdown. The exit hook is
    registered when the first keeper starts, not when this module is imported."""

    def __init__(self) -> None:
        self._keepers: set[LeaseKeeper] = set()
        self._lock = threading.Lock()
        self._stop_at_exit = False

    def add(self, keeper: LeaseKeeper) -> None:
        with self._lock:
            if not self._stop_at_exit:
                atexit.register(self.stop_all)
                self._stop_at_exit = True
            self._keepers.add(keeper)

    def discard(self, keeper: LeaseKeeper) -> None:
        with self._lock:
            self._keepers.discard(keeper)

    def stop_all(self) -> None:
        with self._lock:
            keepers = list(self._keepers)
        for keeper in keepers:
            keeper.stop()


_RUNNING = _RunningKeepers()


class LeaseKeeper:
    def __init__(self, client: BootstrapClient, registration: RankRegistration) -> None:
        if registration.lease_seconds is None:
            raise ValueError("the registration has no lease_seconds: there is nothing to keep")
        self.client = client
        self.registration = registration
        self.interval = registration.lease_seconds / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-keeper {registration.cell}", daemon=True
        )

    def start(self) -> LeaseKeeper:
        _RUNNING.add(self)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and close the client; safe to call twice and from ``atexit``."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        _RUNNING.discard(self)
        self.client.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

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
                    self._stop.set()
                else:
                    log.warning("Heartbeat of cell %s refused: %s", self.registration.cell, exc)
            except BootstrapError as exc:
                log.warning("Heartbeat of cell %s failed: %s", self.registration.cell, exc)

    def _register_again(self) -> None:
        try:
            self.client.register(self.registration)
        except BootstrapError as exc:
            log.warning("Could not register cell %s again: %s", self.registration.cell, exc)


def stop_all_lease_keepers() -> None:
    """Stop every keeper still running (the process does this as it exits, too)."""
    _RUNNING.stop_all()
