"""The acknowledged-writes checker shared by the kill -9 storms and the stateful test (issue 17).

A client that saw ``200`` was promised its write is durable; a client that saw nothing (the
server died first) was promised nothing. So every write falls in one of three kinds:

- **acknowledged** (200): must be served after a restart, unless a later write replaced it;
- **refused** (any other answer): must never be served;
- **unknown** (no answer): may or may not be served, but only with what was actually sent.

"Later" is real time, the only order a client can see: write ``a`` *precedes* ``b`` when ``a``'s
answer arrived before ``b`` was sent. Two writes that overlap may have taken effect in either
order, so the checker accepts either. Its verdicts are one-sided on purpose: it never names a
violation that some order of the overlapping writes could explain, and it names every served
value that no order can.

Resets (``DELETE /prefill_port_table``) start a new instance: the served ``instance_id`` tells
which reset took effect last, and every registration that finished before that reset was sent
must be gone. An acknowledged deregistration (``POST /deregister``) does the same for its one
cell: a registration that finished before it was sent must not be served any more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Address",
    "CellKey",
    "History",
    "Served",
    "Write",
    "differences",
    "figures",
    "tally",
    "violations",
]

CellKey = tuple[int, int, int, int]
"""(dp, cp, tp, pp), as ``/prefill_port_table`` lists cells."""
Address = tuple[str, int]
"""(rank_ip, rank_port)."""

figures: dict[str, int] = {
    "kills": 0,
    "kills_after_answers": 0,
    "acknowledged_checked": 0,
    "unknown": 0,
    "violations": 0,
    "machine_steps": 0,
    "machine_restarts": 0,
    "machine_in_flight": 0,
    "machine_in_flight_applied": 0,
    "bad_inputs": 0,
}
"""What this run checked, summed over every test that used the checker; printed in the pytest
summary (tests/conftest.py) so the README's figures come from a real run."""


@dataclass
class Write:
    """One request that could change the table, with when it was sent and answered."""

    kind: Literal["register", "reset", "deregister"]
    sent: float
    cell: CellKey | None = None
    address: Address | None = None
    answered: float | None = None
    """``time.monotonic()`` once the whole answer was read; None while unknown."""
    status: int | None = None
    instance_id: str | None = None
    """The new instance id an acknowledged reset answered with."""

    @property
    def acknowledged(self) -> bool:
        return self.status == 200

    @property
    def unknown(self) -> bool:
        return self.answered is None

    @property
    def refused(self) -> bool:
        return self.answered is not None and self.status != 200

    def precedes(self, other: Write) -> bool:
        """True when this write was answered before ``other`` was sent: no order of the two
        but this one first is possible."""
        return self.answered is not None and self.answered < other.sent

    def describe(self) -> str:
        what = {
            "register": f"PUT /route {_cell(self.cell)} -> {_address(self.address)}",
            "deregister": f"POST /deregister {_cell(self.cell)} at {_address(self.address)}",
            "reset": "DELETE /prefill_port_table",
        }[self.kind]
        if self.unknown:
            return f"{what} (sent at {self.sent:.4f}, never answered)"
        return f"{what} (sent at {self.sent:.4f}, answered {self.status} at {self.answered:.4f})"


@dataclass
class History:
    """Every write a test sent, in the order they were sent.

    ``initial_instance_id`` is the instance the server served before the first write: the
    pseudo-reset every history starts from.
    """

    initial_instance_id: str
    writes: list[Write] = field(default_factory=list)

    def register(self, cell: CellKey, address: Address) -> Write:
        """Record a registration about to be sent (call right before the first byte goes)."""
        write = Write("register", time.monotonic(), cell=cell, address=address)
        self.writes.append(write)
        return write

    def deregister(self, cell: CellKey, address: Address) -> Write:
        """Record a deregistration about to be sent."""
        write = Write("deregister", time.monotonic(), cell=cell, address=address)
        self.writes.append(write)
        return write

    def reset(self) -> Write:
        """Record a reset about to be sent."""
        write = Write("reset", time.monotonic())
        self.writes.append(write)
        return write

    @staticmethod
    def answer(write: Write, status: int, instance_id: str | None = None) -> None:
        """Record the whole answer of a write (call right after its last byte arrived)."""
        write.answered = time.monotonic()
        write.status = status
        write.instance_id = instance_id

    def registrations(self, cell: CellKey) -> list[Write]:
        return [w for w in self.writes if w.kind == "register" and w.cell == cell]

    def deregistrations(self, cell: CellKey) -> list[Write]:
        """The cell's deregistrations that may have taken effect (a refused one changed nothing)."""
        return [
            w for w in self.writes if w.kind == "deregister" and w.cell == cell and not w.refused
        ]

    @property
    def resets(self) -> list[Write]:
        return [w for w in self.writes if w.kind == "reset"]

    def cells(self) -> set[CellKey]:
        return {w.cell for w in self.writes if w.kind == "register" and w.cell is not None}

    def count(self) -> dict[str, int]:
        return {
            "acknowledged": sum(w.acknowledged for w in self.writes),
            "unknown": sum(w.unknown for w in self.writes),
            "refused": sum(w.refused for w in self.writes),
        }


