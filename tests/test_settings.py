"""Settings come from one place: defaults < PREFILL_BOOTSTRAP_* environment < CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefill_bootstrap.service.settings import DEFAULT_STATE_DIR, ServerSettings
from prefill_bootstrap.shared.protocol import DEFAULT_PORT


def test_the_embedded_defaults_serve_loopback_on_sglangs_port_with_durable_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HOST", "PORT", "STATE_DIR"):
        monkeypatch.delenv(f"PREFILL_BOOTSTRAP_{name}", raising=False)
    settings = ServerSettings()
    assert (settings.host, settings.port) == ("127.0.0.1", DEFAULT_PORT)
    assert DEFAULT_PORT == 8998  # SGLang's default --disaggregation-bootstrap-port
    assert settings.state_dir == DEFAULT_STATE_DIR


def test_environment_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_PORT", "9100")
    monkeypatch.setenv("PREFILL_BOOTSTRAP_STATE_DIR", "/var/lib/pb")
    settings = ServerSettings()
    assert settings.port == 9100
    assert settings.state_dir == Path("/var/lib/pb")


def test_explicit_values_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFILL_BOOTSTRAP_PORT", "9100")
    assert ServerSettings(port=9200).port == 9200


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_state_dir_means_memory_only(empty: str) -> None:
    assert ServerSettings(state_dir=empty).state_dir is None


def test_settings_are_frozen() -> None:
    settings = ServerSettings()
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 70000),
        ("room_capacity", 0),
        ("room_ttl_seconds", 0),
        ("event_history", 8),
        ("keepalive_seconds", 31),  # a watch client would take the silence for a dead stream
        ("watcher_buffer_bytes", 100),
    ],
)
def test_out_of_range_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ServerSettings(**{field: value})
