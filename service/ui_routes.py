"""The status page: static HTML, CSS and JS shipped in the package, read once, on first use.

The page polls ``/prefill_port_table`` like any script would, so it adds no server-side work
beyond serving three small files, and it works offline (no CDN, no build step). Its routes are
declared in ``routes.py`` like every other; these are their answers.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply

__all__ = ["ASSETS", "asset", "status_page_root"]

ASSETS: dict[str, tuple[str, bytes]] = {
    "/ui": ("index.html", b"text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", b"text/css; charset=utf-8"),
}
"""Each asset's path -> (file in the package's ``ui`` folder, content type)."""
_NO_CACHE = ((b"cache-control", b"no-cache"),)
_TO_THE_PAGE = Reply(307, b"", b"text/plain; charset=utf-8", ((b"location", b"/ui"),))


@cache
def asset(path: str) -> Reply:
    """The answer for one asset: read once, then the same bytes for every request."""
    name, content_type = ASSETS[path]
    body = (resources.files("prefill_bootstrap.service") / "ui" / name).read_bytes()
    return Reply(200, body, content_type, _NO_CACHE)


def status_page_root(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``GET /``: the status page lives at ``/ui``."""
    return _TO_THE_PAGE
