"""``coffea-hq``: the operator's command (``coffea-hq local`` runs everything here)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from . import protocol
from .factory.condor import add_condor_parser, run_condor
from .local import INTERRUPTED_STOP_TIMEOUT, LocalCluster


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coffea-hq", description="coffea-hq operator commands.")
    p.add_argument("--version", action="version", version=f"%(prog)s {protocol.package_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    local = sub.add_parser(
        "local", help="embedded Redis + hq-server + workers on this machine, until Ctrl-C"
    )
    local.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    local.add_argument("--slots", type=int, default=1, help="slots per worker (default: 1)")
    local.add_argument(
        "--min",
        type=int,
        default=None,
        dest="minimum",
        help="autoscale: fewest workers (with --max; replaces --workers)",
    )
    local.add_argument(
        "--max",
        type=int,
        default=None,
        dest="maximum",
        help="autoscale: most workers, reached when the queue has work for them",
    )
    local.add_argument(
        "--cooldown",
        type=float,
        default=10.0,
        help="autoscale: seconds of low work before workers drain (default: 10)",
    )
    local.add_argument(
        "--port",
        type=int,
        default=protocol.DEFAULT_PORT,
        help="server port (default: %(default)s; 0 picks a free one)",
    )
    local.add_argument("--host", default="127.0.0.1", help="address to listen on")
    add_condor_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "local":
        return _local(p, args)
    if args.command == "condor":
        return run_condor(args)
    return 2


def _local(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.workers < 0 or args.slots < 1:
        p.error("--workers must be >= 0 and --slots >= 1")
    if not 0 <= args.port <= 65535:
        p.error("--port must be between 0 and 65535")
    adaptive = None
    if args.minimum is not None or args.maximum is not None:
        if args.minimum is None or args.maximum is None:
            p.error("--min and --max go together")
        if not 0 <= args.minimum <= args.maximum or args.maximum < 1:
            p.error("--min and --max need 0 <= min <= max and max >= 1")
        adaptive = (args.minimum, args.maximum)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(
        workers=args.workers,
        slots=args.slots,
        port=args.port,
        host=args.host,
        logs="-",
        adaptive=adaptive,
        scale_cooldown=args.cooldown,
    )
    try:
        cluster.start()
        size = f"{args.workers}" if adaptive is None else f"{adaptive[0]}-{adaptive[1]}"
        print(
            f"coffea-hq running at {cluster.url} with {size} worker(s) x "
            f"{args.slots} slot(s)\n  export {protocol.ENV_URL}={cluster.url}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        stop.wait()
        print("stopping...", flush=True)
    finally:
        # Its store goes too: nothing a drain saves would survive, so stop in seconds.
        cluster.close(INTERRUPTED_STOP_TIMEOUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
