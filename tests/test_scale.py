"""The scale harness (benchmarks/scale.py) in its quick mode: simulated workers against
one and two real replicas; every run must account for every task exactly once (the
results it streamed and the server's own tasks_ok counter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROW = re.compile(r"\s*\d+\s+\d+\s+[\d,]+\s+\d+\.\d\d ").match  # R workers tasks task_s
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _scale(*args: str, limit: int) -> subprocess.CompletedProcess[str]:
    """benchmarks/scale.py with ``args``, stopped by its own watchdog after ``limit`` s."""
    return subprocess.run(
        [sys.executable, "scale.py", *args, "--time-limit", str(limit)],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=limit + 90,
    )


@pytest.mark.slow
def test_the_quick_scale_run_completes_every_task_once() -> None:
    out = _scale("--quick", limit=240)
    # 0: goals met, 1: some missed (a loaded machine); 3 would be the watchdog.
    assert out.returncode in (0, 1), out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if ROW(line)]
    assert len(rows) == 6, out.stdout
    assert all(row.endswith("  ok") for row in rows), out.stdout
    assert "FAILED" not in out.stdout


def _cgroups_left() -> list[str]:
    root = Path("/sys/fs/cgroup/cpu")
    return sorted(p.name for p in root.glob("hq-scale-*")) if root.is_dir() else []


@pytest.mark.slow
def test_capped_replicas_and_harness_processes_account_for_every_task() -> None:
    """--harness-procs spreads the simulated workers over processes and --cpu-cap puts each
    replica in a cgroup of its own: every task still comes back once, and every cgroup
    made is gone afterwards."""
    root = Path("/sys/fs/cgroup/cpu")
    if not (root / "cpu.cfs_quota_us").exists() or not os.access(root, os.W_OK):
        pytest.skip("needs a writable cgroup v1 CPU controller (root)")
    before = _cgroups_left()
    out = _scale(
        "--quick", "--sweeps", "replicas", "--harness-procs", "2", "--cpu-cap", "0.5", limit=200
    )
    assert out.returncode in (0, 1), out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if ROW(line)]
    assert len(rows) == 2 and all(row.endswith("  ok") for row in rows), out.stdout
    assert "capped at 0.5 core, 2 harness processes" in out.stdout
    assert _cgroups_left() == before


def test_cpu_cap_says_what_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import scale
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(scale, "CGROUP_V1", tmp_path / "v1")
    monkeypatch.setattr(scale, "CGROUP_V2", tmp_path / "v2")
    with pytest.raises(SystemExit, match="needs the cgroup CPU controller"):
        scale.CpuCaps(0.3)
    with pytest.raises(SystemExit, match="from 0.01 to 64"):
        scale.CpuCaps(0)
