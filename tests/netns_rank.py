"""One prefill rank, run inside a test host's network namespace by tests/test_multihost.py.

It does what an engine rank does at start-up: join the torch.distributed (gloo) world whose
master is the leader host, then run the client's three steps against the leader's bootstrap
server. ``--no-sync`` reproduces the original bug: register to ``<leader>:<this host's port>``.
The outcome is printed as one JSON line (``{"ok": ...}`` or ``{"error": type, "message": ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--ranks-per-host", type=int, required=True)
    parser.add_argument("--leader", required=True, help="leader host address")
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--local-port", type=int, required=True, help="this host's bootstrap port")
    parser.add_argument("--host-address", required=True)
    parser.add_argument("--no-sync", action="store_true")
    parser.add_argument("--delay-register", type=float, default=0.0)
    parser.add_argument("--retry-deadline", type=float, default=30.0)
    parser.add_argument("--wait-timeout", type=float, default=60.0)
    args = parser.parse_args()

    import torch.distributed as dist

    from prefill_bootstrap.client import errors
    from prefill_bootstrap.client.addresses import bootstrap_url
    from prefill_bootstrap.client.bootstrap import bootstrap_prefill_rank
    from prefill_bootstrap.client.http import BootstrapClient
    from prefill_bootstrap.client.port_sync import sync_bootstrap_port
    from prefill_bootstrap.client.retry import RetryPolicy

    dist_init_addr = f"{args.leader}:{args.master_port}"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{dist_init_addr}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=60),
    )
    nnodes = args.world_size // args.ranks_per_host
    tp_size = args.ranks_per_host
    registration = {
        "attn_tp_size": tp_size, "attn_tp_rank": args.rank % tp_size,
        "attn_cp_size": 1, "attn_cp_rank": 0,
        "attn_dp_size": 1, "attn_dp_rank": 0,
        "pp_size": nnodes, "pp_rank": args.rank // tp_size,
        "system_dp_size": 1, "system_dp_rank": 0,
        "rank_ip": args.host_address, "rank_port": 50000 + args.rank,
        "page_size": 16, "kv_cache_dtype": "auto",
    }  # fmt: skip
    retry = RetryPolicy(deadline=args.retry_deadline, attempts=1000, max_backoff=1.0)
    started = time.monotonic()
    try:
        if args.no_sync or args.delay_register:
            # Without sync: this host's own port, the bug. With a delay: take the leader's port
            # now (a collective) and register later, so a test can kill the server or pull a
            # cable between the two steps.
            port = (
                args.local_port
                if args.no_sync
                else sync_bootstrap_port(
                    args.local_port, dist_init_addr=dist_init_addr, nnodes=nnodes
                )
            )
            time.sleep(args.delay_register)
            with BootstrapClient(bootstrap_url(args.leader, port), retry=retry) as client:
                client.register(registration)
                report = client.wait_until_complete(args.wait_timeout)
        else:
            report = bootstrap_prefill_rank(
                registration,
                local_port=args.local_port,
                dist_init_addr=dist_init_addr,
                nnodes=nnodes,
                wait_timeout=args.wait_timeout,
                retry=retry,
            )
        outcome = {"ok": True, "complete": report.complete, "cells": report.registered_cells}
    except errors.BootstrapError as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, errors.TableIncomplete):
            outcome["missing"] = [list(cell) for cell in exc.missing]
    outcome["rank"] = args.rank
    outcome["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(outcome), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: a peer behind a pulled cable would hang it


if __name__ == "__main__":
    main()
