"""A stateful property test against a real server process (issue 17, item 6).

Hypothesis drives a real durable server through random registrations (new cells, the same
address again, moves), resets, lease heartbeats, bad inputs and ``kill -9`` restarts, some of
them while a registration is on the wire. After every step, what the server serves must equal a
model built only from acknowledged requests: the same instance, the same cells at the same
addresses with the same leases and generations, the same completeness, and the same answers on
``GET /route``; the acknowledged-writes checker (``tests/acknowledged.py``) judges it too.

Leases are an hour long, so no lease expires during a run: what is checked is deterministic.

Size: ``TEST_STATEFUL_EXAMPLES`` (default 8) runs of up to ``TEST_STATEFUL_STEPS`` (default 25)
steps, derandomised and without an example database, so CI runs the same steps every time.
Shrinking a failure restarts the server many times; ``TEST_STATEFUL_SHRINK=1`` turns it on.
Marked ``kill9`` with the storms.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.acknowledged import Address, CellKey, History, Served, Write, figures, violations
from tests.conftest import ServerProcess, cell_query, sglang_registration

EXAMPLES = int(os.environ.get("TEST_STATEFUL_EXAMPLES", "8"))
STEPS = int(os.environ.get("TEST_STATEFUL_STEPS", "25"))
SHRINK = os.environ.get("TEST_STATEFUL_SHRINK") == "1"

DP, TP = 2, 2
CELLS: list[CellKey] = [(dp, 0, tp, 0) for dp in range(DP) for tp in range(TP)]
ADDRESSES: list[Address] = [("10.0.0.1", 41000), ("10.0.0.1", 41001), ("10.0.0.2", 41000)]
LEASE = 3600.0
"""Long enough that no lease expires during a run."""

pytestmark = [pytest.mark.kill9, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class Held:
    """What the model says one cell serves."""

    address: Address
    lease_seconds: float | None
    address_version: int


def registration(cell: CellKey, where: Address, lease: float | None, **overrides: Any) -> bytes:
    dp, _, tp, _ = cell
    shape = {"attn_dp_size": DP, "attn_tp_size": TP, **overrides}
    body = sglang_registration(
        attn_dp_rank=dp, attn_tp_rank=tp, rank_ip=where[0], rank_port=where[1], **shape
    )
    if lease is not None:
        body["lease_seconds"] = lease
    return orjson.dumps(body)


def heartbeat_body(cell: CellKey, where: Address) -> dict[str, Any]:
    dp, cp, tp, pp = cell
    return {"dp": dp, "cp": cp, "tp": tp, "pp": pp, "rank_ip": where[0], "rank_port": where[1]}


BAD_INPUTS: dict[str, tuple[str, str, bytes, int]] = {
    "invalid JSON": ("PUT", "/route", b'{"attn_tp_size": 2,', 400),
    "a wrong type": (
        "PUT", "/route", orjson.dumps(sglang_registration(rank_port="41000")), 422,
    ),
    "an oversize field": (
        "PUT", "/route", orjson.dumps(sglang_registration(kv_cache_dtype="x" * 65)), 422,
    ),
    "an oversize unknown field": (
        "PUT", "/route", orjson.dumps(sglang_registration(new_field="x" * 20_000)), 422,
    ),
    "a rank outside its size": (
        "PUT", "/route", orjson.dumps(sglang_registration(attn_tp_rank=TP)), 422,
    ),
    "a port outside 1..65535": (
        "PUT", "/route", orjson.dumps(sglang_registration(rank_port=70000)), 422,
    ),
    "a heartbeat of wrong types": (
        "POST", "/heartbeat", orjson.dumps({"dp": "zero", "rank_port": []}), 422,
    ),
    "a heartbeat that is not JSON": ("POST", "/heartbeat", b"\xff\xfe", 400),
}  # fmt: skip
"""Requests that must be refused with the given status and change nothing."""


class ServedEqualsAcknowledged(RuleBasedStateMachine):
    server: ClassVar[ServerProcess]

    def __init__(self) -> None:
        super().__init__()
        self.client = httpx.Client(base_url=self.server.url, timeout=30)
        self.model: dict[CellKey, Held] = {}
        self.address_changes = 0
        """Moves and departures since the last reset: what the incarnation counts."""
        self.instance_id = ""
        self.history = History("")

    @initialize()
    def start_from_a_reset(self) -> None:
        """Every run begins with a new, empty instance on the one server of the test."""
        response = self.client.delete("/prefill_port_table")
        assert response.status_code == 200, response.text
        self.instance_id = response.json()["instance_id"]
        self.history = History(self.instance_id)

    def teardown(self) -> None:
        self.client.close()

    # -- the model -----------------------------------------------------------------------------

    def take(self, cell: CellKey, held: Held) -> None:
        """An acknowledged registration into the model; a move counts as an address change."""
        before = self.model.get(cell)
        if before is not None and before.address != held.address:
            self.address_changes += 1
        self.model[cell] = held

    def after_registering(self, cell: CellKey, where: Address, lease: float | None) -> Held:
        """The cell as an acknowledged registration leaves it: address version 1 when new, +1 when
        the address moves, unchanged when it is the same address again."""
        held = self.model.get(cell)
        if held is None:
            return Held(where, lease, 1)
        version = held.address_version + (held.address != where)
        return Held(where, lease, version)

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        cell=st.sampled_from(CELLS),
        where=st.sampled_from(ADDRESSES),
        lease=st.sampled_from([None, LEASE]),
    )
    def register(self, cell: CellKey, where: Address, lease: float | None) -> None:
        """A new cell, the same address again, or a move: acknowledged, so the model takes it."""
        figures["machine_steps"] += 1
        write = self.history.register(cell, where)
        response = self.client.put("/route", content=registration(cell, where, lease))
        History.answer(write, response.status_code)
        assert response.status_code == 200, response.text
        self.take(cell, self.after_registering(cell, where, lease))

    @rule()
    def reset(self) -> None:
        figures["machine_steps"] += 1
        write = self.history.reset()
        response = self.client.delete("/prefill_port_table")
        History.answer(write, response.status_code, response.json().get("instance_id"))
        assert response.status_code == 200, response.text
        self.instance_id = response.json()["instance_id"]
        self.model.clear()
        self.address_changes = 0

    @rule(cell=st.sampled_from(CELLS), where=st.sampled_from(ADDRESSES))
    def deregister(self, cell: CellKey, where: Address) -> None:
        """Only the rank holding the cell may take it out; that is durable and an address
        change (a decode's cached address for the cell is stale)."""
        figures["machine_steps"] += 1
        write = self.history.deregister(cell, where)
        response = self.client.post("/deregister", json=heartbeat_body(cell, where))
        History.answer(write, response.status_code)
        held = self.model.get(cell)
        if held is None:
            assert response.status_code == 404, response.text
        elif held.address != where:
            assert response.status_code == 409, response.text
        else:
            assert response.status_code == 200, response.text
            del self.model[cell]
            self.address_changes += 1

    @rule(cell=st.sampled_from(CELLS), where=st.sampled_from(ADDRESSES))
    def heartbeat(self, cell: CellKey, where: Address) -> None:
        """Only the rank holding the cell may renew it; a heartbeat never changes the table."""
        figures["machine_steps"] += 1
        response = self.client.post("/heartbeat", json=heartbeat_body(cell, where))
        held = self.model.get(cell)
        if held is None:
            assert response.status_code == 404, response.text
        elif held.address != where:
            assert response.status_code == 409, response.text
        else:
            assert response.status_code == 200, response.text
            expires_at = response.json()["lease_expires_at"]
            assert (expires_at is None) == (held.lease_seconds is None)

    @rule(bad=st.sampled_from(sorted(BAD_INPUTS)))
    def bad_input(self, bad: str) -> None:
        figures["machine_steps"] += 1
        figures["bad_inputs"] += 1
        method, path, content, status = BAD_INPUTS[bad]
        response = self.client.request(method, path, content=content)
        assert response.status_code == status, (bad, response.text)
        assert response.json()["error"], bad

    @precondition(lambda self: bool(self.model))
    @rule(cell=st.sampled_from(CELLS), where=st.sampled_from(ADDRESSES))
    def conflicting_registration(self, cell: CellKey, where: Address) -> None:
        """A rank of another group shape: 409, and the cell keeps what it had."""
        figures["machine_steps"] += 1
        figures["bad_inputs"] += 1
        write = self.history.register(cell, where)
        body = registration(cell, where, None, attn_tp_size=TP * 2)
        response = self.client.put("/route", content=body)
        History.answer(write, response.status_code)
        assert response.status_code == 409, response.text

    @rule(
        in_flight=st.one_of(
            st.none(),
            st.tuples(
                st.sampled_from(CELLS),
                st.sampled_from(ADDRESSES),
                st.sampled_from([None, LEASE]),
                st.sampled_from([0.0, 0.001, 0.005, 0.02]),
            ),
        )
    )
    def kill_9(self, in_flight: tuple[CellKey, Address, float | None, float] | None) -> None:
        """SIGKILL and restart on the same state; sometimes with a registration on the wire,
        sent ``delay`` seconds before the kill, whose fate only the restarted server tells."""
        figures["machine_steps"] += 1
        figures["machine_restarts"] += 1
        if in_flight is None:
            self.server.restart()
            return
        cell, where, lease, delay = in_flight
        figures["machine_in_flight"] += 1
        write = self.history.register(cell, where)
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as rank:
            body = registration(cell, where, lease)
            rank.sendall(
                b"PUT /route HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(delay)
            assert self.server.process is not None
            os.kill(self.server.process.pid, signal.SIGKILL)
        self.server.restart()
        self.settle(write, cell, self.after_registering(cell, where, lease))

    def settle(self, write: Write, cell: CellKey, applied: Held) -> None:
        """The restarted server shows whether the unanswered registration took effect; from
        then on it is as good as answered (200 if it did, refused if not)."""
        found = violations(self.history, self.served())
        assert found == [], "\n".join(found)
        shown = self.held(self.report()).get(cell)
        if shown == applied:
            History.answer(write, 200)
            self.take(cell, applied)
            figures["machine_in_flight_applied"] += 1
        else:
            assert shown == self.model.get(cell), (shown, applied, self.model.get(cell))
            History.answer(write, 0)

    # -- what the server serves ----------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        response = self.client.get("/prefill_port_table")
        assert response.status_code == 200, response.text
        return response.json()

    def served(self) -> Served:
        return Served.from_report(self.report())

    @staticmethod
    def held(report: dict[str, Any]) -> dict[CellKey, Held]:
        return {
            (c["dp"], c["cp"], c["tp"], c["pp"]): Held(
                (c["rank_ip"], c["rank_port"]), c["lease_seconds"], c["address_version"]
            )
            for c in report["cells"]
        }

    @invariant()
    def served_equals_the_acknowledged_model(self) -> None:
        report = self.report()
        found = violations(self.history, Served.from_report(report))
        assert found == [], "\n".join(found)
        assert report["instance_id"] == self.instance_id
        changes = self.address_changes
        assert report["incarnation"] == (
            self.instance_id if changes == 0 else f"{self.instance_id}.{changes}"
        )
        assert self.held(report) == self.model
        assert (report["topology"] is None) == (not self.model)
        complete = len(self.model) == len(CELLS)
        assert report["complete"] is complete
        assert all(cell["state"] == "registered" for cell in report["cells"])
        for cell in CELLS:
            route = self.client.get("/route", params=cell_query(*cell))
            if not complete:
                assert route.status_code == 503, route.text
                continue
            assert route.status_code == 200, route.text
            assert (route.json()["rank_ip"], route.json()["rank_port"]) == self.model[cell].address


def test_what_the_server_serves_equals_the_acknowledged_model(
    server_factory: Callable[..., ServerProcess],
) -> None:
    ServedEqualsAcknowledged.server = server_factory()
    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if SHRINK else [])]
    run_state_machine_as_test(
        ServedEqualsAcknowledged,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            derandomize=True,
            phases=phases,
            suppress_health_check=list(HealthCheck),
        ),
    )
