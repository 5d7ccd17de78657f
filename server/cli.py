"""``hq-server``: run the queue server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError

from coffea_hq import gctune, protocol
from coffea_hq.errors import TLSError
from coffea_hq.lifeline import watch_stdin
from coffea_hq.tls import server_context

from . import tokens
from .app import make_app
from .auth import DEFAULT_TOKEN_CACHE_TTL
from .config import ServerConfig
from .limits import Limits
from .store import UnsupportedStore

# Connections waiting to be accepted (the kernel caps it at net.core.somaxconn). aiohttp's
# default of 128 overflows when hundreds of workers (re)connect at once to a busy replica:
# each dropped handshake costs its worker a SYN retransmit, 1 s and more.
LISTEN_BACKLOG = 4096


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hq-server",
        description="The coffea-hq queue server (stateless; all state in Redis/Valkey/Dragonfly).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {protocol.package_version()}")
    p.add_argument(
        "--redis",
        default=os.environ.get("HQ_REDIS_URL"),
        help="store URL, e.g. redis://host:6379/0 (default: $HQ_REDIS_URL)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port",
        type=_positive(int),
        default=protocol.DEFAULT_PORT,
        help="port to listen on (default: %(default)s)",
    )
    p.add_argument(
        "--prefix", default="hq", help="prefix of every Redis key (default: %(default)s)"
    )
    p.add_argument(
        "--lease-timeout",
        type=_positive(float),
        default=protocol.DEFAULT_LEASE_TIMEOUT,
        help="seconds a lease lasts without a heartbeat (default: %(default)s)",
    )
    p.add_argument(
        "--max-request-size",
        type=_positive(int),
        default=protocol.DEFAULT_MAX_REQUEST_SIZE,
        help="largest request body in bytes (default: %(default)s)",
    )
    p.add_argument(
        "--result-ttl",
        type=_positive(int),
        default=protocol.DEFAULT_RESULT_TTL,
        help="seconds a finished job's results are kept if its client never collects "
        "them (default: %(default)s)",
    )
    p.add_argument(
        "--unsealed-timeout",
        type=_positive(float),
        default=protocol.DEFAULT_UNSEALED_TIMEOUT,
        help="seconds an unsealed job may go without a submit before it counts as abandoned "
        "by its client and is cancelled (default: %(default)s)",
    )
    p.add_argument(
        "--allow-eviction",
        action="store_true",
        help="run even if the store's maxmemory-policy may evict keys (loses tasks)",
    )
    security = p.add_argument_group("access (docs/security.md)")
    security.add_argument(
        "--auth",
        action="store_true",
        help="require an access token (made with `coffea-hq token create`) on every route "
        "but /health",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow running without --auth on a non-loopback address: anyone who reaches "
        "the port can run code on the workers",
    )
    security.add_argument(
        "--worker-token-file",
        default=None,
        metavar="PATH",
        help="a file holding a worker token this server accepts besides those in the store "
        "(the chart's Secret); rotate the file and restart to revoke it",
    )
    security.add_argument(
        "--token-cache-ttl",
        type=float,
        default=DEFAULT_TOKEN_CACHE_TTL,
        help="seconds a verified token is trusted without asking the store; a revoked "
        "token stops working within this time (default: %(default)s)",
    )
    limits = p.add_argument_group("quotas and limits (0: none)")
    limits.add_argument(
        "--max-tasks-per-request",
        type=int,
        default=0,
        help="most tasks one submit request may carry (default: no limit)",
    )
    limits.add_argument(
        "--quota-queued-tasks",
        type=int,
        default=0,
        help="most tasks one user may have queued or running (default: no limit)",
    )
    limits.add_argument(
        "--quota-blob-bytes",
        type=int,
        default=0,
        help="most bytes of blobs one user may upload (default: no limit)",
    )
    limits.add_argument(
        "--quota-result-bytes",
        type=int,
        default=0,
        help="most bytes of uncollected results one user may hold before submits are "
        "refused (default: no limit)",
    )
    limits.add_argument(
        "--max-long-polls",
        type=int,
        default=0,
        help="most long polls one client (token) may hold open on this replica at once "
        "(default: no limit)",
    )
    limits.add_argument(
        "--store-full-at",
        type=float,
        default=0.9,
        help="share of the store's maxmemory above which new jobs, tasks and blobs are "
        "refused with 507 'store full' (0: never; default: %(default)s)",
    )
    tls = p.add_argument_group("TLS (HTTPS) for clients and workers")
    tls.add_argument("--tls-cert", help="the server's certificate chain (PEM); with --tls-key")
    tls.add_argument("--tls-key", help="the key of --tls-cert (PEM)")
    tls.add_argument(
        "--tls-ca",
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )
    store = p.add_argument_group("the store's credentials and TLS")
    store.add_argument(
        "--store-user",
        help="Redis ACL user to connect as (its password from "
        f"${protocol.ENV_STORE_PASSWORD}, kept off the command line)",
    )
    store.add_argument("--store-ca", help="CA (PEM) that signed a rediss:// store's certificate")
    store.add_argument(
        "--store-cert", help="client certificate (PEM) for a rediss:// store that requires one"
    )
    store.add_argument("--store-key", help="the key of --store-cert (PEM)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.redis:
        p.error("--redis URL is required (or set HQ_REDIS_URL), e.g. redis://localhost:6379/0")
    if not args.redis.startswith(("redis://", "rediss://", "unix://")):
        p.error(f"--redis must be a redis://, rediss:// or unix:// URL, got {args.redis!r}")
    if not protocol.valid_id(args.prefix):
        p.error("--prefix may hold only letters, digits, '-', '_' and '.'")
    if args.port > 65535:
        p.error("--port must be at most 65535")
    if not args.auth and not args.insecure and not protocol.is_loopback(args.host):
        p.error(
            f"refusing to listen on {args.host} without --auth: anyone who reaches the port "
            "could run code on every worker. Start with --auth (and make tokens with "
            "`coffea-hq token create`), or pass --insecure if the network is trusted"
        )
    numbers = [
        args.max_tasks_per_request,
        args.quota_queued_tasks,
        args.quota_blob_bytes,
        args.quota_result_bytes,
        args.max_long_polls,
    ]
    if min(numbers) < 0 or args.token_cache_ttl < 0:
        p.error("quotas, limits and --token-cache-ttl must be >= 0")
    if not 0 <= args.store_full_at <= 1:
        p.error("--store-full-at is a share of maxmemory, from 0 to 1")
    worker_digest = ""
    if args.worker_token_file:
        if not args.auth:
            p.error("--worker-token-file needs --auth")
        try:
            with open(args.worker_token_file) as f:
                secret = f.read().strip()
        except OSError as e:
            p.error(f"cannot read --worker-token-file: {e}")
        if len(secret) < 16:
            p.error("--worker-token-file must hold a token of at least 16 characters")
        worker_digest = tokens.digest(secret)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        p.error("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    store_tls = [
        f"--{name}"
        for name in ("store-ca", "store-cert", "store-key")
        if getattr(args, name.replace("-", "_"))
    ]
    if store_tls and not args.redis.startswith("rediss://"):
        p.error(f"{', '.join(store_tls)} need a rediss:// store URL, got {args.redis!r}")
    if bool(args.store_cert) != bool(args.store_key):
        p.error("--store-cert and --store-key go together")
    ssl_context = None
    if args.tls_cert:
        try:
            ssl_context = server_context(args.tls_cert, args.tls_key, args.tls_ca)
        except TLSError as e:
            p.error(str(e))
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s hq-server %(levelname)s %(message)s"
    )
    watch_stdin()  # started by a LocalCluster: stop when it goes away
    config = ServerConfig(
        redis_url=args.redis,
        host=args.host,
        port=int(args.port),
        prefix=args.prefix,
        lease_timeout=args.lease_timeout,
        max_request_size=int(args.max_request_size),
        result_ttl=int(args.result_ttl),
        unsealed_timeout=args.unsealed_timeout,
        allow_eviction=args.allow_eviction,
        auth=args.auth,
        token_cache_ttl=args.token_cache_ttl,
        worker_token_digest=worker_digest,
        limits=Limits(
            max_tasks_per_request=args.max_tasks_per_request,
            queued_tasks_per_user=args.quota_queued_tasks,
            blob_bytes_per_user=args.quota_blob_bytes,
            result_bytes_per_user=args.quota_result_bytes,
            long_polls_per_client=args.max_long_polls,
            store_full_at=args.store_full_at,
        ),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        store_user=args.store_user,
        store_password=os.environ.get(protocol.ENV_STORE_PASSWORD) or None,
        store_ca=args.store_ca,
        store_cert=args.store_cert,
        store_key=args.store_key,
    )
    try:
        app = make_app(config)
        gctune.steady_state()  # a third of the server's CPU per task went to the collector
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            print=None,
            ssl_context=ssl_context,
            shutdown_timeout=5.0,
            access_log=None,
            backlog=LISTEN_BACKLOG,
        )
    except UnsupportedStore as e:
        print(f"hq-server: {e}", file=sys.stderr)
        return 2
    except (RedisConnectionError, OSError) as e:
        print(f"hq-server: cannot start: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
