"""How an SGLang release sends a prefill rank's registration, told apart by what its code has.

The plugin must send the exact body the running release would send, and releases build it
differently (fields come and go, the configuration moved from ``server_args`` to a runtime
context). So the release's own ``register_to_bootstrap`` still builds every row; the plugin only
takes the sending away from it, and sends each row with the declared retry policy instead.
Two shapes exist:

- *split* (later releases): ``register_to_bootstrap`` builds the rows and hands each one to
  ``_register_topology_row(url, payload)``, the method that sends.
- *inline* (0.5.11, 0.5.12, ...): ``register_to_bootstrap`` builds the row and sends it itself
  with ``requests.put``.

Nothing here imports SGLang: the class and the method are handed in.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prefill_bootstrap.shared.errors import ConfigurationError, UnsupportedSGLang

__all__ = ["InlineSend", "ReleaseShape", "Row", "SplitSend", "detect_shape"]

Row = tuple[str, dict[str, Any]]
"""One registration the release wanted to send: the URL it chose and its JSON body."""

REGISTER = "register_to_bootstrap"
SEND_ROW = "_register_topology_row"


class ReleaseShape(Protocol):
    """How one kind of release sends its rows, and how to take them instead."""

    name: str

    def capture(self, register: Callable[..., Any], manager: Any) -> list[Row]:
        """Run the release's ``register`` on ``manager``; return the rows it would have sent."""
        ...


@dataclass(frozen=True)
class SplitSend:
    """The release hands each row to ``_register_topology_row``: an instance attribute of the
    same name stands in for that sender during the one call."""

    name: str = f"rows sent by {SEND_ROW}"

    def capture(self, register: Callable[..., Any], manager: Any) -> list[Row]:
        rows: list[Row] = []
        own = manager.__dict__
        previous = own.get(SEND_ROW, _ABSENT)
        own[SEND_ROW] = lambda url, payload: rows.append((url, dict(payload)))
        try:
            register(manager)
        finally:
            if previous is _ABSENT:
                del own[SEND_ROW]
            else:
                own[SEND_ROW] = previous
        return rows


_ABSENT = object()


class _Outbox:
    """What an inline release's ``register_to_bootstrap`` sees as ``requests``: it keeps each
    ``put`` and answers it as accepted, so the release's own loop ends at once."""

    status_code = 200
    text = "OK"
    ok = True

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def put(self, url: str, json: Any = None, **_: Any) -> _Outbox:
        self.rows.append((url, dict(json or {})))
        return self


@dataclass(frozen=True)
class InlineSend:
    """The release sends its one row itself with ``requests.put``: its own function runs with
    ``requests`` naming a recorder, in a private copy of its globals, so nothing outside this
    call sees the change."""

    name: str = f"a row sent inline by {REGISTER}"

    def capture(self, register: Callable[..., Any], manager: Any) -> list[Row]:
        if "requests" not in register.__code__.co_names:
            raise ConfigurationError(
                f"another SGLang plugin wraps CommonKVManager.{REGISTER} too, so "
                "prefill-bootstrap's plugin cannot take its requests.put over: load it without "
                "the other one "
                "(SGLANG_PLUGINS names the plugins SGLang loads)"
            )
        outbox = _Outbox()
        rebound = types.FunctionType(
            register.__code__,
            {**register.__globals__, "requests": outbox},
            register.__name__,
            register.__defaults__,
            register.__closure__,
        )
        rebound(manager)
        if not outbox.rows:
            raise ConfigurationError(
                f"CommonKVManager.{REGISTER} sent no registration through requests.put, so this "
                "rank would not be registered; is another SGLang plugin wrapping it?"
            )
        return outbox.rows


def detect_shape(manager_class: type, release: str) -> ReleaseShape:
    """The shape of ``manager_class`` (SGLang's ``CommonKVManager``), or ``UnsupportedSGLang``
    naming what is missing: the plugin never applies a hook it cannot run."""
    register = manager_class.__dict__.get(REGISTER)
    if not isinstance(register, types.FunctionType):
        raise UnsupportedSGLang(release, f"{manager_class.__name__}.{REGISTER} does not exist")
    if isinstance(manager_class.__dict__.get(SEND_ROW), types.FunctionType):
        return SplitSend()
    names = register.__code__.co_names
    if "requests" in names and "put" in names:
        return InlineSend()
    raise UnsupportedSGLang(
        release,
        f"{manager_class.__name__}.{REGISTER} neither hands its rows to {SEND_ROW} nor sends "
        "them with requests.put, so the plugin cannot take the sending over",
    )
