"""Acknowledged writes survive ``kill -9`` (issue 17, item 1): a checker, not a single case.

Each run starts a real durable server, sends a storm of registrations (1,024 cells, one
connection each), kills the server with SIGKILL at a seeded random moment while the answers are
arriving, restarts it on the same state directory and hands everything it serves to the
acknowledged-writes checker (``tests/acknowledged.py``): every write answered 200 is served with
its address (or that of a write that may have come later), nothing is served that was not sent.
Three storms: fresh registrations, moves (cells re-registering to new addresses, some twice) and
moves with resets in the middle; and a fourth run that kills the server only after the last
answer of such a storm, when what it serves must be exactly what a restart finds.

Each scenario runs once per seed: 2 seeds by default, ``TEST_KILL_SEEDS=20`` for more. The runs
are marked ``kill9``; ``pytest -m "not kill9"`` leaves them out.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
import orjson
import pytest

from tests.acknowledged import (
    Address,
    CellKey,
    History,
    Served,
    Write,
    differences,
    figures,
    tally,
    violations,
)
from tests.conftest import ServerProcess, cell_query, sglang_registration

SEEDS = int(os.environ.get("TEST_KILL_SEEDS", "2"))
DP, TP, PP = 8, 16, 8
CELLS: list[CellKey] = [(dp, 0, tp, pp) for dp in range(DP) for tp in range(TP) for pp in range(PP)]
ANSWER_DEADLINE = 60.0

pytestmark = [pytest.mark.kill9, pytest.mark.timeout(180)]
ServerFactory = Callable[..., ServerProcess]


_INDEX = {cell: index for index, cell in enumerate(CELLS)}


def address(cell: CellKey, version: int) -> Address:
    """A distinct address per cell and version, so a served address names the write it came from."""
    index = _INDEX[cell]
    return f"10.{version}.{index // 256}.{index % 256}", 20000 + index


def registration(cell: CellKey, where: Address) -> bytes:
    dp, _, tp, pp = cell
    body = sglang_registration(
        attn_dp_size=DP, attn_dp_rank=dp, attn_tp_size=TP, attn_tp_rank=tp, pp_size=PP,
        pp_rank=pp, rank_ip=where[0], rank_port=where[1],
    )  # fmt: skip
    return orjson.dumps(body)


async def exchange(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on its own connection; raises OSError or ValueError when no whole answer
    arrives (the server died): the caller then knows nothing about the write."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: bootstrap\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, content = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
    if not lines[0].startswith(b"HTTP/1.1 ") or int(headers[b"content-length"]) != len(content):
        raise ValueError(f"an incomplete answer: {answer[:80]!r}")
    return int(lines[0].split()[1]), content


@dataclass
class Storm:
    """Sends writes, records them in the history, and kills the server after ``kill_after``
    registrations were acknowledged (0: never)."""

    server: ServerProcess
    history: History
    kill_after: int
    acknowledged: int = 0
    killed: bool = False

    async def register(self, cell: CellKey, where: Address) -> Write:
        body = registration(cell, where)
        write = self.history.register(cell, where)
        await self._send(write, "PUT", "/route", body)
        return write

    async def reset(self) -> Write:
        write = self.history.reset()
        await self._send(write, "DELETE", "/prefill_port_table")
        return write

    async def _send(self, write: Write, method: str, path: str, body: bytes = b"") -> None:
        try:
            status, content = await asyncio.wait_for(
                exchange(self.server.port, method, path, body), ANSWER_DEADLINE
            )
        except asyncio.TimeoutError:
            raise AssertionError(
                f"no answer within {ANSWER_DEADLINE}s: {write.describe()}"
            ) from None
        except (OSError, ValueError, KeyError, asyncio.IncompleteReadError):
            return  # unknown: the server may or may not have made it durable
        instance_id = orjson.loads(content)["instance_id"] if write.kind == "reset" else None
        self.history.answer(write, status, instance_id if status == 200 else None)
        if status == 200 and write.kind == "register":
            self.acknowledged += 1
            if self.acknowledged == self.kill_after:
                self.kill()

    def kill(self, inside_the_window: bool = True) -> None:
        """SIGKILL now; reaped later by ``ServerProcess.kill``."""
        assert self.server.process is not None
        os.kill(self.server.process.pid, signal.SIGKILL)
        self.killed = True
        figures["kills" if inside_the_window else "kills_after_answers"] += 1


def instance_id(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/prefill_port_table", timeout=10).json()["instance_id"]


async def register_all(storm: Storm, version: int) -> None:
    writes = await asyncio.gather(*(storm.register(cell, address(cell, version)) for cell in CELLS))
    assert all(write.acknowledged for write in writes), "the storm before the kill must succeed"


async def concurrently(tasks: Iterable[Awaitable[object]]) -> None:
    await asyncio.gather(*tasks)


def restart_and_check(storm: Storm) -> Served:
    """Restart on the same state, then check the table and every cell's ``GET /route``."""
    assert storm.killed, "the kill never came: the storm ended before its answer window did"
    storm.server.restart()
    report = httpx.get(f"{storm.server.url}/prefill_port_table", timeout=10).json()
    served = Served.from_report(report)
    found = violations(storm.history, served)
    tally(storm.history, found)
    assert found == [], "\n".join(found[:20])
    assert_route_agrees(storm.server, served)
    return served


