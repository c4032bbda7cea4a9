"""The client against real ``prefill-bootstrap serve`` processes on loopback ports."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import RegistrationFailed, RequestRejected
from prefill_bootstrap.shared.protocol import RankRegistration
from tests.conftest import ServerProcess, free_port, sglang_registration

pytestmark = pytest.mark.timeout(60)

PATIENT = RetryPolicy(deadline=20.0, attempts=200, initial_backoff=0.05, max_backoff=0.5)


def test_a_rank_started_before_its_server_registers_once_the_server_is_up(
    server_factory: Callable[..., ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    late_start = threading.Timer(3.0, server_factory, kwargs={"port": port, "durable": False})
    started = time.monotonic()
    late_start.start()
    try:
        with (
            caplog.at_level(logging.WARNING),
            BootstrapClient(f"127.0.0.1:{port}", retry=PATIENT) as client,
        ):
            client.register(sglang_registration())
            report = client.table()
    finally:
        late_start.join()
    elapsed = time.monotonic() - started
    assert 3.0 <= elapsed < PATIENT.deadline
    assert report.registered_cells == 1
    assert "connection refused; retrying in" in caplog.text


def test_a_rank_registering_to_a_port_without_server_fails_naming_that_port() -> None:
    port = free_port()
    policy = RetryPolicy(deadline=1.0, attempts=100, initial_backoff=0.05, max_backoff=0.2)
    started = time.monotonic()
    with (
        BootstrapClient(f"127.0.0.1:{port}", retry=policy) as client,
        pytest.raises(RegistrationFailed) as caught,
    ):
        client.register(sglang_registration())
    assert time.monotonic() - started < 5
    assert caught.value.port == port
    assert f"nothing listens at 127.0.0.1:{port}: is {port} the leader's bootstrap port" in str(
        caught.value
    )


def test_a_real_server_rejecting_a_conflict_is_not_retried(
    server_factory: Callable[..., ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(durable=False)
    with caplog.at_level(logging.WARNING), BootstrapClient(server.url, retry=PATIENT) as client:
        client.register(sglang_registration(attn_tp_rank=0))
        started = time.monotonic()
        with pytest.raises(RequestRejected) as caught:
            client.register(sglang_registration(attn_tp_rank=1, attn_tp_size=4))
    assert time.monotonic() - started < 2
    assert "retrying" not in caplog.text
    assert caught.value.status_code == 409
    assert "attn_tp_size=4 contradicts the established attn_tp_size=2" in str(caught.value)


def test_a_real_server_rejecting_an_invalid_field_is_not_retried(
    server_factory: Callable[..., ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(durable=False)
    unchecked = RankRegistration.model_construct(**sglang_registration(rank_port=70000))
    with (
        caplog.at_level(logging.WARNING),
        BootstrapClient(server.url, retry=PATIENT) as client,
        pytest.raises(RequestRejected) as caught,
    ):
        client.register(unchecked)
    assert "retrying" not in caplog.text
    assert caught.value.status_code == 422
    assert "rank_port" in caught.value.server_message


def test_waiting_on_a_real_server_long_polls_until_the_last_rank_registers(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(durable=False)
    with BootstrapClient(server.url) as waiter, BootstrapClient(server.url) as late:
        waiter.register(sglang_registration(attn_tp_rank=0))
        timer = threading.Timer(0.5, late.register, [sglang_registration(attn_tp_rank=1)])
        timer.start()
        try:
            report = waiter.wait_until_complete(30)
        finally:
            timer.join()
    assert report.complete
    assert sorted(cell.tp for cell in report.cells) == [0, 1]
