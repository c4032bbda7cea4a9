"""The client's retry policy, declared once with tenacity.

What is transient: the server is not there yet or is momentarily failing (connection refused or
reset, DNS not resolving yet, timeouts, 408/425/429, any 5xx including 503 "not registered yet").
What is not: every other 4xx. A 422 or 409 says the request itself is wrong, and sending it again
cannot help, so it is raised at once with the server's message.

How long: exponential backoff with jitter, bounded by a total deadline *and* a number of attempts,
whichever comes first. The jitter matters: a whole prefill group (hundreds of ranks) starts within
the same second and must not hammer a late server in lockstep. The last sleep is cut short so an
attempt is made right at the deadline instead of sleeping past it.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

__all__ = [
    "DEFAULT_RETRY",
    "FailureKind",
    "RetryPolicy",
    "Transient",
    "classify_transport_error",
    "is_transient_status",
]

FailureKind = Literal["refused", "unresolved", "timeout", "reset", "network", "status"]


class Transient(Exception):
    """One failed attempt worth retrying. Internal: it never escapes a client call; when the
    policy runs out it becomes ``ServerUnreachable`` / ``RegistrationFailed`` naming the cause."""

    def __init__(self, kind: FailureKind, cause: str, status_code: int | None = None) -> None:
        self.kind = kind
        self.cause = cause
        self.status_code = status_code
        super().__init__(cause)


def is_transient_status(status_code: int) -> bool:
    """5xx (503 included: the table is not complete yet), plus the 4xx that mean "later"."""
    return status_code in (408, 425, 429) or 500 <= status_code <= 599


def _oserror_in_chain(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def classify_transport_error(exc: httpx.HTTPError) -> Transient | None:
    """A ``Transient`` for failures a later attempt can cure, ``None`` for the rest.

    Not transient: TLS verification failures, unsupported schemes, invalid URLs, local protocol
    errors, proxies. Those are configuration mistakes; the same request fails the same way.
    """
    root = _oserror_in_chain(exc)
    if isinstance(root, ssl.SSLError):
        return None
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            return Transient("timeout", "timed out connecting")
        if isinstance(exc, httpx.PoolTimeout):
            return Transient("timeout", "timed out waiting for a free connection")
        if isinstance(exc, httpx.WriteTimeout):
            return Transient("timeout", "timed out sending the request")
        return Transient("timeout", "timed out waiting for the answer")
    if isinstance(exc, httpx.RemoteProtocolError):
        return Transient("reset", f"the server closed the connection without answering ({exc})")
    if not isinstance(exc, httpx.NetworkError):
        return None
    if isinstance(root, socket.gaierror):
        return Transient("unresolved", f"the host name does not resolve ({root.strerror})")
    code = getattr(root, "errno", None)
    if code == errno.ECONNREFUSED:
        return Transient("refused", "connection refused")
    if code in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return Transient("reset", "connection reset by peer")
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Transient("network", f"no route to host ({root.strerror})")
    return Transient("network", str(exc) or type(exc).__name__)


class _until_deadline(wait_base):
    """Never sleep past the deadline: the last wait ends at it, so one more attempt is made."""

    def __init__(self, inner: wait_base, deadline: float) -> None:
        self.inner = inner
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> float:
        remaining = self.deadline - retry_state.seconds_since_start
        return max(0.0, min(self.inner(retry_state), remaining))


@dataclass(frozen=True)
class RetryPolicy:
    """How a client call retries transient failures.

    Defaults suit engine start-up, where the leader's sidecar may come up some seconds after the
    ranks: keep trying for a minute, at most 30 attempts, waiting 0.25 s, 0.5 s, 1 s, ... up to
    5 s between attempts, each wait plus up to 0.5 s of random jitter.
    """

    deadline: float = 60.0
    """Total seconds from the first attempt; no attempt starts after it."""
    attempts: int = 30
    """Most attempts, the first included."""
    initial_backoff: float = 0.25
    """Seconds before the second attempt; doubles after every failure."""
    max_backoff: float = 5.0
    """Upper bound of one wait, before jitter."""
    jitter: float = 0.5
    """Up to this many random seconds added to every wait."""

    def __post_init__(self) -> None:
        if self.deadline < 0:
            raise ValueError(f"deadline={self.deadline} must be 0 or more seconds")
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts} must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise ValueError("backoff and jitter must be 0 or more seconds")

    def within(self, seconds: float) -> RetryPolicy:
        """The same policy with its deadline cut to ``seconds`` (never extended)."""
        return replace(self, deadline=max(0.0, min(self.deadline, seconds)))

    def _options(
        self,
        on_retry: Callable[[RetryCallState], None],
        on_exhausted: Callable[[RetryCallState], Any],
    ) -> dict[str, Any]:
        return {
            "retry": retry_if_exception_type(Transient),
            "stop": stop_after_attempt(self.attempts) | stop_after_delay(self.deadline),
            "wait": _until_deadline(
                wait_exponential(multiplier=self.initial_backoff, max=self.max_backoff)
                + wait_random(0, self.jitter),
                self.deadline,
            ),
            "before_sleep": on_retry,
            "retry_error_callback": on_exhausted,
        }

    def retrying(
        self,
        on_retry: Callable[[RetryCallState], None],
        on_exhausted: Callable[[RetryCallState], Any],
    ) -> Retrying:
        """A tenacity controller: ``on_retry`` logs a failed attempt before its wait,
        ``on_exhausted`` raises the final error once the deadline or attempts run out."""
        return Retrying(**self._options(on_retry, on_exhausted))

    def async_retrying(
        self,
        on_retry: Callable[[RetryCallState], None],
        on_exhausted: Callable[[RetryCallState], Any],
    ) -> AsyncRetrying:
        return AsyncRetrying(**self._options(on_retry, on_exhausted))


DEFAULT_RETRY = RetryPolicy()
