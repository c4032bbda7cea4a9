"""The hot routes answered inside the HTTP protocol, over real sockets: the same bytes as the
ASGI path, keep-alive, pipelining, HTTP/1.0, tokens, body caps and metrics."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from tests.conftest import ServerProcess, cell_query, sglang_registration

pytestmark = pytest.mark.timeout(60)
INFO = "/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1"


def exchange(server: ServerProcess, raw: bytes, responses: int = 1) -> bytes:
    """Send raw bytes, read until ``responses`` complete answers arrived (or the peer closed)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while not _complete(data, responses):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _complete(data: bytes, responses: int) -> bool:
    rest, seen = data, 0
    while seen < responses:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )  # fmt: skip
        if len(rest) < length:
            return False
        rest, seen = rest[length:], seen + 1
    return True


def test_a_hot_answer_carries_status_headers_and_body(server: ServerProcess) -> None:
    answer = exchange(server, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"content-length: 2" in head
    assert b"x-sglang-disaggregation-instance-id: " in head
    assert body == b"OK"


def test_pipelined_requests_are_answered_in_order(server: ServerProcess) -> None:
    requests = (
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        + f"GET {INFO} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
        + b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n"
        + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    answer = exchange(server, requests, responses=4)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"503", b"503", b"200"]


def test_http_1_0_and_connection_close_are_answered_and_closed(server: ServerProcess) -> None:
    for raw in (
        b"GET /health HTTP/1.0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ):
        answer = exchange(server, raw)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"OK")


def test_a_room_body_over_the_cap_is_413(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--max-body-bytes", "2048", durable=False)
    response = httpx.post(f"{server.url}/query_dp_ranks", content=b"[" + b"1," * 2000 + b"1]")
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"


def test_a_body_sent_with_a_get_is_ignored_alike_by_both_doors(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A GET's body is no input of its route, so its size is none of the body cap's business:
    the lean door (keep-alive) must not refuse what the ASGI door (``Connection: close``) and
    FastAPI answer."""
    server = server_factory("--max-body-bytes", "1024", durable=False)
    body = b"x" * 2048
    heads = []
    for connection in (b"keep-alive", b"close"):
        answer = exchange(
            server,
            b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (connection, len(body), body),
        )
        heads.append(answer.split(b"\r\n", 1)[0])
    assert heads == [b"HTTP/1.1 200 OK"] * 2


def test_a_room_registration_needs_the_token_on_the_hot_path_too(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory("--auth-token", "t0k", durable=False)
    body = {"bootstrap_room": 9, "dp_rank": 1}
    assert httpx.post(f"{server.url}/register_dp_rank", json=body).status_code == 401
    ok = httpx.post(
        f"{server.url}/register_dp_rank", json=body, headers={"authorization": "Bearer t0k"}
    )
    assert ok.status_code == 200
    rooms = httpx.post(f"{server.url}/query_dp_ranks", json={"bootstrap_rooms": [9]})
    assert rooms.json() == {"9": 1}


def health_count(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("prefill_bootstrap_request_duration_seconds_count") and (
            'route="/health"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_hot_answers_are_counted_in_metrics(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url) as client:
        before = health_count(client)
        for _ in range(5):
            client.get("/health")
        client.put("/route", json=sglang_registration())
        client.get(INFO)
        assert health_count(client) == before + 5
        text = client.get("/metrics").text
    assert "prefill_bootstrap_not_ready_responses_total 1.0" in text


def test_keep_alive_serves_many_requests_on_one_connection(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url) as client:
        for index in range(50):
            response = client.post(
                "/register_dp_rank", json={"bootstrap_room": index, "dp_rank": index % 4}
            )
            assert response.status_code == 200
        rooms = client.post("/query_dp_ranks", json={"bootstrap_rooms": list(range(50))}).json()
    assert rooms == {str(index): index % 4 for index in range(50)}


def put_route(body: dict[str, object], *extra_headers: str) -> bytes:
    payload = orjson.dumps(body)
    headers = "".join(f"{header}\r\n" for header in extra_headers)
    return (
        f"PUT /route HTTP/1.1\r\nhost: x\r\ncontent-length: {len(payload)}\r\n{headers}\r\n"
    ).encode() + payload


def test_requests_pipelined_behind_a_registration_wait_for_it_to_be_durable(
    server: ServerProcess,
) -> None:
    """The info query after the last rank's registration must already see a complete table."""
    requests = (
        put_route(sglang_registration(attn_tp_rank=0, rank_port=41000))
        + put_route(sglang_registration(attn_tp_rank=1, rank_port=41001))
        + f"GET {INFO} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
        + b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    answer = exchange(server, requests, responses=4)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"200", b"200"]
    assert answer.count(b"\r\n\r\nOK") == 2


def test_a_registration_stands_when_its_rank_hangs_up_before_the_answer(
    server: ServerProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(put_route(sglang_registration(attn_tp_rank=1, rank_port=41001)))
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=server.url) as client:
        while client.get("/prefill_port_table").json()["registered_cells"] < 1:
            assert time.monotonic() < deadline, "the registration was lost with its connection"
            time.sleep(0.02)
        cell = client.get("/route", params=cell_query(0, 0, 1, 0))
    assert cell.status_code == 503  # registered, but the group of two is not complete


def test_a_registration_needs_the_token_and_fits_the_body_cap_on_the_hot_path(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory("--auth-token", "t0k", "--max-body-bytes", "2048", durable=False)
    body = sglang_registration()
    refused = exchange(server, put_route(body))
    assert refused.startswith(b"HTTP/1.1 401 ")
    too_large = exchange(
        server, put_route({**body, "padding": "x" * 4096}, "authorization: Bearer t0k")
    )
    assert too_large.startswith(b"HTTP/1.1 413 ")
    accepted = exchange(server, put_route(body, "authorization: Bearer t0k"))
    assert accepted.startswith(b"HTTP/1.1 200 ") and accepted.endswith(b"\r\n\r\nOK")


def test_a_registration_answer_carries_the_same_headers_as_every_hot_answer(
    server: ServerProcess,
) -> None:
    answer = exchange(server, put_route(sglang_registration()))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"content-type: text/plain; charset=utf-8" in head
    assert b"x-sglang-disaggregation-instance-id: " in head
    assert body == b"OK"
