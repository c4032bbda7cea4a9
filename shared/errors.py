"""The one exception tree of prefill-bootstrap.

Every error carries the data an operator needs and writes its own message: what happened and what
to do next. An error the server answers carries its HTTP ``status`` and machine-readable ``kind``
as class attributes and its ``details()``; ``service/replies.reply_for`` turns any of them into
the one JSON error shape, whichever door answered. The client translates foreign errors (httpx,
torch) into them in one place (``client/http.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "AddressMismatch",
    "BootstrapError",
    "CellHeldElsewhere",
    "CellNotFound",
    "ConfigurationError",
    "DistributedNotInitialized",
    "GroupReset",
    "HistoryGoneError",
    "LeaseNotHeld",
    "NothingToDeregister",
    "PortInUse",
    "PortSyncFailed",
    "PortTableUnavailable",
    "ProtocolMismatch",
    "RegistrationFailed",
    "RequestRejected",
    "ServerUnreachable",
    "StateStoreError",
    "TableIncomplete",
    "TopologyConflict",
    "TopologyNotAddressable",
    "UnexpectedAnswer",
    "UnsupportedSGLang",
    "format_address",
    "format_cell",
]

Cell = tuple[int, int, int, int]


def format_cell(cell: Sequence[int]) -> str:
    """Render a (dp, cp, tp, pp) cell the way logs and messages name it everywhere."""
    dp, cp, tp, pp = cell
    return f"(dp={dp}, cp={cp}, tp={tp}, pp={pp})"


def format_address(ip: str, port: int) -> str:
    """``ip:port``, with an IPv6 address bracketed (``[fd00::1]:41001``) so the port reads apart."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _summarise_cells(cells: Sequence[Sequence[int]], limit: int = 16) -> str:
    shown = ", ".join(format_cell(cell) for cell in cells[:limit])
    hidden = len(cells) - limit
    return shown + (f" and {hidden} more" if hidden > 0 else "")


class BootstrapError(Exception):
    """Root of every error prefill-bootstrap raises on purpose.

    ``status`` and ``kind`` say how the server answers one (one kind, one status); errors the
    server never answers keep the defaults, a 500 should one ever escape."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal_error"
    hint: ClassVar[str] = ""
    """Appended to the message when the server answers it: what the caller should do."""

    def details(self) -> list[dict[str, Any]]:
        """The structured facts of the answer's ``details`` (none unless a subclass has some)."""
        return []

    def answer_message(self) -> str:
        """The ``message`` of the server's answer."""
        return f"{self}{self.hint}"


class ConfigurationError(BootstrapError):
    """The caller's settings or arguments cannot work; nothing was attempted."""


class DistributedNotInitialized(ConfigurationError):
    """Multi-node mode needs the leader's port from torch.distributed, which is not set up."""

    def __init__(self, nnodes: int, dist_init_addr: str) -> None:
        self.nnodes = nnodes
        self.dist_init_addr = dist_init_addr
        super().__init__(
            f"multi-node prefill (nnodes={nnodes}, dist_init_addr={dist_init_addr}) needs the "
            "leader's bootstrap port, but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group() before sync_bootstrap_port(); "
            "the port is never guessed"
        )


class PortInUse(ConfigurationError):
    """The server could not bind its listening socket."""

    def __init__(self, host: str, port: int, reason: str, flag: str = "--port") -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(
            f"cannot listen on {host}:{port}: {reason}; another process holds this port or the "
            f"address is not local — choose another with {flag} (or PREFILL_BOOTSTRAP_PORT)"
        )


class ProtocolMismatch(BootstrapError):
    """A request speaks a bootstrap protocol generation the server was pinned not to accept."""

    status = 422
    kind = "protocol_mismatch"

    def __init__(self, pinned: str, offered: str) -> None:
        self.pinned = pinned
        self.offered = offered
        super().__init__(
            f"this server speaks only SGLang bootstrap protocol generation {pinned} "
            f"(--protocol {pinned}); the request is generation {offered}: run engines of one "
            "generation, or start the server with --protocol auto"
        )

    def details(self) -> list[dict[str, Any]]:
        return [{"pinned": self.pinned, "offered": self.offered}]


class TopologyNotAddressable(BootstrapError):
    """An older decode asks about a group whose topology its protocol generation cannot address
    (context parallelism, pipeline parallelism for gen 1, several dp groups it would pick
    wrongly): a conflict with the stored topology, not with the server's settings."""

    status = 409
    kind = "topology_not_addressable"

    def __init__(self, generation: str, problem: str) -> None:
        self.generation = generation
        self.problem = problem
        super().__init__(problem)

    def details(self) -> list[dict[str, Any]]:
        return [{"generation": self.generation}]


class StateStoreError(BootstrapError):
    """The durable state could not be read or written; the request was not acknowledged."""

    status = 503
    kind = "state_not_durable"
    hint = "; the request was not acknowledged, retry it"