@dataclass(frozen=True)
class Served:
    """What the server serves: its instance id and every cell's address."""

    instance_id: str
    cells: Mapping[CellKey, Address]

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Served:
        """From a ``GET /prefill_port_table`` body."""
        cells = {
            (c["dp"], c["cp"], c["tp"], c["pp"]): (c["rank_ip"], c["rank_port"])
            for c in report["cells"]
        }
        return cls(report["instance_id"], cells)


def violations(history: History, served: Served) -> list[str]:
    """Every way ``served`` contradicts the history, as sentences; empty when it is consistent.

    A cell is judged against each reset that could have taken effect last (the served instance id
    names it, or, for an id nobody was answered, any unanswered reset): it is a violation only
    when no such reset explains it.
    """
    found: list[str] = []
    last_resets = _last_reset_candidates(history, served.instance_id, found)
    if not last_resets:
        return found
    for cell in sorted(history.cells() | set(served.cells)):
        problems = [
            _cell_problem(history, cell, served.cells.get(cell), reset) for reset in last_resets
        ]
        if all(problems):
            found.append(str(problems[0]))
    return found


def differences(before: Served, after: Served) -> list[str]:
    """How two served tables differ, cell by cell, as sentences (empty when they are equal)."""
    found = []
    if before.instance_id != after.instance_id:
        found.append(f"instance {before.instance_id} became {after.instance_id}")
    for cell in sorted(set(before.cells) | set(after.cells)):
        old, new = before.cells.get(cell), after.cells.get(cell)
        if old != new:
            shown = [_address(a) if a else "not served" for a in (old, new)]
            found.append(f"cell {_cell(cell)}: {shown[0]} became {shown[1]}")
    return found


def tally(history: History, found: list[str]) -> None:
    """Add one checked history to the run's figures."""
    counts = history.count()
    figures["acknowledged_checked"] += counts["acknowledged"]
    figures["unknown"] += counts["unknown"]
    figures["violations"] += len(found)


def _last_reset_candidates(history: History, served_id: str, found: list[str]) -> list[Write]:
    """The resets that can explain the served instance id (the initial instance counts as a reset
    answered before anything was sent)."""
    initial = Write("reset", -math.inf, answered=-math.inf, status=200)
    initial.instance_id = history.initial_instance_id
    acknowledged = [initial, *(w for w in history.resets if w.acknowledged)]
    named = [w for w in acknowledged if w.instance_id == served_id]
    if named:
        [last] = named
        later = [w for w in acknowledged if last.precedes(w)]
        if later:
            found.append(
                f"instance {served_id} is served, but a later reset was acknowledged with "
                f"instance {later[-1].instance_id}: {later[-1].describe()}"
            )
            return []
        return [last]
    unanswered = [w for w in history.resets if w.unknown]
    if not unanswered:
        found.append(f"instance {served_id} is served, but no reset ever answered with it")
    return unanswered


def _cell_problem(
    history: History, cell: CellKey, served: Address | None, last_reset: Write
) -> str | None:
    """Why serving ``served`` (None: nothing) for ``cell`` is impossible after ``last_reset``,
    or None when some order of the overlapping writes explains it."""
    sent = [w for w in history.registrations(cell) if not w.refused]
    deregistrations = history.deregistrations(cell)
    left = [d for d in deregistrations if d.acknowledged and not d.precedes(last_reset)]
    after_reset = [w for w in sent if not w.precedes(last_reset)]
    survivors = [w for w in after_reset if not any(w.precedes(d) for d in left)]
    acknowledged = [w for w in survivors if w.acknowledged]
    if served is None:
        required = [w for w in acknowledged if last_reset.precedes(w)]
        if required and not any(d.unknown for d in deregistrations):
            return (
                f"cell {_cell(cell)} is not served, but its registration was acknowledged after "
                f"the last reset: {required[-1].describe()} (an acknowledged write was lost)"
            )
        return None
    possible = {
        w.address
        for w in survivors
        if not any(w.precedes(d) and d.address != w.address for d in acknowledged)
    }
    if served in possible:
        return None
    where = f"cell {_cell(cell)} is served at {_address(served)}"
    if served not in {w.address for w in sent}:
        return f"{where}, an address never sent for it"
    replaced = [w for w in survivors if w.address == served]
    if not replaced and any(w.address == served for w in after_reset):
        return (
            f"{where}, but a deregistration of it was acknowledged: {left[-1].describe()} (an "
            "acknowledged write was lost)"
        )
    if not replaced:
        return f"{where}, which only registrations finished before the last reset carried"
    newer = [d for d in acknowledged if replaced[-1].precedes(d) and d.address != served]
    return (
        f"{where}, but a later registration was acknowledged: {newer[-1].describe()} "
        "(an acknowledged write was lost)"
    )


def _cell(cell: CellKey | None) -> str:
    return "(dp, cp, tp, pp)=?" if cell is None else "(dp={}, cp={}, tp={}, pp={})".format(*cell)


def _address(address: Address | None) -> str:
    return "?" if address is None else f"{address[0]}:{address[1]}"
