"""HTTP clients for the bootstrap server: ``BootstrapClient`` and ``AsyncBootstrapClient``.

Both run the same calls through one core (``client/core.py``): the request building, the
answer reading, the error translation and the retry wiring are shared, so the two cannot drift.
What differs is only how a request is sent and how the clients sleep between polls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import httpx

from prefill_bootstrap.client.core import (
    DEFAULT_TIMEOUT,
    LONG_POLL_SECONDS,
    Call,
    Core,
    Registration,
    WaitPlan,
    describe_invalid,
)
from prefill_bootstrap.client.readiness import BUILTIN_POLL_SECONDS, Readiness
from prefill_bootstrap.client.retry import DEFAULT_RETRY, RetryPolicy
from prefill_bootstrap.shared.errors import BootstrapError, GroupReset, PortTableUnavailable
from prefill_bootstrap.shared.protocol import Cell, RankAddress, TableReport

__all__ = [
    "DEFAULT_TIMEOUT",
    "LONG_POLL_SECONDS",
    "AsyncBootstrapClient",
    "BootstrapClient",
    "Readiness",
    "describe_invalid",
]

T = TypeVar("T")


class BootstrapClient:
    """A blocking client for one bootstrap server.

    ``url`` takes ``http(s)://host:port``, ``host:port``, ``[v6]:port`` or a bare host (port
    8998). ``transport`` replaces the network (tests pass ``httpx.MockTransport``); ``auth_token``
    is sent as ``Authorization: Bearer``; ``retry`` bounds every call; ``rank`` names this rank in
    log lines.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        auth_token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
        rank: int | None = None,
    ) -> None:
        self._core = Core(url, timeout=timeout, retry=retry, auth_token=auth_token, rank=rank)
        self._http = httpx.Client(
            base_url=self._core.base_url,
            headers=self._core.headers,
            transport=transport,
            verify=verify,
        )

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def __enter__(self) -> BootstrapClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _once(self, call: Call[T]) -> T:
        try:
            response = self._http.request(
                call.method, call.path, params=call.params, json=call.json, timeout=call.timeout
            )
        except httpx.HTTPError as exc:
            self._core.raise_for_transport(call, exc)
        return self._core.respond(call, response)

    def _run(self, call: Call[T]) -> T:
        retrying = call.policy.retrying(
            lambda state: self._core.on_retry(call, state),
            lambda state: self._core.on_exhausted(call, state),
        )
        return retrying(self._once, call)

    def register(self, registration: Registration) -> None:
        """``PUT /route``; transient failures are retried, a 4xx raises ``RequestRejected``.
        A wait afterwards raises ``GroupReset`` if the table is reset under it."""
        reg, call = self._core.register_call(registration)
        self._core.registered(reg, self._run(call))

    def wait_as_registered(
        self,
        registrations: Sequence[Registration],
        timeout: float,
        *,
        expected_cells: int | None = None,
    ) -> Readiness:
        """After registering ``registrations``: wait until the group is complete; if the table
        is reset meanwhile (``GroupReset``), register them again and go on waiting, all within
        ``timeout``."""
        plan = WaitPlan(timeout)
        while True:
            try:
                return self.wait_until_ready(plan.remaining(), expected_cells=expected_cells)
            except GroupReset as reset:
                if plan.remaining() <= 0:
                    raise
                self._core.registering_again(reset)
                for registration in registrations:
                    self.register(registration)

    def heartbeat(self, registration: Registration) -> float | None:
        """Renew a leased cell (``POST /heartbeat``); the new expiry, or None without a lease.
        ``CellNotFound`` if the server forgot the cell, ``RequestRejected`` (409) if another
        address holds it now."""
        return self._run(self._core.heartbeat_call(registration))

    def lookup(self, dp: int, cp: int, tp: int, pp: int) -> RankAddress:
        """The address of one cell (``GET /route``); retried while the table is incomplete."""
        return self._run(self._core.lookup_call(Cell(dp, cp, tp, pp)))

    def server_info(self) -> dict[str, Any]:
        """What a decode worker reads (``GET /route`` with all ranks -1), once complete."""
        return self._run(self._core.server_info_call())

    def table(self, wait: float = 0.0) -> TableReport:
        """``GET /prefill_port_table``; ``wait`` long-polls until complete or that many seconds."""
        return self._run(self._core.table_call(wait))

    def readiness(self) -> Readiness:
        """``GET /ready`` once, without waiting: ``complete`` says whether the group is."""
        return self._core.readiness(self._run(self._core.ready_call(0.0, self._core.retry)))

    def wait_until_complete(self, timeout: float, *, poll_interval: float = 0.5) -> TableReport:
        """Long-poll until every cell is registered, then read the whole table once;
        ``TableIncomplete`` names the missing cells and the hosts that did register if
        ``timeout`` seconds pass first. A rank that needs only "complete" calls
        ``wait_until_ready``, which never reads the table unless it must name what is missing."""
        self._wait_for_ready(WaitPlan(timeout), poll_interval)
        return self.table()

    def wait_until_ready(
        self,
        timeout: float,
        *,
        expected_cells: int | None = None,
        poll_interval: float = 0.5,
        builtin_poll_interval: float = BUILTIN_POLL_SECONDS,
    ) -> Readiness:
        """Wait until every cell is registered, at our server or at SGLang's built-in one (which
        has no table: it is polled for its server info, every ``builtin_poll_interval``
        seconds). ``expected_cells``, when the caller knows the group's size, lets the error
        name it where the server does not."""
        plan = WaitPlan(timeout)
        try:
            return self._wait_for_ready(plan, poll_interval)
        except PortTableUnavailable:
            return self._wait_for_builtin(plan, expected_cells, builtin_poll_interval)

    def _wait_for_ready(self, plan: WaitPlan, poll_interval: float) -> Readiness:
        while True:
            poll = plan.next_poll()
            poll_started = time.monotonic()
            call = self._core.ready_call(poll, self._core.retry.within(plan.remaining()))
            report = self._run(call)
            self._core.check_instance(report)
            if report.ready:
                return self._core.ready(report, plan)
            if plan.remaining() <= 0:
                raise self._core.incomplete(report, plan, self._table_to_name_missing())
            self._core.waiting(report, plan)
            time.sleep(plan.pause_after(poll_started, poll, poll_interval))

    def _table_to_name_missing(self) -> TableReport | None:
        try:
            return self._run(self._core.table_call(policy=self._core.deadline_retry()))
        except BootstrapError:
            return None

    def _wait_for_builtin(
        self, plan: WaitPlan, expected_cells: int | None, interval: float
    ) -> Readiness:
        while True:
            call = self._core.server_info_probe_call(self._core.retry.within(plan.remaining()))
            probe = self._run(call)
            if probe.complete:
                return self._core.complete_at_builtin(probe, plan)
            if plan.remaining() <= 0:
                raise self._core.incomplete_at_builtin(probe, plan, expected_cells)
            self._core.waiting_for_builtin(probe, plan)
            time.sleep(min(interval, plan.remaining()))


