"""Accept connections ourselves, a window at a time, so a registration storm waits in the kernel.

uvloop's own server accepts every pending connection at once. In a start-up storm that put a
protocol, a parser and a request of every rank in the heap together (4096 ranks: the heap peaked
at ~130 MB and, fragmented, stayed there). This listener accepts only while fewer than ``limit``
new connections await their first answer; the rest wait in the listen backlog, already connected
(the kernel completed their handshake), and are taken as answers go out. The storm is no slower:
the server could not answer them sooner anyway.

Only *new* connections are paced. A connection gives its slot back when its protocol says so
(``hot_protocol.py``: once its first request is parsed, or for a registration once it is answered)
or when it closes, and after ``slot_seconds`` (2 s) at the latest, so a client
that connects and never sends cannot hold the door shut (measured: with a window of 2, a request
queued behind 6 silent connections was answered after 6 s; with the default 256 it takes 256
silent connections to delay anyone 2 s); kept-alive connections cost no slot.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Callable

__all__ = ["SILENT_SLOT_SECONDS", "SLOT_SECONDS", "AdmissionListener", "Slot"]

log = logging.getLogger(__name__)

SLOT_SECONDS = 2.0
"""How long a new connection may hold its slot without being answered: clients send at once,
and a long poll (`?wait=`) or a client that never sends must not pace everyone behind it."""

SILENT_SLOT_SECONDS = 0.25
"""A new connection that has sent nothing this long gives its slot back early: it holds no
request (the heap the window protects), and real clients send as soon as they connect. Without
this, 1,500 connections that never send kept a new request waiting ~10 s (6 windows x 2 s)."""

_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE})
_RETRY_SECONDS = 1.0


class Slot:
    """One new connection's place in the window; ``release`` is idempotent."""

    __slots__ = ("_listener", "admitted_at", "heard")

    def __init__(self, listener: AdmissionListener, admitted_at: float) -> None:
        self._listener: AdmissionListener | None = listener
        self.admitted_at = admitted_at
        self.heard = False
        """Set by the connection's protocol once the client sent something."""

    def release(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener._release(self)


ProtocolFactory = Callable[[Slot], asyncio.Protocol]
"""Builds the protocol of one accepted connection, which releases the slot it is given."""


class AdmissionListener:
    """Duck-types the part of ``asyncio.Server`` uvicorn uses: ``close`` and ``wait_closed``."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        *,
        limit: int,
        ssl_context: ssl.SSLContext | None = None,
        slot_seconds: float = SLOT_SECONDS,
        silent_seconds: float = SILENT_SLOT_SECONDS,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.slot_seconds = slot_seconds
        self.silent_seconds = silent_seconds
        self._sock = sock
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._loop = asyncio.get_running_loop()
        self._held: dict[Slot, None] = {}
        """Unanswered new connections, oldest first (dicts keep insertion order)."""
        self._handshakes: set[asyncio.Task[object]] = set()
        self._accepting = False
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None
        sock.setblocking(False)

    @property
    def unanswered(self) -> int:
        return len(self._held)

    def start(self) -> None:
        self._closed = False
        self._resume()

    def close(self) -> None:
        """Stop accepting; the socket itself belongs to whoever bound it."""
        self._closed = True
        self._pause()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    async def wait_closed(self) -> None:
        """Let connections already accepted finish connecting (and TLS handshakes end)."""
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    # -- accepting -----------------------------------------------------------------------------

    def _resume(self) -> None:
        if not self._accepting and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_some)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False

    def _accept_some(self) -> None:
        while len(self._held) < self.limit:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up before we took it
            except OSError as exc:
                self._retry_later(exc)
                return
            self._admit(conn)
        self._pause()  # the window is full: the rest wait in the listen backlog

    def _retry_later(self, exc: OSError) -> None:
        """Out of file descriptors and the like: the socket stays readable, so stop watching it
        for a second instead of spinning on the same error."""
        hint = " (raise the open file limit, ulimit -n)" if exc.errno in _OUT_OF_FILES else ""
        log.warning(
            "Cannot accept connections on %s: %s; retrying in %.0fs%s.",
            self._sock.getsockname(),
            exc.strerror or exc,
            _RETRY_SECONDS,
            hint,
        )
        self._pause()
        self._loop.call_later(_RETRY_SECONDS, self._resume)

    def _admit(self, conn: socket.socket) -> None:
        slot = Slot(self, self._loop.time())
        self._held[slot] = None
        if self._sweep is None:
            self._sweep = self._loop.call_later(self.slot_seconds, self._release_stale)
        if self.silent_seconds < self.slot_seconds:
            self._loop.call_later(self.silent_seconds, self._release_if_silent, slot)
        connecting = self._loop.create_task(
            self._loop.connect_accepted_socket(
                functools.partial(self._factory, slot), conn, ssl=self._ssl
            )
        )
        self._handshakes.add(connecting)
        connecting.add_done_callback(functools.partial(self._connected, slot))

    def _connected(self, slot: Slot, connecting: asyncio.Task[object]) -> None:
        self._handshakes.discard(connecting)
        if connecting.cancelled() or connecting.exception() is not None:
            slot.release()  # no protocol will: the connection died during set-up or handshake

    # -- slots ---------------------------------------------------------------------------------

    def _release(self, slot: Slot) -> None:
        del self._held[slot]
        if len(self._held) < self.limit:
            self._resume()

    def _release_if_silent(self, slot: Slot) -> None:
        if not slot.heard:
            slot.release()

    def _release_stale(self) -> None:
        self._sweep = None
        cutoff = self._loop.time() - self.slot_seconds
        stale = []
        for slot in self._held:
            if slot.admitted_at > cutoff:
                break
            stale.append(slot)
        for slot in stale:
            slot.release()
        if self._held and not self._closed:
            oldest = next(iter(self._held)).admitted_at
            delay = max(oldest + self.slot_seconds - self._loop.time(), 0.01)
            self._sweep = self._loop.call_later(delay, self._release_stale)
