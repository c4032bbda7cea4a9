"""Unreadable state at start-up (issue 17, D4): every failure names the file and a remedy that
works; ``--reset`` works on any state, moving it aside; the WAL is folded into the main file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from prefill_bootstrap.service.store import DATABASE_NAME, SqliteStore
from tests.conftest import ServerProcess, free_port, sglang_registration

pytestmark = pytest.mark.timeout(90)
ServerFactory = Callable[..., ServerProcess]


def serve_once(state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start ``serve`` expecting it to refuse to start: its exit code and stderr."""
    command = [sys.executable, "-m", "prefill_bootstrap.cli", "serve", "--port"]
    command += [str(free_port()), "--state-dir", str(state_dir), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def registered_state(server_factory: ServerFactory) -> tuple[ServerProcess, Path]:
    server = server_factory()
    for tp in range(2):
        body = sglang_registration(attn_tp_rank=tp, rank_port=41000 + tp)
        assert httpx.put(f"{server.url}/route", json=body, timeout=10).status_code == 200
    server.kill()
    assert server.state_dir is not None
    return server, server.state_dir / DATABASE_NAME


def assert_starts_fresh_with_reset(server: ServerProcess, database: Path) -> None:
    server.extra_args.append("--reset")
    server.start()
    report = httpx.get(f"{server.url}/prefill_port_table", timeout=10).json()
    assert report["registered_cells"] == 0 and report["topology"] is None
    assert server.state_dir is not None
    [moved] = list(server.state_dir.glob("reset-*"))
    assert (moved / DATABASE_NAME).exists(), "the old state is kept, not deleted"
    assert str(moved) in server.logs(), "the log says where the old state went"
    assert database.stat().st_size > 0


def test_a_corrupt_database_names_the_file_and_reset_then_works(
    server_factory: ServerFactory,
) -> None:
    server, database = registered_state(server_factory)
    database.write_bytes(b"this is not a database, " * 200)
    for side in ("-wal", "-shm"):
        database.with_name(database.name + side).unlink(missing_ok=True)

    refused = serve_once(database.parent)
    assert refused.returncode == 1
    assert str(database) in refused.stderr and "--reset" in refused.stderr
    assert_starts_fresh_with_reset(server, database)


def test_an_emptied_database_is_reported_not_taken_for_a_new_group(
    server_factory: ServerFactory,
) -> None:
    server, database = registered_state(server_factory)
    database.write_bytes(b"")
    for side in ("-wal", "-shm"):
        database.with_name(database.name + side).unlink(missing_ok=True)

    refused = serve_once(database.parent)
    assert refused.returncode == 1
    assert str(database) in refused.stderr
    assert "empty (0 bytes)" in refused.stderr and "--reset" in refused.stderr
    assert_starts_fresh_with_reset(server, database)


def test_a_database_that_cannot_be_opened_names_a_remedy_that_works(
    server_factory: ServerFactory,
) -> None:
    server, database = registered_state(server_factory)
    for path in database.parent.glob(DATABASE_NAME + "*"):
        path.unlink()
    database.mkdir()  # a directory where the file should be: SQLite cannot open it

    refused = serve_once(database.parent)
    assert refused.returncode == 1
    assert "cannot open the state database" in refused.stderr
    assert str(database) in refused.stderr and "--reset" in refused.stderr
    server.extra_args.append("--reset")
    server.start()
    assert httpx.get(f"{server.url}/prefill_port_table", timeout=10).status_code == 200


def test_a_complete_table_is_checkpointed_into_the_main_file(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory()
    assert server.state_dir is not None
    database = server.state_dir / DATABASE_NAME
    wal = database.with_name(database.name + "-wal")
    for tp in range(2):
        body = sglang_registration(attn_tp_rank=tp, rank_port=41000 + tp)
        assert httpx.put(f"{server.url}/route", json=body, timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while wal.exists() and wal.stat().st_size > 0:
        assert time.monotonic() < deadline, "the WAL was never checkpointed"
        time.sleep(0.02)
    copy = tmp_path / "main-file-only"
    copy.mkdir()
    shutil.copy(database, copy / DATABASE_NAME)  # without the WAL
    store = SqliteStore(copy)
    assert len(store.load().snapshot.cells) == 2
    store.close()


def test_a_clean_shutdown_leaves_the_whole_state_in_the_main_file(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory()
    assert server.state_dir is not None
    body = sglang_registration(attn_tp_size=4)  # incomplete: no completion checkpoint
    assert httpx.put(f"{server.url}/route", json=body, timeout=10).status_code == 200
    assert server.terminate() == 0
    database = server.state_dir / DATABASE_NAME
    copy = tmp_path / "main-file-only"
    copy.mkdir()
    shutil.copy(database, copy / DATABASE_NAME)
    store = SqliteStore(copy)
    assert len(store.load().snapshot.cells) == 1
    store.close()
