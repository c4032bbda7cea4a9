"""``prefill-bootstrap doctor``: check, step by step, what a rank needs to register and be found.

Each check says what it saw and, when something is wrong, what to do. The steps follow the path
a registration takes (name -> address -> TCP -> HTTP -> token -> table), and later steps are
skipped when an earlier one makes them meaningless, so the first failure is the one to fix.
Nothing here changes the server: the token probe sends a body the server must refuse.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx

from prefill_bootstrap.client.addresses import (
    bootstrap_url,
    format_host,
    is_multi_node,
    resolve_bootstrap_host,
    split_host_port,
)
from prefill_bootstrap.shared.errors import ConfigurationError, format_cell
from prefill_bootstrap.shared.protocol import DEFAULT_PORT, TableReport

__all__ = ["Check", "DoctorOptions", "as_json", "diagnose", "healthy", "render_checks"]

Status = Literal["ok", "warn", "fail", "skip"]
CLOCK_SKEW_WARN_SECONDS = 5.0
_MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


@dataclass(frozen=True)
class DoctorOptions:
    """What a rank knows: its ``dist_init_addr``, its local bootstrap port, maybe the server URL."""

    dist_init_addr: str | None = None
    bootstrap_port: int | None = None
    url: str | None = None
    nnodes: int | None = None
    local_host: str = "127.0.0.1"
    auth_token: str | None = None
    timeout: float = 3.0


@dataclass
class Check:
    step: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass
class _Findings:
    checks: list[Check] = field(default_factory=list)

    def add(self, step: str, status: Status, detail: str, fix: str | None = None) -> Status:
        self.checks.append(Check(step, status, detail, fix))
        return status

    def skip(self, *steps: str) -> None:
        for step in steps:
            self.add(step, "skip", "not checked: an earlier step failed")


def _target(options: DoctorOptions) -> tuple[str, int, str]:
    """Host and port this rank would register to, and where that choice came from."""
    if options.url:
        host, port = split_host_port(options.url.split("://", 1)[-1].rstrip("/"), DEFAULT_PORT)
        return host, port or DEFAULT_PORT, "--url"
    port = options.bootstrap_port or DEFAULT_PORT
    host = resolve_bootstrap_host(options.dist_init_addr, options.local_host, nnodes=options.nnodes)
    source = "the host of --dist-init-addr" if options.dist_init_addr else "the local host"
    return host, port, f"{source} and this node's --bootstrap-port"


def _connects(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)


def _resolve(host: str, port: int) -> str:
    return str(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])


def diagnose(
    options: DoctorOptions,
    client_factory: Callable[[str], httpx.Client] | None = None,
    resolve: Callable[[str, int], str] = _resolve,
) -> list[Check]:
    """Run every check; ``client_factory(base_url)`` and ``resolve(host, port)`` let tests
    inject a transport and a name service."""
    found = _Findings()
    try:
        host, port, source = _target(options)
    except ConfigurationError as exc:
        found.add("address", "fail", str(exc), "pass --dist-init-addr as host:port")
        return found.checks

    try:
        resolved = resolve(host, port)
        found.add("resolve", "ok", f"{host} resolves to {resolved} ({source})")
    except socket.gaierror as exc:
        found.add(
            "resolve",
            "fail",
            f"{host} does not resolve: {exc.strerror}",
            "check the leader's host name in --dist-init-addr (and DNS from this node), or "
            "use its IP address",
        )
        found.skip("port", "connect", "health", "token", "table")
        return found.checks

    multi_node = is_multi_node(options.dist_init_addr, options.nnodes)
    if options.url and options.bootstrap_port and options.bootstrap_port != port:
        found.add(
            "port",
            "fail",
            f"this node's bootstrap port {options.bootstrap_port} differs from the leader's "
            f"server port {port}: a rank that registers to "
            f"{format_host(host)}:{options.bootstrap_port} is refused and its cells stay empty",
            "take the leader's port before registering (bootstrap_prefill_rank / "
            "sync_bootstrap_port do), or give every node the same --disaggregation-bootstrap-port",
        )
    elif multi_node and not options.url:
        found.add(
            "port",
            "warn",
            f"multi-node: ranks must use the leader's bootstrap port, and this node's is {port}; "
            "pass --url <leader>:<port> to compare the two",
            "ranks calling sync_bootstrap_port use the leader's port whatever this node's is",
        )
    else:
        found.add("port", "ok", f"registering to {format_host(host)}:{port}")

    refused = _connects(host, port, options.timeout)
    if refused is not None:
        fix = "start the bootstrap server on the leader (prefill-bootstrap serve) first"
        if port != DEFAULT_PORT and _connects(host, DEFAULT_PORT, options.timeout) is None:
            fix = (
                f"a server answers at {format_host(host)}:{DEFAULT_PORT}, not at port {port}: "
                "this node's bootstrap port is not the leader's — the classic multi-node mistake; "
                "sync the leader's port (sync_bootstrap_port) or pin the same port on every node"
            )
        found.add("connect", "fail", f"TCP {format_host(host)}:{port}: {refused}", fix)
        found.skip("health", "token", "table")
        return found.checks
    found.add("connect", "ok", f"TCP {format_host(host)}:{port} accepts connections")

    base = options.url if options.url and "://" in options.url else bootstrap_url(host, port)
    make = client_factory or (lambda url: httpx.Client(base_url=url, timeout=options.timeout))
    with make(base) as http:
        _check_http(found, http, options, base)
    return found.checks


def _check_http(found: _Findings, http: httpx.Client, options: DoctorOptions, base: str) -> None:
    try:
        health = http.get("/health")
    except httpx.HTTPError as exc:
        found.add(
            "health",
            "fail",
            f"GET {base}/health failed: {exc}",
            "is this a prefill-bootstrap or SGLang bootstrap server? (TLS needs https://)",
        )
        found.skip("token", "table")
        return
    if health.status_code != 200:
        found.add(
            "health",
            "fail",
            f"GET /health answered HTTP {health.status_code}",
            "check the server's log",
        )
        found.skip("token", "table")
        return
    found.add("health", "ok", f"{base}/health answers OK")
    _check_clock(found, health)
    _check_token(found, http, options)
    _check_table(found, http, options)


def _check_clock(found: _Findings, response: httpx.Response) -> None:
    date = response.headers.get("date")
    if not date:
        return
    skew = time.time() - parsedate_to_datetime(date).timestamp()
    if abs(skew) > CLOCK_SKEW_WARN_SECONDS:
        found.add(
            "clock",
            "warn",
            f"this node's clock is {skew:+.0f}s off the server's",
            "run NTP on every node: lease expiry and registration times assume agreeing clocks",
        )
    else:
        found.add("clock", "ok", f"clocks agree within {CLOCK_SKEW_WARN_SECONDS:g}s")


def _check_token(found: _Findings, http: httpx.Client, options: DoctorOptions) -> None:
    # An empty object can never register, so this probe changes nothing whatever the answer.
    open_answer = http.put("/route", json={})
    if open_answer.status_code != 401:
        found.add("token", "ok", "registrations need no token")
        return
    if not options.auth_token:
        found.add(
            "token",
            "fail",
            "the server requires a bearer token for registrations",
            "give ranks the token (--auth-token, PREFILL_BOOTSTRAP_AUTH_TOKEN or "
            "SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN)",
        )
        return
    headers = {"authorization": f"Bearer {options.auth_token}"}
    if http.put("/route", json={}, headers=headers).status_code == 401:
        found.add(
            "token",
            "fail",
            "the server refuses this token",
            "use the token the server was started with",
        )
    else:
        found.add("token", "ok", "the server accepts this token")


def _check_table(found: _Findings, http: httpx.Client, options: DoctorOptions) -> None:
    headers = {"authorization": f"Bearer {options.auth_token}"} if options.auth_token else {}
    response = http.get("/prefill_port_table", headers=headers)
    if response.status_code != 200:
        found.add(
            "table",
            "fail",
            f"GET /prefill_port_table answered HTTP {response.status_code}",
            "is this an SGLang built-in bootstrap server? It has no diagnostics route",
        )
        return
    report = TableReport.model_validate(response.json())
    if report.topology is None:
        found.add(
            "table",
            "warn",
            "no rank has registered yet",
            "start the prefill ranks; if they run, they reach another server or port",
        )
    elif report.complete:
        found.add(
            "table",
            "ok",
            f"complete: {report.registered_cells}/{report.expected_cells} cells registered",
        )
    else:
        missing = report.missing_cells
        shown = ", ".join(format_cell(cell) for cell in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        hosts = ", ".join(report.registered_hosts()) or "none"
        found.add(
            "table",
            "fail",
            f"incomplete: {len(missing)} of {report.expected_cells} cells missing: {shown}{more}; "
            f"hosts that registered: {hosts}",
            "start (or fix the port of) the ranks of the missing cells; a whole node missing "
            "usually means that node registers to the wrong port",
        )
    if report.expired_cells:
        found.add(
            "leases",
            "fail",
            f"{len(report.expired_cells)} leased cells expired (no heartbeat): "
            + ", ".join(format_cell(cell) for cell in report.expired_cells[:8]),
            "check that those ranks are alive and reach the server; restart them to re-register",
        )
    if report.conflicts:
        latest = report.conflicts[-1]
        found.add(
            "conflicts",
            "warn",
            f"{len(report.conflicts)} registrations refused for contradicting the topology; "
            "latest: "
            f"{format_host(latest.rank_ip)}:{latest.rank_port} offered "
            f"{latest.field}={latest.offered!r}, established {latest.established!r}",
            "make every rank's parallelism flags agree; if the group changed shape on purpose, "
            "reset the server (DELETE /prefill_port_table or serve --reset)",
        )


def render_checks(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"[{_MARKS[check.status]}] {check.step}: {check.detail}")
        if check.fix and check.status in ("warn", "fail"):
            lines.append(f"       fix: {check.fix}")
    verdict = "everything looks fine" if healthy(checks) else "problems found (see above)"
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines) + "\n"


def healthy(checks: list[Check]) -> bool:
    return all(check.status in ("ok", "skip") for check in checks)


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": healthy(checks), "checks": [asdict(check) for check in checks]}
