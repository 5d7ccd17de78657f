"""``coffea-hq``: the operator's command (``coffea-hq local`` runs everything here)."""

from __future__ import annotations

import argparse
import contextlib
import os
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
    _add_token_parser(sub)
    status = sub.add_parser(
        "status",
        help="the queue, workers and jobs of a server, in the terminal",
        description="Reads the server's queue, workers and jobs routes (an admin token "
        f"under hq-server --auth: ${protocol.ENV_TOKEN} or ${protocol.ENV_TOKEN_FILE}).",
    )
    status.add_argument(
        "url",
        nargs="?",
        default=None,
        help=f"the server, or its replicas' URLs comma-separated (default: ${protocol.ENV_URL})",
    )
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between refreshes with --watch (default: %(default)s)",
    )
    shares = sub.add_parser(
        "shares",
        help="show or set how workers are shared between users (fair-share weights)",
        description="Workers are shared between users in proportion to their weights "
        "(default 1); under hq-server --auth this needs an admin token "
        f"(${protocol.ENV_TOKEN} or ${protocol.ENV_TOKEN_FILE}).",
    )
    shares.add_argument(
        "url", nargs="?", default=None, help=f"the server (default: ${protocol.ENV_URL})"
    )
    shares.add_argument(
        "--set",
        action="append",
        default=[],
        dest="weights",
        metavar="USER=WEIGHT",
        help="give USER (or, in open mode, a share label) this weight; repeatable",
    )
    return p


def _add_token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser(
        "token",
        help="make, list and revoke access tokens (in the store the servers use)",
        description="Access tokens live in the queue's store, hashed; this command talks to "
        "the store directly (the operator's credential), so the first admin token needs "
        "no token to make.",
    )
    token.add_argument(
        "--redis",
        default=os.environ.get("HQ_REDIS_URL"),
        help="the store URL hq-server uses (default: $HQ_REDIS_URL)",
    )
    token.add_argument("--prefix", default="hq", help="hq-server's --prefix (default: %(default)s)")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a token and print it (shown only once)")
    create.add_argument("--user", required=True, help="whom the token names")
    create.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in protocol.Role],
        help="user: submit and manage own jobs; worker: run tasks; admin: everything",
    )
    create.add_argument(
        "--expires-in",
        type=float,
        default=None,
        metavar="SECONDS",
        help="lifetime in seconds (default: until revoked)",
    )
    create.add_argument(
        "--users",
        default="",
        help="a worker token only: comma-separated users whose jobs it may take",
    )
    actions.add_parser("list", help="list tokens (ids, users, roles; never the secrets)")
    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id", help="the token's id, as `token list` shows it")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "local":
        return _local(p, args)
    if args.command == "condor":
        return run_condor(args)
    if args.command == "token":
        return _token(p, args)
    if args.command == "status":
        return _status(p, args)
    if args.command == "shares":
        return _shares(p, args)
    return 2


def _shares(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import msgspec

    from . import messages
    from .client import Client
    from .errors import HQError

    weights: dict[str, float] = {}
    for item in args.weights:
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            p.error(f"--set takes USER=WEIGHT (a number), got {item!r}")
    try:
        request = msgspec.convert({"weights": weights}, messages.SetShares) if weights else None
    except msgspec.ValidationError as e:
        p.error(f"--set: {e} (names: letters, digits, '_.-'; weights above 0)")
    try:
        with Client(args.url, retry_for=5) as client:
            api = client.api
            reply = client.run(api.set_shares(request) if request else api.shares())
    except HQError as e:
        print(f"coffea-hq shares: {e}", file=sys.stderr)
        return 2
    print(f"{'group':<24}{'weight':>10}{'usage (s/weight)':>20}")
    for name, info in reply.shares.items():
        print(f"{name or '(default)':<24}{info.weight:>10g}{info.usage:>20.1f}")
    return 0


def _status(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from rich.console import Console

    from .client import Client
    from .errors import HQError
    from .status import render, snapshot, watch

    if args.interval <= 0:
        p.error("--interval must be above 0 seconds")
    try:
        with Client(args.url, retry_for=5) as client:
            if args.watch:
                with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the watch
                    watch(client, every=args.interval)
            else:
                Console().print(render(snapshot(client)))
    except HQError as e:
        print(f"coffea-hq status: {e}", file=sys.stderr)
        return 2
    return 0


def _token(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import time

    import redis

    # The operator's command reaches the store the servers share (like `coffea-hq local`
    # runs the server), not a server route: no admin token is needed to make the first.
    from coffea_hq.server.keys import Keys
    from coffea_hq.server.tokens import TokenError, create, listing, revoke

    if not args.redis:
        p.error("give the store with --redis URL (or set HQ_REDIS_URL)")
    keys = Keys(args.prefix)
    client = redis.Redis.from_url(args.redis, socket_connect_timeout=5)
    try:
        if args.action == "create":
            users = [u.strip() for u in args.users.split(",") if u.strip()]
            secret, record = create(
                client,
                keys,
                user=args.user,
                role=protocol.Role(args.role),
                ttl=args.expires_in,
                users=users,
            )
            print(secret)
            print(
                f"token {record.id} for {record.user} ({record.role}) made; the line above "
                "is the token, shown only this once",
                file=sys.stderr,
            )
        elif args.action == "list":
            print(f"{'id':<14}{'user':<20}{'role':<8}{'created (UTC)':<22}expires / users")
            for r in listing(client, keys):
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created))
                expires = (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.expires))
                    if r.expires
                    else "never"
                )
                note = f"{expires}{' (expired)' if r.expired() else ''}"
                if r.users:
                    note += f"  users: {','.join(r.users)}"
                print(f"{r.id:<14}{r.user:<20}{r.role:<8}{created:<22}{note}")
        elif args.action == "revoke":
            record = revoke(client, keys, args.id)
            print(f"token {record.id} of {record.user} ({record.role}) revoked")
    except TokenError as e:
        print(f"coffea-hq token: {e}", file=sys.stderr)
        return 2
    except redis.RedisError as e:
        print(f"coffea-hq token: cannot reach the store at {args.redis}: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


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
            f"{args.slots} slot(s)\n  dashboard: {cluster.dashboard_link}\n"
            f"  export {protocol.ENV_URL}={cluster.url}\n"
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
