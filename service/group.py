"""The group's port table as the server serves it: changes are made durable, then applied.

This is the one place that changes what the server serves. Every change is planned against the
table, written through the group-commit writer, and only then applied, so a change answered 503
never reaches a decode and a restart finds exactly what was acknowledged. A reset is the same:
the new instance is written first and the table swapped after, so a reset whose write fails
changes nothing. Who else needs to know of a change (long polls, the rooms) subscribes, and
every change a watcher can see is published to the event log once applied (``table_events.py``
drafts them), stamped with the incarnation it leaves: never for a change that did not persist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable

from prefill_bootstrap.service import table_events
from prefill_bootstrap.service.event_log import EventLog
from prefill_bootstrap.service.memory import release_free_memory
from prefill_bootstrap.service.metrics import Metrics
from prefill_bootstrap.service.store import (
    CHECKPOINT,
    Change,
    GroupCommitWriter,
    StateStore,
    new_instance_id,
)
from prefill_bootstrap.service.table import Outcome, PortTable, Registered, Removal, Topology
from prefill_bootstrap.service.table_events import Draft
from prefill_bootstrap.shared.errors import (
    StateStoreError,
    TopologyConflict,
    format_address,
    format_cell,
)
from prefill_bootstrap.shared.protocol import Cell, Heartbeat, RankRegistration, incarnation_of

__all__ = ["PortGroup"]

log = logging.getLogger(__name__)

Subscriber = Callable[[], None]


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


class PortGroup:
    def __init__(
        self,
        store: StateStore,
        metrics: Metrics,
        clock: Callable[[], float],
        *,
        max_cells: int,
        lease_sweep_seconds: float,
        reset: bool = False,
        events: EventLog | None = None,
    ) -> None:
        self.store = store
        self.events = events if events is not None else EventLog()
        self.metrics = metrics
        self.clock = clock
        self.lease_sweep_seconds = lease_sweep_seconds
        if reset:
            store.write([new_instance_id()])
        stored = store.load()
        _check_cell_cap(stored.snapshot.topology, max_cells, store)
        self.instance_id = stored.instance_id
        self._address_changes = stored.address_changes
        """Durable count of this instance's moves and removals (the store counts each one in
        the transaction that writes it; this copy follows as each is applied)."""
        self.table = PortTable.restore(stored.snapshot, now=clock())
        self.writer = GroupCommitWriter(store)
        self._changed: list[Subscriber] = []
        self._reset: list[Subscriber] = []
        self._renewals = 0
        self._resets_in_flight = 0
        self._resets_settled: asyncio.Future[None] | None = None
        """Resolved once no reset is being written: registrations wait for it."""
        if self.table.registered_count:
            log.info(
                "Restored %d of %s cells of instance %s from %s state.",
                self.table.registered_count,
                self.table.expected_count,
                self.instance_id,
                store.kind,
            )

    def on_change(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` after every change applied (registration, renewal of an expired
        lease, expiry, conflict, reset)."""
        self._changed.append(subscriber)

    def on_reset(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` once a reset is durable and applied, before the change is told."""
        self._reset.append(subscriber)

    @property
    def version(self) -> Hashable:
        """Changes whenever anything an answer shows can have changed, lease expiries included:
        what cached answers are keyed by (the table's answer shows the feed's position and the
        incarnation too)."""
        return (
            self.instance_id,
            self.table.version,
            self._renewals,
            self._address_changes,
            self.events.stream,
            self.events.latest,
        )

    @property
    def incarnation(self) -> str:
        """What ``X-SGLang-Disaggregation-Instance-ID`` carries: the instance id while no cell
        of the group has changed address, else ``<instance_id>.<n>`` after n moves or removals.
        A decode's cached addresses are stale exactly when it differs from the one they were
        read under; expiry, renewal and new cells leave it (cached addresses still hold)."""
        return incarnation_of(self.instance_id, self._address_changes)

    # -- changes -------------------------------------------------------------------------------

    async def register(self, registration: RankRegistration, protocol: str = "3") -> Registered:
        """Plan the change, make it durable, and only then serve it."""
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
                format_address(registration.rank_ip, registration.rank_port),
                format_cell(registration.cell),
                conflict,
            )
            record = table.conflict_of(conflict, registration, now)
            await self._persist([record])
            table.record_conflict(record)
            if table is self.table:  # not a refusal to watch in a group reset meanwhile
                self._publish(table_events.conflict(record))
            self._tell(self._changed)
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
        was_complete, was_expired = table.is_complete, table.is_expired(planned.cell)
        done = table.commit(planned)
        self.metrics.registrations[done.outcome.value] += 1
        if table is not self.table:
            log.info(
                "Cell %s at %s was registered just before a reset, which removed it again.",
                format_cell(registration.cell),
                format_address(registration.rank_ip, registration.rank_port),
            )
            return done
        if done.outcome is Outcome.REPLACED:
            self._address_changes += 1  # written with the replacement (store.py)
        self._publish(
            table_events.registered(done, was_expired)
            + table_events.crossing(was_complete, table.is_complete)
        )
        self._tell(self._changed)
        self._log_registration(done)
        return done

    def renew(self, heartbeat: Heartbeat) -> float | None:
        """A leased rank's heartbeat; kept in memory only, so it costs no disk write."""
        table = self.table
        was_expired, was_complete = table.is_expired(heartbeat.cell), table.is_complete
        expires_at = table.renew(heartbeat.cell, heartbeat.address, self.clock())
        self._renewals += 1  # the table's answer shows each cell's lease expiry
        if was_expired:
            self._publish(
                table_events.renewed(table.lookup(heartbeat.cell))
                + table_events.crossing(was_complete, table.is_complete)
            )
            log.info(
                "Cell %s at %s is live again after its lease had expired.",
                format_cell(heartbeat.cell),
                format_address(heartbeat.rank_ip, heartbeat.rank_port),
            )
            self._tell(self._changed)
        return expires_at

    def expire_leases(self) -> list[Cell]:
        was_complete = self.table.is_complete
        expired = self.table.expire_leases(self.clock())
        for cell in expired:
            record = self.table.lookup(cell)
            log.warning(
                "Lease of cell %s at %s expired: no heartbeat for %.1fs; the cell counts as "
                "missing until the rank renews or registers again.",
                format_cell(cell),
                format_address(record.address.rank_ip, record.address.rank_port),
                record.lease_seconds or 0.0,
            )
        if expired:
            self._publish(
                table_events.expired(self.table.lookup(cell) for cell in expired)
                + table_events.crossing(was_complete, self.table.is_complete)
            )
            self._tell(self._changed)
        return expired

    async def sweep_leases_forever(self) -> None:
        """Background task (started by the app's lifespan) so hot reads see expiry promptly."""
        while True:
            await asyncio.sleep(self.lease_sweep_seconds)
            self.expire_leases()

    async def reset(self) -> str:
        """Durable first, then applied: a reset whose write fails leaves the group as it was."""
        instance_id = new_instance_id()
        if self._resets_settled is None:
            self._resets_settled = asyncio.get_running_loop().create_future()
        self._resets_in_flight += 1
        try:
            await self._persist([instance_id])
            previous, was_complete = self.instance_id, self.table.is_complete
            self.table = PortTable()
            self.instance_id = instance_id
            self._address_changes = 0
            self._publish(table_events.reset(previous) + table_events.crossing(was_complete, False))
            self._tell(self._reset)
        finally:
            # Registrations are held until every reset in flight is written (two resets close
            # together: one sent between them would be planned against the first's table yet
            # written after the second).
            self._resets_in_flight -= 1
            if self._resets_in_flight == 0 and self._resets_settled is not None:
                self._resets_settled.set_result(None)
                self._resets_settled = None
        self._tell(self._changed)
        log.warning("Reset the port table; new instance %s.", instance_id)
        return instance_id

    async def deregister(self, heartbeat: Heartbeat) -> Removal:
        """A rank takes its own cell out of the group (a clean shutdown): checked against the
        address that holds the cell, durable, then applied. ``NothingToDeregister`` when the
        cell is not registered, ``AddressMismatch`` when another address holds it."""
        while self._resets_settled is not None:  # as register: plan against the group left
            await asyncio.shield(self._resets_settled)
        table = self.table  # as register: a reset meanwhile wipes the removal on disk too
        removal = table.plan_removal(heartbeat.cell, heartbeat.address, self.clock())
        try:
            await self._persist([removal])
        except BaseException:
            table.abandon(removal)
            raise
        was_complete = table.is_complete
        table.commit_removal(removal)
        if table is not self.table:
            return removal
        self._address_changes += 1  # written with the removal (store.py)
        self._publish(
            table_events.removed(removal) + table_events.crossing(was_complete, table.is_complete)
        )
        self._tell(self._changed)
        log.warning(
            "Cell %s at %s deregistered (%s/%s cells); incarnation now %s.",
            format_cell(removal.cell),
            format_address(removal.address.rank_ip, removal.address.rank_port),
            table.registered_count,
            table.expected_count,
            self.incarnation,
        )
        return removal

    def close(self) -> None:
        self.writer.close()

    def _publish(self, drafts: list[Draft]) -> None:
        """Publish a change's events, each stamped with the instance and incarnation the change
        left (call once the change is applied, before anyone is told)."""
        for draft in drafts:
            self.events.publish(
                draft.kind,
                instance_id=self.instance_id,
                incarnation=self.incarnation,
                cell=draft.cell,
                address=draft.address,
                previous=draft.previous,
                address_version=draft.address_version,
                detail=draft.detail,
            )

    async def _persist(self, changes: list[Change]) -> None:
        await self.writer.submit_async(changes)

    @staticmethod
    def _tell(subscribers: list[Subscriber]) -> None:
        for subscriber in subscribers:
            subscriber()

    def _log_registration(self, done: Registered) -> None:
        record, table = done.record, self.table
        where = format_address(record.address.rank_ip, record.address.rank_port)
        progress = f"{table.registered_count}/{table.expected_count} cells"
        if done.outcome is Outcome.NEW:
            log.info(
                "Registered cell %s at %s (address version %d, %s).",
                format_cell(record.cell),
                where,
                record.address_version,
                progress,
            )
        elif done.outcome is Outcome.REPLACED and done.previous is not None:
            log.warning(
                "Cell %s moved %s -> %s (address version %d, %s).",
                format_cell(record.cell),
                format_address(done.previous.rank_ip, done.previous.rank_port),
                where,
                record.address_version,
                progress,
            )
        else:
            log.debug("Cell %s re-registered unchanged at %s.", format_cell(record.cell), where)
        if done.completed:
            log.info("The port table is complete: all %s cells registered.", table.expected_count)
            self.writer.submit([CHECKPOINT])  # the complete table in the main file, not the WAL
            asyncio.get_running_loop().call_later(1.0, release_free_memory)
