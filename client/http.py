"""HTTP clients for the bootstrap server: ``BootstrapClient`` and ``AsyncBootstrapClient``.

Both run the same calls through one core (``client/core.py``): the request building, the
answer reading, the error translation and the retry wiring are shared, so the two cannot drift.
What differs is only how a request is sent and how the clients sleep between polls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import httpx

from prefill_bootstrap.client.core import (
    DEFAULT_TIMEOUT,
    LONG_POLL_SECONDS,
    Call,
    Core,
    Deregistered,
    Registration,
    WaitPlan,
    describe_invalid,
)
from prefill_bootstrap.client.feed import DEFAULT_IDLE_TIMEOUT, Feed, Resynced, WatchItem
from prefill_bootstrap.client.readiness import BUILTIN_POLL_SECONDS, Readiness
from prefill_bootstrap.client.retry import DEFAULT_RETRY, RetryPolicy
from prefill_bootstrap.shared.errors import BootstrapError, GroupReset, PortTableUnavailable
from prefill_bootstrap.shared.protocol import Cell, RankAddress, TableReport

__all__ = [
    "DEFAULT_TIMEOUT",
    "LONG_POLL_SECONDS",
    "AsyncBootstrapClient",
    "BootstrapClient",
    "Deregistered",
    "Readiness",
    "Resynced",
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
        request = self._core.build(self._http, call)
        try:
            response = self._http.send(request, stream=call.stream)
            if call.stream and not response.is_success:
                response.read()  # closes it too
        except httpx.HTTPError as exc:
            self._core.raise_for_transport(call, exc)
        try:
            return self._core.respond(call, response)
        except BaseException:
            response.close()
            raise

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

    def watch(
        self, since: str | None = None, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    ) -> Iterator[WatchItem]:
        """The table's changes as they happen: ``TableEvent``s, and ``Resynced`` where events
        could not be seen (see ``client/feed.py`` for the rules). Endless: it ends only with an
        error, ``ServerUnreachable`` once reconnecting outlasts the retry policy, or the typed
        error of a refusal (``RequestRejected`` for a 401).

        ``since=None`` watches from now. To follow the table without missing a change, read it
        first and watch from its position: ``t = client.table()`` then
        ``watch(since=f"{t.stream}:{t.seq}")``; the first ``Resynced`` carries a fresh table too.
        ``idle_timeout``: seconds without a byte (keep-alives included) before reconnecting."""
        feed = Feed(self._core, since, idle_timeout)
        while True:
            time.sleep(feed.pause())
            if feed.must_resync():
                yield self._run(feed.table_call())
                continue
            response = self._run(feed.open_call())
            if response is None:
                continue
            broken: httpx.HTTPError | None = None
            try:
                for chunk in response.iter_bytes():
                    yield from feed.take(chunk)
                    if feed.resync is not None:
                        break
            except httpx.HTTPError as exc:
                broken = exc
            finally:
                response.close()
            feed.ended(broken)

    def deregister(
        self,
        dp: int,
        cp: int,
        tp: int,
        pp: int,
        *,
        rank_ip: str,
        rank_port: int,
        within: float | None = None,
    ) -> Deregistered | None:
        """``POST /deregister``: take this rank's cell out of the table (the server removes it
        only if ``rank_ip:rank_port`` holds it). What left, or None if the cell was not
        registered (already gone). ``RequestRejected`` 409 names the address that holds it now.
        ``within`` bounds the call, retries included."""
        call = self._core.deregister_call(
            Cell(dp, cp, tp, pp), RankAddress(rank_ip=rank_ip, rank_port=rank_port), within
        )
        return self._run(call)

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
        request = self._core.build(self._http, call)
        try:
            response = await self._http.send(request, stream=call.stream)
            if call.stream and not response.is_success:
                await response.aread()  # closes it too
        except httpx.HTTPError as exc:
            self._core.raise_for_transport(call, exc)
        try:
            return self._core.respond(call, response)
        except BaseException:
            await response.aclose()
            raise

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

    async def watch(
        self, since: str | None = None, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    ) -> AsyncIterator[WatchItem]:
        """See ``BootstrapClient.watch``. Leaving the loop early, close the iterator
        (``contextlib.aclosing``) so the connection closes at once."""
        feed = Feed(self._core, since, idle_timeout)
        while True:
            await asyncio.sleep(feed.pause())
            if feed.must_resync():
                yield await self._run(feed.table_call())
                continue
            response = await self._run(feed.open_call())
            if response is None:
                continue
            broken: httpx.HTTPError | None = None
            try:
                async for chunk in response.aiter_bytes():
                    for event in feed.take(chunk):
                        yield event
                    if feed.resync is not None:
                        break
            except httpx.HTTPError as exc:
                broken = exc
            finally:
                await response.aclose()
            feed.ended(broken)

    async def deregister(
        self,
        dp: int,
        cp: int,
        tp: int,
        pp: int,
        *,
        rank_ip: str,
        rank_port: int,
        within: float | None = None,
    ) -> Deregistered | None:
        call = self._core.deregister_call(
            Cell(dp, cp, tp, pp), RankAddress(rank_ip=rank_ip, rank_port=rank_port), within
        )
        return await self._run(call)

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
