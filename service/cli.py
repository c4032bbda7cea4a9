"""``prefill-bootstrap serve``: the server's flags, parsed without importing the server.

The server itself (FastAPI, uvicorn) is imported only when ``serve`` runs, so the other commands
work with the client's dependencies alone, and a missing ``[server]`` extra is named plainly.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefill_bootstrap.shared.errors import BootstrapError

__all__ = ["add_serve_command"]


def add_serve_command(commands: Any) -> None:
    """``prefill-bootstrap serve``: every flag, each also read from PREFILL_BOOTSTRAP_<NAME>."""
    serve = commands.add_parser(
        "serve",
        help="run the bootstrap server (the leader's sidecar)",
        description="Run the bootstrap server. Every flag also reads PREFILL_BOOTSTRAP_<NAME>.",
    )
    serve.add_argument("--host", help="listen address (default 127.0.0.1; '::' for IPv6)")
    serve.add_argument("--port", type=int, help="listen port (default 8998; 0 picks one)")
    serve.add_argument(
        "--state-dir",
        type=str,
        help="directory of the durable SQLite state (default ./prefill-bootstrap-state; "
        "'' keeps state in memory only)",
    )
    serve.add_argument(
        "--reset", action="store_true", default=None, help="discard stored state, new group"
    )
    serve.add_argument("--room-ttl-seconds", type=float, help="room entry lifetime (120)")
    serve.add_argument("--room-capacity", type=int, help="most room entries kept (200000)")
    serve.add_argument("--max-body-bytes", type=int, help="request body cap (1048576)")
    serve.add_argument("--max-wait-seconds", type=float, help="cap for ?wait= long polls (300)")
    serve.add_argument(
        "--max-cells", type=int, help="most cells a group may have, dp x cp x tp x pp (16384)"
    )
    serve.add_argument(
        "--max-header-bytes", type=int, help="request line + headers cap, else 431 (65536)"
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        help="seconds to finish a request's headers before the connection is closed (10)",
    )
    serve.add_argument("--backlog", type=int, help="listen backlog (4096)")
    serve.add_argument(
        "--accept-limit",
        type=int,
        help="most new connections taken at once; the rest wait in the backlog (256)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"], help="log line format (text)")
    serve.add_argument("--access-log", action="store_true", default=None, help="log every request")
    serve.add_argument(
        "--auth-token",
        help="require 'Authorization: Bearer <token>' on writes (prefer the environment: "
        "PREFILL_BOOTSTRAP_AUTH_TOKEN or SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN, which "
        "process listings do not show)",
    )
    serve.add_argument(
        "--auth-reads", action="store_true", default=None, help="require the token on reads too"
    )
    serve.add_argument(
        "--protocol",
        choices=["auto", "1", "2", "3"],
        help="SGLang bootstrap protocol generation: auto (default) detects it per request",
    )
    serve.add_argument(
        "--event-history", type=int, help="table events kept for watchers that resume (4096)"
    )
    serve.add_argument(
        "--keepalive-seconds",
        type=float,
        help="keep-alive comment interval on idle event streams, at most 30 (15)",
    )
    serve.add_argument(
        "--watcher-buffer-bytes",
        type=int,
        help="unsent event bytes after which a stalled watcher is dropped (1048576)",
    )
    serve.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate")
    serve.add_argument("--ssl-keyfile", help="the certificate's PEM private key")
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from prefill_bootstrap.service.server import serve
        from prefill_bootstrap.service.settings import ServerSettings
    except ImportError as exc:
        raise BootstrapError(
            f"the server needs the [server] extra ({exc.name} is missing): "
            "pip install 'prefill-bootstrap[server]'"
        ) from exc
    fields = (
        "host", "port", "state_dir", "reset", "room_ttl_seconds", "room_capacity",
        "max_body_bytes", "max_wait_seconds", "max_cells", "max_header_bytes",
        "header_timeout", "backlog", "accept_limit", "log_level",
        "access_log", "log_format", "auth_token", "auth_reads", "ssl_certfile", "ssl_keyfile",
        "protocol", "event_history", "keepalive_seconds", "watcher_buffer_bytes",
    )  # fmt: skip
    overrides = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if isinstance(overrides.get("state_dir"), str) and overrides["state_dir"]:
        overrides["state_dir"] = Path(overrides["state_dir"])
    try:
        settings = ServerSettings(**overrides)
    except ValueError as exc:
        raise BootstrapError(f"invalid server settings: {exc}") from exc
    serve(settings)
    return 0