class AsyncBootstrapClient:
    """The asyncio twin of :class:`BootstrapClient` (same arguments, same errors)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        auth_token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
        rank: int | None = None,
    ) -> None:
        self._core = Core(url, timeout=timeout, retry=retry, auth_token=auth_token, rank=rank)
        self._http = httpx.AsyncClient(
            base_url=self._core.base_url,
            headers=self._core.headers,
            transport=transport,
            verify=verify,
        )

    @property
    def base_url(self) -> str:
        return self._core.base_url

    async def __aenter__(self) -> AsyncBootstrapClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _once(self, call: Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, params=call.params, json=call.json, timeout=call.timeout
            )
        except httpx.HTTPError as exc:
            self._core.raise_for_transport(call, exc)
        return self._core.respond(call, response)

    async def _run(self, call: Call[T]) -> T:
        retrying = call.policy.async_retrying(
            lambda state: self._core.on_retry(call, state),
            lambda state: self._core.on_exhausted(call, state),
        )
        return await retrying(self._once, call)

    async def register(self, registration: Registration) -> None:
        reg, call = self._core.register_call(registration)
        self._core.registered(reg, await self._run(call))

    async def heartbeat(self, registration: Registration) -> float | None:
        return await self._run(self._core.heartbeat_call(registration))

    async def lookup(self, dp: int, cp: int, tp: int, pp: int) -> RankAddress:
        return await self._run(self._core.lookup_call(Cell(dp, cp, tp, pp)))

    async def server_info(self) -> dict[str, Any]:
        return await self._run(self._core.server_info_call())

    async def table(self, wait: float = 0.0) -> TableReport:
        return await self._run(self._core.table_call(wait))

    async def readiness(self) -> Readiness:
        call = self._core.ready_call(0.0, self._core.retry)
        return self._core.readiness(await self._run(call))

    async def wait_until_complete(
        self, timeout: float, *, poll_interval: float = 0.5
    ) -> TableReport:
        await self._wait_for_ready(WaitPlan(timeout), poll_interval)
        return await self.table()

    async def wait_until_ready(
        self,
        timeout: float,
        *,
        expected_cells: int | None = None,
        poll_interval: float = 0.5,
        builtin_poll_interval: float = BUILTIN_POLL_SECONDS,
    ) -> Readiness:
        plan = WaitPlan(timeout)
        try:
            return await self._wait_for_ready(plan, poll_interval)
        except PortTableUnavailable:
            return await self._wait_for_builtin(plan, expected_cells, builtin_poll_interval)

    async def _wait_for_ready(self, plan: WaitPlan, poll_interval: float) -> Readiness:
        while True:
            poll = plan.next_poll()
            poll_started = time.monotonic()
            call = self._core.ready_call(poll, self._core.retry.within(plan.remaining()))
            report = await self._run(call)
            self._core.check_instance(report)
            if report.ready:
                return self._core.ready(report, plan)
            if plan.remaining() <= 0:
                raise self._core.incomplete(report, plan, await self._table_to_name_missing())
            self._core.waiting(report, plan)
            await asyncio.sleep(plan.pause_after(poll_started, poll, poll_interval))

    async def _table_to_name_missing(self) -> TableReport | None:
        try:
            return await self._run(self._core.table_call(policy=self._core.deadline_retry()))
        except BootstrapError:
            return None

    async def _wait_for_builtin(
        self, plan: WaitPlan, expected_cells: int | None, interval: float
    ) -> Readiness:
        while True:
            call = self._core.server_info_probe_call(self._core.retry.within(plan.remaining()))
            probe = await self._run(call)
            if probe.complete:
                return self._core.complete_at_builtin(probe, plan)
            if plan.remaining() <= 0:
                raise self._core.incomplete_at_builtin(probe, plan, expected_cells)
            self._core.waiting_for_builtin(probe, plan)
            await asyncio.sleep(min(interval, plan.remaining()))
