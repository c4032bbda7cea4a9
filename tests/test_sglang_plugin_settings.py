"""The plugin's switch and settings, read before it touches SGLang (no SGLang needed here)."""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import entry_points

import pytest

from prefill_bootstrap.client.sglang_plugin import load, read_settings
from prefill_bootstrap.shared.errors import ConfigurationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("PREFILL_BOOTSTRAP_", "SGLANG_")):
            monkeypatch.delenv(name)


@pytest.fixture
def no_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing SGLang fails: a plugin that is off must never try."""
    monkeypatch.setitem(sys.modules, "sglang", None)


def test_the_distribution_declares_the_plugin_where_sglang_looks_for_it() -> None:
    (plugin,) = [
        ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "prefill_bootstrap"
    ]
    assert plugin.load() is load


OFF = (
    "prefill-bootstrap's SGLang plugin is installed but off (PREFILL_BOOTSTRAP_SGLANG is not 1): "
    "SGLang registers prefill ranks the stock way."
)


@pytest.mark.usefixtures("no_sglang")
def test_installed_but_not_enabled_it_applies_nothing_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="prefill_bootstrap"):
        load()
    assert [record.getMessage() for record in caplog.records] == [OFF]


@pytest.mark.usefixtures("no_sglang")
def test_zero_means_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "0")
    with caplog.at_level(logging.INFO, logger="prefill_bootstrap"):
        load()
    assert [record.getMessage() for record in caplog.records] == [OFF]


@pytest.mark.usefixtures("no_sglang")
def test_while_off_the_other_settings_are_not_even_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_RETRY_ATTEMPTS", "0")
    load()


def test_enabled_with_a_bad_setting_it_stops_the_process_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "1")
    monkeypatch.setenv("PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS", "soon")
    with pytest.raises(
        SystemExit,
        match="so this process stops: invalid setting: PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS",
    ):
        load()


def test_a_switch_that_is_neither_on_nor_off_stops_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "enabled")
    with pytest.raises(SystemExit, match="PREFILL_BOOTSTRAP_SGLANG='enabled': write 1 or 0"):
        load()


@pytest.mark.usefixtures("no_sglang")
def test_enabled_where_sglang_cannot_be_imported_it_stops_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "1")
    with pytest.raises(SystemExit, match="cannot import what the plugin hooks"):
        load()


def test_enabled_under_sglangs_rust_server_it_stops_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_SGLANG", "1")
    monkeypatch.setenv("SGLANG_RUST_SERVER", "1")
    with pytest.raises(SystemExit, match="SGLANG_RUST_SERVER is set"):
        load()


def test_a_blank_or_malformed_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_URL", "  ")
    assert read_settings().url_override is None
    monkeypatch.setenv("PREFILL_BOOTSTRAP_URL", "http://10.0.0.1:9000/some/path")
    with pytest.raises(ConfigurationError, match="PREFILL_BOOTSTRAP_URL"):
        read_settings()


def test_a_zero_wait_is_refused_rather_than_failing_every_rank_but_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_WAIT_TIMEOUT_SECONDS", "0")
    with pytest.raises(ConfigurationError, match="WAIT_TIMEOUT_SECONDS: Input should be greater"):
        read_settings()


def test_a_tokens_surrounding_whitespace_is_not_part_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_AUTH_TOKEN", "s3cret\n")
    assert read_settings().token == "s3cret"


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
