"""Logging set-up: sentences for humans by default, one JSON object per line for collectors."""

from __future__ import annotations

import logging
import re
import sys
from typing import Literal
from urllib.parse import unquote_plus

import orjson

__all__ = ["JsonFormatter", "RedactQueryCredentials", "configure_logging", "redact_query"]

_CREDENTIAL = re.compile(
    r"token|auth|key|secret|pass|pwd|signature|sig$|credential|session|jwt|cookie", re.IGNORECASE
)
REDACTED = "REDACTED"


def redact_query(target: str) -> str:
    """``/path?a=1&token=x`` -> ``/path?a=1&token=REDACTED``: a value whose parameter name looks
    like a credential never reaches the log, whatever the client put in the URL."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        if equals and _CREDENTIAL.search(unquote_plus(name)):
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}"


class RedactQueryCredentials(logging.Filter):
    """On uvicorn's access logger: its third argument is the request target as sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's duplicate of the message with ANSI colours
}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra}``; exceptions as one string field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, log_format: Literal["text", "json"] = "text") -> None:
    """The server process's logging: one handler on the root logger, so every module's logger
    (each named by its module, under ``prefill_bootstrap``) and uvicorn's end up in it."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryCredentials) for f in access.filters):
        access.addFilter(RedactQueryCredentials())
    # A registration storm logs one line per rank; the logging docs' public switches keep each
    # line a little cheaper: no thread or process names (no format shows them). The caller lookup
    # stays: turning it off means writing logging's private ``_srcfile``, for about 1 us a line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
