"""The SGLang plugin: stock SGLang prefill ranks run our three steps, without a fork.

SGLang (0.5.11 and later) loads every installed plugin of the entry-point group
``sglang.srt.plugins`` in each scheduler process before it builds the KV manager. Installed, this
plugin does nothing until ``PREFILL_BOOTSTRAP_SGLANG=1``: then it wraps
``CommonKVManager.register_to_bootstrap`` (every transfer backend inherits it) so that each
prefill rank

1. takes world rank 0's bootstrap port, broadcast over the world group SGLang initialised (or
   registers at ``PREFILL_BOOTSTRAP_URL`` when set),
2. sends the exact rows its release builds, with the declared retry policy, and raises
   ``RegistrationFailed`` naming URL, port, attempts and cause when it runs out,
3. waits until the whole group is registered (at our server or at SGLang's built-in one) and
   raises ``TableIncomplete`` when it is not, so the scheduler fails at start-up, next to the
   cause, instead of serving with a hole in the table.

Configuration is the environment the scheduler processes inherit, with the CLI's names
(``ClientSettings``). SGLang is imported only inside ``load``, which only SGLang calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import httpx
from pydantic import ValidationError

from prefill_bootstrap.client.addresses import bootstrap_url, is_multi_node, unwildcard
from prefill_bootstrap.client.core import as_registration, describe_invalid
from prefill_bootstrap.client.errors import ConfigurationError, UnsupportedSGLang
from prefill_bootstrap.client.http import BootstrapClient
from prefill_bootstrap.client.port_sync import current_rank, sync_bootstrap_port
from prefill_bootstrap.client.settings import ClientSettings
from prefill_bootstrap.client.sglang_release import ReleaseShape, Row, detect_shape

__all__ = ["TARGET", "PluginSettings", "RankBootstrap", "load"]

log = logging.getLogger(__name__)

TARGET = "sglang.srt.disaggregation.common.conn.CommonKVManager.register_to_bootstrap"


class PluginSettings(ClientSettings):
    """``ClientSettings`` plus the switch: ``PREFILL_BOOTSTRAP_SGLANG=1`` turns the plugin on."""

    sglang: bool = False

    @property
    def url_override(self) -> str | None:
        """``PREFILL_BOOTSTRAP_URL`` when the operator set it (a sidecar on a port of its own)."""
        return self.url if "url" in self.model_fields_set else None


@dataclass(frozen=True)
class RankBootstrap:
    """The AROUND hook on ``register_to_bootstrap``: the three steps for one prefill rank."""

    settings: PluginSettings
    shape: ReleaseShape
    world_cpu_group: Any
    """A callable returning the gloo group of SGLang's world group (read when first needed)."""

    def __call__(self, register: Any, manager: Any, *args: Any, **kwargs: Any) -> None:
        manager.bootstrap_port = self._leader_port(manager)
        rows = self.shape.capture(register, manager)
        if not rows:
            log.info("Rank %s: SGLang built no registration row; nothing to send.", current_rank())
            return
        base = ""
        for url, payload in rows:
            base = self._base_url(url)
            with self._client(base) as client:
                client.register(payload)
        with self._client(base) as client:
            client.wait_until_ready(
                self.settings.wait_timeout_seconds, expected_cells=_expected_cells(rows[-1])
            )

    def _leader_port(self, manager: Any) -> int:
        """World rank 0's port on every rank; a collective, so every rank takes this path."""
        dist_init_addr = manager.dist_init_addr
        nnodes = getattr(manager.server_args, "nnodes", None)
        group = self.world_cpu_group() if is_multi_node(dist_init_addr, nnodes) else None
        return sync_bootstrap_port(
            int(manager.bootstrap_port), dist_init_addr=dist_init_addr, nnodes=nnodes, group=group
        )

    def _base_url(self, row_url: str) -> str:
        if self.settings.url_override is not None:
            return self.settings.url_override
        url = httpx.URL(row_url)
        default_port = 443 if url.scheme == "https" else 80
        return bootstrap_url(unwildcard(url.host), url.port or default_port, url.scheme)

    def _client(self, base_url: str) -> BootstrapClient:
        return BootstrapClient(
            base_url,
            timeout=self.settings.request_timeout_seconds,
            retry=self.settings.retry,
            auth_token=self.settings.token,
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
    try:
        return PluginSettings()
    except ValidationError as exc:
        raise ConfigurationError(
            f"prefill-bootstrap's SGLang plugin: invalid PREFILL_BOOTSTRAP_* setting: "
            f"{describe_invalid(exc)}"
        ) from exc


def load() -> None:
    """The entry point SGLang's ``load_plugins()`` calls once per process."""
    settings = read_settings()
    if not settings.sglang:
        log.info(
            "prefill-bootstrap's SGLang plugin is installed but off (PREFILL_BOOTSTRAP_SGLANG is "
            "not set): SGLang registers prefill ranks the stock way."
        )
        return
    release = _release()
    from sglang.srt.disaggregation.common.conn import CommonKVManager
    from sglang.srt.distributed import parallel_state
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

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
