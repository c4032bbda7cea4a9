"""The server's state and what may change it: the port table, the room table and the store.

Routes (slow FastAPI ones and the lean hot path alike) call into this object; it owns ordering
(plan, make durable, then apply), logging, and waking long polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from prefill_bootstrap.service.memory import release_free_memory
from prefill_bootstrap.service.metrics import Metrics
from prefill_bootstrap.service.rooms import RoomTable
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import (
    CHECKPOINT,
    Change,
    GroupCommitWriter,
    StateStore,
    new_instance_id,
)
from prefill_bootstrap.service.table import Outcome, PortTable, Registered, Topology
from prefill_bootstrap.service.waiters import OnWake, Parked, Waiters
from prefill_bootstrap.shared.errors import StateStoreError, TopologyConflict, format_cell
from prefill_bootstrap.shared.protocol import Cell, Heartbeat, RankRegistration

__all__ = ["Registry"]

log = logging.getLogger(__name__)


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _check_cell_cap(topology: Topology | None, cap: int, store: StateStore) -> None:
    """A stored group larger than the cap (stored by a server with a larger --max-cells) would
    be served at a cost the cap exists to bound: say so, with both ways out."""
    if topology is None or topology.expected_cells <= cap:
        return
    where = getattr(store, "path", None) or f"{store.kind} state"
    raise StateStoreError(
        f"the group stored in {where} has {topology.expected_cells} cells (dp_size="
        f"{topology.dp_size} x attn_cp_size={topology.attn_cp_size} x attn_tp_size="
        f"{topology.attn_tp_size} x pp_size={topology.pp_size}), more than --max-cells={cap}: "
        f"raise --max-cells (PREFILL_BOOTSTRAP_MAX_CELLS) to at least "
        f"{topology.expected_cells}, or start once with --reset to begin a new group"
    )


class Registry:
    def __init__(
        self,
        settings: ServerSettings,
        store: StateStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        if settings.reset:
            store.write([new_instance_id()])
        stored = store.load()
        _check_cell_cap(stored.snapshot.topology, settings.max_cells, store)
        self.instance_id = stored.instance_id
        self.table = PortTable.restore(stored.snapshot, now=clock())
        self.rooms = RoomTable(settings.room_ttl_seconds, settings.room_capacity)
        self.writer = GroupCommitWriter(store)
        self.metrics = Metrics()
        self.waiters = Waiters()
        self._waited_for = self._what_waiters_wait_for()
        self._renewals = 0
        self._resets_in_flight = 0
        self._resets_settled: asyncio.Future[None] | None = None
        """Resolved once no reset is being written: registrations wait for it."""
        self._closing = False
        self._cache_version: tuple[str, int, int] | None = None
        self._cache: dict[Any, bytes] = {}
        if self.table.registered_count:
            log.info(
                "Restored %d of %s cells of instance %s from %s state.",
                self.table.registered_count,
                self.table.expected_count,
                self.instance_id,
                store.kind,
            )

    # -- changes -------------------------------------------------------------------------------

    async def register(self, registration: RankRegistration, protocol: str = "3") -> Registered:
        """Plan the change, make it durable, and only then serve it: a registration answered
        503 never reaches a decode, and a restart finds exactly what was acknowledged."""
        while self._resets_settled is not None:  # plan against the group the resets leave
            await asyncio.shield(self._resets_settled)
        now = self.clock()
        # The table this registration is planned against is the one it commits into. A reset
        # while it waits for the disk swaps ``self.table``, and the reset's write follows this
        # one, so on disk the reset wipes it: serving it in the new table would serve what a
        # restart no longer finds.
        table = self.table
        try:
            planned = table.plan(registration, now, protocol)
        except TopologyConflict as conflict:
            self.metrics.registrations["conflict"] += 1
            log.warning(
                "Refused rank %s for cell %s: %s",
                _address(registration.rank_ip, registration.rank_port),
                format_cell(registration.cell),
                conflict,
            )
            record = table.conflict_of(conflict, registration, now)
            await self._persist([record])
            table.record_conflict(record)
            self._notify()
            raise
        changes: list[Change] = []
        if planned.topology_changed:
            changes.append(planned.topology)
        if planned.replacement is not None:
            changes.append(planned.replacement)
        changes.append(planned.record)
        try:
            await self._persist(changes)
        except BaseException:
            table.abandon(planned)
            raise
        done = table.commit(planned)
        self.metrics.registrations[done.outcome.value] += 1
        if table is not self.table:
            log.info(
                "Cell %s at %s was registered just before a reset, which removed it again.",
                format_cell(registration.cell),
                _address(registration.rank_ip, registration.rank_port),
            )
            return done
        self._notify()
        self._log_registration(done)
        return done

    def renew(self, heartbeat: Heartbeat) -> float | None:
        """A leased rank's heartbeat; kept in memory only, so it costs no disk write."""
        was_expired = self.table.is_expired(heartbeat.cell)
        expires_at = self.table.renew(heartbeat.cell, heartbeat.address, self.clock())
        self._renewals += 1  # the table's answer shows each cell's lease expiry
        if was_expired:
            log.info(
                "Cell %s at %s is live again after its lease had expired.",
                format_cell(heartbeat.cell),
                _address(heartbeat.rank_ip, heartbeat.rank_port),
            )
            self._notify()
        return expires_at

    def expire_leases(self) -> list[Cell]:
        expired = self.table.expire_leases(self.clock())
        for cell in expired:
            record = self.table.lookup(cell)
            log.warning(
                "Lease of cell %s at %s expired: no heartbeat for %.1fs; the cell counts as "
                "missing until the rank renews or registers again.",
                format_cell(cell),
                _address(record.address.rank_ip, record.address.rank_port),
                record.lease_seconds or 0.0,
            )
        if expired:
            self._notify()
        return expired

    async def sweep_leases_forever(self) -> None:
        """Background task (started by the app's lifespan) so hot reads see expiry promptly."""
        while True:
            await asyncio.sleep(self.settings.lease_sweep_seconds)
            self.expire_leases()

    async def reset(self) -> str:
        """Durable first, then applied: a reset whose write fails leaves the group as it was."""
        instance_id = new_instance_id()
        if self._resets_settled is None:
            self._resets_settled = asyncio.get_running_loop().create_future()
        self._resets_in_flight += 1
        try:
            await self._persist([instance_id])
            self.table = PortTable()
            self.rooms = RoomTable(self.settings.room_ttl_seconds, self.settings.room_capacity)
            self.instance_id = instance_id
        finally:
            # Registrations are held until every reset in flight is written (two resets close
            # together: one sent between them would be planned against the first's table yet
            # written after the second).
            self._resets_in_flight -= 1
            if self._resets_in_flight == 0 and self._resets_settled is not None:
                self._resets_settled.set_result(None)
                self._resets_settled = None
        self._notify()
        log.warning("Reset the port table; new instance %s.", instance_id)
        return instance_id

    async def _persist(self, changes: list[Change]) -> None:
        await self.writer.submit_async(changes)

    def _what_waiters_wait_for(self) -> tuple[str, bool]:
        return self.instance_id, self.table.is_complete

    def _notify(self) -> None:
        """After every change: wake the parked long polls only if their answer can differ
        (the table completed, or the group became a new instance), not on every registration
        of a storm."""
        waited_for = self._what_waiters_wait_for()
        if waited_for != self._waited_for:
            self._waited_for = waited_for
            self.waiters.wake_all()

    def _log_registration(self, done: Registered) -> None:
        record, table = done.record, self.table
        where = _address(record.address.rank_ip, record.address.rank_port)
        progress = f"{table.registered_count}/{table.expected_count} cells"
        if done.outcome is Outcome.NEW:
            log.info(
                "Registered cell %s at %s (generation %d, %s).",
                format_cell(record.cell),
                where,
                record.generation,
                progress,
            )
        elif done.outcome is Outcome.REPLACED and done.previous is not None:
            log.warning(
                "Cell %s moved %s -> %s (generation %d, %s).",
                format_cell(record.cell),
                _address(done.previous.rank_ip, done.previous.rank_port),
                where,
                record.generation,
                progress,
            )
        else:
            log.debug("Cell %s re-registered unchanged at %s.", format_cell(record.cell), where)
        if done.completed:
            log.info("The port table is complete: all %s cells registered.", table.expected_count)
            self.writer.submit([CHECKPOINT])  # the complete table in the main file, not the WAL
            asyncio.get_running_loop().call_later(1.0, release_free_memory)

    # -- waiting -------------------------------------------------------------------------------

    def must_wait(self, seconds: float, instance: str | None = None) -> bool:
        """Whether a long poll asking to wait ``seconds`` has anything to wait for. One about
        another ``instance`` than the group's (its rank registered before a reset) has not:
        it is answered at once, so the rank learns of the reset."""
        if self._closing or seconds <= 0 or self.settings.max_wait_seconds <= 0:
            return False
        if instance is not None and instance != self.instance_id:
            return False
        self.expire_leases()  # a lease that ran out since the last sweep counts as missing
        return not self.table.is_complete

    async def wait_until_complete(self, seconds: float, instance: str | None = None) -> None:
        """Long poll: return once the table is complete or is a new instance, at shutdown, or
        after ``seconds`` (at most ``--max-wait``), whichever comes first."""
        if self.must_wait(seconds, instance):
            await self.waiters.wait(min(seconds, self.settings.max_wait_seconds))

    def park_until_complete(self, seconds: float, on_wake: OnWake) -> Parked:
        """The same for a callback (the lean door): no task per waiter. Call only when
        ``must_wait(seconds)``."""
        return self.waiters.park(min(seconds, self.settings.max_wait_seconds), on_wake)

    # -- cached answers for hot reads ----------------------------------------------------------

    def cached(self, key: Any, build: Callable[[], Any]) -> bytes:
        """JSON bytes derived from the table, built once per state of the group: every waiter
        woken together, and every decode asking the same, shares one serialisation."""
        version = (self.instance_id, self.table.version, self._renewals)
        if self._cache_version != version:
            self._cache.clear()
            self._cache_version = version
        body = self._cache.get(key)
        if body is None:
            body = self._cache[key] = orjson.dumps(build())
        return body

    def release_waiters(self) -> None:
        """At shutdown: every parked long poll answers now, with the table as it stands, and
        none parks from now on (a request pipelined behind one is answered at once too)."""
        self._closing = True
        self.waiters.wake_all()

    def close(self) -> None:
        self.writer.close()
