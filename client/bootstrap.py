"""``bootstrap_prefill_rank``: what an engine calls once per prefill rank at start-up.

Three steps, in this order, each of which fails loudly instead of leaving a hole in the table:

1. take the leader's bootstrap port (``sync_bootstrap_port``; a collective in multi-node mode);
2. register this rank's cell at the leader (retried while the server is not up yet);
3. wait until every cell of the group is registered, so a missing rank is reported here, by
   cell, and not later by a decode worker as a 404.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from prefill_bootstrap.client.addresses import bootstrap_url, resolve_bootstrap_host
from prefill_bootstrap.client.core import DEFAULT_WAIT_TIMEOUT, as_registration
from prefill_bootstrap.client.http import DEFAULT_TIMEOUT, BootstrapClient
from prefill_bootstrap.client.lease import LeaseKeeper
from prefill_bootstrap.client.port_sync import current_rank, sync_auth_token, sync_bootstrap_port
from prefill_bootstrap.client.readiness import Readiness
from prefill_bootstrap.client.retry import DEFAULT_RETRY, RetryPolicy
from prefill_bootstrap.shared.protocol import RankRegistration

__all__ = ["DEFAULT_WAIT_TIMEOUT", "bootstrap_prefill_rank"]


def bootstrap_prefill_rank(
    registration: RankRegistration | Mapping[str, Any],
    *,
    local_port: int,
    dist_init_addr: str | None = None,
    nnodes: int | None = 1,
    local_host: str = "127.0.0.1",
    group: Any = None,
    wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT,
    retry: RetryPolicy = DEFAULT_RETRY,
    auth_token: str | None = None,
    scheme: str = "http",
    verify: Any = True,
    request_timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
    share_auth_token: bool = False,
    keep_lease: bool = True,
) -> Readiness:
    """Sync the port, register, wait for the complete table; return what the wait learnt
    (complete, cell counts, the group's instance id).

    The wait asks only "complete yet?" (``GET /ready``, a few hundred bytes), never the whole
    table, so thousands of ranks waiting at once cost the server little; call
    ``BootstrapClient.table()`` for the table itself. ``local_port`` is this node's
    ``--disaggregation-bootstrap-port``; ``local_host`` is where the server is in single-node
    mode (wildcards become loopback). ``wait_timeout=None`` skips the wait and returns the
    readiness right after registering (``complete`` may then be False). A reset of the table
    while the rank waits makes it register again (``GroupReset`` only at the deadline).

    Raises ``DistributedNotInitialized`` (multi-node without torch.distributed),
    ``RegistrationFailed`` (server unreachable past the retry policy), ``RequestRejected`` (the
    server refused the registration, e.g. 409 topology conflict) or ``TableIncomplete`` (naming
    the missing cells).

    ``share_auth_token``: rank 0's ``auth_token`` goes to every rank with the port (another
    collective), so only the leader needs the secret. ``keep_lease``: when the registration
    carries ``lease_seconds``, a background thread keeps renewing it (``LeaseKeeper``; stopped at
    exit or by ``stop_all_lease_keepers()``). Such a rank also deregisters its cell when the
    interpreter exits normally (within 2 s, best effort), but not when an uncaught exception or a
    signal ends it: then the lease runs out. A rank without a lease never deregisters by itself
    (its cell stays until replaced, reset, or ``prefill-bootstrap deregister``).
    """
    port = sync_bootstrap_port(
        local_port, dist_init_addr=dist_init_addr, nnodes=nnodes, group=group
    )
    if share_auth_token:
        auth_token = sync_auth_token(
            auth_token, dist_init_addr=dist_init_addr, nnodes=nnodes, group=group
        )
    host = resolve_bootstrap_host(dist_init_addr, local_host, nnodes=nnodes)

    def connect() -> BootstrapClient:
        return BootstrapClient(
            bootstrap_url(host, port, scheme),
            timeout=request_timeout,
            retry=retry,
            auth_token=auth_token,
            transport=transport,
            verify=verify,
            rank=current_rank(),
        )

    reg = as_registration(registration)
    with connect() as client:
        client.register(reg)
        if reg.lease_seconds is not None and keep_lease:
            LeaseKeeper(connect(), reg).start()
        if wait_timeout is None:
            return client.readiness()
        return client.wait_as_registered([reg], wait_timeout)
