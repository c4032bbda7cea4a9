"""The state directory's files, for ``--reset`` and for start-up checks: no SQLite here.

``--reset`` must work whatever state the files are in (a corrupt database cannot be opened, let
alone cleared), so it moves them aside into a timestamped folder and the server starts fresh.
Nothing is deleted: an operator can still inspect or restore what was there.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefill_bootstrap.shared.errors import StateStoreError

__all__ = ["RESET_REMEDY", "check_not_emptied", "move_aside"]

RESET_REMEDY = (
    "start once with --reset (PREFILL_BOOTSTRAP_RESET=1): it moves the state files aside into a "
    "timestamped folder of the state directory and begins a new group (every rank then "
    "registers again); or restore the file from a backup"
)


def _state_files(database: Path) -> list[Path]:
    candidates = [database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))]
    return [path for path in candidates if path.exists() or path.is_symlink()]


def move_aside(database: Path, now: float | None = None) -> Path | None:
    """Move the database and its WAL/SHM files into ``reset-<UTC time>/`` next to them; answer
    that folder, or None when there was nothing to move."""
    files = _state_files(database)
    if not files:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = database.parent / f"reset-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = database.parent / f"reset-{stamp}-{suffix}"
    try:
        target.mkdir()
        for path in files:
            path.rename(target / path.name)
    except OSError as exc:
        raise StateStoreError(
            f"--reset could not move the state {database} aside into {target}: "
            f"{exc.strerror or exc}; make the state directory writable or move the files away "
            "yourself"
        ) from exc
    return target


def check_not_emptied(database: Path) -> None:
    """A database file that exists but holds 0 bytes lost its state (truncated or overwritten):
    SQLite would silently treat it as a new, empty group, and every rank would be forgotten."""
    if database.exists() and database.stat().st_size == 0:
        raise StateStoreError(
            f"the state database {database} exists but is empty (0 bytes): the registrations it "
            f"held are lost, so the server will not start as if nothing had been there; "
            f"{RESET_REMEDY}"
        )
