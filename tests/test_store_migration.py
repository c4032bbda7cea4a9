"""State written by an older release keeps working: opened, migrated in place, served the same.

The fixtures (``tests/fixtures/state-v1/``, see its README) were written by the schema-1 release
itself, once stopped cleanly and once with ``kill -9``. This release must serve from them exactly
the bytes that release served, but for the address counter's new name (``address_version``,
with the old ``generation`` alongside for one release); the upgrade happens in one transaction,
so a failure leaves the older release's files untouched; and a server upgraded this way keeps
every acknowledged write through a ``kill -9`` of its own.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from prefill_bootstrap.service import store_migrations
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.report import table_report
from prefill_bootstrap.service.settings import ServerSettings
from prefill_bootstrap.service.store import DATABASE_NAME, SqliteStore
from prefill_bootstrap.shared.errors import StateStoreError
from prefill_bootstrap.shared.protocol import RankRegistration, TableReport
from tests.acknowledged import CellKey, History, Served, Write, violations
from tests.conftest import ServerProcess, free_port, sglang_registration
from tests.test_kill_storms import exchange

FIXTURES = Path(__file__).parent / "fixtures" / "state-v1"
KINDS = ["clean", "killed"]
RESTORED_AT = 1_800_000_000.0
"""The clock the old release reopened the fixtures at for ``served.json``."""


@pytest.fixture(params=KINDS)
def old_state(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A copy of one fixture (a test never changes the committed files), its ``served.json``
    moved next to it."""
    copy = tmp_path / "state"
    shutil.copytree(FIXTURES / request.param, copy)
    (copy / "served.json").rename(tmp_path / "served.json")
    return copy


def served_by_old_release(state: Path) -> bytes:
    return (state.parent / "served.json").read_bytes().strip()


def renamed(key_holder: dict[str, Any]) -> dict[str, Any]:
    """The record with ``generation`` renamed in place and kept as the deprecated alias."""
    out: dict[str, Any] = {}
    for key, value in key_holder.items():
        if key == "generation":
            out["address_version"] = value
        out[key] = value
    return out


def as_this_release_serves(old: bytes, stream: str) -> bytes:
    """The old answer with the address version renamed, and the change feed's fields after the
    instance id: the old release counted no address changes (the incarnation is the instance id)
    and this run has published no event yet."""
    old_body = orjson.loads(old)
    body = {key: old_body.pop(key) for key in ["instance_id"]}
    body.update(incarnation=body["instance_id"], stream=stream, seq=0, **old_body)
    body["cells"] = [renamed(cell) for cell in body["cells"]]
    body["replacements"] = [renamed(event) for event in body["replacements"]]
    return orjson.dumps(body)


