"""The event loop hq-server and hq-worker run on (coffea_hq/eventloop.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from coffea_hq import eventloop, protocol

uvloop = pytest.importorskip("uvloop")  # a dependency on Linux and macOS


def _loop_type(env: dict[str, str]) -> str:
    """The class of the loop eventloop.run() runs a coroutine on, in a fresh process."""
    code = (
        "import asyncio\n"
        "from coffea_hq import eventloop\n"
        "async def main():\n"
        "    return type(asyncio.get_running_loop()).__module__\n"
        "print(eventloop.run(main()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_uvloop_by_default_and_asyncio_on_request() -> None:
    env = {k: v for k, v in os.environ.items() if k != protocol.ENV_EVENT_LOOP}
    assert _loop_type(env).startswith("uvloop")
    assert _loop_type({**env, protocol.ENV_EVENT_LOOP: "asyncio"}).startswith("asyncio")


def test_run_returns_the_coroutines_value_and_closes_its_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(protocol.ENV_EVENT_LOOP, "asyncio")
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        loops.append(asyncio.get_running_loop())
        return 42

    assert eventloop.run(main()) == 42
    assert loops[0].is_closed()
    assert not eventloop.using_uvloop()