class TopologyConflict(BootstrapError):
    """A registration contradicts the topology the group already established."""

    status = 409
    kind = "topology_conflict"

    def __init__(self, field: str, established: Any, offered: Any) -> None:
        self.field = field
        self.established = established
        self.offered = offered
        super().__init__(
            f"{field}={offered!r} contradicts the established {field}={established!r}; every rank "
            "of one prefill group must agree — restart the misconfigured rank, or reset the "
            "server's state if the whole group changed shape"
        )

    def details(self) -> list[dict[str, Any]]:
        return [{"field": self.field, "established": self.established, "offered": self.offered}]


class CellNotFound(BootstrapError):
    """No rank registered the requested cell (the server answers it to a heartbeat: lookups
    answer SGLang's own 404 text)."""

    status = 404
    kind = "cell_not_found"
    hint = "; register the rank (PUT /route) before renewing its lease"

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        super().__init__(f"no rank registered cell {format_cell(cell)}")


class NothingToDeregister(CellNotFound):
    """A deregistration of a cell nobody holds: the rank that asks treats it as already gone
    (a retried deregistration whose first answer was lost reads the same)."""

    hint = "; it is already gone, nothing to deregister"


class CellHeldElsewhere(BootstrapError):
    """A rank's request about its cell, while another address holds the cell: that rank took it
    over since. Acting on it (renewing the lease, removing the cell) would act on a live rank's
    behalf, so the request is refused and both addresses are named."""

    status = 409

    def __init__(self, cell: Cell, registered: Any, offered: Any) -> None:
        self.cell = cell
        self.registered = registered
        self.offered = offered
        super().__init__(
            f"cell {format_cell(cell)} is registered at "
            f"{format_address(registered.rank_ip, registered.rank_port)}, not at "
            f"{format_address(offered.rank_ip, offered.rank_port)}"
        )

    def details(self) -> list[dict[str, Any]]:
        def address(value: Any) -> dict[str, Any]:
            return {"rank_ip": value.rank_ip, "rank_port": value.rank_port}

        return [{"registered": address(self.registered), "offered": address(self.offered)}]


class LeaseNotHeld(CellHeldElsewhere):
    """A heartbeat came from an address that no longer holds the cell."""

    kind = "lease_not_held"
    hint = "; this rank was replaced: stop its heartbeat or register again"


class AddressMismatch(CellHeldElsewhere):
    """A deregistration from an address that does not hold the cell: removing it would take a
    live rank out of the group."""

    kind = "address_mismatch"
    hint = "; only the rank registered at that address can deregister the cell"


class HistoryGoneError(BootstrapError):
    """A watcher asked to resume the change feed from a position the server cannot honour: older
    than the events it still holds, ahead of the latest, or of another stream (the server
    restarted). Replaying a partial history would hide changes, so the watcher is told to
    resynchronise from the table instead."""

    status = 410
    kind = "history_gone"  # shared.events.HISTORY_GONE: the wire's one spelling of it

    def __init__(self, position: str, stream: str, oldest: int, latest: int) -> None:
        self.position = position
        self.stream = stream
        self.oldest = oldest
        self.latest = latest
        super().__init__(
            f"event position {position!r} cannot be resumed: this server resumes only from "
            f"{stream}:{oldest - 1} to {stream}:{latest} (older events are gone, or the server "
            "restarted); re-read GET /prefill_port_table and watch from its stream and seq"
        )

    def details(self) -> list[dict[str, Any]]:
        return [{"stream": self.stream, "oldest": self.oldest, "latest": self.latest}]


class GroupReset(BootstrapError):
    """The port table was reset after this rank registered: its cell is gone, and a "complete"
    answer would be about a group it is not in. ``register_and_wait`` registers again."""

    def __init__(self, url: str, registered_under: str, now: str) -> None:
        self.url = url
        self.registered_under = registered_under
        self.now = now
        super().__init__(
            f"the port table at {url} was reset after this rank registered (instance "
            f"{registered_under}, now {now}): its cell is no longer in the group; register again"
        )


