"""The core both HTTP clients share: building calls, reading answers, translating failures.

A call is described once (method, path, body, how to read the answer, what its failure means);
``BootstrapClient`` and ``AsyncBootstrapClient`` only differ in how they send it and sleep, the
way httpx's own sync and async clients share their request building. This is also the one place
where foreign errors become ours: an httpx error is either a transient failure the retry policy
absorbs or a configuration error raised at once, always ``from`` the original.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

import httpx
from pydantic import ValidationError
from tenacity import RetryCallState

from prefill_bootstrap.client.addresses import normalize_base_url
from prefill_bootstrap.client.readiness import (
    BUILTIN_SERVER,
    Readiness,
    ServerInfoProbe,
    read_server_info_probe,
)
from prefill_bootstrap.client.retry import (
    RetryPolicy,
    Transient,
    classify_transport_error,
    is_transient_status,
)
from prefill_bootstrap.shared.errors import (
    BootstrapError,
    CellNotFound,
    ConfigurationError,
    GroupReset,
    PortTableUnavailable,
    RegistrationFailed,
    RequestRejected,
    ServerUnreachable,
    TableIncomplete,
    UnexpectedAnswer,
    format_cell,
)
from prefill_bootstrap.shared.protocol import (
    DEREGISTER_PATH,
    HEARTBEAT_PATH,
    INSTANCE_HEADER,
    READY_PATH,
    ROUTE_PATH,
    SERVER_INFO_QUERY,
    TABLE_PATH,
    Cell,
    Deregistered,
    RankAddress,
    RankRegistration,
    ReadyReport,
    TableReport,
    instance_of,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WAIT_TIMEOUT",
    "LONG_POLL_SECONDS",
    "Call",
    "Core",
    "Deregistered",
    "Registration",
    "WaitPlan",
    "as_registration",
    "describe_invalid",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
"""Seconds for one request to connect and answer (long polls add their wait on top)."""
LONG_POLL_SECONDS = 30.0
"""Longest single ``?wait=`` poll: short enough that a dead server is noticed, and below the
idle timeouts of the proxies that sit in front of servers."""

DEFAULT_WAIT_TIMEOUT = 300.0
"""Seconds a rank waits for the whole group: nodes finish loading weights minutes apart."""
T = TypeVar("T")
Registration = RankRegistration | Mapping[str, Any]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request as both clients send it, and what its answers mean."""

    method: str
    path: str
    action: str
    """What the rank tried, as a log line continues "Rank 3 could not ..."."""
    noun: str
    """What failed, as an error message begins "... failed after 3 attempts"."""
    read: Callable[[httpx.Response], T]
    policy: RetryPolicy
    timeout: httpx.Timeout
    params: dict[str, str] | None = None
    json: Any = None
    registering: bool = False
    not_found: Callable[[], BootstrapError] | None = None
    answers: frozenset[int] = frozenset()
    """Statuses besides 2xx that ``read`` understands (a 503 that means "not yet")."""
    headers: dict[str, str] | None = None
    stream: bool = False
    """Hand ``read`` the response with its body still unread (the event stream): a failed
    answer's body is read first, so ``respond`` can quote it."""


