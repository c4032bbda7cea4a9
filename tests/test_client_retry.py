"""The retry policy: which failures are retried, how long, how it is logged, how it gives up.

The network is an ``httpx.MockTransport`` that fails exactly as scripted, so every test counts
the attempts the client really made.
"""

from __future__ import annotations

import errno
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import (
    ConfigurationError,
    RegistrationFailed,
    RequestRejected,
    ServerUnreachable,
)
from tests.conftest import sglang_registration

URL = "http://127.0.0.1:41234"
FAST = RetryPolicy(deadline=10.0, attempts=4, initial_backoff=0.0, max_backoff=0.0, jitter=0.0)
Outcome = Callable[[httpx.Request], httpx.Response]


def refused(request: httpx.Request) -> httpx.Response:
    refusal = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request) from refusal


def reset(request: httpx.Request) -> httpx.Response:
    cause = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request) from cause


def raises(kind: type[httpx.TransportError]) -> Outcome:
    def fail(request: httpx.Request) -> httpx.Response:
        raise kind("scripted failure", request=request)

    return fail


def status(code: int, message: str = "scripted") -> Outcome:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, json={"error": "x", "message": message, "details": []})

    return answer


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text="OK")


class Script:
    """A transport answering with the given outcomes in order, the last one repeating."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        index = min(len(self.requests) - 1, len(self.outcomes) - 1)
        return self.outcomes[index](request)

    def client(self, retry: RetryPolicy = FAST, **options: Any) -> BootstrapClient:
        return BootstrapClient(URL, retry=retry, transport=httpx.MockTransport(self), **options)


TRANSIENT_ERRORS = {
    "connection refused": refused,
    "connection reset": reset,
    "connect timeout": raises(httpx.ConnectTimeout),
    "read timeout": raises(httpx.ReadTimeout),
    "write timeout": raises(httpx.WriteTimeout),
    "pool timeout": raises(httpx.PoolTimeout),
    "server hung up": raises(httpx.RemoteProtocolError),
}


@pytest.mark.parametrize("failure", TRANSIENT_ERRORS.values(), ids=TRANSIENT_ERRORS.keys())
def test_a_transient_network_failure_is_retried_until_the_server_answers(failure: Outcome) -> None:
    script = Script(failure, failure, ok)
    with script.client() as client:
        client.register(sglang_registration())
    assert len(script.requests) == 3


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408, 429])
def test_a_transient_status_is_retried_until_the_server_answers(code: int) -> None:
    script = Script(status(code), ok)
    with script.client() as client:
        client.register(sglang_registration())
    assert len(script.requests) == 2


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 413, 422])
def test_a_client_error_is_raised_at_once_with_the_servers_message(code: int) -> None:
    script = Script(status(code, f"the server explains {code}"), ok)
    with script.client() as client, pytest.raises(RequestRejected) as caught:
        client.register(sglang_registration())
    assert len(script.requests) == 1
    assert caught.value.status_code == code
    assert caught.value.server_message == f"the server explains {code}"
    assert f"the server explains {code}" in str(caught.value)


def test_a_plain_text_rejection_carries_the_text_as_the_message() -> None:
    missing = "Missing inputs for bootstrap server."
    script = Script(lambda request: httpx.Response(400, text=missing))
    with script.client() as client, pytest.raises(RequestRejected) as caught:
        client.lookup(0, 0, 0, 0)
    assert caught.value.server_message == missing


def test_a_certificate_failure_is_a_configuration_error_and_not_retried() -> None:
    def bad_certificate(request: httpx.Request) -> httpx.Response:
        cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
        raise httpx.ConnectError("certificate verify failed", request=request) from cause

    script = Script(bad_certificate, ok)
    with script.client() as client, pytest.raises(ConfigurationError, match="--cacert"):
        client.register(sglang_registration())
    assert len(script.requests) == 1


@pytest.mark.parametrize("kind", [httpx.UnsupportedProtocol, httpx.LocalProtocolError])
def test_a_request_that_cannot_be_sent_is_not_retried(kind: type[httpx.TransportError]) -> None:
    script = Script(raises(kind), ok)
    with script.client() as client, pytest.raises(ConfigurationError) as caught:
        client.register(sglang_registration())
    assert len(script.requests) == 1
    assert isinstance(caught.value.__cause__, kind)


def test_retries_stop_after_the_configured_number_of_attempts() -> None:
    script = Script(refused)
    with (
        script.client(RetryPolicy(deadline=60, attempts=3, initial_backoff=0, jitter=0)) as c,
        pytest.raises(RegistrationFailed) as caught,
    ):
        c.register(sglang_registration())
    assert len(script.requests) == 3
    assert caught.value.attempts == 3


def test_retries_stop_at_the_deadline_even_with_attempts_left() -> None:
    script = Script(refused)
    policy = RetryPolicy(deadline=0.4, attempts=10_000, initial_backoff=0.05, max_backoff=0.05)
    started = time.monotonic()
    with script.client(policy) as client, pytest.raises(RegistrationFailed) as caught:
        client.register(sglang_registration())
    assert 0.4 <= time.monotonic() - started < 2.0
    assert caught.value.attempts == len(script.requests) < 10_000
    assert caught.value.elapsed >= 0.4


def test_the_last_wait_is_cut_short_so_an_attempt_is_made_at_the_deadline() -> None:
    script = Script(refused, ok)
    policy = RetryPolicy(deadline=0.3, attempts=5, initial_backoff=30.0, jitter=0.0)
    started = time.monotonic()
    with script.client(policy) as client:
        client.register(sglang_registration())
    assert len(script.requests) == 2
    assert 0.25 <= time.monotonic() - started < 2.0


def test_waits_double_from_the_initial_backoff_up_to_the_maximum(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(refused)
    policy = RetryPolicy(deadline=60, attempts=5, initial_backoff=0.01, max_backoff=0.04, jitter=0)
    with (
        caplog.at_level(logging.WARNING),
        script.client(policy) as client,
        pytest.raises(RegistrationFailed),
    ):
        client.register(sglang_registration())
    waits = [float(w) for w in re.findall(r"retrying in ([\d.]+)s", caplog.text)]
    assert waits == [0.01, 0.02, 0.04, 0.04]


def test_jitter_adds_at_most_the_configured_random_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(refused)
    policy = RetryPolicy(deadline=60, attempts=6, initial_backoff=0.0, max_backoff=0.0, jitter=0.02)
    with (
        caplog.at_level(logging.WARNING),
        script.client(policy) as client,
        pytest.raises(RegistrationFailed),
    ):
        client.register(sglang_registration())
    waits = [float(w) for w in re.findall(r"retrying in ([\d.]+)s", caplog.text)]
    assert len(waits) == 5
    assert all(0.0 <= wait <= 0.02 for wait in waits)


def test_every_failed_attempt_logs_one_line_naming_the_url_the_cell_and_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(refused)
    policy = RetryPolicy(deadline=60, attempts=3, initial_backoff=0, jitter=0)
    with (
        caplog.at_level(logging.WARNING),
        script.client(policy, rank=5) as client,
        pytest.raises(RegistrationFailed),
    ):
        client.register(sglang_registration(attn_tp_rank=1, rank_port=41001))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    for number, line in enumerate(lines, start=1):
        assert line.startswith("Rank 5 could not register cell (dp=0, cp=0, tp=1, pp=0)")
        assert f"at {URL}/route" in line
        assert f"attempt {number} of 3" in line
        assert "connection refused" in line
    assert lines[-1].endswith("giving up.")


def test_a_registration_that_runs_out_names_url_host_port_attempts_time_cause_and_hint() -> None:
    script = Script(refused)
    policy = RetryPolicy(deadline=60, attempts=2, initial_backoff=0, jitter=0)
    with script.client(policy) as client, pytest.raises(RegistrationFailed) as caught:
        client.register(sglang_registration())
    error = caught.value
    assert (error.url, error.host, error.port, error.attempts) == (
        f"{URL}/route",
        "127.0.0.1",
        41234,
        2,
    )
    assert error.last_cause == "connection refused"
    message = str(error)
    assert f"registration to {URL}/route failed after 2 attempt(s) over" in message
    assert "nothing listens at 127.0.0.1:41234: is 41234 the leader's bootstrap port" in message
    assert "sync_bootstrap_port" in message


def test_the_final_error_keeps_the_httpx_error_in_its_cause_chain() -> None:
    script = Script(refused)
    with script.client(RetryPolicy(attempts=1)) as client, pytest.raises(RegistrationFailed) as c:
        client.register(sglang_registration())
    chain = []
    error: BaseException | None = c.value
    while error is not None:
        chain.append(type(error))
        error = error.__cause__
    assert httpx.ConnectError in chain
    assert ConnectionRefusedError in chain


def test_a_read_that_runs_out_is_server_unreachable_naming_the_last_status() -> None:
    script = Script(status(503, "the state is not durable, retry"))
    with script.client() as client, pytest.raises(ServerUnreachable) as caught:
        client.table()
    assert not isinstance(caught.value, RegistrationFailed)
    assert caught.value.attempts == 4
    assert "HTTP 503: the state is not durable, retry" in str(caught.value)
    assert "table request to http://127.0.0.1:41234/prefill_port_table" in str(caught.value)


def test_a_timeout_that_runs_out_hints_at_reachability() -> None:
    script = Script(raises(httpx.ConnectTimeout))
    with script.client(RetryPolicy(attempts=1)) as client, pytest.raises(ServerUnreachable) as c:
        client.server_info()
    assert "is 127.0.0.1 reachable from this node" in str(c.value)


def test_a_policy_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline=-1)


def test_a_policy_cut_to_a_shorter_deadline_is_never_extended() -> None:
    policy = RetryPolicy(deadline=60)
    assert policy.within(5).deadline == 5
    assert policy.within(500).deadline == 60
    assert policy.within(-3).deadline == 0
