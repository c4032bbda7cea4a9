"""The ``prefill-bootstrap`` command: ``serve`` for the leader, rank-side tools for everyone.

It sits above both halves (``service.cli`` adds ``serve``, ``client.commands`` the rank tools),
so the client package never imports the server. Exit codes: 0 success, 1 a bootstrap failure (the
one-line reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from prefill_bootstrap import __version__
from prefill_bootstrap.client.commands import add_rank_commands
from prefill_bootstrap.service.cli import add_serve_command
from prefill_bootstrap.shared.errors import BootstrapError

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]


def _add_doctor(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check step by step what a rank needs to register, with the fix for each problem",
        description="Check name resolution, the port, TCP, /health, the token and the table, "
        "from what a rank knows. Exit 0 only when everything is fine.",
    )
    doctor.add_argument("--dist-init-addr", help="host:port of world rank 0 (multi-node)")
    doctor.add_argument("--bootstrap-port", type=int, help="this node's bootstrap port")
    doctor.add_argument("--nnodes", type=int, help="nodes in the prefill group")
    doctor.add_argument("--url", help="the leader's bootstrap server, if known (host:port)")
    doctor.add_argument("--auth-token", help="the token ranks send (or the environment)")
    doctor.add_argument("--timeout", type=float, default=3.0, help="seconds per check (3)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(run=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    import json
    import os

    from prefill_bootstrap.client.doctor import (
        DoctorOptions,
        as_json,
        diagnose,
        healthy,
        render_checks,
    )

    token = (
        args.auth_token
        or os.environ.get("PREFILL_BOOTSTRAP_AUTH_TOKEN")
        or os.environ.get("SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN")
    )
    nnodes = args.nnodes if args.nnodes is not None else (2 if args.dist_init_addr else 1)
    checks = diagnose(
        DoctorOptions(
            dist_init_addr=args.dist_init_addr,
            bootstrap_port=args.bootstrap_port,
            url=args.url,
            nnodes=nnodes,
            auth_token=token,
            timeout=args.timeout,
        )
    )
    if args.json:
        print(json.dumps(as_json(checks), indent=2))
    else:
        print(render_checks(checks), end="")
    return 0 if healthy(checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefill-bootstrap",
        description="Bootstrap server and rank tools for multi-node disaggregated prefill.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(commands)
    add_rank_commands(commands)
    _add_doctor(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except BootstrapError as exc:
        print(f"prefill-bootstrap {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
