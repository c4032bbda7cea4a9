"""``python -m bench``: run the phases, print the table, write the JSON.

Exit status: 0 when every request was answered correctly, 1 when any phase saw a failed
registration, a wrong answer or an error (never because something was slow), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.phases import PHASES, PhaseResult, Plan, run_phase
from bench.report import (
    code_version,
    machine,
    readme_block,
    rows,
    table,
    update_readme,
    write_json,
)
from bench.server import pin_load_generator, raise_fd_limit
from bench.waiters import WAIT_PATHS

__all__ = ["main"]

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every phase, tiny: ~10 s, CI")
    parser.add_argument("--runs", type=int, help="repetitions per phase (default 3)")
    parser.add_argument(
        "--phase",
        action="append",
        choices=sorted(PHASES),
        help="run only this phase (repeatable); default: all",
    )
    parser.add_argument("--seconds", type=float, help="duration of each steady-load phase (10)")
    parser.add_argument("--rooms", type=int, help="room registrations in the memory phase (10^6)")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check")
    parser.add_argument(
        "--wait-path",
        choices=sorted(WAIT_PATHS),
        help="the wait the waiter phases send: ready (the rank client's) or table (before 16)",
    )
    parser.add_argument(
        "--server-source",
        type=Path,
        help="run the servers from another checkout (before/after figures on one machine)",
    )
    parser.add_argument("--out", type=Path, help="JSON file to write (default bench/results/)")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="write the table into bench/README.md (full runs only: every phase, no --smoke)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra 'prefill-bootstrap serve' argument, e.g. --server-arg=--log-level=warning",
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    plan = Plan.smoke() if args.smoke else Plan()
    changes: dict[str, object] = {"server_args": tuple(args.server_arg)}
    if args.runs:
        changes["runs"] = args.runs
    if args.seconds:
        changes["seconds"] = args.seconds
    if args.rooms:
        changes["memory_rooms"] = args.rooms
    if args.no_wrk:
        changes["use_wrk"] = False
    if args.wait_path:
        changes["wait_path"] = args.wait_path
    if args.server_source:
        changes["server_source"] = args.server_source.resolve()
    return dataclasses.replace(plan, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.update_readme and (args.smoke or args.phase or args.server_source or args.wait_path):
        parser.error(
            "--update-readme needs a full run of this checkout: every phase, without --smoke, "
            "--server-source or --wait-path"
        )
    pinning = pin_load_generator()
    plan = dataclasses.replace(_plan(args), server_cpus=pinning.server_cpus)
    raise_fd_limit()
    about = machine(pinning.description)
    about["load_generator_affinity"] = sorted(os.sched_getaffinity(0))
    print(f"bench: {about['cpu']}, {about['cores']} cores, {pinning.description}", flush=True)
    print(f"bench: {plan}", flush=True)
    results: dict[str, PhaseResult] = {}
    started = time.monotonic()
    for name in args.phase or list(PHASES):
        phase_start = time.monotonic()
        results[name] = run_phase(name, plan)
        took = time.monotonic() - phase_start
        problems = results[name].problems
        print(f"bench: {name} done in {took:.1f}s, {len(problems)} problems", flush=True)
        for problem in problems:
            print(f"bench:   {problem}", flush=True)
    found = rows(results, plan)
    print()
    print(table(found))
    about["load_average_at_end"] = os.getloadavg()
    about["code_at_end"] = code_version()
    if about["code_at_end"] != {k: about[k] for k in about["code_at_end"]}:
        print(f"bench: the server code changed during the run: {about['code_at_end']}")
    about["seconds"] = round(time.monotonic() - started, 1)
    document = {
        "machine": about,
        "plan": dataclasses.asdict(plan),
        "table": [dataclasses.asdict(row) for row in found],
        "phases": {name: result.as_json() for name, result in results.items()},
    }
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"{'smoke' if args.smoke else 'bench'}-{stamp}.json"
    write_json(out, document)
    print(f"\nbench: wrote {out}")
    if args.update_readme:
        update_readme(README, readme_block(about, found))
        print(f"bench: wrote the table into {README}")
    problems = sum(len(result.problems) for result in results.values())
    if problems:
        print(f"bench: {problems} correctness problems (see above)", file=sys.stderr)
        return 1
    return 0
