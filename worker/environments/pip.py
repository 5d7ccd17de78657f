"""pip environments, made with uv: ``uv venv`` then ``uv pip install``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from coffea_hq import protocol
from coffea_hq.errors import EnvironmentFailed
from coffea_hq.messages import EnvironmentSpec

from .steps import run_step


def uv_binary() -> str:
    """The uv executable: the ``uv`` wheel's (``coffea-hq[envs]``), else one on PATH."""
    try:
        from uv import find_uv_bin
    except ImportError:
        import shutil

        found = shutil.which("uv")
        if found is None:
            raise EnvironmentFailed(
                "find uv",
                "this worker has no uv: install coffea-hq[envs] (or uv) beside hq-worker",
            ) from None
        return found
    return str(find_uv_bin())


def _base_python() -> str:
    # The worker's own interpreter without its venv: the new venv must not see the
    # worker's site-packages (uv venv never includes them unless asked).
    return getattr(sys, "_base_executable", None) or sys.executable


def install_pip(
    spec: EnvironmentSpec, prefix: Path, cache: Path, log: Callable[[str], None]
) -> Path:
    """Make the virtual environment ``spec`` at ``prefix``; returns its interpreter."""
    uv = uv_binary()
    env = dict(os.environ, UV_CACHE_DIR=str(cache), UV_PYTHON_DOWNLOADS="never")
    env.pop("VIRTUAL_ENV", None)
    python = spec.python or _base_python()
    run_step("uv venv", [uv, "venv", "--quiet", "--python", python, str(prefix)], log, env=env)
    interpreter = prefix / "bin" / "python"
    requirements = prefix / "hq-requirements.txt"
    requirements.write_text("\n".join(spec.requirements) + "\n")
    argv = [uv, "pip", "install", "--python", str(interpreter), "-r", str(requirements)]
    if any("--hash" in line for line in spec.requirements):
        argv.append("--require-hashes")
    links = list(spec.find_links)
    if os.environ.get(protocol.ENV_PIP_FIND_LINKS):
        links += os.environ[protocol.ENV_PIP_FIND_LINKS].split(os.pathsep)
    for link in filter(None, links):
        argv += ["--find-links", link]
    if not spec.index or os.environ.get(protocol.ENV_PIP_NO_INDEX, "") in ("1", "true", "yes"):
        argv.append("--no-index")
    run_step("uv pip install", argv, log, env=env)
    return interpreter
