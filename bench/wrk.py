"""A cross-check of the GET phases with ``wrk`` (Debian package), on the load generator's core.

wrk is C and needs far less CPU per request than any Python client, so when its figures agree
with ours the Python load generator is not what limits the measurement.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

__all__ = ["parse", "run"]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 from ``--latency``, and every error wrk reports."""
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", output, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", output))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return {
        "req_per_s": float(rate.group(1)) if rate else 0.0,
        "p50_ms": _ms(percentiles["50"]) if "50" in percentiles else None,
        "p99_ms": _ms(percentiles["99"]) if "99" in percentiles else None,
        "errors": errors if rate else 1,
    }


def run(port: int, path: str, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk thread for ``seconds``; it inherits this process's pinning to the client core."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        f"http://127.0.0.1:{port}{path}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    return parse(done.stdout)
