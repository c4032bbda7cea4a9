"""``prefill-bootstrap watch`` and ``prefill-bootstrap deregister``: the change feed from a shell.

They share the rank commands' server options and conventions (``client/commands.py``): exit 0 on
success, 1 with a one-line reason on a bootstrap failure (the server unreachable past the retry
policy, a refusal), 2 on bad usage, 130 on Ctrl-C (``prefill_bootstrap.cli``).

``deregister`` of a cell nobody holds exits 0 saying "already gone", so a shutdown script can run
it unconditionally and twice; another address holding the cell exits 1 naming it (the rank was
replaced: removing the cell would take a live rank out of the group).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from prefill_bootstrap.client.commands import client_for, logging_to_stderr, usage_error
from prefill_bootstrap.shared.errors import format_address, format_cell
from prefill_bootstrap.shared.events import parse_position

__all__ = ["add_feed_commands"]


def _run_watch(args: argparse.Namespace) -> int:
    from prefill_bootstrap.client.event_lines import as_json_line, describe

    if args.since is not None:
        try:
            parse_position(args.since)
        except ValueError as exc:
            usage_error(args, f"--since: {exc}")
    if args.count is not None and args.count < 1:
        usage_error(args, "--count must be at least 1")
    show = as_json_line if args.json else describe
    shown = 0
    with client_for(args) as client, logging_to_stderr(args):
        try:
            for item in client.watch(since=args.since):
                print(show(item), flush=True)
                shown += 1
                if args.count is not None and shown >= args.count:
                    break
        except BrokenPipeError:  # `watch | head`: the reader left, which is not a failure
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
    return 0


def _run_deregister(args: argparse.Namespace) -> int:
    cell = (args.dp, args.cp, args.tp, args.pp)
    address = format_address(args.rank_ip, args.rank_port)
    with client_for(args) as client, logging_to_stderr(args):
        left = client.deregister(*cell, rank_ip=args.rank_ip, rank_port=args.rank_port)
        if left is None:
            print(
                f"cell {format_cell(cell)} at {address} was not registered at {client.base_url}: "
                "already gone"
            )
            return 0
        expected = left.expected if left.expected is not None else "?"
        print(
            f"deregistered cell {format_cell(left.cell)} at {address} from {client.base_url}: "
            f"{left.registered} of {expected} cells registered now (incarnation "
            f"{left.incarnation})"
        )
    return 0


def _add_watch(commands: Any, options: argparse.ArgumentParser) -> None:
    watch = commands.add_parser(
        "watch",
        parents=[options],
        help="print the port table's changes as they happen, one line each, until Ctrl-C",
        description="Follow GET /prefill_port_table/events: reconnects and resumes with the "
        "retry policy; prints 'resynced' with the table's counts when events could not be seen "
        "(a server restart, a reset, a history too short). Exit 1 once the server stays "
        "unreachable past the retry policy.",
    )
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument(
        "--since",
        metavar="POS",
        help="resume after this position, <stream>:<seq> (a table's stream and seq, or an "
        "event's id); default: from now",
    )
    watch.add_argument("--count", type=int, help="stop after this many lines")
    watch.set_defaults(run=_run_watch, parser=watch)


def _add_deregister(commands: Any, options: argparse.ArgumentParser) -> None:
    deregister = commands.add_parser(
        "deregister",
        parents=[options],
        help="take one rank's cell out of the table (POST /deregister), if its address holds it",
        description="Deregister a rank that is going away on purpose: the table becomes "
        "incomplete and watchers see 'left'. Exit 0 also when the cell was not registered "
        "(already gone); exit 1 when another address holds it.",
    )
    cell = deregister.add_argument_group("the cell")
    for name in ("dp", "cp", "tp", "pp"):
        cell.add_argument(f"--{name}", type=int, default=0, metavar="R", help="(0)")
    address = deregister.add_argument_group("the address that registered it")
    address.add_argument("--rank-ip", required=True, help="the rank's KV-transfer address")
    address.add_argument("--rank-port", type=int, required=True, help="its port")
    deregister.set_defaults(run=_run_deregister, parser=deregister)


def add_feed_commands(commands: Any, options: argparse.ArgumentParser) -> None:
    """Add ``watch`` and ``deregister``, with the rank commands' server options."""
    _add_watch(commands, options)
    _add_deregister(commands, options)
