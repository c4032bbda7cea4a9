"""``create_app(settings, store=...)``: the bootstrap server as an ASGI application.

The routes are declared once, in ``routes.py``. The ``FrontDoor`` (``fastpath.py``) answers them
and the lean protocol (``hot_protocol.py``) answers the hot ones; the FastAPI app behind the door
serves the same routes generated from the same table (``openapi.py``: the OpenAPI schema, and
every answer when ``fast_path=False``), ``/docs`` and the 404s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from prefill_bootstrap import __version__
from prefill_bootstrap.service.fastpath import FrontDoor
from prefill_bootstrap.service.http_errors import install_error_handlers
from prefill_bootstrap.service.openapi import install_routes
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import StateStore, open_store

__all__ = ["create_app"]


def create_app(
    settings: ServerSettings | None = None,
    store: StateStore | None = None,
    *,
    fast_path: bool = True,
    clock: Callable[[], float] = time.time,
) -> FrontDoor:
    """Build the server. ``store`` defaults to what ``settings.state_dir`` names; ``clock``
    (unix seconds) drives leases, room expiry and registration times. ``fast_path=False`` leaves
    every answer to the FastAPI routes (the same answers, the slower way: for tests)."""
    settings = settings or ServerSettings()
    store = store if store is not None else open_store(settings.state_dir, settings.reset)
    registry = Registry.open(settings, store, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(registry.group.sweep_leases_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            registry.close()

    app = FastAPI(
        title="prefill-bootstrap",
        version=__version__,
        summary="SGLang-compatible bootstrap server for multi-node disaggregated prefill.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    install_error_handlers(app)
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    front = FrontDoor(
        app,
        registry,
        settings.max_body_bytes,
        serve_hot_routes=fast_path,
        auth_token=token,
        auth_reads=settings.auth_reads,
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout,
    )
    install_routes(app, front)
    return front
