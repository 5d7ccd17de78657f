"""``hq-worker``: pull tasks from a coffea-hq server and run them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from coffea_hq import gctune, protocol
from coffea_hq.errors import HQError, TLSError
from coffea_hq.lifeline import watch_stdin
from coffea_hq.sizes import parse_memory
from coffea_hq.transport import parse_urls

from .agent import DEFAULT_DRAIN_TIMEOUT, Worker, WorkerConfig


def _drain_timeout(text: str) -> float | None:
    if text.strip().lower() in ("none", "inf", "infinity"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"a number of seconds >= 0, or 'none', not {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hq-worker",
        description="A coffea-hq worker: leases tasks from the server and runs them in "
        "subprocesses, one per slot. SIGTERM drains it: unstarted tasks go back, running "
        "ones finish (within --drain-timeout). A second SIGTERM exits at once.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {protocol.package_version()}")
    p.add_argument(
        "url",
        nargs="?",
        default=os.environ.get(protocol.ENV_URL),
        help=f"server URL, e.g. http://server:{protocol.DEFAULT_PORT}, or several replicas' "
        f"URLs comma-separated, failed over in turn (default: ${protocol.ENV_URL})",
    )
    p.add_argument("--slots", type=int, default=1, help="tasks run at once (default: %(default)s)")
    p.add_argument("--name", default=None, help="worker name (default: host-pid-random)")
    p.add_argument(
        "--lease-wait",
        type=float,
        default=10.0,
        help="seconds one lease request waits on the server for work (default: %(default)s)",
    )
    p.add_argument(
        "--retry-for",
        type=float,
        default=300.0,
        help="seconds to keep retrying an unreachable server before exiting (default: %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_drain_timeout,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS|none",
        help="on SIGTERM, how long running tasks may take to finish and report; then they "
        "are stopped and handed back to the queue (their attempt not counted). 0: hand "
        "them back at once; 'none': wait however long they take (default: %(default)s)",
    )
    p.add_argument(
        "--users",
        default="",
        help="comma-separated users whose jobs this worker takes, and no others' (a pool "
        "per user or group; default: any user's). A worker token may narrow it further",
    )
    p.add_argument(
        "--tls-ca",
        default=os.environ.get(protocol.ENV_TLS_CA),
        help="PEM file of the CA that signed an https:// server's certificate, if not a "
        f"public one (default: ${protocol.ENV_TLS_CA})",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get(protocol.ENV_TLS_CERT),
        help="this worker's client certificate (PEM), for a server that requires one "
        f"(default: ${protocol.ENV_TLS_CERT})",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get(protocol.ENV_TLS_KEY),
        help=f"the key of --tls-cert (default: ${protocol.ENV_TLS_KEY})",
    )
    p.add_argument(
        "--env-cache",
        default=None,
        metavar="DIR",
        help="directory where per-task environments are built and cached, shared by the "
        "workers of a node (default: $_CONDOR_SCRATCH_DIR or the temporary directory, "
        "/coffea-hq-envs-UID)",
    )
    p.add_argument(
        "--env-cache-size",
        type=_memory,
        default=None,
        metavar="BYTES",
        help="evict least recently used environments beyond this total size (e.g. 20G; "
        "default: no limit)",
    )
    p.add_argument(
        "--task-memory",
        type=_memory,
        default=0,
        metavar="SIZE",
        help="memory (private resident set) one task may use, e.g. 2GiB; a task over it is stopped "
        "and fails as memory_exceeded, which HQExecutor answers by splitting the chunk "
        "(default: no limit)",
    )
    p.add_argument(
        "--task-walltime",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds one task may run; a task over it is stopped and fails as "
        "walltime_exceeded (default: no limit)",
    )
    p.add_argument(
        "--preload",
        default="",
        metavar="MOD[,MOD]",
        help="modules the worker's zygote imports before forking each job's fresh slot "
        "subprocess, besides those earlier jobs imported (e.g. coffea.nanoevents,numpy)",
    )
    p.add_argument(
        "--no-zygote",
        action="store_true",
        help="start every slot subprocess as a new interpreter, not a fork of the warm zygote",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _memory(text: str) -> int:
    """A size flag (``2GiB``, ``500M``, ``20G``), as coffea_hq.sizes reads it."""
    try:
        return parse_memory(text) or 0
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.url:
        p.error(f"give the server URL or set {protocol.ENV_URL}, e.g. http://localhost:8786")
    try:
        urls = parse_urls(args.url)
    except HQError as e:
        p.error(str(e))
    if not 1 <= args.slots <= 1024:
        p.error("--slots must be between 1 and 1024")
    if args.task_walltime < 0:
        p.error("--task-walltime must be positive (or 0: no limit)")
    if args.lease_wait <= 0 or args.retry_for <= 0:
        p.error("--lease-wait and --retry-for must be positive")
    if args.name is not None and not protocol.valid_id(args.name):
        p.error("--name may hold 1-64 letters, digits, '-', '_' and '.'")
    users = tuple(u.strip() for u in args.users.split(",") if u.strip())
    if not all(protocol.valid_id(u) for u in users):
        p.error("--users takes comma-separated user names (letters, digits, '-', '_', '.')")
    preload = tuple(m.strip() for m in args.preload.split(",") if m.strip())
    if not all(all(part.isidentifier() for part in m.split(".")) for m in preload):
        p.error("--preload takes comma-separated module names, e.g. numpy,coffea.nanoevents")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s hq-worker %(levelname)s %(message)s"
    )
    config = WorkerConfig(
        url=",".join(urls),
        slots=args.slots,
        name=args.name,
        lease_wait=args.lease_wait,
        retry_for=args.retry_for,
        drain_timeout=args.drain_timeout,
        users=users,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        env_cache=args.env_cache,
        env_cache_size=args.env_cache_size,
        task_memory=args.task_memory,
        task_walltime=args.task_walltime,
        preload=preload,
        zygote=not args.no_zygote,
    )
    try:
        worker = Worker(config)
    except TLSError as e:
        print(f"hq-worker: {e}", file=sys.stderr)
        return 2
    watch_stdin()  # started by a LocalCluster: drain when it goes away
    gctune.steady_state()  # a third of the agent's CPU per task went to the collector
    asyncio.run(worker.run())
    return 1 if worker.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
