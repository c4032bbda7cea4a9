"""A scripted server speaking the change feed's wire, for client tests without a server.

Each connection to ``/prefill_port_table/events`` takes the next ``Answer`` of the script: a
status, and for a 200 the SSE bytes to stream, optionally breaking the connection afterwards
(``httpx.ReadError``, as a killed server does). ``GET /prefill_port_table`` answers ``table``.
Every request is recorded, so tests can read the ``Last-Event-ID`` each reconnect sent. One
transport serves both the sync and the async client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from prefill_bootstrap.shared.events import TableEvent

INSTANCE = "g1"


def event(seq: int, kind: str = "registered", **fields: Any) -> TableEvent:
    body: dict[str, Any] = {
        "seq": seq,
        "kind": kind,
        "instance_id": INSTANCE,
        "incarnation": INSTANCE,
        "at": 1_700_000_000.0 + seq,
    }
    if kind not in ("complete", "incomplete", "reset"):
        body |= {"cell": [0, 0, seq % 4, 0], "address_version": 1}
        body["address"] = {"rank_ip": "10.0.1.4", "rank_port": 41000 + seq}
    return TableEvent.model_validate(body | fields)


def sse(stream: str, *events: TableEvent) -> bytes:
    return b"".join(
        f"id: {stream}:{e.seq}\nevent: {e.kind}\ndata: {e.model_dump_json()}\n\n".encode()
        for e in events
    )


def table(stream: str, seq: int, instance: str = INSTANCE, incarnation: str | None = None) -> dict:
    return {
        "instance_id": instance,
        "incarnation": incarnation or instance,
        "stream": stream,
        "seq": seq,
        "complete": False,
        "topology": None,
        "expected_cells": None,
        "registered_cells": 0,
        "missing_cells": [],
        "rows": [],
        "cells": [],
        "replacements": [],
        "conflicts": [],
        "server_info": None,
        "state": "memory",
    }


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    then_break: bool = False
    json: Any = None


def gone(stream: str = "s1") -> Answer:
    details = [{"stream": stream, "oldest": 1, "latest": 1}]
    return Answer(410, json={"error": "history_gone", "message": "re-read", "details": details})


class _Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, body: bytes, then_break: bool) -> None:
        self.body = body
        self.then_break = then_break

    def _chunks(self) -> list[bytes]:
        return [self.body[i : i + 40] for i in range(0, len(self.body), 40)]

    def __iter__(self) -> Iterator[bytes]:
        yield b"retry: 2000\n\n"
        yield from self._chunks()
        if self.then_break:
            raise httpx.ReadError("connection reset by peer")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


@dataclass
class FeedServer:
    script: list[Answer]
    table: dict = field(default_factory=lambda: table("s1", 0))
    requests: list[httpx.Request] = field(default_factory=list)

    @property
    def resumed_from(self) -> list[str | None]:
        """The ``Last-Event-ID`` of every connection to the event stream, in order."""
        return [
            r.headers.get("last-event-id") for r in self.requests if r.url.path.endswith("events")
        ]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/prefill_port_table":
            return httpx.Response(200, json=self.table)
        if not self.script:
            return httpx.Response(503, json={"error": "script_over", "message": "no more"})
        answer = self.script.pop(0)
        if answer.json is not None:
            return httpx.Response(answer.status, content=json.dumps(answer.json).encode())
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache"}
        stream = _Body(answer.body, answer.then_break)
        return httpx.Response(answer.status, headers=headers, stream=stream)
