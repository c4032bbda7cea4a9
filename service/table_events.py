"""What each applied change tells watchers: the group's outcomes translated into table events.

Pure functions, no I/O and no event log: ``PortGroup`` decides *when* a change is served (durable
first, then applied) and publishes what these functions draft, stamped with the instance and
incarnation it holds after the change. Kept apart so the rules of the feed (which outcome is an
event at all, which order a change's events go out in) read in one place and are tested without
a server.

The rules: a change to one cell is one event about that cell, and when the table as a whole
crossed the line ``/ready`` answers, a ``complete`` or ``incomplete`` follows it. A same-address
re-registration and an ordinary heartbeat change nothing a watcher can see: no event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prefill_bootstrap.service.table import CellRecord, Conflict, Outcome, Registered, Removal
from prefill_bootstrap.shared.events import EventKind
from prefill_bootstrap.shared.protocol import Cell, RankAddress

__all__ = [
    "Draft",
    "conflict",
    "crossing",
    "expired",
    "registered",
    "removed",
    "renewed",
    "reset",
]


@dataclass(frozen=True)
class Draft:
    """An event before the log numbers it and the group stamps its instance and incarnation."""

    kind: EventKind
    cell: Cell | None = None
    address: RankAddress | None = None
    previous: RankAddress | None = None
    address_version: int | None = None
    detail: str | None = None


def crossing(was_complete: bool, is_complete: bool) -> list[Draft]:
    """``complete`` or ``incomplete`` when a change moved the table across the line, else none."""
    if was_complete == is_complete:
        return []
    return [Draft("complete" if is_complete else "incomplete")]


def _about(kind: EventKind, record: CellRecord) -> Draft:
    return Draft(kind, record.cell, record.address, address_version=record.address_version)


def registered(done: Registered, was_expired: bool = False) -> list[Draft]:
    """A new cell is ``registered``; a cell at another address ``moved`` (with the address it
    left); the same address again is nothing, unless its lease had expired: then it is
    ``renewed``, as if its heartbeat had come back."""
    if done.outcome is Outcome.NEW:
        return [_about("registered", done.record)]
    if done.outcome is Outcome.REPLACED:
        return [
            Draft(
                "moved",
                done.record.cell,
                done.record.address,
                previous=done.previous,
                address_version=done.record.address_version,
            )
        ]
    return renewed(done.record) if was_expired else []


def renewed(record: CellRecord) -> list[Draft]:
    """A lease that had expired came back (a heartbeat of a live lease is no event)."""
    return [_about("renewed", record)]


def expired(records: Iterable[CellRecord]) -> list[Draft]:
    """One ``expired`` per cell whose lease ran out in one sweep, in cell order."""
    return [_about("expired", record) for record in sorted(records, key=lambda r: r.cell)]


def removed(removal: Removal) -> list[Draft]:
    """A rank deregistered its cell: ``left``, with the address that left."""
    return [_about("left", removal.record)]


def conflict(refused: Conflict) -> list[Draft]:
    """A refused registration: the cell it asked for, the address refused, and why."""
    return [
        Draft(
            "conflict",
            refused.cell,
            refused.address,
            detail=f"{refused.field}: established {refused.established!r}, offered "
            f"{refused.offered!r}",
        )
    ]


def reset(previous_instance: str) -> list[Draft]:
    """A new group: its first event names the instance it replaced."""
    return [Draft("reset", detail=f"previous instance {previous_instance}")]
