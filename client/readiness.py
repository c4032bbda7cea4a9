"""What a waiting rank learns about its group's completeness, at either kind of server.

Our server counts cells and lists the missing ones; SGLang's built-in server answers only
``GET /route`` with all ranks -1: the server info once its count of registrations reaches the
group's size, else 503 naming that count. These types carry what each can tell.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "BUILTIN_POLL_SECONDS",
    "BUILTIN_SERVER",
    "Readiness",
    "ServerInfoProbe",
    "read_server_info_probe",
]

BUILTIN_POLL_SECONDS = 1.0
"""Pause between polls of a server that cannot long-poll (SGLang's built-in one)."""
BUILTIN_SERVER = "SGLang's built-in bootstrap server"
_REGISTERED_COUNT = re.compile(r"\((\d+) workers? registered\)")


@dataclass(frozen=True)
class ServerInfoProbe:
    """One answer of ``GET /route`` with all ranks -1: the info once complete, else the count
    of registrations the server reported (SGLang's 503 names it)."""

    info: dict[str, Any] | None
    registered: int | None

    @property
    def complete(self) -> bool:
        return self.info is not None

    @property
    def expected_cells(self) -> int | None:
        if self.info is None:
            return None
        sizes = ("dp_size", "attn_cp_size", "attn_tp_size", "pp_size")
        try:
            return math.prod(int(self.info[size]) for size in sizes)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Readiness:
    """What a waiting rank learns: whether the group is complete, under which instance, and at
    which kind of server. A wait returns it only once complete (else ``TableIncomplete``)."""

    url: str
    server: str
    expected_cells: int | None
    registered_cells: int | None
    """None where the server does not count cells (SGLang's built-in one)."""
    instance_id: str | None = None
    """The group's instance at our server (None at SGLang's built-in one): a reset changes it."""
    complete: bool = True
    """False only from a check that did not wait (``bootstrap_prefill_rank(wait_timeout=None)``)."""


def read_server_info_probe(response: httpx.Response) -> ServerInfoProbe:
    if response.status_code == 200:
        body = response.json()
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object, got {type(body).__name__}")
        return ServerInfoProbe(body, None)
    found = _REGISTERED_COUNT.search(response.text)
    return ServerInfoProbe(None, int(found.group(1)) if found else None)
