"""The prefill port table as a pure domain object: no HTTP, no I/O, no clock of its own.

The first registration establishes the group's topology; every later one must agree with it.
Readiness counts distinct cells, never registrations, so a rank that registers twice cannot make
an incomplete group look complete. Every change bumps ``version`` so callers can cache answers
derived from the table and notice when they go stale.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from prefill_bootstrap.shared.errors import (
    AddressMismatch,
    CellNotFound,
    LeaseNotHeld,
    NothingToDeregister,
    TopologyConflict,
)
from prefill_bootstrap.shared.protocol import (
    OPTIONAL_INFO_KEYS,
    Cell,
    RankAddress,
    RankRegistration,
)

__all__ = [
    "CellRecord",
    "Conflict",
    "Outcome",
    "PortTable",
    "Registered",
    "Removal",
    "Replacement",
    "Snapshot",
    "Topology",
]

HISTORY_LIMIT = 256
"""How many replacements and conflicts the diagnostics remember (oldest forgotten first)."""

DEFAULT_ALLOCATION_POLICY = "early"
FOLLOW_BOOTSTRAP_ROOM = "follow_bootstrap_room"


@dataclass(frozen=True)
class Topology:
    """What the whole group agrees on; fixed by the first registration."""

    dp_size: int
    attn_cp_size: int
    attn_tp_size: int
    pp_size: int
    page_size: int | None
    kv_cache_dtype: str | None
    options: dict[str, Any] = field(default_factory=dict)
    """Optional server-info inputs as first carried (``load_balance_method`` and the like)."""

    @property
    def expected_cells(self) -> int:
        return self.dp_size * self.attn_cp_size * self.attn_tp_size * self.pp_size

    def cells(self) -> Iterator[Cell]:
        for dp in range(self.dp_size):
            for cp in range(self.attn_cp_size):
                for tp in range(self.attn_tp_size):
                    for pp in range(self.pp_size):
                        yield Cell(dp, cp, tp, pp)

    def cells_per_row(self) -> int:
        return self.attn_cp_size * self.attn_tp_size * self.pp_size

    @classmethod
    def from_registration(cls, registration: RankRegistration) -> Topology:
        carried = registration.carried_keys()
        options = {
            key: getattr(registration, key)
            for key in (*OPTIONAL_INFO_KEYS, "load_balance_method")
            if key in carried
        }
        return cls(
            dp_size=registration.dp_size,
            attn_cp_size=registration.attn_cp_size,
            attn_tp_size=registration.attn_tp_size,
            pp_size=registration.pp_size,
            page_size=registration.page_size,
            kv_cache_dtype=registration.kv_cache_dtype,
            options=options,
        )

    def check(self, registration: RankRegistration) -> None:
        """Raise ``TopologyConflict`` for the first field the registration contradicts."""
        offered_sizes = {
            "dp_size": registration.dp_size,
            "attn_cp_size": registration.attn_cp_size,
            "attn_tp_size": registration.attn_tp_size,
            "pp_size": registration.pp_size,
        }
        for name, offered in offered_sizes.items():
            established = getattr(self, name)
            if offered != established:
                raise TopologyConflict(name, established, offered)
        # Unknown (null) page size or dtype agrees with anything; two known values must match.
        for name in ("page_size", "kv_cache_dtype"):
            established, offered = getattr(self, name), getattr(registration, name)
            if established is not None and offered is not None and established != offered:
                raise TopologyConflict(name, established, offered)
        # SGLang refuses these two when ranks disagree; an absent policy means "early".
        policy = self.options.get("decode_allocation_policy") or DEFAULT_ALLOCATION_POLICY
        offered_policy = registration.decode_allocation_policy or DEFAULT_ALLOCATION_POLICY
        if policy != offered_policy:
            raise TopologyConflict("decode_allocation_policy", policy, offered_policy)
        layout = self.options.get("dsv41_spec_layout")
        if layout != registration.dsv41_spec_layout:
            raise TopologyConflict("dsv41_spec_layout", layout, registration.dsv41_spec_layout)

    def absorb(self, registration: RankRegistration) -> Topology:
        """Fill values still unknown from a compatible registration (first known value wins)."""
        updates: dict[str, Any] = {}
        if self.page_size is None and registration.page_size is not None:
            updates["page_size"] = registration.page_size
        if self.kv_cache_dtype is None and registration.kv_cache_dtype is not None:
            updates["kv_cache_dtype"] = registration.kv_cache_dtype
        carried = registration.carried_keys()
        options = dict(self.options)
        for key in (*OPTIONAL_INFO_KEYS, "load_balance_method"):
            if key in carried and options.get(key) is None:
                options[key] = getattr(registration, key)
        if options != self.options:
            updates["options"] = options
        return replace(self, **updates) if updates else self

    def older_decode_problem(self, generation: str) -> str | None:
        """Why a gen 1-2 decode cannot use this group, or None when it can."""
        who = f"a generation {generation} decode (SGLang 0.5.9 or older)"
        if self.attn_cp_size > 1:
            return (
                f"the prefill registered attn_cp_size={self.attn_cp_size}; {who} cannot "
                "address cp ranks"
            )
        if generation == "1" and self.pp_size > 1:
            return f"the prefill registered pp_size={self.pp_size}; {who} cannot address pp ranks"
        method = self.options.get("load_balance_method") or FOLLOW_BOOTSTRAP_ROOM
        if self.dp_size > 1 and method != FOLLOW_BOOTSTRAP_ROOM:
            return (
                f"the prefill balances dp_size={self.dp_size} groups with "
                f"load_balance_method={method!r}; {who} picks the group as bootstrap_room % "
                "dp_size and never asks /query_dp_ranks, so it would reach the wrong ranks"
            )
        return None

    def server_info(self) -> dict[str, Any]:
        """SGLang's ``PrefillServerInfo`` keys: the base ones plus only the optional keys the
        prefill's registrations carried, because an older decode breaks on keys it does not know.
        """
        method = self.options.get("load_balance_method") or FOLLOW_BOOTSTRAP_ROOM
        info: dict[str, Any] = {
            "attn_tp_size": self.attn_tp_size,
            "attn_cp_size": self.attn_cp_size,
            "dp_size": self.dp_size,
            "pp_size": self.pp_size,
            "page_size": self.page_size,
            "kv_cache_dtype": self.kv_cache_dtype,
            "follow_bootstrap_room": method == FOLLOW_BOOTSTRAP_ROOM,
        }
        for key in OPTIONAL_INFO_KEYS:
            if key not in self.options:
                continue
            value = self.options[key]
            if key in ("kv_layout", "dsv41_spec_layout") and value is None:
                continue  # SGLang drops these two when unset.
            if key.startswith("enable_"):
                value = bool(value)
            elif key == "decode_allocation_policy":
                value = value or DEFAULT_ALLOCATION_POLICY
            info[key] = value
        return info


def older_server_info(topology: Topology | None, generation: str) -> dict[str, Any]:
    """Gens 1-2 server info: their own key names, nulls before any registration (their servers
    answered the same). Gen 1 answers the union of 1a's and 1b's keys: the two decodes send the
    same query and each reads only its own keys (tests/golden/README.md, case A); gen 2 always
    carries 2b's page size, which a 2a decode ignores (case B)."""
    known = topology is not None
    if generation == "1":
        return {
            "prefill_tp_size": topology.attn_tp_size * topology.dp_size if known else None,
            "prefill_dp_size": topology.dp_size if known else None,
            "tp_size_per_dp_rank": topology.attn_tp_size if known else None,
        }
    return {
        "prefill_attn_tp_size": topology.attn_tp_size if known else None,
        "prefill_dp_size": topology.dp_size if known else None,
        "prefill_pp_size": topology.pp_size if known else None,
        "prefill_page_size": topology.page_size if known else None,
    }


