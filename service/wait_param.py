"""The ``?wait=`` parameter every long poll takes (``/ready``, ``/prefill_port_table``, the events
route): one declaration of its bound, one parser, so each answers a bad one with the same 422."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from annotated_types import Ge, Le
from pydantic import TypeAdapter, ValidationError

from prefill_bootstrap.service.replies import Reply, invalid_reply

__all__ = ["WAIT_SECONDS", "WaitSeconds", "long_poll_seconds"]

WaitSeconds = Annotated[float, Ge(0), Le(3600)]
"""``?wait=`` of the long polls: the one declaration the doors check and the docs show."""
WAIT_SECONDS: TypeAdapter[float] = TypeAdapter(WaitSeconds)


def long_poll_seconds(params: Mapping[str, str]) -> float | Reply:
    """How long a long poll may wait (0 when not asked), or the 422 naming ``query.wait``."""
    raw = params.get("wait")
    if raw is None:
        return 0.0
    try:
        return WAIT_SECONDS.validate_strings(raw)
    except ValidationError as exc:
        return invalid_reply(exc, "query", "wait")
