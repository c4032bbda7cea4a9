"""The status page: static HTML, CSS and JS shipped in the package, read once at start-up.

The page polls ``/prefill_port_table`` like any script would, so it adds no server-side work
beyond serving three small files, and it works offline (no CDN, no build step).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Response
from fastapi.responses import RedirectResponse

__all__ = ["UI_PATHS", "install_ui"]

_FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
UI_PATHS = frozenset({"/", *_FILES})


def install_ui(app: FastAPI) -> None:
    folder = resources.files("prefill_bootstrap.service") / "ui"
    contents = {path: (folder / name).read_bytes() for path, (name, _) in _FILES.items()}

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    def serve(path: str, media_type: str) -> None:
        body = contents[path]

        async def page() -> Response:
            return Response(body, media_type=media_type, headers={"cache-control": "no-cache"})

        app.get(path, summary=f"Status page asset {path}", include_in_schema=False)(page)

    for path, (_, media_type) in _FILES.items():
        serve(path, media_type)