@dataclass(frozen=True)
class CellRecord:
    """One filled cell: the rank's address and when and how often it registered."""

    cell: Cell
    address: RankAddress
    first_registered_at: float
    last_registered_at: float
    address_version: int
    """1 at the first registration, +1 each time the cell's address changes."""
    extra: dict[str, Any] = field(default_factory=dict)
    lease_seconds: float | None = None
    """None: the cell never expires (plain SGLang ranks). Else it must be renewed this often."""
    protocol: str = "3"
    """The SGLang bootstrap protocol generation the rank registered with ("1", "2a", "2b", "3")."""


@dataclass(frozen=True)
class Replacement:
    """A cell moved to a new address (its record's ``address_version`` is now this one's)."""

    cell: Cell
    old: RankAddress
    new: RankAddress
    address_version: int
    at: float


@dataclass(frozen=True, eq=False)
class Removal:
    """A rank deregistered its cell: the cell is gone (and the group's address changes counted
    once more). Compared by identity: a plan in flight is told apart from an equal later one."""

    cell: Cell
    record: CellRecord
    """The record removed: its address is the one that left."""
    was_expired: bool
    at: float

    @property
    def address(self) -> RankAddress:
        return self.record.address


@dataclass(frozen=True)
class Conflict:
    field: str
    established: Any
    offered: Any
    address: RankAddress
    cell: Cell
    at: float


