"""A TCP relay that adds a fixed one-way delay, run inside a test host's network namespace.

Why a relay: this machine's kernel has no ``netem`` qdisc ("Specified qdisc kind is unknown"),
the usual way to give a link latency. What a rank notices of a long link is that every request
and every answer arrive late; this relay produces exactly that on the worker's path to the
leader: it listens on the worker's loopback, opens a connection to the leader's bootstrap port
for every connection it accepts, and forwards every chunk ``delay`` seconds after it arrived, in
each direction, keeping order (a pipe with latency, not a rate limit). The worker's ranks use the
relay's address as their bootstrap URL; the leader's server sees the relay's connections coming
from the worker's own address, over the worker's real (possibly lossy or partitioned) link.

What it does not model: the TCP handshake and TCP's own timers are not delayed (the kernel's
round-trip estimate stays the veth's), so a connection's set-up costs no added latency and an
HTTP exchange costs one added round trip (2 x delay) where netem would add two.

It prints one line, ``relay listening on HOST:PORT``, once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it was read; pass the
    end of the stream on (half-close), as a link passes a FIN."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((loop.time() + delay, chunk))
        finally:
            queue.put_nowait((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    await asyncio.gather(read(), write())


async def _relay(
    target: tuple[str, int],
    delay: float,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
) -> None:
    loop = asyncio.get_running_loop()
    upstream_writer: asyncio.StreamWriter | None = None
    forwards: list[asyncio.Task[None]] = []
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        forwards = [
            loop.create_task(_forward(client_reader, upstream_writer, delay)),
            loop.create_task(_forward(upstream_reader, client_writer, delay)),
        ]
        await asyncio.gather(*forwards)
    except OSError:
        pass  # a side went away (reset, refused, unreachable): close both, as a dead path does
    finally:
        for task in forwards:
            task.cancel()
        for writer in (client_writer, upstream_writer):
            if writer is not None:
                writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept connections on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward them to")
    parser.add_argument("--delay", type=float, required=True, help="seconds added each way")
    args = parser.parse_args()
    target, delay = _address(args.target), args.delay
    listen_host, listen_port = _address(args.listen)
    loop = asyncio.get_running_loop()
    # The loop holds tasks weakly: once a connection's transports are gone nothing else refers
    # to its relay task, which would be collected mid-flight. Keep them until they finish.
    running: set[asyncio.Task[None]] = set()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = loop.create_task(_relay(target, delay, reader, writer))
        running.add(task)
        task.add_done_callback(running.discard)

    server = await asyncio.start_server(accepted, listen_host, listen_port)
    print(f"relay listening on {args.listen}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
