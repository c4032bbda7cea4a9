"""``python -m bench.calibrate``: which load generator can saturate the server on one core?

Runs ``GET /health`` at 64 connections for a few seconds with our raw client and with httpx's
``AsyncClient`` (keep-alive pool of 64), each on the load generator's core, and prints the rate
and how much of that core each client used. The raw client is the one ``python -m bench`` uses;
this module is how that choice was made and how to re-check it.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx

from bench.load import Health, closed_loop
from bench.server import Server, pin_load_generator, raise_fd_limit
from bench.wire import new_loop

__all__ = ["httpx_rate", "main"]

CONNECTIONS = 64


async def httpx_rate(port: int, seconds: float) -> tuple[int, int]:
    """Requests answered (and errors) by 64 httpx tasks sharing one keep-alive pool."""
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    done = errors = 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop_at:
                response = await client.get("/health")
                done += 1
                errors += response.status_code != 200

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return done, errors


def _measure(name: str, server: Server, run: object, seconds: float) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    loop = new_loop()
    try:
        requests, errors = loop.run_until_complete(run)  # type: ignore[arg-type]
    finally:
        loop.close()
    wall = time.perf_counter() - wall
    print(
        f"{name:>6}: {requests / wall:8,.0f} req/s, {errors} errors, "
        f"client CPU {100 * (time.process_time() - cpu) / wall:3.0f}%",
        flush=True,
    )


async def _raw(port: int, seconds: float) -> tuple[int, int]:
    outcome = await closed_loop(port, Health(), CONNECTIONS, seconds, 0.0)
    return outcome.requests, outcome.errors


def main(seconds: float = 5.0) -> int:
    pinning = pin_load_generator()
    print(f"calibrate: {pinning.description}, GET /health, {CONNECTIONS} connections")
    raise_fd_limit()
    with Server(cpus=pinning.server_cpus) as server:
        _measure("raw", server, _raw(server.port, seconds), seconds)
        _measure("httpx", server, httpx_rate(server.port, seconds), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0))
