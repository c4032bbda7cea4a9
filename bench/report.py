"""The results table (ours beside SGLang 0.5.23's figures and the issue's targets) and the JSON.

Targets are shown as met or not for the reader; the suite never fails on speed, only on
correctness (a failed registration or a wrong answer).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.phases import PhaseResult, Plan
from bench.stats import Stat
from bench.waiters import WAIT_PATHS

__all__ = [
    "README_END",
    "README_START",
    "Row",
    "code_version",
    "machine",
    "readme_block",
    "rows",
    "table",
    "update_readme",
    "write_json",
]

README_START = "<!-- bench:results:start (written by `make bench`; edits here are overwritten) -->"
README_END = "<!-- bench:results:end -->"
PACKAGES = ("uvicorn", "uvloop", "httptools", "fastapi", "pydantic", "orjson")


@dataclass(frozen=True)
class Row:
    workload: str
    ours: str
    sglang: str
    target: str
    met: str


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return done.stdout.strip()


def code_version() -> dict[str, Any]:
    """The commit, and whether service/ or client/ had uncommitted edits: servers run the working
    tree, which others may be changing while the suite runs."""
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "working_tree_dirty": bool(_git("status", "--porcelain", "--", "service", "client")),
    }


def machine(pinning: str) -> dict[str, Any]:
    """What the figures were measured on; the load average says how busy the machine was."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "pinning": pinning,
        "load_average_at_start": os.getloadavg(),
        **code_version(),
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def _met(stat: Stat | None, ok: Callable[[float], bool]) -> str:
    if stat is None or not stat.runs:
        return "-"
    return "yes" if ok(stat.median) else "no"


def rows(results: dict[str, PhaseResult], plan: Plan) -> list[Row]:
    """One row per figure the issue names, in the issue's order."""

    def stat(phase: str, key: str) -> Stat | None:
        found = results.get(phase)
        return found.metrics.get(key) if found else None

    def show(value: Stat | None, digits: int, unit: str) -> str:
        return value.show(digits, unit) if value and value.runs else "not run"

    out: list[Row] = []
    for ranks in plan.storm_sizes:
        seconds = stat("storm", f"seconds_{ranks}")
        failures = stat("storm", f"failures_{ranks}")
        sglang = {512: "1.135 s", 4096: "3.02 s (2.53..3.46)"}.get(ranks, "-")
        target = {512: "≤ 0.25 s", 4096: "≤ 1 s"}.get(ranks, "-")
        limit = {512: 0.25, 4096: 1.0}.get(ranks)
        failed = f", {int(failures.high)} failed" if failures and failures.high else ", 0 failed"
        cost = stat("storm", f"server_us_per_registration_{ranks}")
        if cost and cost.runs:
            failed += f"; server {cost.show(0, 'µs')} CPU/registration"
        out.append(
            Row(
                f"storm: {ranks} ranks at once → complete",
                show(seconds, 3, "s") + failed,
                sglang,
                target,
                _met(seconds, lambda v, limit=limit: v <= limit) if limit else "-",
            )
        )
    out += _wait_rows(plan, stat, show)
    out += _watch_rows(plan, stat, show)
    capped = stat("storm_capped", f"seconds_{plan.capped_ranks}_capped_{plan.capped_in_flight}")
    as_issue = (plan.capped_ranks, plan.capped_in_flight) == (512, 64)
    out.append(
        Row(
            f"storm: {plan.capped_ranks} ranks, ≤ {plan.capped_in_flight} in flight → complete",
            show(capped, 3, "s"),
            "0.396 s" if as_issue else "-",
            "-",
            "-",
        )
    )
    load = "steady_load"
    for name, label, sglang, rate_target, p99_target in (
        ("route", "GET /route single cell", "10,700 req/s, p50 6.0, p99 6.8 ms", 16_000, 5.0),
        ("health", "GET /health", "-", 16_000, 5.0),
        ("dp_rank_pairs", "register_dp_rank + query_dp_ranks(32)", "8,200 req/s, p99 10.2 ms",
         12_000, 8.0),
    ):  # fmt: skip
        rate = stat(load, f"{name}_req_per_s")
        p50, p99 = stat(load, f"{name}_p50_ms"), stat(load, f"{name}_p99_ms")
        met = "-"
        if rate and p99 and rate.runs:
            met = "yes" if rate.median >= rate_target and p99.median <= p99_target else "no"
        server_cpu = stat(load, f"{name}_server_cpu_pct")
        client_cpu = stat(load, f"{name}_client_cpu_pct")
        cost = stat(load, f"{name}_server_us_per_request")
        busy = ""
        if server_cpu and client_cpu and cost and server_cpu.runs:
            core0 = stat(load, f"{name}_core0_busy_pct")
            busy = (
                f"; server {cost.show(0, 'µs')} CPU/request; CPU busy: server"
                f" {server_cpu.median:.0f}%, client {client_cpu.median:.0f}%"
                + (f", core 0 {core0.median:.0f}%" if core0 and core0.runs else "")
            )
        out.append(
            Row(
                f"{label}, {plan.connections} conns",
                f"{show(rate, 0, 'req/s')}; p50 {show(p50, 2, 'ms')}; p99 {show(p99, 2, 'ms')}"
                + busy,
                sglang,
                f"≥ {rate_target:,} req/s, p99 ≤ {p99_target:g} ms",
                met,
            )
        )
    for name, label, sglang in (
        ("wrk_route", "wrk cross-check: GET /route", "10,800 req/s"),
        ("wrk_health", "wrk cross-check: GET /health", "-"),
    ):
        rate, p99 = stat(load, f"{name}_req_per_s"), stat(load, f"{name}_p99_ms")
        if rate and rate.runs:
            out.append(
                Row(label, f"{show(rate, 0, 'req/s')}; p99 {show(p99, 2, 'ms')}", sglang, "-", "-")
            )
    idle = stat("memory", "idle_rss_mb")
    after = stat("memory", "rooms_rss_mb")
    rooms = f"{plan.memory_rooms:,}"
    memory_rows = (
        ("server RSS idle", idle, "546 MB", "≤ 60 MB", 60.0),
        (f"server RSS after {plan.memory_ranks}-rank storm", stat("memory", "storm_rss_mb"),
         "-", "-", None),
        (f"server RSS after storm + {rooms} rooms", after, "-", "≤ 80 MB", 80.0),
        (f"server peak (VmHWM) after storm + {rooms} rooms", stat("memory", "rooms_hwm_mb"),
         "-", "-", None),
    )  # fmt: skip
    for label, value, sglang, target, limit in memory_rows:
        out.append(
            Row(
                label,
                show(value, 1, "MB"),
                sglang,
                target,
                _met(value, lambda v, limit=limit: v <= limit) if limit else "-",
            )
        )
    start = stat("startup", "seconds")
    out.append(
        Row(
            "process start → first /health 200",
            show(start, 3, "s"),
            "-",
            "≤ 1 s",
            _met(start, lambda v: v <= 1.0),
        )
    )
    if plan.toy:
        out = [dataclasses.replace(row, met="-") for row in out]
    return out


