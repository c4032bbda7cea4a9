"""One prefill rank, run inside a test host's network namespace by tests/test_multihost.py.

It does what an engine rank does at start-up: join the torch.distributed (gloo) world whose
master is the leader host, then run the client's three steps against the leader's bootstrap
server. ``--no-sync`` reproduces the original bug: register to ``<leader>:<this host's port>``.
``--go-file`` holds the rank between the port sync and the registration until a test has
degraded its link; ``--bootstrap-host`` registers through a local relay instead of the leader.
``--leader-port`` skips step 1 (no torch.distributed world, no torch import): the rank starts
with the port the sync would have given it, for tests of steps 2 and 3 that need many ranks.
The client's log lines (INFO and up) go to the output; the outcome is the last line, one JSON
object (``{"ok": ...}`` or ``{"error": type, "message": ...}``) with ``time.monotonic()`` marks
(one clock for every process on the machine) so a test can time the phases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path


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
    parser.add_argument("--go-file", help="after the port sync, wait until this file exists")
    parser.add_argument("--bootstrap-host", help="register here (on the synced port)")
    parser.add_argument("--leader-port", type=int, help="skip the port sync: use this port")
    parser.add_argument("--retry-deadline", type=float, default=30.0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--wait-timeout", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from prefill_bootstrap.client.addresses import bootstrap_url
    from prefill_bootstrap.client.bootstrap import bootstrap_prefill_rank
    from prefill_bootstrap.client.http import BootstrapClient
    from prefill_bootstrap.client.port_sync import sync_bootstrap_port
    from prefill_bootstrap.client.retry import RetryPolicy
    from prefill_bootstrap.shared import errors

    dist_init_addr = f"{args.leader}:{args.master_port}"
    if args.leader_port is None:
        import torch.distributed as dist

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
    marks: dict[str, float] = {}
    try:
        manual = args.no_sync or args.delay_register or args.go_file or args.bootstrap_host
        if manual or args.leader_port is not None:
            # Without sync: this host's own port, the bug. Otherwise take the leader's port now
            # (a collective, unless given) and register later, so a test can kill the server,
            # pull a cable or degrade the link between the two steps.
            if args.no_sync:
                port = args.local_port
            elif args.leader_port is not None:
                port = args.leader_port
            else:
                port = sync_bootstrap_port(
                    args.local_port, dist_init_addr=dist_init_addr, nnodes=nnodes
                )
            time.sleep(args.delay_register)
            if args.go_file:
                _wait_for_file(args.go_file, timeout=120)
            marks["released_at"] = time.monotonic()
            url = bootstrap_url(args.bootstrap_host or args.leader, port)
            with BootstrapClient(
                url, retry=retry, timeout=args.request_timeout, rank=args.rank
            ) as client:
                client.register(registration)
                marks["registered_at"] = time.monotonic()
                report = client.wait_until_complete(args.wait_timeout)
        else:
            report = bootstrap_prefill_rank(
                registration,
                local_port=args.local_port,
                dist_init_addr=dist_init_addr,
                nnodes=nnodes,
                wait_timeout=args.wait_timeout,
                retry=retry,
                request_timeout=args.request_timeout,
            )
        outcome = {"ok": True, "complete": report.complete, "cells": report.registered_cells}
    except errors.BootstrapError as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, errors.TableIncomplete):
            outcome["missing"] = [list(cell) for cell in exc.missing]
            outcome["waited"] = exc.waited_seconds
    marks["finished_at"] = time.monotonic()
    outcome.update(marks)
    outcome["rank"] = args.rank
    outcome["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(outcome), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: a peer behind a pulled cable would hang it


def _wait_for_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