def assert_route_agrees(server: ServerProcess, served: Served) -> None:
    """``GET /route`` (the hot path) answers only once the table is complete: fill every cell
    the restart did not keep, then every cell's answer must match the table."""
    filler = {cell: (f"10.250.{i // 256}.{i % 256}", 9) for i, cell in enumerate(CELLS)}
    expected = {**filler, **served.cells}

    async def fill(cell: CellKey) -> int:
        body = registration(cell, filler[cell])
        return (await exchange(server.port, "PUT", "/route", body))[0]

    async def route(cell: CellKey) -> tuple[int, bytes]:
        return await exchange(server.port, "GET", f"/route?{urlencode(cell_query(*cell))}")

    async def check() -> list[tuple[int, bytes]]:
        missing = [cell for cell in CELLS if cell not in served.cells]
        assert set(await asyncio.gather(*(fill(cell) for cell in missing))) <= {200}
        return await asyncio.gather(*(route(cell) for cell in CELLS))

    for cell, (status, body) in zip(CELLS, asyncio.run(check()), strict=True):
        assert status == 200, (cell, body)
        answer = orjson.loads(body)
        assert (answer["rank_ip"], answer["rank_port"]) == expected[cell], cell


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_acknowledged_registration_of_a_storm_survives_kill_9(
    server_factory: ServerFactory, seed: int
) -> None:
    server = server_factory()
    rng = random.Random(seed)
    storm = Storm(server, History(instance_id(server)), kill_after=rng.randint(1, len(CELLS) - 1))
    order = rng.sample(CELLS, len(CELLS))

    asyncio.run(concurrently(storm.register(cell, address(cell, 1)) for cell in order))
    restart_and_check(storm)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_acknowledged_move_of_a_storm_survives_kill_9(
    server_factory: ServerFactory, seed: int
) -> None:
    """Every cell moves to a new address; a quarter move again as soon as the first move is
    answered, so the last acknowledged address is the one that must be served."""
    server = server_factory()
    rng = random.Random(seed)
    storm = Storm(server, History(instance_id(server)), kill_after=0)
    asyncio.run(register_all(storm, version=1))
    storm.kill_after = storm.acknowledged + rng.randint(1, len(CELLS) - 1)
    twice = set(rng.sample(CELLS, len(CELLS) // 4))
    moves: list[Write] = []

    async def move(cell: CellKey) -> None:
        first = await storm.register(cell, address(cell, 2))
        moves.append(first)
        if cell in twice and first.acknowledged:
            moves.append(await storm.register(cell, address(cell, 3)))

    asyncio.run(concurrently(move(cell) for cell in rng.sample(CELLS, len(CELLS))))
    restart_and_check(storm)
    # The incarnation counts each durable move once: every acknowledged one, and none that was
    # never sent (no cell was missing, so the check's fill registered nothing new).
    report = httpx.get(f"{storm.server.url}/prefill_port_table", timeout=10).json()
    counted = int(report["incarnation"].rpartition(".")[2]) if "." in report["incarnation"] else 0
    assert sum(write.acknowledged for write in moves) <= counted <= len(moves)


async def moves_and_resets(storm: Storm, rng: random.Random, resets_at: list[int]) -> None:
    """Every cell moves to its version-2 address; once ``resets_at[i]`` moves were acknowledged
    the i-th reset is sent, and 64 cells register again as soon as it is acknowledged."""
    start = storm.acknowledged
    sent_resets: list[asyncio.Task[None]] = []

    async def reset_then_register(wave: int) -> None:
        if (await storm.reset()).acknowledged:
            again = rng.sample(CELLS, 64)
            await concurrently(storm.register(cell, address(cell, 3 + wave)) for cell in again)

    async def move(cell: CellKey) -> None:
        await storm.register(cell, address(cell, 2))
        while resets_at and storm.acknowledged - start >= resets_at[0]:
            resets_at.pop(0)
            sent_resets.append(asyncio.create_task(reset_then_register(len(sent_resets))))

    await concurrently(move(cell) for cell in rng.sample(CELLS, len(CELLS)))
    await asyncio.gather(*sent_resets)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_acknowledged_resets_and_moves_of_a_storm_survive_kill_9(
    server_factory: ServerFactory, seed: int
) -> None:
    """Every cell moves while two resets are sent into the storm; each acknowledged reset is
    followed by 64 cells registering again. After the restart the served instance is the last
    reset that took effect, and nothing finished before it is served."""
    server = server_factory()
    rng = random.Random(seed)
    storm = Storm(server, History(instance_id(server)), kill_after=0)
    asyncio.run(register_all(storm, version=1))
    kill_at = rng.randint(64, len(CELLS) - 1)
    resets_at = sorted(rng.sample(range(1, kill_at), 2))
    storm.kill_after = storm.acknowledged + kill_at

    asyncio.run(moves_and_resets(storm, rng, resets_at))
    assert any(write.kind == "reset" for write in storm.history.writes)
    restart_and_check(storm)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_once_a_storm_with_a_reset_is_answered_kill_9_changes_nothing_served(
    server_factory: ServerFactory, seed: int
) -> None:
    """With no write in flight, what the server serves must be exactly what is durable. Moves
    planned before a reset but made durable after it was sent used to be served in the new
    instance although the reset had wiped them from disk: acknowledged, served, then lost."""
    server = server_factory()
    rng = random.Random(seed)
    storm = Storm(server, History(instance_id(server)), kill_after=0)
    asyncio.run(register_all(storm, version=1))

    asyncio.run(moves_and_resets(storm, rng, [rng.randint(1, len(CELLS) - 1)]))
    before = httpx.get(f"{server.url}/prefill_port_table", timeout=10).json()
    assert violations(storm.history, Served.from_report(before)) == []
    storm.kill(inside_the_window=False)

    changed = differences(Served.from_report(before), restart_and_check(storm))
    assert changed == [], f"{len(changed)} changes, first: " + "\n".join(changed[:10])
