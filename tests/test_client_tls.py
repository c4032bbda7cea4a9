"""The rank client over HTTPS: verified with the server's CA, refused at once without it."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prefill_bootstrap.cli import main
from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import ConfigurationError
from tests import tls
from tests.conftest import ServerProcess, sglang_registration

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def https_server(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> tuple[str, tls.TestCertificates]:
    """A TLS server and its CA; registering through the client is what waits for it to be up."""
    certificates = tls.make_certificates(tmp_path)
    server = server_factory(
        "--ssl-certfile", str(certificates.cert_file),
        "--ssl-keyfile", str(certificates.key_file),
        durable=False, wait=False,
    )  # fmt: skip
    url = f"https://127.0.0.1:{server.port}"
    verify = ssl.create_default_context(cafile=str(certificates.ca_file))
    patient = RetryPolicy(deadline=20, attempts=1000, initial_backoff=0.05, max_backoff=0.2)
    with BootstrapClient(url, verify=verify, retry=patient) as client:
        client.register(sglang_registration(attn_tp_rank=0))
    return url, certificates


def test_a_rank_registers_over_https_when_it_trusts_the_servers_ca(
    https_server: tuple[str, tls.TestCertificates],
) -> None:
    url, certificates = https_server
    verify = ssl.create_default_context(cafile=str(certificates.ca_file))
    with BootstrapClient(url, verify=verify) as client:
        client.register(sglang_registration(attn_tp_rank=1))
        assert client.table().complete


def test_an_untrusted_certificate_is_a_configuration_error_raised_at_once(
    https_server: tuple[str, tls.TestCertificates],
) -> None:
    url, _ = https_server
    started = time.monotonic()
    with BootstrapClient(url) as client, pytest.raises(ConfigurationError, match="--cacert"):
        client.register(sglang_registration(attn_tp_rank=1))
    assert time.monotonic() - started < 2


def test_the_cli_reads_the_table_over_https_with_cacert(
    https_server: tuple[str, tls.TestCertificates], capsys: pytest.CaptureFixture[str]
) -> None:
    url, certificates = https_server
    assert main(["table", "--url", url, "--cacert", str(certificates.ca_file)]) == 0
    assert "1 of 2 cells registered" in capsys.readouterr().out


def test_an_unreadable_cacert_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["table", "--cacert", str(tmp_path / "absent.pem")])
    assert caught.value.code == 2