def _wait_rows(
    plan: Plan,
    stat: Callable[[str, str], Stat | None],
    show: Callable[[Stat | None, int, str], str],
) -> list[Row]:
    """Issue 16: parked waiters answered at completion, and the whole start-up with its wait."""
    out: list[Row] = []
    path = WAIT_PATHS[plan.wait_path]
    for count in plan.waiter_sizes:
        key = str(count)
        longest, p99 = stat("waiters", f"max_s_{key}"), stat("waiters", f"p99_s_{key}")
        first, sent = stat("waiters", f"first_s_{key}"), stat("waiters", f"bytes_per_waiter_{key}")
        rss, cpu = (
            stat("waiters", f"peak_rss_mb_{key}"),
            stat("waiters", f"server_cpu_seconds_{key}"),
        )
        met = "-"
        if count == 4096 and longest and p99 and first and sent and rss and longest.runs:
            met = "yes" if (
                longest.median <= 0.5 and p99.median <= 0.3 and first.median <= 0.05
                and sent.median <= 2048 and rss.median <= 120
            ) else "no"  # fmt: skip
        out.append(
            Row(
                f"{count} waiters on `{path}`, last registration → all answered",
                f"all {show(longest, 3, 's')}; p99 {show(p99, 3, 's')}; first "
                f"{show(first, 4, 's')}; {show(sent, 0, 'B')}/waiter; server CPU "
                f"{show(cpu, 2, 's')}; peak RSS {show(rss, 0, 'MB')}",
                "-",
                "all ≤ 0.5 s, p99 ≤ 0.3 s, first ≤ 50 ms, ≤ 2 KB/waiter, RSS ≤ 120 MB"
                if count == 4096
                else "-",
                met,
            )
        )
    count = plan.startup_wait_ranks
    longest = stat("startup_wait", f"max_s_{count}")
    rss = stat("startup_wait", f"peak_rss_mb_{count}")
    out.append(
        Row(
            f"start-up: {count} ranks register, then wait on `{path}` → last rank returns",
            f"{show(longest, 3, 's')}; peak RSS {show(rss, 0, 'MB')}",
            "-",
            "≤ 1.5 s" if count == 4096 else "-",
            _met(longest, lambda v: v <= 1.5) if count == 4096 else "-",
        )
    )
    return out


