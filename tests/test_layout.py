"""The architecture's import rules, and the code checks (ruff, mypy) run with the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "module", ["coffea_hq.server.app", "coffea_hq.worker.agent", "coffea_hq.api"]
)
def test_server_and_worker_import_only_the_protocol_of_ours(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    ours = {m for m in loaded if m.startswith("coffea_hq.")}
    assert "coffea_hq.client" not in ours and "coffea_hq.local" not in ours
    assert not {m for m in loaded if m.split(".")[0] in ("coffea", "awkward", "uproot")}
    if "server" in module:
        assert not any(m.startswith("coffea_hq.worker") for m in ours)
    else:
        assert not any(m.startswith("coffea_hq.server") for m in ours)


def test_server_and_worker_are_not_top_level_packages() -> None:
    loaded = loaded_after("import coffea_hq.server, coffea_hq.worker")
    assert "server" not in loaded and "worker" not in loaded
    import importlib.util

    assert importlib.util.find_spec("coffea_hq.server") is not None


@pytest.mark.timeout(300)
def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "coffea_hq",
            "server",
            "worker",
            "tests",
            "benchmarks",
            "examples",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "coffea_hq", "server", "worker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
