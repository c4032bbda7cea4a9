"""``watch()`` against a scripted server speaking the change feed's wire (``tests/feed_fakes``):
what it yields, where every reconnect resumes, when it resynchronises, how it ends."""

from __future__ import annotations

import asyncio
import itertools
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from prefill_bootstrap.client.feed import Resynced
from prefill_bootstrap.client.http import AsyncBootstrapClient, BootstrapClient
from prefill_bootstrap.client.retry import RetryPolicy
from prefill_bootstrap.shared.errors import (
    ConfigurationError,
    RequestRejected,
    ServerUnreachable,
    UnexpectedAnswer,
)
from prefill_bootstrap.shared.events import TableEvent
from tests.feed_fakes import Answer, FeedServer, event, gone, sse, table

URL = "http://bootstrap:8998"
FAST = RetryPolicy(deadline=0.3, attempts=3, initial_backoff=0.01, max_backoff=0.02, jitter=0.0)


def watch(server: FeedServer, count: int, **options: Any) -> list[Any]:
    client = BootstrapClient(
        URL, transport=httpx.MockTransport(server), retry=FAST, auth_token="s3cret"
    )
    with client:
        return list(itertools.islice(client.watch(**options), count))


def seqs(items: list[Any]) -> list[Any]:
    return [item.seq if isinstance(item, TableEvent) else item.reason for item in items]


def test_events_arrive_typed_in_order_over_an_authenticated_event_stream() -> None:
    moved = event(3, "moved", previous={"rank_ip": "10.0.1.4", "rank_port": 40000})
    server = FeedServer([Answer(body=sse("s1", event(1), event(2), moved))])
    items = watch(server, 3)
    assert items == [event(1), event(2), moved]
    first = server.requests[0]
    assert first.headers["accept"] == "text/event-stream"
    assert first.headers["authorization"] == "Bearer s3cret"
    assert "last-event-id" not in first.headers  # since=None: from now


def test_a_broken_connection_resumes_from_the_last_event_without_gap_or_duplicate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = FeedServer(
        [
            Answer(body=sse("s1", event(1), event(2)), then_break=True),
            Answer(body=sse("s1", event(2), event(3))),  # the server repeats the boundary
        ]
    )
    assert seqs(watch(server, 3)) == [1, 2, 3]
    assert server.resumed_from == [None, "s1:2"]
    assert server.requests[1].url.params["since"] == "s1:2"
    assert "(the stream was cut: connection reset by peer); resuming from s1:2" in caplog.text


def test_a_stream_the_server_ends_is_resumed_too() -> None:
    server = FeedServer([Answer(body=sse("s1", event(1))), Answer(body=sse("s1", event(2)))])
    assert seqs(watch(server, 2)) == [1, 2]
    assert server.resumed_from == [None, "s1:1"]


def test_since_is_sent_as_last_event_id_and_a_bad_one_is_refused_before_any_request() -> None:
    server = FeedServer([Answer(body=sse("s1", event(8)))])
    assert seqs(watch(server, 1, since="s1:7")) == [8]
    assert server.resumed_from == ["s1:7"]
    with pytest.raises(ConfigurationError, match=r"since: .*malformed sequence number"):
        watch(FeedServer([]), 1, since="s1:-3")


def test_410_history_gone_reads_the_table_and_watches_from_its_position() -> None:
    server = FeedServer(
        [gone(), Answer(body=sse("s2", event(8)))], table=table("s2", 7, incarnation="g1.3")
    )
    resynced, moved = watch(server, 2, since="s1:2")
    assert isinstance(resynced, Resynced)
    assert (resynced.reason, resynced.position) == ("history_gone", "s2:7")
    assert (resynced.instance_id, resynced.incarnation) == ("g1", "g1.3")
    assert resynced.table.instance_id == "g1"
    assert moved.seq == 8
    assert server.resumed_from == ["s1:2", "s2:7"]


