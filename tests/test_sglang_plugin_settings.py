"""The plugin's switch and settings, read before it touches SGLang (no SGLang needed here)."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import pytest

from prefill_bootstrap.client.errors import ConfigurationError
from prefill_bootstrap.client.sglang_plugin import load, read_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFILL_BOOTSTRAP_SGLANG", "PREFILL_BOOTSTRAP_URL"):
        monkeypatch.delenv(name, raising=False)


def test_the_distribution_declares_the_plugin_where_sglang_looks_for_it() -> None:
    (plugin,) = [
        ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "prefill_bootstrap"
    ]
    assert plugin.load() is load


def test_installed_but_not_enabled_it_applies_nothing_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="prefill_bootstrap"):
        load()
    assert [record.getMessage() for record in caplog.records] == [
        "prefill-bootstrap's SGLang plugin is installed but off (PREFILL_BOOTSTRAP_SGLANG is not "
        "set): SGLang registers prefill ranks the stock way."
    ]
    assert "sglang" not in sys.modules


def test_zero_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "0")
    assert read_settings().sglang is False


def test_a_bad_setting_is_an_error_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "1")
    monkeypatch.setenv("PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ConfigurationError, match="wait_timeout_seconds"):
        load()


def test_the_bootstrap_url_is_an_override_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_settings().url_override is None
    monkeypatch.setenv("PREFILL_BOOTSTRAP_URL", "http://10.0.0.1:9000")
    assert read_settings().url_override == "http://10.0.0.1:9000"


def test_the_plugin_and_the_cli_read_the_same_retry_and_wait_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_RETRY_DEADLINE_SECONDS", "7")
    monkeypatch.setenv("PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS", "42")
    monkeypatch.setenv("SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN", "s3cret")
    settings = read_settings()
    assert (settings.retry.deadline, settings.wait_timeout_seconds, settings.token) == (
        7.0,
        42.0,
        "s3cret",
    )
