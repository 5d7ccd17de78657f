"""Fixtures for the deployment tests: the chart renderer (built from tools/helm-render),
the chart's paths, and helpers to render with given values."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "coffea-hq"
KUBE_VERSION = "1.30.0"  # a version kubernetes-validate ships schemas for

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def helm_render() -> Path:
    """The helm-render binary. A machine without the Go toolchain must fail here, not
    skip: CI installs it (tools/helm-render/build.sh does, as root)."""
    try:
        done = subprocess.run(
            ["bash", str(REPO / "tools" / "helm-render" / "build.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"building helm-render took too long: {e}")
    if done.returncode != 0:
        pytest.fail(f"cannot build helm-render (tools/helm-render/build.sh):\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


class Rendered:
    """The manifests of one render, with lookups by kind and name suffix."""

    def __init__(self, docs: list[Manifest]) -> None:
        self.docs = docs

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[Manifest]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, suffix: str = "") -> Manifest:
        found = [d for d in self.all(kind) if d["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"expected one {kind} named *{suffix}, got {len(found)}"
        return found[0]


def container(manifest: Manifest) -> dict[str, Any]:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(manifest: Manifest) -> dict[str, Any]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest).get("env", [])
    }


@pytest.fixture
def render(helm_render: Path, tmp_path: Path) -> Callable[..., Rendered]:
    """render(values, namespace=..., release=...) -> Rendered; fails on a render error."""

    def run(
        values: dict[str, Any] | None = None, *, namespace: str = "analysis", release: str = "hq"
    ) -> Rendered:
        done = render_raw(helm_render, tmp_path, values, namespace=namespace, release=release)
        assert done.returncode == 0, done.stderr
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        return Rendered(docs)

    return run


def render_raw(
    binary: Path,
    tmp_path: Path,
    values: dict[str, Any] | None,
    *,
    namespace: str = "analysis",
    release: str = "hq",
    notes: bool = False,
) -> subprocess.CompletedProcess[str]:
    args = [
        str(binary),
        "--namespace",
        namespace,
        "--release",
        release,
        "--kube-version",
        KUBE_VERSION,
    ]
    if values is not None:
        values_file = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.json"
        values_file.write_text(json.dumps(values))
        args += ["-f", str(values_file)]
    if notes:
        args.append("--notes")
    return subprocess.run([*args, str(CHART)], capture_output=True, text=True, timeout=60)


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float = 30.0,
    ignore: tuple[type[BaseException], ...] = (),
) -> None:
    """Poll ``check`` until it is true; ``ignore`` lists errors that mean "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except ignore:
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)
