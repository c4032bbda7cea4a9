"""Run the server: bind the socket ourselves, then hand it to uvicorn.

Binding first turns a port clash into a clear error naming host, port and the flag to change,
instead of uvicorn logging it from inside its loop. uvicorn handles SIGTERM/SIGINT with a graceful
shutdown; the app's lifespan then drains the state writer, so every acknowledged write is on disk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from types import FrameType

from prefill_bootstrap.service.app import create_app
from prefill_bootstrap.service.hot_protocol import hot_path_protocol
from prefill_bootstrap.service.listener import AdmissionListener, Slot
from prefill_bootstrap.service.logs import configure_logging
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import StateStore
from prefill_bootstrap.service.uvicorn_glue import Config, UvicornServer, check_uvicorn
from prefill_bootstrap.shared.errors import ConfigurationError, PortInUse

__all__ = ["BootstrapServer", "bind_socket", "prepare", "serve"]

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"cannot resolve listen host {host!r}: {exc.strerror}; pass an address with --host"
        ) from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", "[::]"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # also serve IPv4
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port, "the address is already in use") from exc
        raise PortInUse(host, port, exc.strerror or str(exc)) from exc
    return sock


class BootstrapServer(UvicornServer):
    """uvicorn with our listener, and a clean exit on SIGTERM.

    uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies "killed by signal"
    even though it stopped cleanly; supervisors then report a crash. We shut down the same way but
    exit 0.
    """

    def __init__(self, config: Config, accept_limit: int) -> None:
        super().__init__(config)
        self.accept_limit = accept_limit

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the app's lifespan) without uvicorn's listener: ours paces how
        many new connections are taken at once (listener.py)."""
        await super().startup(sockets=[])
        connection_protocol = self.connection_protocol(asyncio.get_running_loop())

        def protocol(slot: Slot) -> asyncio.Protocol:
            return connection_protocol(slot=slot)

        for sock in sockets or []:
            listener = AdmissionListener(
                sock, protocol, limit=self.accept_limit, ssl_context=self.tls_context
            )
            listener.start()
            self.add_listener(listener)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Parked long polls answer first, with the table as it stands: a rank then hears
        "not yet" and retries elsewhere, rather than waiting out the shutdown's deadline. Event
        streams end now too (uvicorn waits for open connections, and a stream never ends by
        itself); a watcher reconnects with Last-Event-ID to wherever the server comes back."""
        registry = self.config.app.registry
        registry.waits.release()
        registry.watchers.close()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.forget_signals()
        log.info("Received %s; finishing requests and closing the state.", signal.Signals(sig).name)


def prepare(
    settings: ServerSettings, store: StateStore | None = None
) -> tuple[BootstrapServer, socket.socket]:
    """Bind the socket and build the server, not yet serving: ``serve`` runs it; tests run it
    in a thread with a store of their own."""
    check_uvicorn()
    sock = bind_socket(settings.host, settings.port, settings.backlog)
    app = create_app(settings, store)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    registry = app.registry
    log.info(
        "prefill-bootstrap listening on %s://%s:%d (state: %s%s, instance %s, incarnation %s, "
        "%d/%s cells%s).",
        settings.scheme,
        shown,
        port,
        registry.group.store.kind,
        f" in {settings.state_dir}" if settings.state_dir else "",
        registry.group.instance_id,
        registry.group.incarnation,
        registry.group.table.registered_count,
        registry.group.table.expected_count,
        ", writes need the bearer token" if settings.auth_token else "",
    )
    config = Config(
        app,
        log_level=settings.log_level,
        access_log=settings.access_log,
        backlog=settings.backlog,
        timeout_graceful_shutdown=5,
        log_config=None,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        # The hot routes are answered in the protocol itself (see hot_protocol.py); and no
        # X-Forwarded-* rewriting: logs should name the peer that actually connected.
        http=hot_path_protocol(app),
        proxy_headers=False,
    )
    return BootstrapServer(config, settings.accept_limit), sock


def serve(settings: ServerSettings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    server, sock = prepare(settings)
    server.run(sockets=[sock])
    log.info("prefill-bootstrap stopped cleanly.")