def test_a_restarted_server_that_ignores_the_position_is_caught_by_its_new_stream() -> None:
    server = FeedServer(
        [
            Answer(body=sse("s1", event(1)), then_break=True),
            Answer(body=sse("s9", event(1))),  # a new run, streaming from its start
            Answer(body=sse("s9", event(4))),
        ],
        table=table("s9", 3),
    )
    assert seqs(watch(server, 3)) == [1, "new_stream", 4]
    assert server.resumed_from == [None, "s1:1", "s9:3"]


def test_a_gap_in_the_sequence_resynchronises() -> None:
    server = FeedServer(
        [Answer(body=sse("s1", event(1), event(5))), Answer(body=sse("s1", event(6)))],
        table=table("s1", 5),
    )
    assert seqs(watch(server, 3)) == [1, "gap", 6]


def test_a_reset_event_passes_but_an_unannounced_new_instance_resynchronises() -> None:
    reset = event(2, "reset", instance_id="g2", incarnation="g2", detail="previous instance g1")
    stray = event(3, "registered", instance_id="g3", incarnation="g3")
    server = FeedServer(
        [
            Answer(body=sse("s1", event(1), reset, stray)),
            Answer(body=sse("s1", event(4, instance_id="g3", incarnation="g3"))),
        ],
        table=table("s1", 3, instance="g3"),
    )
    items = watch(server, 4)
    assert seqs(items) == [1, 2, "new_instance", 4]
    assert items[1].kind == "reset"


def test_a_drop_before_the_first_event_resynchronises_since_it_cannot_know_what_it_missed() -> None:
    server = FeedServer(
        [Answer(body=b": keep-alive\n\n", then_break=True), Answer(body=sse("s1", event(5)))],
        table=table("s1", 4),
    )
    assert seqs(watch(server, 2)) == ["no_position", 5]
    assert server.resumed_from == [None, "s1:4"]


def test_5xx_answers_are_retried_by_the_policy() -> None:
    busy = Answer(503, json={"error": "busy", "message": "later"})
    server = FeedServer([busy, busy, Answer(body=sse("s1", event(1)))])
    assert seqs(watch(server, 1)) == [1]


def test_a_refusal_ends_the_watch_with_the_usual_typed_error() -> None:
    denied = Answer(401, json={"error": "unauthorized", "message": "bad token"})
    with pytest.raises(RequestRejected) as caught:
        watch(FeedServer([denied]), 1)
    assert caught.value.status_code == 401


def test_an_unreachable_server_ends_the_watch_after_the_retry_policy() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    client = BootstrapClient(URL, transport=httpx.MockTransport(refuse), retry=FAST)
    with pytest.raises(ServerUnreachable, match="watch request"):
        next(client.watch())


def test_an_answer_that_is_not_an_event_stream_is_an_unexpected_answer() -> None:
    server = FeedServer([Answer(200, json={"stream": "s1", "seq": 0, "events": []})])
    with pytest.raises(UnexpectedAnswer, match="text/event-stream"):
        watch(server, 1)


def test_the_async_client_watches_resumes_and_resynchronises_alike() -> None:
    server = FeedServer(
        [
            Answer(body=sse("s1", event(1), event(2)), then_break=True),
            Answer(body=sse("s1", event(3))),
            gone(),
            Answer(body=sse("s2", event(10))),
        ],
        table=table("s2", 9),
    )

    async def take() -> list[Any]:
        transport = httpx.MockTransport(server)
        got: list[Any] = []
        client = AsyncBootstrapClient(URL, transport=transport, retry=FAST)
        async with client, aclosing(client.watch()) as items:
            async for item in items:
                got.append(item)
                if len(got) == 5:
                    return got
        return got

    assert seqs(asyncio.run(take())) == [1, 2, 3, "history_gone", 10]
    assert server.resumed_from == [None, "s1:2", "s1:3", "s2:9"]
