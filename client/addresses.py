"""Where the bootstrap server is: host resolution and URL building.

A rank finds the server on the leader: in multi-node mode that is the host of ``dist_init_addr``
(world rank 0's address), otherwise the local bootstrap host. Listen wildcards are not places to
connect to, so ``0.0.0.0`` and ``::`` become the loopback of the same family. IPv6 literals appear
in ``dist_init_addr`` with or without brackets and must be bracketed in every URL; getting that
wrong produces URLs that fail far from the cause, so it happens here, once.
"""

from __future__ import annotations

import ipaddress

from prefill_bootstrap.shared.errors import ConfigurationError
from prefill_bootstrap.shared.protocol import DEFAULT_PORT

__all__ = [
    "bootstrap_url",
    "format_host",
    "is_multi_node",
    "normalize_base_url",
    "resolve_bootstrap_host",
    "split_host_port",
    "unwildcard",
]

_WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigurationError(
            f"{address!r} has port {text!r}, which is not a number in 1..65535; "
            "write host:port (IPv6 as [addr]:port)"
        )
    return int(text)


def split_host_port(address: str, default_port: int | None = None) -> tuple[str, int | None]:
    """Split ``host[:port]`` into host (without brackets) and port.

    Accepts DNS names, IPv4, bracketed IPv6 with or without a port (``[fe80::1]:5000``) and bare
    IPv6 (``fe80::1``). A bare IPv6 literal never carries a port: ``2001:db8::1:5000`` is itself a
    valid address, so reading its last group as a port would be a guess.
    """
    text = address.strip()
    if not text:
        raise ConfigurationError("an empty address was given where host[:port] was expected")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_ipv6(host.split("%")[0]):
            raise ConfigurationError(
                f"{address!r} is not a bracketed IPv6 address; write [addr] or [addr]:port"
            )
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ConfigurationError(f"{address!r} has {rest!r} after the IPv6 address")
        return host, _port(rest[1:], address)
    if _is_ipv6(text.split("%")[0]):
        return text, default_port
    if text.count(":") > 1:
        raise ConfigurationError(
            f"{address!r} is neither host:port nor an IPv6 address; write IPv6 with a port as "
            "[addr]:port"
        )
    host, colon, port = text.partition(":")
    if not host:
        raise ConfigurationError(f"{address!r} has no host before the port")
    return host, _port(port, address) if colon else default_port


def unwildcard(host: str) -> str:
    """A listen wildcard is not an address to connect to: use the same family's loopback."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return _WILDCARD_LOOPBACK.get(bare, bare)


def is_multi_node(dist_init_addr: str | None, nnodes: int | None) -> bool:
    """SGLang's rule: multi-node needs a ``dist_init_addr`` and more than one node."""
    return bool(dist_init_addr) and (nnodes is None or nnodes > 1)


def resolve_bootstrap_host(
    dist_init_addr: str | None, local_host: str = "127.0.0.1", *, nnodes: int | None = None
) -> str:
    """The host of the bootstrap server as this rank must reach it (no brackets).

    Multi-node (``dist_init_addr`` set, ``nnodes`` unknown or above 1): the leader's host from
    ``dist_init_addr``. Otherwise ``local_host``. Wildcards become loopback either way.
    """
    if dist_init_addr and is_multi_node(dist_init_addr, nnodes):
        host, _ = split_host_port(dist_init_addr)
    else:
        host, _ = split_host_port(local_host)
    return unwildcard(host)


def format_host(host: str) -> str:
    """The host as it appears in a URL authority: IPv6 bracketed, a zone id percent-encoded."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        return "[" + bare.replace("%25", "%").replace("%", "%25") + "]"
    return bare


def bootstrap_url(host: str, port: int, scheme: str = "http") -> str:
    """``scheme://host:port`` with IPv6 brackets; the base URL every client request starts from."""
    if scheme not in ("http", "https"):
        raise ConfigurationError(f"scheme {scheme!r} is not http or https")
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"bootstrap port {port} is outside 1..65535")
    return f"{scheme}://{format_host(unwildcard(host))}:{port}"


def normalize_base_url(text: str, default_port: int = DEFAULT_PORT) -> str:
    """Turn what a user types (``http://h:p``, ``h:p``, ``[::1]:p``, ``h``) into a base URL.

    A missing port means the bootstrap default (8998) for http and https alike: the server's
    port does not change with TLS.
    Wildcards are rewritten, so the address a server was told to listen on also works as the
    address to reach it from the same host.
    """
    text = text.strip().rstrip("/")
    scheme = "http"
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if "/" in text:
            raise ConfigurationError(
                f"bootstrap URL {scheme}://{text} has a path; give the server's base URL only"
            )
    host, port = split_host_port(text, default_port)
    assert port is not None
    return bootstrap_url(host, port, scheme)
