"""Every rank takes the leader's bootstrap port before it registers.

Launchers that reserve a free bootstrap port per host give every node a different local port, yet
the server runs only on the leader, at the leader's port. A rank that registers to
``<leader host>:<its own port>`` is refused and its cells stay empty. Broadcasting world rank 0's
port over the group the engine already initialised makes every rank use the one port that has a
server behind it.

torch is imported inside the function: the client package must import without torch installed,
and single-node ranks never need it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from prefill_bootstrap.client.addresses import is_multi_node
from prefill_bootstrap.shared.errors import (
    ConfigurationError,
    DistributedNotInitialized,
    PortSyncFailed,
)

__all__ = ["current_rank", "sync_auth_token", "sync_bootstrap_port"]

log = logging.getLogger(__name__)


def current_rank() -> int | None:
    """This process's world rank if torch.distributed is already up, for log lines only.

    It never imports torch: a process that has not imported it has no rank to report.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except (RuntimeError, ValueError):
        return None
    return None


def _device_for(dist: Any, torch: Any, group: Any) -> Any:
    """NCCL only moves CUDA tensors (on the current device); everything else goes on the CPU."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _initialised_torch(dist_init_addr: str, nnodes: int | None, what: str) -> tuple[Any, Any]:
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        raise ConfigurationError(
            f"multi-node prefill (nnodes={nnodes}, dist_init_addr={dist_init_addr}) needs torch "
            f"to broadcast {what}, and torch is not installed: "
            "pip install 'prefill-bootstrap[torch]'"
        ) from exc
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedNotInitialized(nnodes or 0, dist_init_addr)
    return torch, dist


def _broadcast(torch: Any, dist: Any, values: list[int], leader: int, group: Any) -> list[int]:
    """Rank ``leader``'s integers to every rank of ``group`` (a plain tensor: no pickling)."""
    try:
        tensor = torch.tensor(values, dtype=torch.int64, device=_device_for(dist, torch, group))
        dist.broadcast(tensor, src=leader, group=group)
        return [int(value) for value in tensor.tolist()]
    except (RuntimeError, ValueError) as exc:  # torch's DistBackendError is a RuntimeError
        backend = str(dist.get_backend(group))
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise PortSyncFailed(dist.get_rank(), backend, detail) from exc


def sync_auth_token(
    token: str | None, *, dist_init_addr: str | None, nnodes: int | None, group: Any = None
) -> str | None:
    """The leader's bearer token, for every rank (so only rank 0 needs the secret mounted).

    A collective like ``sync_bootstrap_port``: all ranks call it together. Single node: ``token``.
    """
    if not is_multi_node(dist_init_addr, nnodes):
        return token
    assert dist_init_addr is not None
    torch, dist = _initialised_torch(dist_init_addr, nnodes, "the leader's auth token")
    leader = 0 if group is None else dist.get_global_rank(group, 0)
    mine = (token or "").encode()
    [length] = _broadcast(torch, dist, [len(mine)], leader, group)
    if length == 0:
        return None
    padded = list(mine[:length]) + [0] * max(0, length - len(mine))
    shared = bytes(_broadcast(torch, dist, padded, leader, group)).decode()
    return shared


def sync_bootstrap_port(
    local_port: int,
    *,
    dist_init_addr: str | None,
    nnodes: int | None,
    group: Any = None,
) -> int:
    """The bootstrap port every rank must use: the leader's.

    Single node (no ``dist_init_addr``, or ``nnodes == 1``): ``local_port``, no communication.
    Multi-node: rank 0 of ``group`` (default: the world group) broadcasts its port, every member
    returns it. All ranks of the group must call this at the same point, like any collective.

    A port outside 1..65535 is checked only after the broadcast, so every rank raises the same
    error; raising before it on one rank would leave the others blocked in the collective.
    """
    if not is_multi_node(dist_init_addr, nnodes):
        return local_port
    assert dist_init_addr is not None
    torch, dist = _initialised_torch(dist_init_addr, nnodes, "the leader's bootstrap port")
    rank = dist.get_rank()
    leader = 0 if group is None else dist.get_global_rank(group, 0)
    [leader_port] = _broadcast(torch, dist, [local_port], leader, group)

    if not 1 <= leader_port <= 65535:
        raise ConfigurationError(
            f"the leader (rank {leader}) announced bootstrap port {leader_port}, outside "
            "1..65535; set the leader's --disaggregation-bootstrap-port"
        )
    if leader_port != local_port:
        log.info(
            "Rank %d uses the leader's bootstrap port: local %d -> leader %d (rank %d at %s).",
            rank,
            local_port,
            leader_port,
            leader,
            dist_init_addr,
        )
    else:
        log.debug("Rank %d already has the leader's bootstrap port %d.", rank, leader_port)
    return leader_port
