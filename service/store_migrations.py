"""Bring a state database written by an older release up to this release's schema, on open.

Every release records its ``meta.schema_version``; opening older state runs each step from that
version up, all in one transaction, so a crash or a failure mid-way leaves the database exactly
as the older release wrote it (and that release can still open it). State from a newer release
is refused rather than misread. ``tests/test_store_migration.py`` opens state directories
written by the older releases themselves (``tests/fixtures/``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["SCHEMA_VERSION", "NewerSchema", "migrate"]

SCHEMA_VERSION = "2"
"""The schema this release writes (``records.py`` documents it)."""


class NewerSchema(Exception):
    """The state was written by a newer release: this one cannot know what it means."""


def _v1_event(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 named the address version ``generation`` and nested a conflict's address."""
    if kind == "replacement":
        return {
            "cell": body["cell"],
            "old": body["old"],
            "new": body["new"],
            "address_version": body["generation"],
            "at": body["at"],
        }
    address = body["address"]
    return {
        "field": body["field"],
        "established": body["established"],
        "offered": body["offered"],
        "rank_ip": address["rank_ip"],
        "rank_port": address["rank_port"],
        "cell": body["cell"],
        "at": body["at"],
    }


def _from_v1(db: sqlite3.Connection) -> None:
    """Schema 1 (releases up to ab9e5e6) -> 2: the cell counter is ``address_version``."""
    db.execute("ALTER TABLE cells RENAME COLUMN generation TO address_version")
    rows = db.execute("SELECT id, kind, body FROM events").fetchall()
    for event_id, kind, body in rows:
        upgraded = orjson.dumps(_v1_event(kind, orjson.loads(body))).decode()
        db.execute("UPDATE events SET body = ? WHERE id = ?", (upgraded, event_id))


_STEPS: dict[str, tuple[str, Callable[[sqlite3.Connection], None]]] = {"1": ("2", _from_v1)}
"""From a version: the version it leads to and the step that gets there."""


def migrate(db: sqlite3.Connection) -> str | None:
    """Upgrade the database to ``SCHEMA_VERSION`` in one transaction; answer the version it had
    when it was older (None when already current). Raises ``NewerSchema``, or the step's error
    after rolling everything back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        found = _version(db)
        version = found
        while version != SCHEMA_VERSION:
            if version not in _STEPS:
                raise NewerSchema(version)
            version, step = _STEPS[version]
            step(db)
        if found != SCHEMA_VERSION:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return None if found == SCHEMA_VERSION else found


def _version(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return SCHEMA_VERSION if row is None else str(row[0])