@dataclass
class WaitPlan:
    """The clock of a wait (``wait_until_complete``, ``wait_until_ready``), shared by both
    clients."""

    timeout: float
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return max(0.0, self.started + self.timeout - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def next_poll(self) -> float:
        return min(self.remaining(), LONG_POLL_SECONDS)

    def pause_after(self, poll_started: float, poll: float, interval: float) -> float:
        """A server without long-poll support answers at once; then pace the polls ourselves."""
        answered_early = time.monotonic() - poll_started < poll * 0.5
        return min(interval, self.remaining()) if answered_early else 0.0


def _server_message(response: httpx.Response) -> str:
    """The sentence the server wrote: our JSON error shape, FastAPI's ``detail``, or plain text
    (SGLang's own answers are plain text)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])[:500]
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase


class Core:
    """Request building, response reading, error translation and retry wiring for both clients."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retry: RetryPolicy,
        auth_token: str | None,
        rank: int | None,
    ) -> None:
        self.base_url = normalize_base_url(url)
        parsed = httpx.URL(self.base_url)
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.timeout = timeout
        self.retry = retry
        if auth_token and not all(" " <= char <= "~" for char in auth_token):
            # Never echo it: the message ends up in logs.
            raise ConfigurationError(
                "the auth token holds a character an HTTP header cannot carry (a control "
                "character, a line break or non-ASCII): check the secret's value"
            )
        self.headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self.who = f"Rank {rank}" if rank is not None else "The bootstrap client"
        self.registered_instance: str | None = None
        """The group instance this client's last registration was acknowledged under (our
        server says so on every answer; SGLang's does not)."""

    def check_instance(self, report: ReadyReport) -> None:
        """A wait after registering must be about the group the rank registered in."""
        registered = self.registered_instance
        if registered is not None and report.instance_id != registered:
            raise GroupReset(self.base_url, registered, report.instance_id)

    def url(self, call: Call[Any]) -> str:
        return self.base_url + call.path

    @staticmethod
    def build(http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        return http.build_request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            timeout=call.timeout,
        )

    # -- the calls -------------------------------------------------------------------------------

    def register_call(
        self, registration: Registration
    ) -> tuple[RankRegistration, Call[str | None]]:
        """``PUT /route``; the call answers the instance the registration was acknowledged in."""
        reg = as_registration(registration)
        cell = format_cell(reg.cell)
        call: Call[str | None] = Call(
            "PUT",
            ROUTE_PATH,
            action=f"register cell {cell} as {reg.rank_ip}:{reg.rank_port}",
            noun="registration",
            policy=self.retry,
            timeout=httpx.Timeout(self.timeout),
            json=reg.wire(),
            registering=True,
            read=lambda response: response.headers.get(INSTANCE_HEADER),
        )
        return reg, call

    def heartbeat_call(self, registration: Registration) -> Call[float | None]:
        """``POST /heartbeat``: renew a leased cell; answers the new expiry (unix seconds)."""
        reg = as_registration(registration)
        cell = reg.cell
        return Call(
            "POST",
            HEARTBEAT_PATH,
            action=f"renew the lease of cell {format_cell(cell)}",
            noun="heartbeat",
            read=lambda response: _json_object(response).get("lease_expires_at"),
            policy=self.retry,
            timeout=httpx.Timeout(self.timeout),
            json={
                "dp": cell.dp,
                "cp": cell.cp,
                "tp": cell.tp,
                "pp": cell.pp,
                "rank_ip": reg.rank_ip,
                "rank_port": reg.rank_port,
            },
            not_found=lambda: CellNotFound(cell),
        )

    def deregister_call(
        self, cell: Cell, address: RankAddress, within: float | None = None
    ) -> Call[Deregistered | None]:
        """``POST /deregister``: the cell leaves the table if ``address`` holds it. Answers what
        left, or None when the server holds no such cell (already gone: a retry whose first
        answer was lost reads the same). ``within`` bounds the whole call, retries included (a
        rank shutting down must not hang on a dead server)."""
        policy, timeout = self.retry, self.timeout
        if within is not None:
            policy, timeout = self.retry.within(within), min(timeout, max(within, 0.1))
        return Call(
            "POST",
            DEREGISTER_PATH,
            action=f"deregister cell {format_cell(cell)} at {address.rank_ip}:{address.rank_port}",
            noun="deregistration",
            read=lambda response: _read_departure(response, self.base_url + DEREGISTER_PATH),
            policy=policy,
            timeout=httpx.Timeout(timeout),
            json={
                "dp": cell.dp,
                "cp": cell.cp,
                "tp": cell.tp,
                "pp": cell.pp,
                "rank_ip": address.rank_ip,
                "rank_port": address.rank_port,
            },
            answers=frozenset({404}),
        )

    def lookup_call(self, cell: Cell) -> Call[RankAddress]:
        return Call(
            "GET",
            ROUTE_PATH,
            action=f"look up cell {format_cell(cell)}",
            noun="lookup",
            read=lambda response: RankAddress.model_validate_json(response.content),
            policy=self.retry,
            timeout=httpx.Timeout(self.timeout),
            params={
                "prefill_dp_rank": str(cell.dp),
                "prefill_cp_rank": str(cell.cp),
                "target_tp_rank": str(cell.tp),
                "target_pp_rank": str(cell.pp),
            },
            not_found=lambda: CellNotFound(cell),
        )

    def server_info_call(self) -> Call[dict[str, Any]]:
        return Call(
            "GET",
            ROUTE_PATH,
            action="read the server info",
            noun="server-info request",
            read=_json_object,
            policy=self.retry,
            timeout=httpx.Timeout(self.timeout),
            params=dict(SERVER_INFO_QUERY),
        )

    def table_call(self, wait: float = 0.0, policy: RetryPolicy | None = None) -> Call[TableReport]:
        return Call(
            "GET",
            TABLE_PATH,
            action="read the port table",
            noun="table request",
            read=lambda response: TableReport.model_validate_json(response.content),
            policy=policy or self.retry,
            timeout=httpx.Timeout(self.timeout, read=self.timeout + wait),
            params={"wait": f"{wait:.3f}"} if wait > 0 else None,
            not_found=lambda: PortTableUnavailable(self.base_url + TABLE_PATH),
        )

    def _long_poll_params(self, wait: float) -> dict[str, str] | None:
        """``wait``, and the instance this client registered in: the server answers at once if
        the group has been reset since, rather than parking the poll on the new group."""
        params = {"wait": f"{wait:.3f}"} if wait > 0 else {}
        if params and self.registered_instance is not None:
            params["instance"] = self.registered_instance
        return params or None

    def deadline_retry(self) -> RetryPolicy:
        """A wait's last request, after its deadline (the table naming what is missing): one
        request timeout's worth of retries, so a dead server cannot stretch the wait."""
        return self.retry.within(self.timeout)

    def ready_call(self, wait: float, policy: RetryPolicy) -> Call[ReadyReport]:
        """The rank's wait: ``GET /ready?wait=``, a few hundred bytes whatever the group's size
        (the table is fetched only to name what is missing at the deadline)."""
        return Call(
            "GET",
            READY_PATH,
            action="ask whether the port table is complete",
            noun="readiness request",
            read=_read_ready,
            policy=policy,
            timeout=httpx.Timeout(self.timeout, read=self.timeout + wait),
            params=self._long_poll_params(wait),
            not_found=lambda: PortTableUnavailable(self.base_url + READY_PATH),
            answers=frozenset({503}),
        )

    def server_info_probe_call(self, policy: RetryPolicy) -> Call[ServerInfoProbe]:
        """The completeness check every SGLang bootstrap server answers: 200 with the info once
        every cell is registered, 503 naming the count before."""
        return Call(
            "GET",
            ROUTE_PATH,
            action="ask whether the prefill group is complete",
            noun="server-info request",
            read=read_server_info_probe,
            policy=policy,
            timeout=httpx.Timeout(self.timeout),
            params=dict(SERVER_INFO_QUERY),
            answers=frozenset({503}),
        )

    # -- answers and failures --------------------------------------------------------------------

    def respond(self, call: Call[T], response: httpx.Response) -> T:
        status = response.status_code
        if 200 <= status < 300 or status in call.answers:
            try:
                return call.read(response)
            except ValueError as exc:  # pydantic's ValidationError and JSON errors alike
                problem = str(exc).splitlines()[0]
                raise UnexpectedAnswer(self.url(call), status, problem) from exc
        if status == 404 and call.not_found is not None:
            raise call.not_found()
        message = _server_message(response)
        if is_transient_status(status):
            raise Transient("status", f"HTTP {status}: {message}", status)
        log.info(
            "%s could not %s at %s: the server refused it with HTTP %d (%s); not retrying.",
            self.who,
            call.action,
            self.url(call),
            status,
            message,
        )
        raise RequestRejected(self.url(call), status, message, _body(response))

    def raise_for_transport(self, call: Call[Any], exc: httpx.HTTPError) -> NoReturn:
        """The one place httpx errors are translated."""
        transient = classify_transport_error(exc)
        if transient is not None:
            raise transient from exc
        if isinstance(exc, httpx.ConnectError):  # TLS: the certificate or handshake is wrong
            raise ConfigurationError(
                f"cannot open a secure connection to {self.url(call)}: {exc}; pass the server's "
                "CA certificate (verify=... / --cacert) or use http://"
            ) from exc
        raise ConfigurationError(f"cannot send {call.noun} to {self.url(call)}: {exc}") from exc

    def on_retry(self, call: Call[Any], state: RetryCallState) -> None:
        log.warning(
            "%s could not %s at %s (attempt %d of %d, %.1fs elapsed): %s; retrying in %.2fs.",
            self.who,
            call.action,
            self.url(call),
            state.attempt_number,
            call.policy.attempts,
            state.seconds_since_start or 0.0,
            _cause(state).cause,
            state.upcoming_sleep,
        )

    def on_exhausted(self, call: Call[Any], state: RetryCallState) -> NoReturn:
        last = _cause(state)
        elapsed = state.seconds_since_start or 0.0
        log.warning(
            "%s could not %s at %s (attempt %d of %d, %.1fs elapsed): %s; giving up.",
            self.who,
            call.action,
            self.url(call),
            state.attempt_number,
            call.policy.attempts,
            elapsed,
            last.cause,
        )
        hint = self.hint(last, call.registering)
        if call.registering:
            raise RegistrationFailed(
                self.url(call), self.host, self.port, state.attempt_number, elapsed, last.cause,
                hint,
            ) from last  # fmt: skip
        raise ServerUnreachable(
            self.url(call), state.attempt_number, elapsed, last.cause, hint, action=call.noun
        ) from last

    def hint(self, last: Transient, registering: bool) -> str:
        where = f"{self.host}:{self.port}"
        sync = (
            " Multi-node ranks must call sync_bootstrap_port first so every node uses the "
            "leader's port."
            if registering
            else ""
        )
        if last.kind == "refused":
            return (
                f"nothing listens at {where}: is {self.port} the leader's bootstrap port, and is "
                f"its server running?{sync}"
            )
        if last.kind == "unresolved":
            return f"{self.host} does not resolve: check dist_init_addr or the bootstrap host."
        if last.kind == "timeout":
            return (
                f"no answer from {where} in time: is {self.host} reachable from this node "
                "(firewall, wrong interface)?"
            )
        if last.kind == "status":
            return f"the server at {where} is up but not answering successfully; see its log."
        return f"check that {where} is the leader's bootstrap server and reachable.{sync}"

    # -- outcomes worth a log line ---------------------------------------------------------------

    def registered(self, reg: RankRegistration, instance_id: str | None) -> None:
        if instance_id is not None:  # the header is the incarnation: a move is no reset
            self.registered_instance = instance_of(instance_id)
        log.info(
            "%s registered cell %s as %s:%d at %s.",
            self.who,
            format_cell(reg.cell),
            reg.rank_ip,
            reg.rank_port,
            self.base_url,
        )

    def registering_again(self, reset: GroupReset) -> None:
        log.warning("%s registers again: %s.", self.who, reset)

    def waiting(self, report: ReadyReport, plan: WaitPlan) -> None:
        log.info(
            "%s is waiting for the port table at %s: %d of %s cells registered, %.0fs left.",
            self.who,
            self.base_url,
            report.registered_cells,
            report.expected_cells if report.expected_cells is not None else "?",
            plan.remaining(),
        )

    def readiness(self, report: ReadyReport) -> Readiness:
        return Readiness(
            self.base_url,
            "prefill-bootstrap",
            report.expected_cells,
            report.registered_cells,
            report.instance_id,
            report.ready,
        )

    def ready(self, report: ReadyReport, plan: WaitPlan) -> Readiness:
        log.info(
            "%s sees the port table at %s complete: %d of %d cells after %.1fs.",
            self.who,
            self.base_url,
            report.registered_cells,
            report.expected_cells or 0,
            plan.elapsed(),
        )
        return self.readiness(report)

    def waiting_for_builtin(self, probe: ServerInfoProbe, plan: WaitPlan) -> None:
        log.info(
            "%s is waiting for the prefill group at %s (%s): %s registered so far, %.0fs left.",
            self.who,
            self.base_url,
            BUILTIN_SERVER,
            probe.registered if probe.registered is not None else "an unknown number",
            plan.remaining(),
        )

    def complete_at_builtin(self, probe: ServerInfoProbe, plan: WaitPlan) -> Readiness:
        log.info(
            "%s sees the prefill group at %s (%s) complete after %.1fs.",
            self.who,
            self.base_url,
            BUILTIN_SERVER,
            plan.elapsed(),
        )
        # That server only says "complete" (it counts registrations, not distinct cells).
        return Readiness(self.base_url, BUILTIN_SERVER, probe.expected_cells, None)

    def incomplete_at_builtin(
        self, probe: ServerInfoProbe, plan: WaitPlan, expected_cells: int | None
    ) -> TableIncomplete:
        return TableIncomplete(
            (),
            expected_cells,
            waited_seconds=plan.elapsed(),
            url=self.base_url + ROUTE_PATH,
            registered_count=probe.registered,
            server=BUILTIN_SERVER,
        )

    def incomplete(
        self, report: ReadyReport, plan: WaitPlan, table: TableReport | None
    ) -> TableIncomplete:
        """At the deadline: the missing cells, and (from the table, when it could be read) the
        hosts that did register, which tell an operator which node is absent."""
        return TableIncomplete(
            (table or report).missing_cells,
            report.expected_cells,
            registered_hosts=table.registered_hosts() if table is not None else None,
            waited_seconds=plan.elapsed(),
            url=self.base_url + TABLE_PATH,  # what an operator curls to see the rest
            missing_count=(table or report).missing_count,
        )


