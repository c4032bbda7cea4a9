"""The rank-side subcommands of ``prefill-bootstrap``: ``register``, ``wait`` and ``table``
(``watch`` and ``deregister`` live in ``feed_commands.py`` and share these options).

They live apart from ``cli.py`` (which owns the parser, ``serve`` and the exit codes) so each
module stays one concept. Every registration field is a flag named as on the wire
(``--attn-tp-rank`` for ``attn_tp_rank``), so a shell script or sidecar can register exactly what
an SGLang rank would.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import ValidationError

from prefill_bootstrap.client.grid import render_table
from prefill_bootstrap.shared.errors import ConfigurationError, format_cell
from prefill_bootstrap.shared.protocol import RankRegistration

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

    from prefill_bootstrap.client.http import BootstrapClient

SettingsT = TypeVar("SettingsT", bound="BaseSettings")

# The HTTP client stack (httpx, tenacity) is imported by the commands that use it, not here:
# ``prefill-bootstrap serve`` builds this parser too, and the server never needs that stack.

__all__ = ["REGISTRATION_FLAGS", "add_rank_commands"]

_SIZES = ("attn_tp_size", "attn_cp_size", "attn_dp_size", "pp_size", "system_dp_size")
_RANKS = ("attn_tp_rank", "attn_cp_rank", "attn_dp_rank", "pp_rank", "system_dp_rank")
_ALWAYS_SENT: dict[str, Callable[[str], Any]] = {"page_size": int, "kv_cache_dtype": str}
"""SGLang sends these keys on every registration, null when unset."""
_SENT_WHEN_GIVEN: dict[str, Callable[[str], Any]] = {
    "load_balance_method": str,
    "kv_layout": str,
    "dsv41_spec_layout": json.loads,
    "decode_allocation_policy": str,
    "prefill_http_port": int,
    "lease_seconds": float,
}
_SWITCHES = ("enable_dsa_cache_layer_split", "enable_kv_cache_sharding")
REGISTRATION_FLAGS = frozenset(
    (*_SIZES, *_RANKS, "rank_ip", "rank_port", *_ALWAYS_SENT, *_SENT_WHEN_GIVEN, *_SWITCHES)
)
"""Every ``RankRegistration`` field that has its own flag (a test keeps this exhaustive)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _client_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("server and retries (also PREFILL_BOOTSTRAP_<NAME>)")
    group.add_argument(
        "--url",
        help="the bootstrap server: http(s)://host:port, host:port, [v6]:port or host "
        "(default http://127.0.0.1:8998)",
    )
    group.add_argument(
        "--auth-token",
        help="bearer token (prefer PREFILL_BOOTSTRAP_AUTH_TOKEN: process lists show flags)",
    )
    group.add_argument("--cacert", help="PEM CA bundle that signed the server's certificate")
    group.add_argument(
        "--request-timeout", dest="request_timeout_seconds", type=float, help="seconds (10)"
    )
    group.add_argument(
        "--retry-deadline",
        dest="retry_deadline_seconds",
        type=float,
        help="seconds to keep retrying an unreachable server (60)",
    )
    group.add_argument("--retry-attempts", type=int, help="most attempts per request (30)")
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="no retry log lines, only the outcome"
    )
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log progress too")
    return options


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    args.parser.error(message)  # exits 2


