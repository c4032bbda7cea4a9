"""Errors in one place: every error the server answers knows its status and kind, one kind has
one status, and every door answers it in the one JSON shape."""

from __future__ import annotations

import orjson
import pytest

from prefill_bootstrap.service.replies import reply_for, validation_reply
from prefill_bootstrap.shared import errors
from prefill_bootstrap.shared.errors import BootstrapError
from prefill_bootstrap.shared.protocol import RankAddress

ANSWERED = {
    errors.TopologyConflict("pp_size", 1, 2): (409, "topology_conflict"),
    errors.ProtocolMismatch("3", "1"): (422, "protocol_mismatch"),
    errors.TopologyNotAddressable("1", "pp_size=2"): (409, "topology_not_addressable"),
    errors.CellNotFound((0, 0, 0, 0)): (404, "cell_not_found"),
    errors.LeaseNotHeld(
        (0, 0, 0, 0), RankAddress(rank_ip="a", rank_port=1), RankAddress(rank_ip="b", rank_port=2)
    ): (409, "lease_not_held"),
    errors.StateStoreError("disk full"): (503, "state_not_durable"),
}  # fmt: skip


@pytest.mark.parametrize("error", list(ANSWERED), ids=lambda e: type(e).__name__)
def test_an_answered_error_says_its_own_status_kind_and_details(error: BootstrapError) -> None:
    reply = reply_for(error)
    assert (reply.status, type(error).kind) == ANSWERED[error]
    body = orjson.loads(reply.body)
    assert body == {
        "error": type(error).kind,
        "message": error.answer_message(),
        "details": error.details(),
    }


def test_one_kind_has_one_status() -> None:
    status_of: dict[str, int] = {}
    for cls in vars(errors).values():
        if (
            isinstance(cls, type)
            and issubclass(cls, BootstrapError)
            and cls.kind != "internal_error"
        ):
            assert status_of.setdefault(cls.kind, cls.status) == cls.status, cls


def test_a_topology_conflict_names_field_established_and_offered() -> None:
    reply = reply_for(errors.TopologyConflict("pp_size", 1, 2))
    assert orjson.loads(reply.body)["details"] == [
        {"field": "pp_size", "established": 1, "offered": 2}
    ]


def test_pydantics_value_error_prefix_is_stripped_once_for_every_message() -> None:
    reply = validation_reply(
        [{"loc": ("body", "rank_ip"), "msg": "Value error, 'x:1' is not an IP", "type": "v"}]
    )
    body = orjson.loads(reply.body)
    assert body["message"] == "body.rank_ip: 'x:1' is not an IP"
    assert body["details"][0]["msg"] == "'x:1' is not an IP"
