"""The acknowledged-writes checker itself (tests/acknowledged.py): it names what no order of the
writes explains, and accepts what some order does. Fabricated histories and server answers, so
the kill -9 suites can be trusted to fail when the server loses a write."""

from __future__ import annotations

from tests.acknowledged import Address, CellKey, History, Served, Write, violations

A: CellKey = (0, 0, 0, 0)
B: CellKey = (0, 0, 1, 0)
OLD: Address = ("10.0.0.1", 41000)
NEW: Address = ("10.0.0.2", 42000)
NEWER: Address = ("10.0.0.3", 43000)


def register(
    cell: CellKey, address: Address, sent: float, answered: float | None, status: int = 200
) -> Write:
    return Write(
        "register",
        sent,
        cell=cell,
        address=address,
        answered=answered,
        status=status if answered is not None else None,
    )


def reset(sent: float, answered: float | None, instance_id: str | None = None) -> Write:
    return Write(
        "reset",
        sent,
        answered=answered,
        status=200 if answered is not None else None,
        instance_id=instance_id,
    )


def deregister(cell: CellKey, address: Address, sent: float, answered: float | None) -> Write:
    return Write(
        "deregister",
        sent,
        cell=cell,
        address=address,
        answered=answered,
        status=200 if answered is not None else None,
    )


def history(*writes: Write) -> History:
    return History("first", list(writes))


def test_a_served_table_holding_every_acknowledged_write_has_no_violation() -> None:
    writes = history(register(A, OLD, 1, 2), register(B, NEW, 1, 3))
    assert violations_of(writes, {A: OLD, B: NEW}) == []


def test_an_acknowledged_registration_missing_after_the_restart_is_named_as_lost() -> None:
    writes = history(register(A, OLD, 1, 2), register(B, NEW, 1, 3))
    [found] = violations_of(writes, {A: OLD})
    assert "cell (dp=0, cp=0, tp=1, pp=0) is not served" in found
    assert "10.0.0.2:42000" in found and "acknowledged write was lost" in found


def test_an_address_never_sent_for_the_cell_is_named() -> None:
    writes = history(register(A, OLD, 1, 2))
    [found] = violations_of(writes, {A: ("10.9.9.9", 1)})
    assert "served at 10.9.9.9:1, an address never sent for it" in found


def test_a_cell_nobody_registered_is_named() -> None:
    [found] = violations_of(history(), {A: OLD})
    assert "an address never sent for it" in found


def test_a_refused_registration_must_never_be_served() -> None:
    writes = history(register(A, OLD, 1, 2, status=503))
    [found] = violations_of(writes, {A: OLD})
    assert "never sent" in found  # refused writes count as not sent


def test_an_unknown_registration_may_be_served_or_not() -> None:
    writes = history(register(A, OLD, 1, None))
    assert violations_of(writes, {A: OLD}) == []
    assert violations_of(writes, {}) == []


def test_the_old_address_after_an_acknowledged_later_move_is_named() -> None:
    writes = history(register(A, OLD, 1, 2), register(A, NEW, 3, 4))
    [found] = violations_of(writes, {A: OLD})
    assert "served at 10.0.0.1:41000, but a later registration was acknowledged" in found
    assert "10.0.0.2:42000" in found


def test_overlapping_moves_may_end_in_either_order() -> None:
    writes = history(register(A, OLD, 1, 2), register(A, NEW, 3, 6), register(A, NEWER, 4, 5))
    assert violations_of(writes, {A: NEW}) == []
    assert violations_of(writes, {A: NEWER}) == []
    assert violations_of(writes, {A: OLD}) != []


def test_a_move_with_no_answer_may_or_may_not_have_replaced_the_acknowledged_address() -> None:
    writes = history(register(A, OLD, 1, 2), register(A, NEW, 3, None))
    assert violations_of(writes, {A: OLD}) == []
    assert violations_of(writes, {A: NEW}) == []
    assert violations_of(writes, {}) != []


def test_nothing_registered_before_an_acknowledged_reset_is_served() -> None:
    writes = history(register(A, OLD, 1, 2), reset(3, 4, "second"))
    assert violations_of(writes, {}, instance="second") == []
    [found] = violations_of(writes, {A: OLD}, instance="second")
    assert "which only registrations finished before the last reset carried" in found


def test_a_registration_acknowledged_after_the_reset_must_be_served() -> None:
    writes = history(register(A, OLD, 1, 2), reset(3, 4, "second"), register(A, NEW, 5, 6))
    assert violations_of(writes, {A: NEW}, instance="second") == []
    [found] = violations_of(writes, {}, instance="second")
    assert "acknowledged after the last reset" in found


def test_a_registration_overlapping_the_reset_may_survive_it_or_not() -> None:
    writes = history(reset(3, 6, "second"), register(A, NEW, 4, 5))
    assert violations_of(writes, {A: NEW}, instance="second") == []
    assert violations_of(writes, {}, instance="second") == []


def test_the_instance_of_an_earlier_reset_after_a_later_acknowledged_one_is_named() -> None:
    writes = history(reset(1, 2, "second"), reset(3, 4, "third"))
    [found] = violations_of(writes, {}, instance="second")
    assert "a later reset was acknowledged with instance third" in found
    [found] = violations_of(writes, {}, instance="first")
    assert "instance third" in found


def test_an_instance_id_nobody_was_given_is_named_unless_a_reset_went_unanswered() -> None:
    [found] = violations_of(history(reset(1, 2, "second")), {}, instance="bogus")
    assert "no reset ever answered with it" in found
    assert violations_of(history(reset(1, 2, "second"), reset(3, None)), {}, instance="x") == []


def violations_of(
    writes: History, cells: dict[CellKey, Address], instance: str = "first"
) -> list[str]:
    return violations(writes, Served(instance, cells))


def test_a_cell_served_after_its_acknowledged_deregistration_is_named() -> None:
    writes = history(register(A, OLD, 1, 2), deregister(A, OLD, 3, 4))
    assert violations_of(writes, {}) == []
    [found] = violations_of(writes, {A: OLD})
    assert "a deregistration of it was acknowledged" in found
    assert "POST /deregister (dp=0, cp=0, tp=0, pp=0) at 10.0.0.1:41000" in found


def test_a_registration_acknowledged_after_the_deregistration_must_be_served() -> None:
    writes = history(register(A, OLD, 1, 2), deregister(A, OLD, 3, 4), register(A, NEW, 5, 6))
    assert violations_of(writes, {A: NEW}) == []
    [found] = violations_of(writes, {})
    assert "acknowledged write was lost" in found


def test_a_deregistration_with_no_answer_may_or_may_not_have_taken_the_cell_out() -> None:
    writes = history(register(A, OLD, 1, 2), deregister(A, OLD, 3, None))
    assert violations_of(writes, {A: OLD}) == []
    assert violations_of(writes, {}) == []