def schema_of(state: Path) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(schema_version, the cells table's columns, every event body) read with plain SQLite."""
    db = sqlite3.connect(state / DATABASE_NAME)
    try:
        [(version,)] = db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        columns = [row[1] for row in db.execute("PRAGMA table_info(cells)")]
        bodies = [orjson.loads(body) for (body,) in db.execute("SELECT body FROM events")]
    finally:
        db.close()
    return version, columns, bodies


def open_registry(state: Path) -> Registry:
    settings = ServerSettings(state_dir=state)
    return Registry.open(settings, SqliteStore(state), clock=lambda: RESTORED_AT)


def test_the_fixtures_really_are_schema_1(old_state: Path) -> None:
    version, columns, bodies = schema_of(old_state)
    assert version == "1" and "generation" in columns
    assert [sorted(body) for body in bodies] == [
        ["at", "cell", "generation", "new", "old"],
        ["address", "at", "cell", "established", "field", "offered"],
    ]


def test_state_of_the_older_release_is_served_byte_for_byte_as_it_served_it(
    old_state: Path,
) -> None:
    registry = open_registry(old_state)
    try:
        served = orjson.dumps(table_report(registry))
        expected = as_this_release_serves(served_by_old_release(old_state), registry.events.stream)
    finally:
        registry.close()
    assert served == expected
    report = TableReport.model_validate_json(served)
    assert [cell.address_version for cell in report.cells] == [1, 1, 2]
    assert [cell.generation for cell in report.cells] == [1, 1, 2]
    assert report.replacements[0].address_version == 2
    assert report.conflicts[0].field == "page_size"


def test_opening_upgrades_the_files_to_the_current_schema(old_state: Path) -> None:
    open_registry(old_state).close()
    version, columns, bodies = schema_of(old_state)
    assert version == store_migrations.SCHEMA_VERSION == "2"
    assert "address_version" in columns and "generation" not in columns
    replacement, conflict = bodies
    assert replacement["address_version"] == 2 and "generation" not in replacement
    assert (conflict["rank_ip"], conflict["rank_port"]) == ("10.0.0.5", 41004)
    again = open_registry(old_state)  # an upgraded state opens as it is, serving the same
    try:
        served = orjson.dumps(table_report(again))
    finally:
        again.close()
    stream = again.events.stream
    assert served == as_this_release_serves(served_by_old_release(old_state), stream)


def test_an_upgrade_that_fails_half_way_leaves_the_older_release_s_files_as_they_were(
    old_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(kind: str, body: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("a body the upgrade cannot read")

    monkeypatch.setattr(store_migrations, "_v1_event", broken)  # after the column's rename
    with pytest.raises(StateStoreError, match="cannot open the state database"):
        SqliteStore(old_state)
    version, columns, bodies = schema_of(old_state)
    assert version == "1" and "generation" in columns
    assert "generation" in bodies[0] and "address" in bodies[1]


def test_state_written_by_a_newer_release_is_refused_not_misread(old_state: Path) -> None:
    SqliteStore(old_state).close()
    db = sqlite3.connect(old_state / DATABASE_NAME)
    with db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(StateStoreError, match="schema version 3, written by a newer"):
        SqliteStore(old_state)


def tables_of(state: Path) -> set[str]:
    db = sqlite3.connect(state / DATABASE_NAME)
    try:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()


def test_schema_1_killed_before_it_recorded_its_version_is_upgraded_not_taken_for_current(
    old_state: Path,
) -> None:
    """The older release created its tables, then recorded its version in a second statement:
    a ``kill -9`` between the two left schema-1 tables and no version. Taken for the current
    schema, every registration would fail (no ``address_version`` column) while the server
    looked healthy."""
    db = sqlite3.connect(old_state / DATABASE_NAME)
    with db:
        for table in ("meta", "cells", "events"):
            db.execute(f"DELETE FROM {table}")
    db.close()
    store = SqliteStore(old_state)
    try:
        registry = Registry.open(ServerSettings(state_dir=old_state), store)
        asyncio.run(registry.group.register(RankRegistration(**sglang_registration())))
        registry.close()
    finally:
        store.close()
    version, columns, _ = schema_of(old_state)
    assert version == "2" and "address_version" in columns and "generation" not in columns


def test_newer_state_is_refused_before_anything_is_written_into_it(old_state: Path) -> None:
    SqliteStore(old_state).close()
    db = sqlite3.connect(old_state / DATABASE_NAME)
    with db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        db.execute("DROP TABLE events")  # say the newer release keeps its history elsewhere
    db.close()
    with pytest.raises(StateStoreError, match="schema version 3"):
        SqliteStore(old_state)
    assert tables_of(old_state) == {"meta", "cells", "sqlite_sequence"}


# -- kill -9 after the upgrade -----------------------------------------------------------------

CELLS: list[CellKey] = [(dp, 0, tp, 0) for dp in range(2) for tp in range(2)]
MOVES = 25


def moved_to(cell: CellKey, move: int) -> tuple[str, int]:
    return f"10.9.{move}.{CELLS.index(cell)}", 42000 + move


def fixture_history(report: dict[str, Any]) -> History:
    """The old release's cells as writes acknowledged before anything was sent."""
    history = History(report["instance_id"])
    for key, address in Served.from_report(report).cells.items():
        write = history.register(key, address)
        write.sent = write.answered = -math.inf
        write.status = 200
    return history


async def moves_until_killed(server: ServerProcess, history: History, kill_after: int) -> None:
    """Each cell moves ``MOVES`` times in turn, the four cells at once; SIGKILL after the
    ``kill_after``-th 200, with the other cells' writes in flight."""
    acknowledged = 0

    async def move(cell: CellKey) -> None:
        nonlocal acknowledged
        dp, _, tp, _ = cell
        for step in range(MOVES):
            where = moved_to(cell, step)
            body = sglang_registration(
                attn_dp_size=2, attn_dp_rank=dp, attn_tp_rank=tp, rank_ip=where[0],
                rank_port=where[1],
            )  # fmt: skip
            write: Write = history.register(cell, where)
            try:
                status, _ = await exchange(server.port, "PUT", "/route", orjson.dumps(body))
            except (OSError, ValueError, KeyError):
                return  # killed: this write is unknown, and the cell sends no more
            history.answer(write, status)
            acknowledged += status == 200
            if acknowledged == kill_after:
                server.kill()

    await asyncio.wait_for(asyncio.gather(*(move(cell) for cell in CELLS)), 60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(2))
def test_an_upgraded_state_keeps_every_acknowledged_write_through_kill_9(
    old_state: Path, tmp_path: Path, seed: int
) -> None:
    server = ServerProcess("127.0.0.1", free_port(), old_state, tmp_path / "server.log").start()
    try:
        before = httpx.get(f"{server.url}/prefill_port_table", timeout=10).json()
        history = fixture_history(before)
        kill_after = random.Random(seed).randint(5, MOVES * len(CELLS) - 5)
        asyncio.run(moves_until_killed(server, history, kill_after))
        assert server.process is not None and server.process.poll() is not None, "never killed"
        server.start()
        after = httpx.get(f"{server.url}/prefill_port_table", timeout=10).json()
        assert violations(history, Served.from_report(after)) == []
        assert after["instance_id"] == before["instance_id"]
        assert after["replacements"][0] == before["replacements"][0]
        assert after["conflicts"] == before["conflicts"]
        assert all(cell["address_version"] == cell["generation"] for cell in after["cells"])
        assert server.terminate() == 0
    finally:
        server.kill()
    version, columns, _ = schema_of(old_state)
    assert version == "2" and "address_version" in columns
