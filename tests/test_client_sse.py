"""The event-stream reader, alone: the parsing rules a watcher relies on, chunk by chunk."""

from __future__ import annotations

import pytest

from prefill_bootstrap.client.sse import ServerSentEvent, SSEDecoder

WIRE = (
    b"retry: 2000\n\n"
    b'id: abc:1\nevent: registered\ndata: {"seq": 1}\n\n'
    b": keep-alive\n\n"
    b'id: abc:2\nevent: moved\ndata: {"seq": 2}\n\n'
)
EXPECTED = [
    ServerSentEvent('{"seq": 1}', "registered", "abc:1"),
    ServerSentEvent('{"seq": 2}', "moved", "abc:2"),
]


def decode(*chunks: bytes) -> tuple[list[ServerSentEvent], SSEDecoder]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events, decoder


def test_our_servers_stream_reads_as_its_events_and_the_retry_hint() -> None:
    events, decoder = decode(WIRE)
    assert events == EXPECTED
    assert decoder.retry == 2000
    assert decoder.last_id == "abc:2"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    chunks = [WIRE[i : i + size] for i in range(0, len(WIRE), size)]
    assert decode(*chunks)[0] == EXPECTED


@pytest.mark.parametrize("ending", [b"\r\n", b"\r", b"\n"])
def test_every_line_ending_is_a_line_ending(ending: bytes) -> None:
    wire = WIRE.replace(b"\n", ending)
    assert decode(wire)[0] == EXPECTED
    assert decode(*[wire[i : i + 1] for i in range(len(wire))])[0] == EXPECTED


def test_a_crlf_split_between_chunks_is_one_line_ending() -> None:
    events, _ = decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert events == [ServerSentEvent("a\nb")]


def test_multi_line_data_joins_with_newlines_and_keeps_inner_spaces() -> None:
    events, _ = decode(b"data:first\ndata:  second\ndata\n\n")
    assert events == [ServerSentEvent("first\n second\n")]


def test_comments_unknown_fields_and_dataless_blocks_dispatch_nothing() -> None:
    events, decoder = decode(b": hello\n\nfoo: bar\n\nevent: x\n\nretry: soon\n\n")
    assert events == []
    assert decoder.retry is None


def test_the_event_type_resets_after_each_event_but_the_id_persists() -> None:
    events, _ = decode(b"id: s:5\nevent: left\ndata: 1\n\ndata: 2\n\n")
    assert events == [ServerSentEvent("1", "left", "s:5"), ServerSentEvent("2", "message", "s:5")]


def test_a_character_split_across_chunks_is_decoded_whole() -> None:
    wire = "data: caf\u00e9\n\n".encode()
    split = wire.index(b"\xa9")
    assert decode(wire[:split], wire[split:])[0] == [ServerSentEvent("caf\u00e9")]


def test_a_leading_byte_order_mark_is_dropped() -> None:
    assert decode(b"\xef\xbb\xbfdata: x\n\n")[0] == [ServerSentEvent("x")]


def test_an_unterminated_event_is_not_dispatched() -> None:
    assert decode(b"data: half")[0] == []


def test_a_line_without_end_past_the_bound_is_refused() -> None:
    decoder = SSEDecoder(max_line=16)
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        decoder.feed(b"data: " + b"x" * 32)
