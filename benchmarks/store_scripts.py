#!/usr/bin/env python
"""Valkey's cost per task of the lease and complete scripts alone, through the server's
own ``Store`` calls (no HTTP, no workers).

Each round is a new job of ``--tasks`` no-op tasks: submitted, then leased by one worker
in leases of ``--lease`` tasks, then reported in batches of ``--report``. Printed: the
store's main-thread CPU per task of each phase (median over rounds). With
``--callgrind lease|complete|submit`` the store runs under ``valgrind --tool=callgrind``
and only that phase of the first round is instrumented: instructions are not swayed by
other processes' load, as CPU time is on a shared machine. Read the total with
``callgrind_annotate FILE | head -25``.

    python benchmarks/store_scripts.py
    python benchmarks/store_scripts.py --rounds 1 --callgrind complete
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import Report, Store

from coffea_hq import protocol
from coffea_hq.embedded import EmbeddedRedis, server_binary
from coffea_hq.protocol import Outcome

FUNCTION = b"stand-in function"


async def store_cpu(r: aioredis.Redis) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


async def bench(args: argparse.Namespace, binary: str | None) -> dict[str, list[float]]:
    store = EmbeddedRedis(binary=binary)
    store.start()
    phases: dict[str, list[float]] = {}
    try:
        r = aioredis.Redis.from_url(store.url)
        st = Store(r, Keys("bench"), lease_timeout=600, result_ttl=600)
        fn = protocol.blob_name(FUNCTION)
        await st.put_blob(fn, FUNCTION)
        pid = (await r.info("server"))["process_id"]

        def instrument(phase: str, on: bool) -> None:
            if args.callgrind == phase:
                flag = "on" if on else "off"
                subprocess.run(
                    ["callgrind_control", "-i", flag, str(pid)], check=True, capture_output=True
                )

        n = args.tasks
        for rnd in range(args.rounds + 1):  # round 0 warms up (and is instrumented)
            job = uuid.uuid4().hex
            measured = rnd > 0 or args.callgrind
            t0 = await store_cpu(r)
            await st.create_job(
                job, function=fn, max_attempts=3, fail_fast=False, label="", user=""
            )
            instrument("submit", rnd == 0)
            for i in range(0, n, 5000):
                ids = [str(k) for k in range(i, min(n, i + 5000))]
                await st.submit(job, ids, [protocol.dumps((int(k),)) for k in ids])
            await st.seal(job, n)
            instrument("submit", False)
            t1 = await store_cpu(r)
            instrument("lease", rnd == 0)
            leased = []
            while got := await st.lease("w1", args.lease):
                leased += got
            instrument("lease", False)
            t2 = await store_cpu(r)
            instrument("complete", rnd == 0)
            for j in range(0, len(leased), args.report):
                reports = [
                    Report(t.job, t.task, t.attempt, Outcome.OK, None, t.payload, wall=1.2e-4,
                           cpu=1e-4, max_rss=30_000_000)
                    for t in leased[j : j + args.report]
                ]  # fmt: skip
                await st.complete("w1", reports)
            instrument("complete", False)
            t3 = await store_cpu(r)
            if len(leased) != n:
                raise AssertionError(f"leased {len(leased)} of {n} tasks")
            if measured and not (args.callgrind and rnd > 0):
                for phase, spent in (
                    ("submit", t1 - t0),
                    ("lease", t2 - t1),
                    ("complete", t3 - t2),
                ):
                    phases.setdefault(phase, []).append(spent / n * 1e6)
            if args.callgrind:
                break
        await r.aclose()
    finally:
        store.stop()
    return phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000, help="tasks per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--lease", type=int, default=1000, help="tasks per lease")
    p.add_argument("--report", type=int, default=500, help="reports per complete")
    p.add_argument(
        "--callgrind",
        choices=("submit", "lease", "complete"),
        help="run the store under callgrind, instrumenting this phase of one round",
    )
    args = p.parse_args(argv)
    binary = None
    out = None
    if args.callgrind:
        if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
            p.error("--callgrind needs valgrind (apt-get install valgrind)")
        out = Path(tempfile.mkdtemp(prefix="hq-callgrind-"))
        wrapper = out / "store.sh"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no "
            f'--callgrind-out-file={out}/callgrind.out {server_binary()} "$@"\n'
        )
        wrapper.chmod(0o755)
        binary = str(wrapper)
    phases = asyncio.run(bench(args, binary))
    for phase, values in phases.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"{phase:9s} store CPU per task {statistics.median(values):6.2f} us  ({shown})")
    if out is not None:
        print(f"callgrind profile of the {args.callgrind} phase: {out}/callgrind.out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
