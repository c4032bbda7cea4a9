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
    """Schema 1 (releases up to ab9e5e6) -> 2: the cell counter is ``address_version``.
    (A table schema 1 was killed before creating is created by the current schema after.)"""
    db.execute("ALTER TABLE cells RENAME COLUMN generation TO address_version")
    if "events" not in _tables(db):
        return
    rows = db.execute("SELECT id, kind, body FROM events").fetchall()
    for event_id, kind, body in rows:
        upgraded = orjson.dumps(_v1_event(kind, orjson.loads(body))).decode()
        db.execute("UPDATE events SET body = ? WHERE id = ?", (upgraded, event_id))


_STEPS: dict[str, tuple[str, Callable[[sqlite3.Connection], None]]] = {"1": ("2", _from_v1)}
"""From a version: the version it leads to and the step that gets there."""


def migrate(db: sqlite3.Connection) -> str | None:
    """Upgrade the database to ``SCHEMA_VERSION`` in one transaction; answer the version it had
    when it was older (None when already current or new). Raises ``NewerSchema``, or the step's
    error after rolling everything back. Run before anything else writes to the file: state of
    a newer release is refused untouched."""
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
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (version,))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return None if found == SCHEMA_VERSION else found


def _tables(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _version(db: sqlite3.Connection) -> str:
    """The recorded version; else what the tables say. Schema 1 created its tables, then
    recorded its version in a second statement: a ``kill -9`` between the two left schema-1
    tables without a version, which must not be taken for the current schema. No tables at all
    is a new database."""
    tables = _tables(db)
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None:
            return str(row[0])
    if "cells" in tables:
        columns = {row[1] for row in db.execute("PRAGMA table_info(cells)")}
        if "generation" in columns:
            return "1"
    return SCHEMA_VERSION
