"""What an environment's interpreter holds: runs, has cloudpickle, which versions."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from coffea_hq import protocol
from coffea_hq.errors import EnvironmentFailed

from .steps import run_step

MIN_PYTHON = (3, 8)  # what worker/foreign.py is written for
PROBE_TIMEOUT = 120.0  # a first start on a cold CVMFS cache can be slow

# Runs under the environment's interpreter with -I: standard library only.
_PROBE = """
import importlib.metadata as m, json, sys
found = {"python": "%d.%d" % sys.version_info[:2]}
for name in NAMES:
    try:
        found[name] = m.version(name)
    except Exception:
        pass
try:
    import cloudpickle
except Exception as e:
    found["cloudpickle-error"] = repr(e)
print(json.dumps(found))
"""


def probe(interpreter: str, log: Callable[[str], None]) -> dict[str, str]:
    """The versions of :data:`coffea_hq.protocol.VERSION_CHECKED` in ``interpreter``'s
    environment. Raises :class:`EnvironmentFailed` if it does not exist, does not run or
    lacks cloudpickle (the task runner's one requirement)."""
    if not os.path.exists(interpreter):
        raise EnvironmentFailed("find interpreter", f"{interpreter} does not exist on this worker")
    if not os.access(interpreter, os.X_OK):
        raise EnvironmentFailed("find interpreter", f"{interpreter} is not executable")
    code = f"NAMES = {list(protocol.VERSION_CHECKED[1:])!r}\n{_PROBE}"
    out = run_step("run interpreter", [interpreter, "-I", "-c", code], log, timeout=PROBE_TIMEOUT)
    try:
        found = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise EnvironmentFailed("run interpreter", f"unexpected output: {out[-500:]!r}") from e
    if "cloudpickle-error" in found:
        raise EnvironmentFailed(
            "check requirements",
            "cloudpickle cannot be imported there "
            f"({found['cloudpickle-error']}): add cloudpickle to the environment "
            "(coffea-hq's task runner needs it, with the standard library)",
        )
    major, _, minor = str(found.get("python", "0.0")).partition(".")
    if (int(major), int(minor or 0)) < MIN_PYTHON:
        raise EnvironmentFailed(
            "check requirements",
            f"its Python is {found.get('python')}: the task runner needs "
            f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer",
        )
    return {str(k): str(v) for k, v in found.items()}


def mismatches(session: dict[str, str], environment: dict[str, str]) -> list[str]:
    """Human-readable differences, for each package the session has."""
    out = []
    for name, version in session.items():
        theirs = environment.get(name)
        if theirs != version:
            out.append(f"{name} {version} here, {theirs or 'absent'} in the environment")
    return out
