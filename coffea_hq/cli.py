"""``coffea-hq``: the operator's command (``coffea-hq local`` runs everything here)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from . import protocol
from .local import LocalCluster


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coffea-hq", description="coffea-hq operator commands.")
    sub = p.add_subparsers(dest="command", required=True)
    local = sub.add_parser(
        "local", help="embedded Redis + hq-server + workers on this machine, until Ctrl-C"
    )
    local.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    local.add_argument("--slots", type=int, default=1, help="slots per worker (default: 1)")
    local.add_argument(
        "--port",
        type=int,
        default=protocol.DEFAULT_PORT,
        help="server port (default: %(default)s; 0 picks a free one)",
    )
    local.add_argument("--host", default="127.0.0.1", help="address to listen on")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "local":
        return _local(p, args)
    return 2


def _local(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.workers < 0 or args.slots < 1:
        p.error("--workers must be >= 0 and --slots >= 1")
    if not 0 <= args.port <= 65535:
        p.error("--port must be between 0 and 65535")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCluster(
        workers=args.workers, slots=args.slots, port=args.port, host=args.host, logs="-"
    ) as cluster:
        print(
            f"coffea-hq running at {cluster.url} with {args.workers} worker(s) x "
            f"{args.slots} slot(s)\n  export {protocol.ENV_URL}={cluster.url}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        stop.wait()
        print("stopping...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
