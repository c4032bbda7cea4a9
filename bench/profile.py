"""``python -m bench.profile``: where the server's time goes under the hot workloads.

Samples the server process with py-spy (``pip install py-spy`` into the venv; ``make
bench-profile`` does it) while the load generator runs (1) ``GET /route`` single-cell lookups at 64
connections and (2) a storm of 4096 ranks on a fresh durable server. Writes py-spy's collapsed
stacks (feed them to any flame-graph tool) and a text summary: self time by layer, and the
functions with the most self and inclusive time. Idle samples (the loop waiting) are left out.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.load import RouteLookups, closed_loop
from bench.payloads import Topology
from bench.server import Server, pin_load_generator, raise_fd_limit
from bench.storm import storm
from bench.wire import build_request, fetch, new_loop

__all__ = ["LAYERS", "main", "summarise"]

RESULTS = Path(__file__).parent / "results"
TABLE_PATH = "/prefill_port_table"

LAYERS: tuple[tuple[str, str], ...] = (
    ("service/hot_protocol.py", "ours: hot-path protocol (hot_protocol.py, incl. its write)"),
    ("service/listener.py", "ours: admission listener (accept, connection set-up)"),
    ("service/fastpath.py", "ours: front door (fastpath.py)"),
    ("service/replies.py", "ours: replies.py"),
    ("service/answers.py", "ours: answers.py"),
    ("service/registry.py", "ours: registry (state, durability wait, logging calls)"),
    ("service/table.py", "ours: port table"),
    ("service/rooms.py", "ours: room table"),
    ("service/store.py", "ours: store + group-commit writer (SQLite)"),
    ("service/metrics.py", "ours: metrics"),
    ("service/app.py", "ours: FastAPI routes (app.py)"),
    ("service/", "ours: other service modules"),
    ("client/", "ours: protocol models, errors"),
    ("uvicorn/protocols/http", "uvicorn HTTP protocol (httptools)"),
    ("uvicorn/", "uvicorn other"),
    ("starlette/", "starlette"),
    ("fastapi/", "fastapi"),
    ("pydantic", "pydantic"),
    ("logging/", "logging"),
    ("sqlite3", "sqlite3"),
    ("asyncio/", "asyncio"),
    ("uvloop", "uvloop"),
    ("concurrent/futures", "concurrent.futures"),
    ("threading.py", "threading"),
    ("urllib/parse", "urllib.parse"),
    ("re/", "re"),
)


def _layer(frame: str) -> str:
    for needle, name in LAYERS:
        if needle in frame:
            return name
    return "other: " + frame.split("(")[-1].split(":")[0].rstrip(")")


def summarise(collapsed: str, top: int = 25) -> str:
    """Self time per layer and per function, inclusive time per function, as percentages."""
    self_by_layer: Counter[str] = Counter()
    self_by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if not frames[0].startswith(("<module>", "_run_module")) else "main"
        threads[thread] += count
        total += count
        leaf = frames[-1]
        self_by_layer[_layer(leaf)] += count
        self_by_function[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples (the server was idle, or py-spy could not attach)\n"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    out = [f"{total} samples (idle excluded)", "", "by thread:"]
    out += [f"  {pct(n)}  {name}" for name, n in threads.most_common(6)]
    out += ["", "self time by layer:"]
    out += [f"  {pct(n)}  {name}" for name, n in self_by_layer.most_common()]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {pct(n)}  {name}" for name, n in self_by_function.most_common(top)]
    out += ["", f"top {top} functions by inclusive time:"]
    out += [f"  {pct(n)}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is missing: .venv/bin/pip install py-spy (or make bench-profile)")
    return found


def _record(pid: int, out: Path, rate: int, native: bool) -> subprocess.Popen[bytes]:
    command = [_py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    command += ["--output", str(out), "--threads"]
    # Non-blocking sampling disturbs the server least, but py-spy needs to pause it for C frames.
    command.append("--native" if native else "--nonblocking")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach before the load starts
    return process


def _stop(recorder: subprocess.Popen[bytes]) -> None:
    recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        recorder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait(timeout=10)


def _run(coroutine: object) -> object:
    loop = new_loop()
    try:
        return loop.run_until_complete(coroutine)  # type: ignore[arg-type]
    finally:
        loop.close()


def profile_route(out_dir: Path, seconds: float, rate: int, native: bool, cpus: str | None) -> Path:
    topology = Topology.for_ranks(512)
    raw = out_dir / f"profile-route{'-native' if native else ''}.txt"
    with Server(cpus=cpus) as server:
        storm(server.port, topology, 64)
        recorder = _record(server.pid, raw, rate, native)
        outcome = _run(closed_loop(server.port, RouteLookups(topology), 64, seconds, 0.5))
        _stop(recorder)
    print(f"profile: GET /route under py-spy: {outcome.summary()}")  # type: ignore[attr-defined]
    return raw


def profile_storm(
    out_dir: Path, ranks: int, rate: int, native: bool, cpus: str | None, storms: int
) -> Path:
    """``storms`` storms on one server (reset in between with ``DELETE /prefill_port_table``):
    one storm lasts about a second, too few samples on its own."""
    raw = out_dir / f"profile-storm-{ranks}{'-native' if native else ''}.txt"
    topology = Topology.for_ranks(ranks)
    with Server(cpus=cpus) as server:
        recorder = _record(server.pid, raw, rate, native)
        for index in range(storms):
            if index:
                _run(fetch("127.0.0.1", server.port, build_request("DELETE", TABLE_PATH)))
            outcome = storm(server.port, topology)
            print(f"profile: storm {index + 1} under py-spy: {outcome.summary()}")  # type: ignore[attr-defined]
        _stop(recorder)
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="GET /route load duration")
    parser.add_argument("--ranks", type=int, default=4096, help="storm size")
    parser.add_argument("--storms", type=int, default=5, help="storms sampled (one server)")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (uvloop, ...)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--summarise", type=Path, nargs="+", help="only summarise these collapsed-stack files"
    )
    args = parser.parse_args(argv)
    if args.summarise:
        for raw in args.summarise:
            print(f"== {raw}\n{summarise(raw.read_text())}")
        return 0
    pinning = pin_load_generator()
    print(f"profile: {pinning.description}")
    raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    for raw in (
        profile_route(args.out, args.seconds, args.rate, args.native, pinning.server_cpus),
        profile_storm(
            args.out, args.ranks, args.rate, args.native, pinning.server_cpus, args.storms
        ),
    ):
        summary = summarise(raw.read_text()) if raw.exists() else "py-spy wrote nothing\n"
        summary_path = raw.with_name(raw.stem + "-summary.txt")
        summary_path.write_text(summary)
        print(f"\n== {raw.name} (summary in {summary_path.name})\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
