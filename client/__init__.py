"""The rank side of prefill-bootstrap: port sync, HTTP clients, the rank commands, the plugin.

The wire models and errors it re-exports live in :mod:`prefill_bootstrap.shared`.

Importing this package never imports torch (the port broadcast imports it when called) nor the
server's dependencies. Names are loaded on first use, so ``import prefill_bootstrap.client`` stays
cheap for processes that only need the wire models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DEFAULT_RETRY",
    "AsyncBootstrapClient",
    "BootstrapClient",
    "BootstrapError",
    "ConfigurationError",
    "Deregistered",
    "DistributedNotInitialized",
    "LeaseKeeper",
    "PortSyncFailed",
    "RankAddress",
    "RankRegistration",
    "RegistrationFailed",
    "RequestRejected",
    "Resynced",
    "RetryPolicy",
    "ServerUnreachable",
    "TableIncomplete",
    "TableReport",
    "bootstrap_prefill_rank",
    "bootstrap_url",
    "render_table",
    "resolve_bootstrap_host",
    "stop_all_lease_keepers",
    "sync_auth_token",
    "sync_bootstrap_port",
]

_HOME = {
    "DEFAULT_RETRY": "retry",
    "RetryPolicy": "retry",
    "AsyncBootstrapClient": "http",
    "BootstrapClient": "http",
    "Deregistered": "core",
    "Resynced": "feed",
    "BootstrapError": "prefill_bootstrap.shared.errors",
    "ConfigurationError": "prefill_bootstrap.shared.errors",
    "DistributedNotInitialized": "prefill_bootstrap.shared.errors",
    "PortSyncFailed": "prefill_bootstrap.shared.errors",
    "RegistrationFailed": "prefill_bootstrap.shared.errors",
    "RequestRejected": "prefill_bootstrap.shared.errors",
    "ServerUnreachable": "prefill_bootstrap.shared.errors",
    "TableIncomplete": "prefill_bootstrap.shared.errors",
    "RankAddress": "prefill_bootstrap.shared.protocol",
    "RankRegistration": "prefill_bootstrap.shared.protocol",
    "TableReport": "prefill_bootstrap.shared.protocol",
    "bootstrap_prefill_rank": "bootstrap",
    "bootstrap_url": "addresses",
    "resolve_bootstrap_host": "addresses",
    "render_table": "grid",
    "sync_bootstrap_port": "port_sync",
    "sync_auth_token": "port_sync",
    "LeaseKeeper": "lease",
    "stop_all_lease_keepers": "lease",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = home if "." in home else f"{__name__}.{home}"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from prefill_bootstrap.client.addresses import bootstrap_url, resolve_bootstrap_host
    from prefill_bootstrap.client.bootstrap import bootstrap_prefill_rank
    from prefill_bootstrap.client.core import Deregistered
    from prefill_bootstrap.client.feed import Resynced
    from prefill_bootstrap.client.grid import render_table
    from prefill_bootstrap.client.http import AsyncBootstrapClient, BootstrapClient
    from prefill_bootstrap.client.lease import LeaseKeeper, stop_all_lease_keepers
    from prefill_bootstrap.client.port_sync import sync_auth_token, sync_bootstrap_port
    from prefill_bootstrap.client.retry import DEFAULT_RETRY, RetryPolicy
    from prefill_bootstrap.shared.errors import (
        BootstrapError,
        ConfigurationError,
        DistributedNotInitialized,
        PortSyncFailed,
        RegistrationFailed,
        RequestRejected,
        ServerUnreachable,
        TableIncomplete,
    )
    from prefill_bootstrap.shared.protocol import RankAddress, RankRegistration, TableReport
