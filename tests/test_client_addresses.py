"""Where a rank finds the bootstrap server: host resolution and URL building."""

from __future__ import annotations

import pytest

from prefill_bootstrap.client.addresses import (
    bootstrap_url,
    format_host,
    normalize_base_url,
    resolve_bootstrap_host,
    split_host_port,
)
from prefill_bootstrap.shared.errors import ConfigurationError


@pytest.mark.parametrize(
    ("dist_init_addr", "expected"),
    [
        ("10.0.0.1:5000", "10.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("prefill-0.prefill.svc.cluster.local:5000", "prefill-0.prefill.svc.cluster.local"),
        ("leader", "leader"),
        ("[fe80::1]:5000", "fe80::1"),
        ("[fe80::1]", "fe80::1"),
        ("fe80::1", "fe80::1"),
        ("2001:db8::1:5000", "2001:db8::1:5000"),
        ("0.0.0.0:5000", "127.0.0.1"),
        ("[::]:5000", "::1"),
        ("::", "::1"),
    ],
)
def test_multi_node_ranks_use_the_host_of_dist_init_addr(
    dist_init_addr: str, expected: str
) -> None:
    assert resolve_bootstrap_host(dist_init_addr, "192.0.2.9", nnodes=2) == expected


@pytest.mark.parametrize(
    ("local_host", "expected"),
    [
        ("10.0.0.7", "10.0.0.7"),
        ("node-7", "node-7"),
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("[::]", "::1"),
        ("::1", "::1"),
        ("[fe80::7]", "fe80::7"),
    ],
)
def test_single_node_ranks_use_the_local_host_with_wildcards_made_loopback(
    local_host: str, expected: str
) -> None:
    assert resolve_bootstrap_host(None, local_host) == expected


def test_one_node_with_a_dist_init_addr_still_counts_as_single_node() -> None:
    assert resolve_bootstrap_host("10.0.0.1:5000", "127.0.0.1", nnodes=1) == "127.0.0.1"


def test_an_unknown_node_count_with_a_dist_init_addr_counts_as_multi_node() -> None:
    assert resolve_bootstrap_host("10.0.0.1:5000", "127.0.0.1") == "10.0.0.1"


@pytest.mark.parametrize(
    "address",
    ["", "[fe80::1", "[fe80::1]5000", "[not-v6]:5000", "host:port", "host:70000", ":5000", "a:b:c"],
)
def test_a_malformed_address_is_a_configuration_error_naming_it(address: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        split_host_port(address)
    assert repr(address) in str(caught.value) or "empty address" in str(caught.value)


def test_a_bracketed_ipv6_address_keeps_its_port() -> None:
    assert split_host_port("[fe80::1]:5000") == ("fe80::1", 5000)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.1", 8998, "http://10.0.0.1:8998"),
        ("fe80::1", 8998, "http://[fe80::1]:8998"),
        ("[fe80::1]", 8998, "http://[fe80::1]:8998"),
        ("::", 41234, "http://[::1]:41234"),
        ("0.0.0.0", 41234, "http://127.0.0.1:41234"),
        ("leader.example", 1, "http://leader.example:1"),
    ],
)
def test_urls_bracket_ipv6_and_never_point_at_a_wildcard(
    host: str, port: int, expected: str
) -> None:
    assert bootstrap_url(host, port) == expected


def test_an_ipv6_zone_id_is_percent_encoded_in_a_url() -> None:
    assert format_host("fe80::1%eth0") == "[fe80::1%25eth0]"


def test_a_port_outside_the_tcp_range_cannot_become_a_url() -> None:
    with pytest.raises(ConfigurationError, match=r"outside 1\.\.65535"):
        bootstrap_url("10.0.0.1", 0)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("http://10.0.0.1:8998", "http://10.0.0.1:8998"),
        ("http://10.0.0.1:8998/", "http://10.0.0.1:8998"),
        ("https://leader:9443", "https://leader:9443"),
        ("10.0.0.1:41234", "http://10.0.0.1:41234"),
        ("10.0.0.1", "http://10.0.0.1:8998"),
        ("[::1]:41234", "http://[::1]:41234"),
        ("::1", "http://[::1]:8998"),
        ("http://[::]:41234", "http://[::1]:41234"),
        ("0.0.0.0:41234", "http://127.0.0.1:41234"),
    ],
)
def test_what_a_user_types_becomes_a_base_url(typed: str, expected: str) -> None:
    assert normalize_base_url(typed) == expected


def test_a_base_url_with_a_path_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="has a path"):
        normalize_base_url("http://10.0.0.1:8998/route")
