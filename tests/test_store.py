"""One contract for every state store, plus what only the SQLite store promises."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefill_bootstrap.service.store import (
    DATABASE_NAME,
    GroupCommitWriter,
    MemoryStore,
    SqliteStore,
    StateStore,
    new_instance_id,
)
from prefill_bootstrap.service.table import PortTable
from prefill_bootstrap.shared.errors import (
    ConfigurationError,
    StateStoreError,
    TopologyConflict,
)
from prefill_bootstrap.shared.protocol import RankRegistration
from tests.conftest import sglang_registration


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    opened: StateStore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path)
    yield opened
    opened.close()


def filled_table() -> PortTable:
    table = PortTable()
    for tp in range(2):
        table.register(
            RankRegistration.model_validate(
                sglang_registration(attn_tp_rank=tp, shiny={"nested": [1, 2]})
            ),
            now=10.0 + tp,
        )
    table.register(RankRegistration.model_validate(sglang_registration(rank_port=45000)), now=20.0)
    with pytest.raises(TopologyConflict):
        table.register(RankRegistration.model_validate(sglang_registration(pp_size=4)), now=30.0)
    return table


def persist(store: StateStore, table: PortTable) -> None:
    snapshot = table.snapshot()
    assert snapshot.topology is not None
    store.write([snapshot.topology, *snapshot.cells, *snapshot.replacements, *snapshot.conflicts])


def test_a_new_store_starts_an_empty_instance(store: StateStore) -> None:
    state = store.load()
    assert state.instance_id
    assert state.snapshot.topology is None
    assert state.snapshot.cells == ()


def test_a_written_table_loads_back_equal(store: StateStore) -> None:
    table = filled_table()
    persist(store, table)
    assert store.load().snapshot == table.snapshot()


def test_the_instance_id_is_stable_across_loads(store: StateStore) -> None:
    assert store.load().instance_id == store.load().instance_id


def test_moves_and_removals_are_counted_with_the_change_and_a_reset_clears_the_count(
    store: StateStore,
) -> None:
    table = filled_table()  # one replacement (tp 0 moved to 45000)
    persist(store, table)
    assert store.load().address_changes == 1
    [record] = [r for r in table.records() if r.cell.tp == 1]
    store.write([table.remove(record.cell, record.address, now=40.0)])
    state = store.load()
    assert state.address_changes == 2
    assert [r.cell.tp for r in state.snapshot.cells] == [0]
    store.write([new_instance_id()])
    assert store.load().address_changes == 0


@pytest.mark.parametrize("recorded", ["abc", "-1", "1.5"])
def test_a_corrupt_count_of_address_changes_is_unreadable_state_not_a_made_up_incarnation(
    tmp_path: Path, recorded: str
) -> None:
    SqliteStore(tmp_path).close()
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('address_changes', ?)", (recorded,))
    with pytest.raises(StateStoreError, match="is unreadable"):
        SqliteStore(tmp_path).load()


def test_a_reset_forgets_everything_and_takes_the_new_instance_id(store: StateStore) -> None:
    persist(store, filled_table())
    fresh = new_instance_id()
    store.write([fresh])
    state = store.load()
    assert state.instance_id == fresh
    assert state.snapshot.cells == ()
    assert state.snapshot.topology is None


def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    table = filled_table()
    first = SqliteStore(tmp_path)
    persist(first, table)
    instance = first.load().instance_id
    first.close()
    second = SqliteStore(tmp_path)
    try:
        assert second.load().instance_id == instance
        assert second.load().snapshot == table.snapshot()
    finally:
        second.close()


def test_two_servers_cannot_share_one_state_directory(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    try:
        with pytest.raises(ConfigurationError, match="in use by another prefill-bootstrap"):
            SqliteStore(tmp_path)
    finally:
        first.close()


def test_an_unwritable_state_directory_is_a_clear_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError, match="--state-dir"):
        SqliteStore(blocker / "state")


def test_the_group_commit_writer_resolves_every_future_after_writing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    writer = GroupCommitWriter(store)
    table = filled_table()
    snapshot = table.snapshot()
    futures = [writer.submit([record]) for record in snapshot.cells]
    for future in futures:
        future.result(timeout=10)
    assert writer.commits >= 1
    assert {record.cell for record in store.load().snapshot.cells} == {
        record.cell for record in snapshot.cells
    }
    writer.close()


def test_a_failed_write_fails_every_waiting_future_and_the_writer_keeps_going() -> None:
    class Flaky(MemoryStore):
        calls = 0

        def write(self, changes):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 1:
                raise OSError("disk full")
            super().write(changes)

    writer = GroupCommitWriter(Flaky())
    with pytest.raises(StateStoreError, match="disk full"):
        writer.submit(["x"]).result(timeout=10)
    writer.submit([new_instance_id()]).result(timeout=10)
    writer.close()


def test_one_change_the_store_cannot_take_fails_alone_not_the_commit_it_shares() -> None:
    class Picky(MemoryStore):
        """Blocks its first write until released; refuses any batch holding the poison id."""

        def __init__(self) -> None:
            super().__init__()
            self.writing, self.release = threading.Event(), threading.Event()

        def write(self, changes):  # type: ignore[no-untyped-def]
            if not self.writing.is_set():
                self.writing.set()
                self.release.wait(timeout=30)
            if "poison" in changes:
                raise TypeError("Recursion limit reached")
            super().write(changes)

    store = Picky()
    writer = GroupCommitWriter(store)
    first = writer.submit(["a"])
    assert store.writing.wait(timeout=10)
    queued = [writer.submit(["b"]), writer.submit(["poison"]), writer.submit(["c"])]
    store.release.set()
    first.result(timeout=10)
    queued[0].result(timeout=10)
    with pytest.raises(StateStoreError, match="Recursion limit"):
        queued[1].result(timeout=10)
    queued[2].result(timeout=10)
    assert store.load().instance_id == "c"
    writer.close()


def test_a_stored_group_larger_than_the_cell_cap_is_refused_at_start_with_both_remedies() -> None:
    from prefill_bootstrap.service import ServerSettings, create_app

    store = MemoryStore()
    table = PortTable()
    done = table.register(
        RankRegistration.model_validate(sglang_registration(attn_tp_size=64)), 1.0
    )
    store.write([done.topology, done.record])
    with pytest.raises(StateStoreError, match="64 cells") as refused:
        create_app(ServerSettings(state_dir=None, max_cells=32), store)
    assert "--max-cells" in str(refused.value) and "--reset" in str(refused.value)
