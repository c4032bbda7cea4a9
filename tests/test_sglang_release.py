"""Telling SGLang releases apart by what their code has, and taking their sending over.

These use small classes written the way each release shape is; tests/test_sglang_plugin.py runs
the same code on the real ``CommonKVManager`` of real releases.
"""

from __future__ import annotations

from typing import Any

import pytest

from prefill_bootstrap.client.sglang_release import InlineSend, SplitSend, detect_shape
from prefill_bootstrap.shared.errors import ConfigurationError, UnsupportedSGLang

SENT_FOR_REAL: list[Any] = []


class requests:
    @staticmethod
    def put(url: str, json: Any = None, timeout: float = 0) -> Any:
        SENT_FOR_REAL.append((url, json))
        raise AssertionError("the release's own requests.put must never run")


class InlineManager:
    bootstrap_port = 8998

    def register_to_bootstrap(self) -> None:
        payload = {"attn_tp_rank": 1, "rank_port": 41001}
        response = requests.put(f"http://10.0.0.1:{self.bootstrap_port}/route", json=payload)
        assert response.status_code == 200


class SplitManager:
    def register_to_bootstrap(self) -> None:
        for tp in (0, 1):
            self._register_topology_row("http://10.0.0.1:8998/route", {"attn_tp_rank": tp})

    def _register_topology_row(self, url: str, payload: dict[str, Any]) -> None:
        SENT_FOR_REAL.append((url, payload))


class UnknownManager:
    def register_to_bootstrap(self) -> None:
        self.client.send({"attn_tp_rank": 0})  # type: ignore[attr-defined]


def test_a_release_that_sends_through_register_topology_row_is_split() -> None:
    assert isinstance(detect_shape(SplitManager, "0.5.23"), SplitSend)


def test_a_release_that_calls_requests_put_itself_is_inline() -> None:
    assert isinstance(detect_shape(InlineManager, "0.5.11"), InlineSend)


def test_an_unknown_shape_is_refused_naming_the_release_and_what_is_missing() -> None:
    with pytest.raises(UnsupportedSGLang, match=r"SGLang 9\.9\.9: UnknownManager.register_to_b"):
        detect_shape(UnknownManager, "9.9.9")


def test_a_release_without_the_registration_method_is_refused() -> None:
    with pytest.raises(UnsupportedSGLang, match="register_to_bootstrap does not exist"):
        detect_shape(object, "0.4.0")


def test_split_capture_keeps_every_row_and_sends_none() -> None:
    SENT_FOR_REAL.clear()
    manager = SplitManager()
    rows = SplitSend().capture(SplitManager.register_to_bootstrap, manager)
    assert rows == [
        ("http://10.0.0.1:8998/route", {"attn_tp_rank": 0}),
        ("http://10.0.0.1:8998/route", {"attn_tp_rank": 1}),
    ]
    assert SENT_FOR_REAL == []
    assert "_register_topology_row" not in vars(manager)


def test_inline_capture_runs_the_releases_code_with_the_url_it_builds() -> None:
    SENT_FOR_REAL.clear()
    manager = InlineManager()
    manager.bootstrap_port = 9001
    rows = InlineSend().capture(InlineManager.register_to_bootstrap, manager)
    assert rows == [("http://10.0.0.1:9001/route", {"attn_tp_rank": 1, "rank_port": 41001})]
    assert SENT_FOR_REAL == []


def test_inline_capture_changes_nothing_outside_the_call() -> None:
    InlineSend().capture(InlineManager.register_to_bootstrap, InlineManager())
    assert globals()["requests"] is requests


def test_inline_capture_refuses_a_method_another_plugin_wrapped() -> None:
    def wrapper(self: Any) -> None:
        InlineManager.register_to_bootstrap(self)

    with pytest.raises(ConfigurationError, match="another SGLang plugin wraps"):
        InlineSend().capture(wrapper, InlineManager())


def test_inline_capture_refuses_a_release_that_sent_nothing() -> None:
    class Silent:
        def register_to_bootstrap(self) -> None:
            if False:
                requests.put("http://10.0.0.1:8998/route")

    with pytest.raises(ConfigurationError, match="sent no registration"):
        InlineSend().capture(Silent.register_to_bootstrap, Silent())


def test_split_capture_puts_back_an_instance_attribute_it_shadowed() -> None:
    manager = SplitManager()
    own_sender = object()
    manager.__dict__["_register_topology_row"] = own_sender
    SplitSend().capture(SplitManager.register_to_bootstrap, manager)
    assert manager.__dict__["_register_topology_row"] is own_sender
