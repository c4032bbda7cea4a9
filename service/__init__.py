"""The bootstrap server: ``create_app(settings, store=...)`` and ``serve(settings)``."""

from prefill_bootstrap.service.app import create_app
from prefill_bootstrap.service.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
