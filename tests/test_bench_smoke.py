"""The benchmark suite works: every phase runs at smoke size and sees no error.

Only correctness is asserted (0 failed registrations, 0 wrong answers, 0 errors), never speed:
CI machines are shared and figures from them mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.payloads import Topology, registration
from bench.report import README_END, README_START, update_readme
from tests.conftest import sglang_registration

REPO = Path(__file__).resolve().parents[1]
RANK_FIELDS = {
    "attn_tp_size", "attn_tp_rank", "attn_cp_size", "attn_cp_rank", "attn_dp_size",
    "attn_dp_rank", "pp_size", "pp_rank", "rank_ip", "rank_port",
}  # fmt: skip


def test_bench_registrations_carry_exactly_what_sglang_sends() -> None:
    body = registration(Topology(dp=2), (1, 0, 3, 2), index=7)
    reference = sglang_registration()
    assert body.keys() == reference.keys()
    assert {k: v for k, v in body.items() if k not in RANK_FIELDS} == {
        k: v for k, v in reference.items() if k not in RANK_FIELDS
    }


@pytest.mark.timeout(90)
def test_bench_smoke_runs_every_phase_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert set(phases) == {
        "startup", "storm", "storm_capped", "steady_load", "memory", "waiters", "startup_wait",
        "watchers",
    }  # fmt: skip
    assert all(not phase["problems"] for phase in phases.values())
    storm_runs = phases["storm"]["runs"] + phases["storm_capped"]["runs"]
    assert storm_runs and all(run["failures"] == 0 for run in storm_runs)
    if {0, 1} <= os.sched_getaffinity(0):  # two cores: server and load generator never share
        assert report["machine"]["load_generator_affinity"] == [1]
        assert all(run["server_affinity"] == [0] for run in phases["startup"]["runs"])
    for run in phases["waiters"]["runs"] + phases["startup_wait"]["runs"]:
        assert run["answered"] == run["waiters"] and not run["problems"]
    (watched,) = phases["watchers"]["runs"]  # every watcher got every event once, in order:
    assert watched["watched"]["events"] == 64 + 1 + 8  # registered, complete, moved (no problems)
    assert watched["watched"]["delivery_pairs"] == 16 * (64 + 8)
    (run,) = phases["steady_load"]["runs"]
    for workload in ("route", "health", "dp_rank_pairs"):
        assert run[workload]["requests"] > 0
        assert run[workload]["errors"] == 0


def test_the_results_table_replaces_only_what_stands_between_the_readme_markers(
    tmp_path: Path,
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\nintro\n{README_START}\nold table\n{README_END}\nmethod\n")
    update_readme(readme, "new table")
    assert readme.read_text() == (
        f"# Benchmarks\nintro\n{README_START}\nnew table\n{README_END}\nmethod\n"
    )


def test_a_readme_without_the_markers_is_left_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, "new table")
    assert readme.read_text() == "# Benchmarks\n"


def test_the_readme_is_only_rewritten_from_a_full_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--update-readme"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--update-readme needs a full run" in done.stderr