class Outcome(enum.Enum):
    NEW = "new"
    SAME = "same"
    REPLACED = "replaced"


@dataclass(frozen=True)
class Registered:
    """What a successful registration did, for the response, the log and the store."""

    outcome: Outcome
    record: CellRecord
    previous: RankAddress | None
    topology: Topology
    topology_changed: bool
    completed: bool = False
    """This registration made the table complete (it was not before): true for exactly one
    registration of a storm, however the acknowledgements are batched afterwards."""
    replacement: Replacement | None = None
    """The history entry a REPLACED registration adds once committed."""

    @property
    def cell(self) -> Cell:
        return self.record.cell


@dataclass(frozen=True)
class Snapshot:
    """Everything needed to rebuild a table, as the durable store keeps it."""

    topology: Topology | None
    cells: tuple[CellRecord, ...]
    replacements: tuple[Replacement, ...] = ()
    conflicts: tuple[Conflict, ...] = ()


class PortTable:
    """dp group -> cp rank -> tp rank -> pp rank -> rank address, with diagnostics."""

    def __init__(self) -> None:
        self.topology: Topology | None = None
        self._cells: dict[Cell, CellRecord] = {}
        self.replacements: deque[Replacement] = deque(maxlen=HISTORY_LIMIT)
        self.conflicts: deque[Conflict] = deque(maxlen=HISTORY_LIMIT)
        self.version = 0
        self._renewed_at: dict[Cell, float] = {}
        self._next_expiry = 0.0
        """No live lease runs out before this time: ``expire_leases`` looks at the cells only
        from then on (every read checks, and a group can lease thousands of cells). Renewals
        only push expiries later, so it is never too late; it may be early, then one look
        moves it on."""
        self._expired: set[Cell] = set()
        self._live = bytearray()
        """One byte per expected cell, in ``Topology.cells()`` order: 1 when registered and
        live. Missing cells are found by the C-speed ``bytearray.find``, not a Python scan."""
        self._pending_topology: Topology | None = None
        self._pending_cells: dict[Cell, CellRecord | Removal] = {}
        """What the plans in flight leave in each cell: a record, or a removal (a tombstone)."""
        self._in_flight = 0

    # -- changes -------------------------------------------------------------------------------

    def register(
        self, registration: RankRegistration, now: float, protocol: str = "3"
    ) -> Registered:
        """Plan and commit at once: for callers with nothing to make durable in between."""
        try:
            planned = self.plan(registration, now, protocol)
        except TopologyConflict as conflict:
            self.record_conflict(self.conflict_of(conflict, registration, now))
            raise
        return self.commit(planned)

    def plan(self, registration: RankRegistration, now: float, protocol: str = "3") -> Registered:
        """What registering would do, without changing what the table serves.

        The plan is checked against the committed table *and* the plans still in flight (so two
        ranks racing with contradicting topologies cannot both be accepted); ``commit`` applies
        it once it is durable, ``abandon`` forgets it when it could not be made durable.
        Raises ``TopologyConflict`` when the registration disagrees with the group.
        """
        cell = registration.cell
        topology = self._pending_topology or self.topology
        if topology is None:
            topology = Topology.from_registration(registration)
        else:
            topology.check(registration)
            topology = topology.absorb(registration)

        extra = dict(registration.model_extra or {})
        lease = registration.lease_seconds
        previous = self._planned(cell)
        replacement = None
        if previous is None:
            outcome = Outcome.NEW
            record = CellRecord(cell, registration.address, now, now, 1, extra, lease, protocol)
        elif previous.address == registration.address:
            outcome = Outcome.SAME
            record = replace(
                previous,
                last_registered_at=now,
                extra=extra,
                lease_seconds=lease,
                protocol=protocol,
            )
        else:
            outcome = Outcome.REPLACED
            record = replace(
                previous,
                address=registration.address,
                last_registered_at=now,
                address_version=previous.address_version + 1,
                extra=extra,
                lease_seconds=lease,
                protocol=protocol,
            )
            replacement = Replacement(
                cell, previous.address, record.address, record.address_version, now
            )
        self._pending_topology = topology
        self._pending_cells[cell] = record
        self._in_flight += 1
        return Registered(
            outcome,
            record,
            previous.address if previous else None,
            topology,
            topology != self.topology,
            replacement=replacement,
        )

    def commit(self, planned: Registered) -> Registered:
        """Serve a plan that is now durable; answers it with ``completed`` filled in."""
        self._settle(planned)
        cell, record = planned.record.cell, planned.record
        was_complete = self.is_complete
        topology_changed = planned.topology != self.topology
        if self.topology is None:
            self._start_live_map(planned.topology)
        self.topology = planned.topology
        self._cells[cell] = record
        if planned.replacement is not None:
            self.replacements.append(planned.replacement)
        self._set_live(cell, True)
        if record.lease_seconds is None:
            self._renewed_at.pop(cell, None)
        else:
            self._renewed_at[cell] = record.last_registered_at
            self._next_expiry = min(
                self._next_expiry, record.last_registered_at + record.lease_seconds
            )
        self.version += 1
        return replace(
            planned,
            topology_changed=topology_changed,
            completed=not was_complete and self.is_complete,
        )

    def _start_live_map(self, topology: Topology) -> None:
        """Once the topology is known; cells already held (a state stored without its topology
        by an older server) count from the start."""
        self.topology = topology
        self._live = bytearray(topology.expected_cells)
        for cell in self._cells:
            self._set_live(cell, cell not in self._expired)

    def _set_live(self, cell: Cell, live: bool) -> None:
        if live:
            self._expired.discard(cell)
        else:
            self._expired.add(cell)
        topology = self.topology
        if topology is None:
            return
        sizes = (topology.dp_size, topology.attn_cp_size, topology.attn_tp_size, topology.pp_size)
        if all(rank < size for rank, size in zip(cell, sizes, strict=True)):
            index = (cell.dp * topology.attn_cp_size + cell.cp) * topology.attn_tp_size + cell.tp
            self._live[index * topology.pp_size + cell.pp] = live

    def abandon(self, planned: Registered | Removal) -> None:
        """Forget a plan that could not be made durable: nothing of it is ever served."""
        self._settle(planned)

    def _settle(self, planned: Registered | Removal) -> None:
        cell = planned.cell
        pending = planned if isinstance(planned, Removal) else planned.record
        if self._pending_cells.get(cell) is pending:
            del self._pending_cells[cell]
        self._in_flight -= 1
        if self._in_flight <= 0:
            self._in_flight = 0
            self._pending_topology = None
            self._pending_cells.clear()

    def remove(self, cell: Cell, address: RankAddress, now: float) -> Removal:
        """Plan and commit a removal at once: for callers with nothing to make durable between."""
        return self.commit_removal(self.plan_removal(cell, address, now))

    def plan_removal(self, cell: Cell, address: RankAddress, now: float) -> Removal:
        """What deregistering ``cell`` from ``address`` would do, without serving it yet.

        Checked like a registration's plan, against the committed table and the plans in flight
        (a cell a registration in flight moves is held by its new address already). Raises
        ``NothingToDeregister`` when nobody holds the cell, ``AddressMismatch`` when another
        address does: only the rank registered there may take the cell out of the group."""
        record = self._planned(cell)
        if record is None:
            raise NothingToDeregister(cell)
        if record.address != address:
            raise AddressMismatch(cell, record.address, address)
        removal = Removal(cell, record, cell in self._expired, now)
        self._pending_cells[cell] = removal
        self._in_flight += 1
        return removal

    def commit_removal(self, removal: Removal) -> Removal:
        """Serve a removal that is now durable: the cell counts as missing, not as expired."""
        self._settle(removal)
        cell = removal.cell
        if self._cells.pop(cell, None) is None:
            return removal  # gone already (a reset's new table): nothing to serve
        self._renewed_at.pop(cell, None)
        self._set_live(cell, False)
        self._expired.discard(cell)  # missing now, no longer a registered cell whose lease ran out
        self.version += 1
        return removal

    def _planned(self, cell: Cell) -> CellRecord | None:
        """The cell as the committed table and the plans in flight leave it."""
        if cell in self._pending_cells:
            pending = self._pending_cells[cell]
            return None if isinstance(pending, Removal) else pending
        return self._cells.get(cell)

    def conflict_of(
        self, conflict: TopologyConflict, registration: RankRegistration, now: float
    ) -> Conflict:
        return Conflict(
            conflict.field,
            conflict.established,
            conflict.offered,
            registration.address,
            registration.cell,
            now,
        )

    def record_conflict(self, conflict: Conflict) -> None:
        """Remember a refused registration for the diagnostics (once it is durable)."""
        self.conflicts.append(conflict)
        self.version += 1

    def renew(self, cell: Cell, address: RankAddress, now: float) -> float | None:
        """A leased rank's heartbeat: push its expiry out again; answer the new expiry time.

        Only the rank that holds the cell may renew it: a heartbeat from a replaced rank must
        not keep its successor's cell alive under the old address.
        """
        record = self.lookup(cell)
        if record.address != address:
            raise LeaseNotHeld(cell, record.address, address)
        if record.lease_seconds is None:
            return None
        self._renewed_at[cell] = now
        self._next_expiry = min(self._next_expiry, now + record.lease_seconds)
        if cell in self._expired:
            self._set_live(cell, True)
            self.version += 1
        return now + record.lease_seconds

    def expire_leases(self, now: float) -> list[Cell]:
        """Mark cells whose lease ran out; they count as missing until they renew."""
        if now < self._next_expiry:
            return []
        live = {
            cell: renewed_at + (self._cells[cell].lease_seconds or 0)
            for cell, renewed_at in self._renewed_at.items()
            if cell not in self._expired
        }
        newly = [cell for cell, expires_at in live.items() if expires_at <= now]
        self._next_expiry = min(
            (expires_at for expires_at in live.values() if expires_at > now), default=float("inf")
        )
        for cell in newly:
            self._set_live(cell, False)
        if newly:
            self.version += 1
        return newly

    def lease_expires_at(self, cell: Cell) -> float | None:
        renewed_at = self._renewed_at.get(cell)
        lease = self._cells[cell].lease_seconds if cell in self._cells else None
        return None if renewed_at is None or lease is None else renewed_at + lease

    def is_expired(self, cell: Cell) -> bool:
        return cell in self._expired

    # -- questions -----------------------------------------------------------------------------

    @property
    def expected_count(self) -> int | None:
        return self.topology.expected_cells if self.topology else None

    @property
    def in_flight(self) -> int:
        """Plans neither committed nor abandoned yet (registrations on their way to disk)."""
        return self._in_flight

    @property
    def registered_count(self) -> int:
        return len(self._cells)

    @property
    def live_count(self) -> int:
        """Registered cells whose lease (if any) has not expired."""
        return len(self._cells) - len(self._expired)

    @property
    def is_complete(self) -> bool:
        expected = self.expected_count
        return expected is not None and self.live_count >= expected

    def lookup(self, cell: Cell) -> CellRecord:
        try:
            return self._cells[cell]
        except KeyError:
            raise CellNotFound(cell) from None

    def records(self) -> list[CellRecord]:
        return sorted(self._cells.values(), key=lambda record: record.cell)

    @property
    def missing_count(self) -> int:
        """Cells not registered or whose lease expired (0 before the first registration)."""
        expected = self.expected_count
        return 0 if expected is None else expected - self.live_count

    def missing_cells(self, limit: int | None = None) -> list[Cell]:
        """Cells nobody registered, and cells whose lease expired: both keep the table unready.
        The first ``limit`` of them in cell order (all when None)."""
        topology = self.topology
        if topology is None:
            return []
        cp, tp, pp = topology.attn_cp_size, topology.attn_tp_size, topology.pp_size
        found: list[Cell] = []
        index = self._live.find(0)
        while index >= 0 and (limit is None or len(found) < limit):
            rest, pp_rank = divmod(index, pp)
            rest, tp_rank = divmod(rest, tp)
            dp_rank, cp_rank = divmod(rest, cp)
            found.append(Cell(dp_rank, cp_rank, tp_rank, pp_rank))
            index = self._live.find(0, index + 1)
        return found

    def expired_cells(self) -> list[Cell]:
        return sorted(self._expired)

    def row_counts(self) -> dict[int, int]:
        """Live registered cells per dp group, every group of the topology included."""
        counts = dict.fromkeys(range(self.topology.dp_size), 0) if self.topology else {}
        for cell in self._cells:
            if cell not in self._expired:
                counts[cell.dp] = counts.get(cell.dp, 0) + 1
        return counts

    def server_info(self) -> dict[str, Any] | None:
        return self.topology.server_info() if self.topology else None

    # -- persistence ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.topology,
            tuple(self.records()),
            tuple(self.replacements),
            tuple(self.conflicts),
        )

    @classmethod
    def restore(cls, snapshot: Snapshot, now: float = 0.0) -> PortTable:
        """Rebuild a table; leased cells get a full lease from ``now`` (the restart is not
        their fault, and their heartbeats resume as soon as the server answers again).
        """
        table = cls()
        table.topology = snapshot.topology
        table._cells = {record.cell: record for record in snapshot.cells}
        table._renewed_at = {
            record.cell: now for record in snapshot.cells if record.lease_seconds is not None
        }
        if snapshot.topology is not None:
            table._start_live_map(snapshot.topology)
        table.replacements.extend(snapshot.replacements)
        table.conflicts.extend(snapshot.conflicts)
        table.version = 1 if snapshot.topology or snapshot.cells else 0
        return table
