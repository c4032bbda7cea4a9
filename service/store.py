"""Durable state behind a small interface: SQLite (WAL) by default, memory for tests.

A store applies *batches* of changes atomically; ``GroupCommitWriter`` funnels every request's
changes through one thread so concurrent registrations share one fsync (group commit) without
weakening the promise that a 200 means the registration is on disk. Both stores pass the same
contract tests (``tests/test_store.py``). The SQLite format is documented with the functions that
write and read it (``records.py``); ``store_migrations.py`` upgrades older state on open.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import queue
import sqlite3
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from prefill_bootstrap.service.records import (
    CELL_COLUMNS,
    cell_from_row,
    cell_row,
    conflict_from_json,
    conflict_json,
    replacement_from_json,
    replacement_json,
    topology_from_json,
    topology_json,
)
from prefill_bootstrap.service.state_files import RESET_REMEDY, check_not_emptied, move_aside
from prefill_bootstrap.service.store_migrations import SCHEMA_VERSION, NewerSchema, migrate
from prefill_bootstrap.service.table import (
    HISTORY_LIMIT,
    CellRecord,
    Conflict,
    Removal,
    Replacement,
    Snapshot,
    Topology,
)
from prefill_bootstrap.shared.errors import ConfigurationError, StateStoreError
from prefill_bootstrap.shared.protocol import Cell

__all__ = [
    "CHECKPOINT",
    "Change",
    "Checkpoint",
    "GroupCommitWriter",
    "MemoryStore",
    "SqliteStore",
    "StateStore",
    "StoredState",
    "new_instance_id",
    "open_store",
]

log = logging.getLogger(__name__)

DATABASE_NAME = "prefill-bootstrap.sqlite3"


def new_instance_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class StoredState:
    instance_id: str
    snapshot: Snapshot
    address_changes: int = 0
    """Cells of this instance moved to another address or removed, ever: the incarnation's
    counter (``PortGroup.incarnation``)."""


@dataclass(frozen=True)
class Checkpoint:
    """Not a change: ask the store to fold its log into the main file (SQLite's WAL), so the
    state does not live only in the log."""


CHECKPOINT = Checkpoint()

Change = Topology | CellRecord | Replacement | Removal | Conflict | Checkpoint | str
"""A topology, cell, history entry, a removed cell, a new instance id (a reset), or a checkpoint
request. Every ``Replacement`` and ``Removal`` written also counts one address change, in the
same transaction: a store that has the move has the count, and never the count without it."""


def _changes_address(change: Change) -> bool:
    return isinstance(change, Replacement | Removal)


class StateStore(ABC):
    kind: str

    @abstractmethod
    def load(self) -> StoredState:
        """Return what was persisted, starting a fresh instance if there is nothing."""

    @abstractmethod
    def write(self, changes: Sequence[Change]) -> None:
        """Persist every change or none of them."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and locks."""


class MemoryStore(StateStore):
    """Keeps the last written state in memory: for tests and ``--state-dir ''``."""

    kind = "memory"

    def __init__(self) -> None:
        self._clear(new_instance_id())

    def _clear(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._topology: Topology | None = None
        self._cells: dict[Cell, CellRecord] = {}
        self._replacements: list[Replacement] = []
        self._conflicts: list[Conflict] = []
        self._address_changes = 0

    def load(self) -> StoredState:
        snapshot = Snapshot(
            self._topology,
            tuple(sorted(self._cells.values(), key=lambda r: r.cell)),
            tuple(self._replacements[-HISTORY_LIMIT:]),
            tuple(self._conflicts[-HISTORY_LIMIT:]),
        )
        return StoredState(self._instance_id, snapshot, self._address_changes)

    def write(self, changes: Sequence[Change]) -> None:
        for change in changes:
            if _changes_address(change):
                self._address_changes += 1
            if isinstance(change, str):
                self._clear(change)
            elif isinstance(change, Topology):
                self._topology = change
            elif isinstance(change, CellRecord):
                self._cells[change.cell] = change
            elif isinstance(change, Replacement):
                self._replacements.append(change)
            elif isinstance(change, Conflict):
                self._conflicts.append(change)
            elif isinstance(change, Removal):
                self._cells.pop(change.cell, None)


# -- SQLite ------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    dp INTEGER NOT NULL, cp INTEGER NOT NULL, tp INTEGER NOT NULL, pp INTEGER NOT NULL,
    rank_ip TEXT NOT NULL, rank_port INTEGER NOT NULL,
    first_registered_at REAL NOT NULL, last_registered_at REAL NOT NULL,
    address_version INTEGER NOT NULL, extra TEXT NOT NULL, lease_seconds REAL,
    protocol TEXT NOT NULL DEFAULT '3',
    PRIMARY KEY (dp, cp, tp, pp)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, body TEXT NOT NULL
);
"""


_INSERT_CELL = (
    f"INSERT OR REPLACE INTO cells ({', '.join(CELL_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in CELL_COLUMNS)})"
)
_INSERT_EVENT = "INSERT INTO events (kind, body) VALUES (?, ?)"
_DELETE_CELL = "DELETE FROM cells WHERE dp = ? AND cp = ? AND tp = ? AND pp = ?"
_COUNT_ADDRESS_CHANGE = (
    "INSERT INTO meta VALUES ('address_changes', '1') "
    "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class SqliteStore(StateStore):
    """One SQLite file in WAL mode with ``synchronous=FULL``: a committed batch survives
    ``kill -9`` and power loss. A lock file keeps two servers from sharing one state dir.
    """

    kind = "sqlite"

    def __init__(self, state_dir: Path, reset: bool = False) -> None:
        self.state_dir = state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = (state_dir / "lock").open("w")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot use state directory {state_dir}: {exc.strerror}; choose a writable "
                "directory with --state-dir (or PREFILL_BOOTSTRAP_STATE_DIR)"
            ) from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ConfigurationError(
                f"state directory {state_dir} is in use by another prefill-bootstrap server; "
                "stop it or give this one its own --state-dir"
            ) from None
        self.path = state_dir / DATABASE_NAME
        try:
            if reset:
                moved = move_aside(self.path)
                if moved is not None:
                    log.warning(
                        "--reset: moved the state %s aside into %s; starting a new group.",
                        self.path,
                        moved,
                    )
            else:
                check_not_emptied(self.path)
        except StateStoreError:
            self._lock_file.close()
            raise
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA synchronous=FULL")
            # The schema is known (and upgraded) before anything is written: a newer release's
            # state is refused as it is, and older tables are never taken for current ones.
            migrated_from = migrate(self._db)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?), ('instance_id', ?)",
                (SCHEMA_VERSION, new_instance_id()),
            )
            self._opened = True
        except NewerSchema as exc:
            self.close()
            raise StateStoreError(
                f"the state database {self.path} has schema version {exc}, written by a newer "
                f"prefill-bootstrap (this one knows up to {SCHEMA_VERSION}): run that release, "
                f"or {RESET_REMEDY}"
            ) from exc
        except (sqlite3.Error, orjson.JSONDecodeError, TypeError, KeyError) as exc:
            self.close()
            raise StateStoreError(
                f"cannot open the state database {self.path}: {exc}; if the file is damaged, "
                f"{RESET_REMEDY}"
            ) from exc
        if migrated_from is not None:
            log.warning(
                "Upgraded the state database %s from schema version %s to %s; releases older "
                "than this one cannot open it any more.",
                self.path,
                migrated_from,
                SCHEMA_VERSION,
            )

    def load(self) -> StoredState:
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            topology = None
            if "topology" in meta:
                topology = topology_from_json(orjson.loads(meta["topology"]))
            cells = tuple(
                cell_from_row(row)
                for row in self._db.execute("SELECT * FROM cells ORDER BY dp, cp, tp, pp")
            )
            history: dict[str, list[dict[str, Any]]] = {"replacement": [], "conflict": []}
            for kind in history:
                rows = self._db.execute(
                    "SELECT body FROM events WHERE kind = ? ORDER BY id DESC LIMIT ?",
                    (kind, HISTORY_LIMIT),
                ).fetchall()
                history[kind] = [orjson.loads(row["body"]) for row in reversed(rows)]
            address_changes = int(meta.get("address_changes", 0))
            if address_changes < 0:
                raise ValueError(f"address_changes is {address_changes}, a count below 0")
        except (sqlite3.Error, orjson.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise StateStoreError(
                f"the state database {self.path} is unreadable ({exc}); {RESET_REMEDY}"
            ) from exc
        snapshot = Snapshot(
            topology,
            cells,
            tuple(replacement_from_json(body) for body in history["replacement"]),
            tuple(conflict_from_json(body) for body in history["conflict"]),
        )
        return StoredState(meta["instance_id"], snapshot, address_changes)

    def write(self, changes: Sequence[Change]) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for change in changes:
                if isinstance(change, Checkpoint):
                    continue
                if _changes_address(change):
                    db.execute(_COUNT_ADDRESS_CHANGE)
                if isinstance(change, str):
                    db.execute("DELETE FROM cells")
                    db.execute("DELETE FROM events")
                    db.execute("DELETE FROM meta")
                    db.execute(
                        "INSERT INTO meta VALUES ('schema_version', ?), ('instance_id', ?)",
                        (SCHEMA_VERSION, change),
                    )
                elif isinstance(change, Topology):
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('topology', ?)",
                        (_dumps(topology_json(change)),),
                    )
                elif isinstance(change, CellRecord):
                    db.execute(_INSERT_CELL, cell_row(change))
                elif isinstance(change, Replacement):
                    body = replacement_json(change, deprecated_alias=False)
                    db.execute(_INSERT_EVENT, ("replacement", _dumps(body)))
                elif isinstance(change, Removal):
                    db.execute(_DELETE_CELL, tuple(change.cell))
                else:
                    db.execute(_INSERT_EVENT, ("conflict", _dumps(conflict_json(change))))
            db.execute("COMMIT")
        except (sqlite3.Error, TypeError, ValueError) as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StateStoreError(f"cannot write the state database {self.path}: {exc}") from exc
        if any(isinstance(change, Checkpoint) for change in changes):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Fold the WAL into the main file and truncate it. A failure here loses nothing (the
        WAL still holds every commit), so it is logged, not raised."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("Could not checkpoint the state database %s: %s.", self.path, exc)

    def close(self) -> None:
        if getattr(self, "_opened", False):
            self._opened = False
            self._checkpoint()
        with contextlib.suppress(Exception):
            self._db.close()
        with contextlib.suppress(Exception):
            self._lock_file.close()


def open_store(state_dir: Path | None, reset: bool = False) -> StateStore:
    """SQLite under ``state_dir``, or memory when no directory is given. ``reset`` moves any
    stored state aside first, readable or not."""
    return MemoryStore() if state_dir is None else SqliteStore(state_dir, reset)


# -- group commit ------------------------------------------------------------------------------


class GroupCommitWriter:
    """One writer thread: every batch queued while a commit runs rides on the next commit.

    ``submit`` returns a future that resolves once the changes are durable, so request handlers
    can await durability without blocking the event loop (and ``/health`` never waits on disk).
    ``submit_async`` does the same for asyncio: every future of one commit is resolved by a single
    wake-up of the loop, instead of one cross-thread call per request.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[tuple[Sequence[Change], _Waiter] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.commits = 0
        self.failures = 0
        """Failed writes; each refused its requests with 503 (``/metrics``)."""
        self._failing_since = 0

    def submit(self, changes: Sequence[Change]) -> Future[None]:
        """Queue changes for the next commit; the writer thread starts with the first write."""
        future: Future[None] = Future()
        self._enqueue(changes, future)
        return future

    def submit_async(self, changes: Sequence[Change]) -> asyncio.Future[None]:
        """Like ``submit``, for a coroutine on the running loop."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(changes, future)
        return future

    def _enqueue(self, changes: Sequence[Change], waiter: _Waiter) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="state-writer", daemon=True
                    )
                    self._thread.start()
        self._queue.put((changes, waiter))

    def close(self) -> None:
        """Finish every queued write, then stop the thread and close the store.

        A write submitted after closing starts a new thread and fails fast on the closed store
        (a 503 to the client) instead of waiting forever on a queue nobody reads.
        """
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        self.store.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            pending: list[tuple[Sequence[Change], _Waiter]] = []
            stop = item is None
            if item is not None:
                pending.append(item)
            while not stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    pending.append(item)
            if pending:
                self._commit(pending)
            if stop:
                return

    def _commit(self, pending: list[tuple[Sequence[Change], _Waiter]]) -> None:
        failure = self._write([change for changes, _ in pending for change in changes])
        if failure is not None and len(pending) > 1:
            # One request's change must never fail the others: write each on its own. (A full
            # disk fails them all again, fast; a change the store cannot take fails alone.)
            outcomes = [(waiter, self._write(changes)) for changes, waiter in pending]
        else:
            outcomes = [(waiter, failure) for _, waiter in pending]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], _Failure]]] = {}
        for waiter, outcome in outcomes:
            if isinstance(waiter, asyncio.Future):
                by_loop.setdefault(waiter.get_loop(), []).append((waiter, outcome))
            elif outcome is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(outcome)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, futures)

    def _write(self, changes: Sequence[Change]) -> StateStoreError | None:
        try:
            self.store.write(changes)
        except Exception as exc:  # surfaced to every waiting request, never swallowed
            failure = (
                exc
                if isinstance(exc, StateStoreError)
                else StateStoreError(f"cannot write the state ({type(exc).__name__}: {exc})")
            )
            failure.__cause__ = exc if failure is not exc else exc.__cause__
            self._note_failure(failure)
            return failure
        self.commits += 1
        if self._failing_since:
            log.warning(
                "The durable state is writable again after %d failed writes.",
                self.failures - self._failing_since + 1,
            )
            self._failing_since = 0
        return None

    def _note_failure(self, failure: StateStoreError) -> None:
        """Log the first failure of a burst, with its cause; the rest only count."""
        self.failures += 1
        if self._failing_since:
            return
        self._failing_since = self.failures
        cause = failure.__cause__
        log.error(
            "Cannot make changes durable: %s%s. Registrations are answered 503 (retry) until a "
            "write succeeds; further failures are counted in "
            "prefill_bootstrap_state_write_failures, not logged.",
            failure,
            f" (cause: {type(cause).__name__}: {cause})" if cause is not None else "",
        )


_Waiter = Future[None] | asyncio.Future[None]


_Failure = StateStoreError | None


def _resolve(futures: list[tuple[asyncio.Future[None], _Failure]]) -> None:
    """On the waiting loop: settle every future of one commit."""
    for future, failure in futures:
        if future.done():  # the request was cancelled (client gone) meanwhile
            continue
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)
