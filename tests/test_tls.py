"""HTTPS end to end: the server serves a certificate, clients verify it with the CA bundle."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, sglang_registration
from tests.tls import make_certificates


@pytest.mark.timeout(60)
def test_a_registration_round_trips_over_verified_https(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefill_bootstrap.cli", "serve", "--port", str(port),
         "--state-dir", "", "--ssl-certfile", str(certificates.cert_file),
         "--ssl-keyfile", str(certificates.key_file)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=str(certificates.ca_file))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        response = httpx.put(f"{url}/route", json=sglang_registration(), verify=verify)
        assert (response.status_code, response.text) == (200, "OK")
        report = httpx.get(f"{url}/prefill_port_table", verify=verify).json()
        assert report["registered_cells"] == 1
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health", verify=ssl.create_default_context())
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    assert "listening on https://" in (tmp_path / "server.log").read_text()


def test_a_certificate_without_its_key_is_refused() -> None:
    from prefill_bootstrap.service import ServerSettings

    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile"):
        ServerSettings(ssl_certfile=Path("/tmp/cert.pem"))
