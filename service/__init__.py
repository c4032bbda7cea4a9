"""The bootstrap server: ``create_app(settings, store=...)`` and ``serve(settings)``.

Importing this package loads nothing: ``service.table`` and the other domain modules stay free of
FastAPI, and ``create_app`` is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from prefill_bootstrap.service.app import create_app

        return create_app
    if name == "ServerSettings":
        from prefill_bootstrap.service.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from prefill_bootstrap.service.app import create_app
    from prefill_bootstrap.service.settings import ServerSettings
