"""Container health check for either role (Docker's HEALTHCHECK; on Kubernetes the chart's
probes do this job).

It finds the hq-server or hq-worker process in the container and asks a server's /health:
the server's own for the server role, the one the worker pulls from for the worker role.
Exit 0 when the answer is {"status": "ok"}, 1 otherwise. Only the standard library.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

ROLES = ("hq-server", "hq-worker", "coffea-hq")


def find_command() -> list[str]:
    """The argv of our main process (a console script runs as `python /opt/venv/bin/NAME`)."""
    for proc in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        for i, arg in enumerate(argv[:2]):
            if os.path.basename(arg) in ROLES:
                return argv[i:]
    return []


def option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def health_url(argv: list[str]) -> str | None:
    role = os.path.basename(argv[0])
    if role == "hq-server":
        host = option(argv, "--host") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        port = option(argv, "--port") or "8786"
        return f"http://{host}:{port}/health"
    if role == "hq-worker":
        url = next((a for a in argv[1:] if a.startswith(("http://", "https://"))), None)
        url = url or os.environ.get("HQ_URL")
        return url.rstrip("/") + "/health" if url else None
    return None  # coffea-hq local: alive is all we can say


def main() -> int:
    argv = find_command()
    if not argv:
        print("unhealthy: no hq-server or hq-worker process", file=sys.stderr)
        return 1
    url = health_url(argv)
    return 0 if url is None else check(url)


def check(url: str) -> int:
    """0 if ``url`` answers {"status": "ok"}, else 1 with the reason on stderr."""
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = json.load(response).get("status")
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != "ok":
        print(f"unhealthy: {url} says {status!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