def _read_ready(response: httpx.Response) -> ReadyReport:
    try:
        return ReadyReport.model_validate_json(response.content)
    except ValueError:
        if response.status_code == 503:  # not ours: a proxy's or a restarting server's 503
            raise Transient("status", f"HTTP 503: {_server_message(response)}", 503) from None
        raise


def _read_departure(response: httpx.Response, url: str) -> Deregistered | None:
    if response.status_code != 404:
        return Deregistered.model_validate_json(response.content)
    body = _body(response)
    if isinstance(body, dict) and body.get("error") == "cell_not_found":
        return None
    # Not our "no such cell": a server without the route (an older release, SGLang's own).
    raise UnexpectedAnswer(url, 404, "the server has no POST /deregister (an older release?)")


def describe_invalid(exc: ValidationError) -> str:
    """pydantic's report as one line naming each field, the way the server's 422 names them."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def as_registration(registration: Registration) -> RankRegistration:
    """A registration validated on this side, so a bad one never leaves the rank."""
    if isinstance(registration, RankRegistration):
        return registration
    try:
        return RankRegistration.model_validate(dict(registration))
    except ValidationError as exc:
        raise ConfigurationError(f"invalid registration: {describe_invalid(exc)}") from exc


def _json_object(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    return body


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _cause(state: RetryCallState) -> Transient:
    assert state.outcome is not None
    exc = state.outcome.exception()
    assert isinstance(exc, Transient)
    return exc