class TableIncomplete(BootstrapError):
    """The port table is missing cells when it was required to be complete.

    ``missing`` names the cells when the server lists them (ours does); SGLang's built-in server
    only counts registrations, so then ``registered_count`` and ``server`` say what is known.
    """

    def __init__(
        self,
        missing: Sequence[Cell],
        expected: int | None,
        registered_hosts: Sequence[str] | None = (),
        waited_seconds: float | None = None,
        url: str | None = None,
        registered_count: int | None = None,
        server: str | None = None,
        missing_count: int | None = None,
    ) -> None:
        self.missing = [tuple(cell) for cell in missing]
        self.missing_count = len(self.missing) if missing_count is None else missing_count
        """All missing cells; ``missing`` lists the first 1000 (the server's cap)."""
        self.expected = expected
        self.registered_hosts = list(registered_hosts) if registered_hosts is not None else None
        """None when the table could not be read to name them."""
        self.waited_seconds = waited_seconds
        self.url = url
        self.registered_count = registered_count
        self.server = server
        where = f" at {url}" if url else ""
        waited = f" after {waited_seconds:.1f}s" if waited_seconds is not None else ""
        if server is not None:
            counted = "an unknown number of" if registered_count is None else str(registered_count)
            of = f" for {expected} cells" if expected is not None else ""
            super().__init__(
                f"prefill group{where} is incomplete{waited}: {counted} registrations{of}; "
                f"{server} does not say which cells are missing (run prefill-bootstrap serve as "
                "the bootstrap server to have them named). Check that every prefill rank started "
                "and reaches the leader's bootstrap port"
            )
            return
        if expected is None:
            what = "no rank has registered yet, so the topology is unknown"
        else:
            listed = (
                f" (the first {len(self.missing)} listed)"
                if self.missing_count > len(self.missing)
                else ""
            )
            what = (
                f"{self.missing_count} of {expected} cells are missing{listed}: "
                f"{_summarise_cells(self.missing)}"
            )
        if self.registered_hosts is None:
            hosts = "unknown (the table could not be read)"
        else:
            hosts = ", ".join(self.registered_hosts) or "none"
        super().__init__(
            f"prefill port table{where} is incomplete{waited}: {what}; hosts that did register: "
            f"{hosts}. Check that the ranks of the missing cells started and reach the leader's "
            "bootstrap port (multi-node ranks must call sync_bootstrap_port first)"
        )


class RequestRejected(BootstrapError):
    """The server answered with a client error (4xx); retrying the same request cannot help."""

    def __init__(self, url: str, status_code: int, message: str, body: Any = None) -> None:
        self.url = url
        self.status_code = status_code
        self.server_message = message
        self.body = body
        super().__init__(f"{url} refused the request with HTTP {status_code}: {message}")


class ServerUnreachable(BootstrapError):
    """Transient failures (refused, timed out, 5xx) outlasted the retry policy."""

    def __init__(
        self,
        url: str,
        attempts: int,
        elapsed: float,
        last_cause: str,
        hint: str | None = None,
        action: str = "request",
    ) -> None:
        self.url = url
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_cause = last_cause
        self.hint = hint
        message = (
            f"{action} to {url} failed after {attempts} attempt(s) over {elapsed:.1f}s; "
            f"last cause: {last_cause}"
        )
        super().__init__(message + (f" — {hint}" if hint else ""))


class RegistrationFailed(ServerUnreachable):
    """A rank could not register with the bootstrap server before its retry policy ran out."""

    def __init__(
        self,
        url: str,
        host: str,
        port: int,
        attempts: int,
        elapsed: float,
        last_cause: str,
        hint: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        super().__init__(url, attempts, elapsed, last_cause, hint, action="registration")


class PortSyncFailed(BootstrapError):
    """The broadcast of the leader's bootstrap port failed inside torch.distributed."""

    def __init__(self, rank: int | None, backend: str, cause: str) -> None:
        self.rank = rank
        self.backend = backend
        self.cause = cause
        who = f"rank {rank}" if rank is not None else "this rank"
        super().__init__(
            f"{who} could not receive the leader's bootstrap port over torch.distributed "
            f"({backend}): {cause}; every rank of the group must call sync_bootstrap_port at the "
            "same point of start-up — check that no rank exited or skipped it"
        )


class UnsupportedSGLang(ConfigurationError):
    """The SGLang plugin was enabled on a release whose registration path it does not know."""

    def __init__(self, release: str, missing: str) -> None:
        self.release = release
        self.missing = missing
        super().__init__(
            f"prefill-bootstrap's SGLang plugin cannot run on SGLang {release}: {missing}. No hook "
            "was applied; unset PREFILL_BOOTSTRAP_SGLANG to run this release stock, or use a "
            "supported release (0.5.11 or later)"
        )


class PortTableUnavailable(BootstrapError):
    """The server has no ``/prefill_port_table``: SGLang's built-in bootstrap server (or another
    server that only speaks SGLang's protocol). Waiting still works there, by polling."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(
            f"{url} does not exist (HTTP 404): the server speaks only SGLang's bootstrap protocol "
            "(SGLang's built-in server?), so it cannot list cells; wait_until_ready and "
            "`prefill-bootstrap wait` without --json still work against it"
        )


class UnexpectedAnswer(BootstrapError):
    """The server answered in a shape this client does not understand (not a bootstrap server?)."""

    def __init__(self, url: str, status_code: int, problem: str) -> None:
        self.url = url
        self.status_code = status_code
        self.problem = problem
        super().__init__(
            f"{url} answered HTTP {status_code} with a body this client cannot read ({problem}); "
            "is the URL a prefill-bootstrap server of a compatible version?"
        )
