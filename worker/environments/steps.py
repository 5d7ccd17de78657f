"""One materialisation step: a subprocess with a time limit whose failure names itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence

from coffea_hq import protocol
from coffea_hq.errors import EnvironmentFailed

TAIL_LINES = 15  # lines of a failed step's output that its error quotes


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text`` (where a tool says what went wrong)."""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept) or "(no output)"


def run_step(
    step: str,
    argv: Sequence[str],
    log: Callable[[str], None],
    *,
    env: dict[str, str] | None = None,
    timeout: float = protocol.ENV_STEP_TIMEOUT,
    cwd: str | None = None,
) -> str:
    """Run ``argv``; its output, or :class:`EnvironmentFailed` naming ``step`` with the
    tail of that output (or the time limit it ran past: a step never hangs a worker)."""
    log(f"step {step!r}: {' '.join(argv)[:300]}")
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env if env is not None else dict(os.environ),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise EnvironmentFailed(step, f"{argv[0]} not found ({e.strerror})") from e
    except PermissionError as e:
        raise EnvironmentFailed(step, f"{argv[0]} cannot be run ({e.strerror})") from e
    except subprocess.TimeoutExpired as e:
        raise EnvironmentFailed(step, f"still running after {timeout:.0f} s, stopped") from e
    out = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        raise EnvironmentFailed(step, f"exit code {done.returncode}:\n{tail(out)}")
    return out
