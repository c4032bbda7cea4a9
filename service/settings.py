"""Server settings from one place: defaults < ``PREFILL_BOOTSTRAP_*`` environment < CLI flags.

The object is frozen and passed down explicitly; nothing reads the environment anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefill_bootstrap.shared.auth import AUTH_TOKEN_VARIABLES, blank_is_none
from prefill_bootstrap.shared.protocol import DEFAULT_PORT, MAX_BODY_BYTES

__all__ = ["DEFAULT_STATE_DIR", "ServerSettings"]

DEFAULT_STATE_DIR = Path("prefill-bootstrap-state")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFILL_BOOTSTRAP_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
    )

    host: str = Field("127.0.0.1", description="address to listen on; '::' for IPv6")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        DEFAULT_PORT, description="TCP port; 0 picks a free one (printed at start-up)"
    )
    state_dir: Path | None = Field(
        DEFAULT_STATE_DIR,
        description="directory of the SQLite state; empty keeps state in memory only",
    )
    reset: bool = Field(False, description="discard the stored table and start a new group")
    room_ttl_seconds: Annotated[float, Field(gt=0)] = Field(
        120.0,
        description="how long a bootstrap_room -> dp_rank entry lives: at least this long after "
        "its last registration, at most an eighth longer (SGLang: 120 s)",
    )
    room_capacity: Annotated[int, Field(ge=1)] = Field(
        200_000,
        description="most room entries kept (~12 bytes each); the oldest are evicted beyond it",
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        MAX_BODY_BYTES, description="larger request bodies are refused with 413"
    )
    max_wait_seconds: Annotated[float, Field(ge=0)] = Field(
        300.0, description="upper bound for ?wait= long polls"
    )
    backlog: Annotated[int, Field(ge=16)] = Field(
        4096, description="listen backlog: a whole group registers within the same second"
    )
    accept_limit: Annotated[int, Field(ge=1)] = Field(
        256,
        description="most new connections taken at once (accepted, not yet answered); the rest "
        "wait in the listen backlog, which keeps a start-up storm's memory bounded",
    )
    max_cells: Annotated[int, Field(ge=1, le=1 << 24)] = Field(
        16384,
        description="most cells a group may have (dp x cp x tp x pp); a registration of a "
        "larger group is refused with 422. Real groups have tens to a few thousand cells",
    )
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 24)] = Field(
        65536,
        description="largest request line plus headers; past it the request is answered 431 "
        "and the connection closed",
    )
    header_timeout: Annotated[float, Field(gt=0, le=3600)] = Field(
        10.0,
        description="seconds a request (or a new connection) may take to finish its headers "
        "before the connection is closed",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="'json' writes one JSON object per log line"
    )
    access_log: bool = Field(False, description="log every request (noisy under load)")
    auth_token: SecretStr | None = Field(
        None,
        description="bearer token required on writes (and reads with auth_reads)",
        validation_alias=AUTH_TOKEN_VARIABLES,
    )
    auth_reads: bool = Field(False, description="require the token on reads too")
    ssl_certfile: Path | None = Field(None, description="serve HTTPS with this certificate")
    ssl_keyfile: Path | None = Field(None, description="private key of ssl_certfile")
    protocol: Literal["auto", "1", "2", "3"] = Field(
        "auto",
        description="SGLang bootstrap protocol generation: 'auto' detects it per request; a "
        "number refuses the others",
    )
    lease_sweep_seconds: Annotated[float, Field(gt=0)] = Field(
        1.0, description="how often expired rank leases are looked for"
    )
    event_history: Annotated[int, Field(ge=16, le=1 << 20)] = Field(
        4096,
        description="table events kept for watchers that resume (GET "
        "/prefill_port_table/events); an older position is answered 410 and re-reads the table",
    )
    keepalive_seconds: Annotated[float, Field(gt=0, le=30)] = Field(
        15.0,
        description="an idle event stream gets a keep-alive comment this often, so proxies that "
        "cut idle connections leave it open; at most 30, since watch clients take 60 s of "
        "silence for a dead connection and reconnect",
    )
    watcher_buffer_bytes: Annotated[int, Field(ge=4096, le=1 << 30)] = Field(
        1 << 20,
        description="event bytes one watcher may have waiting to be sent; a watcher that does "
        "not drain more than this is dropped, so a stalled one holds no more memory",
    )

    _blank_token_is_none = field_validator("auth_token", mode="before")(blank_is_none)

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> ServerSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile must be given together")
        if self.auth_reads and self.auth_token is None:
            raise ValueError("auth_reads needs an auth_token")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"

    @field_validator("state_dir", mode="before")
    @classmethod
    def _empty_means_memory(cls, value: object) -> object:
        if value is None or (isinstance(value, str | Path) and str(value).strip() == ""):
            return None
        return value
