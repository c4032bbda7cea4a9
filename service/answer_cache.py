"""Answers serialised once per state of the group, shared by every reader of that state.

Thousands of ranks woken together, and every decode asking for the same cell, get the same bytes:
one ``orjson.dumps`` per state, not one per request. The cache is emptied whenever the version it
is keyed by changes (any registration, reset, lease expiry or renewal).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import orjson

__all__ = ["AnswerCache"]


class AnswerCache:
    def __init__(self, version: Callable[[], Hashable]) -> None:
        self._version = version
        self._cached_version: Hashable = None
        self._answers: dict[Hashable, bytes] = {}

    def get(self, key: Hashable, build: Callable[[], Any]) -> bytes:
        """The JSON bytes of ``build()`` for ``key``, built at most once per version."""
        version = self._version()
        if self._cached_version != version:
            self._answers.clear()
            self._cached_version = version
        body = self._answers.get(key)
        if body is None:
            body = self._answers[key] = orjson.dumps(build())
        return body
