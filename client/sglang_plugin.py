"""The SGLang plugin: stock SGLang prefill ranks run our three steps, without a fork.

SGLang (0.5.11 and later) loads every installed plugin of the entry-point group
``sglang.srt.plugins`` in each scheduler process before it builds the KV manager. Installed, this
plugin does nothing until ``PREFILL_BOOTSTRAP_SGLANG=1``: then it wraps
``CommonKVManager.register_to_bootstrap`` (every transfer backend inherits it) so that each
prefill rank

1. takes world rank 0's bootstrap port (and bearer token), broadcast over the world group SGLang
   initialised,
2. sends the exact rows its release builds (to ``PREFILL_BOOTSTRAP_URL`` when set), with the
   declared retry policy, and raises
   ``RegistrationFailed`` naming URL, port, attempts and cause when it runs out,
3. waits until the whole group is registered (at our server or at SGLang's built-in one) and
   raises ``TableIncomplete`` when it is not, so the scheduler fails at start-up, next to the
   cause, instead of serving with a hole in the table.

Configuration is the environment the scheduler processes inherit, with the CLI's names
(``ClientSettings``, ``WaitSettings``). Enabled but unable to work (a bad setting, a release it
does not know), the plugin stops the process at load: SGLang's loader would log any other error
and run stock, the silent hole this exists to close. SGLang is imported only once the plugin is
on, inside ``load``, which only SGLang calls.

At exit the plugin does nothing: SGLang's rows carry no lease, so no keeper runs, and nothing is
sent while the interpreter shuts down (SGLang ends its scheduler processes with signals anyway,
which run no exit hooks). A plugin rank's cell stays registered until a new rank takes it over (a
``moved`` event; the incarnation changes), the table is reset, or an operator runs
``prefill-bootstrap deregister``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NoReturn

import httpx
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefill_bootstrap.client.addresses import (
    bootstrap_url,
    is_multi_node,
    normalize_base_url,
    unwildcard,
)
from prefill_bootstrap.client.core import as_registration
from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.port_sync import current_rank, sync_auth_token, sync_bootstrap_port
from prefill_bootstrap.client.settings import ClientSettings, WaitSettings
from prefill_bootstrap.client.sglang_release import ReleaseShape, Row, detect_shape
from prefill_bootstrap.shared.errors import BootstrapError, ConfigurationError, UnsupportedSGLang

__all__ = ["TARGET", "PluginSettings", "PluginSwitch", "RankBootstrap", "load", "read_settings"]

log = logging.getLogger(__name__)

TARGET = "sglang.srt.disaggregation.common.conn.CommonKVManager.register_to_bootstrap"
SWITCH = "PREFILL_BOOTSTRAP_SGLANG"


class PluginSwitch(BaseSettings):
    """``PREFILL_BOOTSTRAP_SGLANG`` alone: read first, so nothing else is checked while off."""

    model_config = SettingsConfigDict(env_prefix="PREFILL_BOOTSTRAP_", extra="ignore")

    sglang: bool = False


class PluginSettings(ClientSettings, WaitSettings):
    """What the plugin reads once it is on: the CLI's variables (``ClientSettings``,
    ``WaitSettings``)."""

    @property
    def url_override(self) -> str | None:
        """``PREFILL_BOOTSTRAP_URL`` when the operator set it (a sidecar on a port of its own);
        blank (a template rendering an unset value) counts as unset."""
        return self.url.strip() or None if "url" in self.model_fields_set else None


@dataclass(frozen=True)
class RankBootstrap:
    """The AROUND hook on ``register_to_bootstrap``: the three steps for one prefill rank."""

    settings: PluginSettings
    shape: ReleaseShape
    world_cpu_group: Callable[[], Any]
    """The gloo group of SGLang's world group, read when a multi-node rank first needs it."""

    def __call__(self, register: Any, manager: Any, *args: Any, **kwargs: Any) -> None:
        dist_init_addr = manager.dist_init_addr
        nnodes = getattr(manager.server_args, "nnodes", None)
        group = self.world_cpu_group() if is_multi_node(dist_init_addr, nnodes) else None
        # Collectives, in the same order on every rank (each is a no-op on a single node).
        manager.bootstrap_port = sync_bootstrap_port(
            int(manager.bootstrap_port), dist_init_addr=dist_init_addr, nnodes=nnodes, group=group
        )
        token = sync_auth_token(
            self.settings.token, dist_init_addr=dist_init_addr, nnodes=nnodes, group=group
        )
        rows = self.shape.capture(register, manager)
        if not rows:
            log.info("Rank %s: SGLang built no registration row; nothing to send.", current_rank())
            return
        bases = {self._base_url(url) for url, _ in rows}
        if len(bases) > 1:
            raise ConfigurationError(
                f"SGLang addressed this rank's rows to several servers: {bases}"
            )
        with self._client(bases.pop(), token) as client:
            payloads = [payload for _, payload in rows]
            for payload in payloads:
                client.register(payload)
            client.wait_as_registered(
                payloads,
                self.settings.wait_timeout_seconds,
                expected_cells=_expected_cells(rows[-1]),
            )

    def _base_url(self, row_url: str) -> str:
        if self.settings.url_override is not None:
            return self.settings.url_override
        url = httpx.URL(row_url)
        default_port = 443 if url.scheme == "https" else 80
        return bootstrap_url(unwildcard(url.host), url.port or default_port, url.scheme)

    def _client(self, base_url: str, token: str | None) -> BootstrapClient:
        return BootstrapClient(
            base_url,
            timeout=self.settings.request_timeout_seconds,
            retry=self.settings.retry,
            auth_token=token,
            verify=self.settings.verify(),
            rank=current_rank(),
        )


