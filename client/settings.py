"""Rank-side CLI settings from one place: defaults < ``PREFILL_BOOTSTRAP_*`` environment < flags.

The token shares its variables with the server (``PREFILL_BOOTSTRAP_AUTH_TOKEN`` or SGLang's
``SGLANG_DISAGGREGATION_BOOTSTRAP_AUTH_TOKEN``), so a sidecar and its ranks configured from one
environment agree without repeating the secret on command lines.
"""

from __future__ import annotations

import ssl
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefill_bootstrap.client.core import DEFAULT_TIMEOUT, DEFAULT_WAIT_TIMEOUT
from prefill_bootstrap.client.retry import DEFAULT_RETRY, RetryPolicy
from prefill_bootstrap.shared.auth import AUTH_TOKEN_VARIABLES, blank_is_none
from prefill_bootstrap.shared.errors import ConfigurationError
from prefill_bootstrap.shared.protocol import DEFAULT_PORT

__all__ = ["ClientSettings", "WaitSettings"]


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFILL_BOOTSTRAP_", frozen=True, extra="ignore", populate_by_name=True
    )

    url: str = Field(
        f"http://127.0.0.1:{DEFAULT_PORT}",
        description="the bootstrap server: http(s)://host:port, host:port, [v6]:port or host",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="sent as 'Authorization: Bearer <token>'",
        validation_alias=AUTH_TOKEN_VARIABLES,
    )
    cacert: str | None = Field(None, description="PEM CA bundle that signed the server's cert")
    request_timeout_seconds: Annotated[float, Field(gt=0)] = DEFAULT_TIMEOUT
    retry_deadline_seconds: Annotated[float, Field(ge=0)] = DEFAULT_RETRY.deadline
    retry_attempts: Annotated[int, Field(ge=1)] = DEFAULT_RETRY.attempts

    _blank_token_is_none = field_validator("auth_token", mode="before")(blank_is_none)

    @property
    def token(self) -> str | None:
        return self.auth_token.get_secret_value() if self.auth_token else None

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx checks the server's certificate against: ``cacert``, else the system's."""
        if not self.cacert:
            return True
        try:
            return ssl.create_default_context(cafile=self.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot use the CA bundle {self.cacert}: {exc}") from exc

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(deadline=self.retry_deadline_seconds, attempts=self.retry_attempts)


class WaitSettings(BaseSettings):
    """How long a rank waits for the whole group (``wait`` and the SGLang plugin): its own
    settings, so a bad value stops only what waits."""

    model_config = SettingsConfigDict(env_prefix="PREFILL_BOOTSTRAP_", frozen=True, extra="ignore")

    wait_timeout_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        DEFAULT_WAIT_TIMEOUT, description="seconds a rank waits for every cell to be registered"
    )
