"""What the routes that are ours, not SGLang's, answer: readiness, the table, its reset, lease
heartbeats, deregistration and the metrics. Same signature as every answer (``routes.Answer``)."""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from prefill_bootstrap.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from prefill_bootstrap.service.metrics import render as render_metrics
from prefill_bootstrap.service.registry import Registry
from prefill_bootstrap.service.replies import Reply, invalid_reply
from prefill_bootstrap.service.report import readiness, table_report
from prefill_bootstrap.shared.protocol import Deregistration, Heartbeat

__all__ = ["deregister", "heartbeat", "metrics", "port_table", "ready", "reset"]


def ready(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``GET /ready``: 200 once every cell is live, else 503 naming what is missing. One
    serialisation per state of the group, shared by every waiter and probe."""
    registry.group.expire_leases()
    answer = registry.cache.get("ready", lambda: readiness(registry))
    return Reply(200 if registry.group.table.is_complete else 503, answer)


def port_table(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``GET /prefill_port_table``: the whole table (always 200)."""
    registry.group.expire_leases()
    return Reply(200, registry.cache.get("table", lambda: table_report(registry)))


async def reset(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``DELETE /prefill_port_table``: a new group, answered once durable."""
    return Reply(200, orjson.dumps({"instance_id": await registry.group.reset()}))


def heartbeat(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``POST /heartbeat``: renew a leased cell (``CellNotFound``/``LeaseNotHeld`` are answered
    by their own status)."""
    try:
        beat = Heartbeat.model_validate_json(body)
    except ValidationError as exc:
        return invalid_reply(exc, "body")
    return Reply(200, orjson.dumps({"lease_expires_at": registry.group.renew(beat)}))


async def deregister(registry: Registry, query: bytes, body: bytes) -> Reply:
    """``POST /deregister``: a rank takes its own cell out, answered once durable
    (``NothingToDeregister`` 404 and ``AddressMismatch`` 409 are answered by their own status)."""
    try:
        leaving = Deregistration.model_validate_json(body)
    except ValidationError as exc:
        return invalid_reply(exc, "body")
    group = registry.group
    removal = await group.deregister(leaving)
    table = group.table
    answer = {
        "cell": list(removal.cell),
        "address": {"rank_ip": removal.address.rank_ip, "rank_port": removal.address.rank_port},
        "registered": table.registered_count,
        "expected": table.expected_count,
        "complete": table.is_complete,
        "incarnation": group.incarnation,
    }
    return Reply(200, orjson.dumps(answer))


def metrics(registry: Registry, query: bytes, body: bytes) -> Reply:
    registry.group.expire_leases()
    return Reply(200, render_metrics(registry), METRICS_CONTENT_TYPE)