@contextmanager
def logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """Show the client's log lines (one per failed attempt) on stderr for this command only.

    A handler on our own logger, removed afterwards, rather than ``basicConfig``: that would be
    a no-op when the host process already configured logging, and permanent when it had not.
    """
    logger = logging.getLogger(__package__)  # every client module logs below it
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    handler.setLevel(level)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous or logging.WARNING))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _settings(args: argparse.Namespace, kind: type[SettingsT]) -> SettingsT:
    """``kind`` from flags over ``PREFILL_BOOTSTRAP_*`` over defaults; exit 2 naming the field."""
    from prefill_bootstrap.client.http import describe_invalid

    given = {name: getattr(args, name, None) for name in kind.model_fields}
    try:
        return kind(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as exc:
        usage_error(
            args, f"invalid option or PREFILL_BOOTSTRAP_* variable: {describe_invalid(exc)}"
        )


def client_for(args: argparse.Namespace) -> BootstrapClient:
    from prefill_bootstrap.client.http import BootstrapClient
    from prefill_bootstrap.client.settings import ClientSettings

    settings = _settings(args, ClientSettings)
    try:
        return BootstrapClient(
            settings.url,
            timeout=settings.request_timeout_seconds,
            retry=settings.retry,
            auth_token=settings.token,
            verify=settings.verify(),
        )
    except ConfigurationError as exc:
        usage_error(args, str(exc))


def _registration(args: argparse.Namespace) -> RankRegistration:
    from prefill_bootstrap.client.core import describe_invalid

    body: dict[str, Any] = {name: getattr(args, name) for name in (*_SIZES, *_RANKS)}
    body |= {"rank_ip": args.rank_ip, "rank_port": args.rank_port}
    body |= {name: getattr(args, name) for name in _ALWAYS_SENT}
    optional = (*_SENT_WHEN_GIVEN, *_SWITCHES)
    body |= {name: getattr(args, name) for name in optional if getattr(args, name) is not None}
    for item in args.field or ():
        key, equals, value = item.partition("=")
        if not equals or not key:
            usage_error(
                args, f"--field {item!r}: write NAME=JSON, e.g. --field kv_layout='\"nhd\"'"
            )
        try:
            body[key] = json.loads(value)
        except ValueError:
            body[key] = value  # a bare word is meant as a string
    try:
        return RankRegistration.model_validate(body)
    except ValidationError as exc:
        usage_error(args, f"invalid registration: {describe_invalid(exc)}")


def _run_register(args: argparse.Namespace) -> int:
    registration = _registration(args)
    with client_for(args) as client, logging_to_stderr(args):
        client.register(registration)
        print(
            f"registered cell {format_cell(registration.cell)} as "
            f"{registration.rank_ip}:{registration.rank_port} at {client.base_url}"
        )
    return 0


def _run_wait(args: argparse.Namespace) -> int:
    from prefill_bootstrap.client.settings import WaitSettings

    timeout = _settings(args, WaitSettings).wait_timeout_seconds
    with client_for(args) as client, logging_to_stderr(args):
        if args.json:
            print(client.wait_until_complete(timeout).model_dump_json(indent=2))
            return 0
        ready = client.wait_until_ready(timeout)
        if ready.registered_cells is None:  # SGLang's own server: it only says "complete"
            print(f"prefill group at {client.base_url} is complete ({ready.server} answered)")
        else:
            print(
                f"prefill port table at {client.base_url} is complete: "
                f"{ready.registered_cells} of {ready.expected_cells} cells registered "
                f"(instance {ready.instance_id})"
            )
    return 0


def _run_table(args: argparse.Namespace) -> int:
    with client_for(args) as client, logging_to_stderr(args):
        if args.watch:
            from prefill_bootstrap.client.live import watch_table

            watch_table(client.table, url=client.base_url, interval=args.interval, count=args.count)
            return 0
        report = client.table(wait=args.wait)
        if args.json:
            print(report.model_dump_json(indent=2))
        else:
            width = args.width or shutil.get_terminal_size((120, 24)).columns
            sys.stdout.write(render_table(report, url=client.base_url, width=width))
    return 0


def _add_register(commands: Any, options: argparse.ArgumentParser) -> None:
    register = commands.add_parser(
        "register",
        parents=[options],
        help="register one rank's cell and address (PUT /route), with retries",
        description="Register one prefill rank, exactly as an SGLang rank would. Sizes default "
        "to 1 and ranks to 0; flags are the wire field names.",
    )
    cell = register.add_argument_group("the rank's cell")
    for name in _SIZES:
        cell.add_argument(_flag(name), type=int, default=1, metavar="N", help="(1)")
    for name in _RANKS:
        cell.add_argument(_flag(name), type=int, default=0, metavar="R", help="(0)")
    address = register.add_argument_group("the rank's KV-transfer address")
    address.add_argument("--rank-ip", required=True, help="address decode workers connect to")
    address.add_argument("--rank-port", type=int, required=True, help="its port")
    extra = register.add_argument_group("engine options (SGLang's optional keys)")
    for name, kind in {**_ALWAYS_SENT, **_SENT_WHEN_GIVEN}.items():
        help_text = "JSON object" if kind is json.loads else None
        extra.add_argument(_flag(name), type=kind, help=help_text)
    for name in _SWITCHES:
        extra.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None)
    extra.add_argument(
        "--field",
        action="append",
        metavar="NAME=JSON",
        help="any other field, for keys newer SGLang releases add (repeatable)",
    )
    register.set_defaults(run=_run_register, parser=register)


def _add_wait(commands: Any, options: argparse.ArgumentParser) -> None:
    wait = commands.add_parser(
        "wait",
        parents=[options],
        help="wait until every cell is registered; exit 1 naming the missing cells",
        description="Long-poll the port table until it is complete.",
    )
    wait.add_argument(
        "--timeout",
        dest="wait_timeout_seconds",
        metavar="SECONDS",
        type=float,
        help="seconds (300; PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS)",
    )
    wait.add_argument(
        "--json",
        action="store_true",
        help="print the final table as JSON (needs a prefill-bootstrap server)",
    )
    wait.set_defaults(run=_run_wait, parser=wait)


def _add_table(commands: Any, options: argparse.ArgumentParser) -> None:
    table = commands.add_parser(
        "table",
        parents=[options],
        help="show the port table: rows per dp group, registered and missing cells",
        description="Show the port table as a grid (or JSON for scripts). Exits 0 even when "
        "incomplete; use 'wait' to check completeness.",
    )
    table.add_argument("--json", action="store_true", help="the TableReport as JSON")
    table.add_argument(
        "--wait", type=float, default=0.0, help="long-poll up to this many seconds first"
    )
    table.add_argument("--width", type=int, help="grid width (default: the terminal's)")
    table.add_argument(
        "--watch", action="store_true", help="redraw the grid in place, in colour, until Ctrl-C"
    )
    table.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (2)")
    table.add_argument("--count", type=int, help="with --watch: stop after this many redraws")
    table.set_defaults(run=_run_table, parser=table)


def add_rank_commands(commands: Any) -> None:
    """Add ``register``, ``wait``, ``table``, ``watch`` and ``deregister`` to the
    ``prefill-bootstrap`` subcommands."""
    from prefill_bootstrap.client.feed_commands import add_feed_commands  # it imports this module

    options = _client_options()
    _add_register(commands, options)
    _add_wait(commands, options)
    _add_table(commands, options)
    add_feed_commands(commands, options)
