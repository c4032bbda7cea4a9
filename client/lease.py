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

log = logging.getLogger("prefill_bootstrap.client")
_RUNNING: set[LeaseKeeper] = set()
_RUNNING_LOCK = threading.Lock()


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
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and close the client; safe to call twice and from ``atexit``."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with _RUNNING_LOCK:
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
    with _RUNNING_LOCK:
        keepers = list(_RUNNING)
    for keeper in keepers:
        keeper.stop()


atexit.register(stop_all_lease_keepers)