def _expected_cells(row: Row) -> int:
    """The size of the group this row claims (rows were validated when they were sent)."""
    reg = as_registration(row[1])
    return reg.dp_size * reg.attn_cp_size * reg.attn_tp_size * reg.pp_size


def _release() -> str:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def read_settings() -> PluginSettings:
    """The plugin's settings, or ``ConfigurationError`` naming each bad variable."""
    try:
        settings = PluginSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"PREFILL_BOOTSTRAP_{str(error['loc'][0]).upper()}: "
            f"{str(error['msg']).removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise ConfigurationError(f"invalid setting: {problems}") from exc
    if settings.url_override is not None:
        try:
            normalize_base_url(settings.url_override)
        except ConfigurationError as exc:
            raise ConfigurationError(f"invalid setting: PREFILL_BOOTSTRAP_URL: {exc}") from exc
    return settings


def _install() -> RankBootstrap:
    """Check everything the hook needs, then register it: all of it, or nothing."""
    settings = read_settings()
    release = _release()
    if os.environ.get("SGLANG_RUST_SERVER", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UnsupportedSGLang(
            release,
            "SGLANG_RUST_SERVER is set, and then SGLang sends the rows to a local Rust registry "
            "instead of the bootstrap server; the plugin does not cover that path",
        )
    try:
        from sglang.srt.disaggregation.common.conn import CommonKVManager
        from sglang.srt.distributed import parallel_state
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as exc:
        raise UnsupportedSGLang(release, f"cannot import what the plugin hooks ({exc})") from exc

    shape = detect_shape(CommonKVManager, release)
    get_world_group = getattr(parallel_state, "get_world_group", None)
    if get_world_group is None:
        raise UnsupportedSGLang(release, "sglang.srt.distributed.parallel_state has no world group")
    hook = RankBootstrap(settings, shape, lambda: get_world_group().cpu_group)
    HookRegistry.register(TARGET, hook, HookType.AROUND)
    log.info(
        "prefill-bootstrap's SGLang plugin is on for SGLang %s (%s): prefill ranks take the "
        "leader's bootstrap port, register%s with retries for up to %.0fs, then wait up to %.0fs "
        "for the whole group.",
        release,
        shape.name,
        f" at {settings.url_override}" if settings.url_override else "",
        settings.retry_deadline_seconds,
        settings.wait_timeout_seconds,
    )
    return hook


def _refuse(error: BootstrapError) -> NoReturn:
    """Enabled but unable to work: stop this process rather than let it run SGLang without the
    plugin. SGLang's loader catches every ``Exception`` of a plugin and carries on, which would
    bring back the silent hole; ``SystemExit`` is not one."""
    message = (
        f"prefill-bootstrap's SGLang plugin is enabled ({SWITCH}) but cannot run, so this "
        f"process stops: {error}"
    )
    log.critical("%s", message)
    raise SystemExit(message) from error


def load() -> None:
    """The entry point SGLang's ``load_plugins()`` calls once per process."""
    try:
        enabled = PluginSwitch().sglang
    except ValidationError:
        _refuse(ConfigurationError(f"{SWITCH}={os.environ.get(SWITCH)!r}: write 1 or 0"))
    if not enabled:
        log.info(
            "prefill-bootstrap's SGLang plugin is installed but off (%s is not 1): SGLang "
            "registers prefill ranks the stock way.",
            SWITCH,
        )
        return
    try:
        _install()
    except BootstrapError as exc:
        _refuse(exc)