def _watch_rows(
    plan: Plan,
    stat: Callable[[str, str], Stat | None],
    show: Callable[[Stat | None, int, str], str],
) -> list[Row]:
    """Issue 14: delivery to N SSE watchers, the storm beside the same storm alone, RSS."""
    as_issue = (plan.watchers, plan.watch_ranks, plan.watch_moves) == (1000, 512, 100)
    n = f"{plan.watchers:,}"

    def delivery(prefix: str) -> str:
        return " / ".join(
            show(stat("watchers", f"{prefix}delivery_{name}_ms"), 1, "ms")
            for name in ("p50", "p99", "max")
        )

    p99, longest = stat("watchers", "delivery_p99_ms"), stat("watchers", "delivery_max_ms")
    slower, rss = stat("watchers", "storm_slower_pct"), stat("watchers", "rss_connected_mb")
    met = "-"
    if as_issue and p99 and longest and p99.runs:
        met = "yes" if p99.median <= 50 and longest.median <= 250 else "no"
    return [
        Row(
            f"{n} SSE watchers, change acknowledged → event read: p50 / p99 / max",
            f"all {delivery('')}; storm of {plan.watch_ranks} {delivery('storm_')}; "
            f"{plan.watch_moves} moves {plan.watch_move_gap * 1000:g} ms apart "
            f"{delivery('moves_')}",
            "-",
            "p99 ≤ 50 ms, max ≤ 250 ms" if as_issue else "-",
            met,
        ),
        Row(
            f"storm: {plan.watch_ranks} ranks with {n} watchers, against none",
            f"{show(stat('watchers', 'storm_seconds'), 3, 's')} against "
            f"{show(stat('watchers', 'storm_alone_seconds'), 3, 's')}: "
            f"{show(slower, 1, '%')} slower",
            "-",
            "≤ 10% slower" if as_issue else "-",
            _met(slower, lambda v: v <= 10) if as_issue else "-",
        ),
        Row(
            f"server RSS with {n} watchers connected (after the storm and moves)",
            f"{show(rss, 1, 'MB')} ({show(stat('watchers', 'rss_after_mb'), 1, 'MB')})",
            "-",
            "≤ 120 MB" if as_issue else "-",
            _met(rss, lambda v: v <= 120) if as_issue else "-",
        ),
    ]


def table(found: list[Row]) -> str:
    """A Markdown table, pasted as is into bench/README.md."""
    lines = [
        "| workload | ours: median (min..max) | SGLang 0.5.23 | target | met |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.workload} | {r.ours} | {r.sglang} | {r.target} | {r.met} |" for r in found]
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    path.write_bytes(orjson.dumps(document, option=options, default=str))


def readme_block(about: dict[str, Any], found: list[Row]) -> str:
    """The figures with what they were measured on, for bench/README.md."""
    code = about["commit"] + (
        " with uncommitted server changes" if about["working_tree_dirty"] else ""
    )
    packages = ", ".join(f"{name} {version}" for name, version in about["packages"].items())
    start, end = about["load_average_at_start"], about["load_average_at_end"]
    return "\n".join(
        [
            f"Run {about['date']} at commit {code}, {about['seconds']:.0f} s in all.",
            f"Machine: {about['cpu']}, {about['cores']} cores, Linux {about['kernel']}, Python "
            f"{about['python']}; {packages}; net.core.somaxconn {about['somaxconn']}; "
            f"{about['pinning']}. Load average (1 min) {start[0]:.2f} at the start, "
            f"{end[0]:.2f} at the end.",
            "",
            table(found),
        ]
    )


def update_readme(path: Path, block: str) -> None:
    """Replace what stands between the two markers; refuse a README without them."""
    text = path.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"{path} lacks the markers {README_START!r} ... {README_END!r}")
    path.write_text(f"{head}{README_START}\n{block}\n{README_END}{tail}")
