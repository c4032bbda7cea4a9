"""Where both sides read the bearer token from, defined once (and free of HTTP imports, so the
server can use it without loading the client's httpx stack)."""

from __future__ import annotations

from pydantic import AliasChoices

__all__ = ["AUTH_TOKEN_VARIABLES", "blank_is_none"]

AUTH_TOKEN_VARIABLES = AliasChoices(
    "PREFILL_BOOTSTRAP_AUTH_TOKEN", "SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN"
)
"""Ours, or the name SGLang's proposed fix uses."""


def blank_is_none(cls: type, value: object) -> object:
    """An empty or blank token (an unset variable rendered by a template) means no token, and
    surrounding whitespace (the newline a secret file ends with) is not part of a token."""
    if isinstance(value, str):
        return value.strip() or None
    return value
