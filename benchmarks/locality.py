"""Locality-aware leasing on the AGC analysis: files each worker opens, and wall time.

    python benchmarks/locality.py                  # 2 workers, 360 chunks of 10,000 events
    python benchmarks/locality.py --small-chunks   # 1,800 chunks of 100 events

Runs ``examples/agc`` through ``HQExecutor`` on one ``LocalCluster`` alternately with
locality keys (each chunk names its file; the default) and without (the executor sends
none), and reads from the server's store which worker ran each chunk: how many distinct
files each worker had to open, and the median wall time of each mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
AGC = HERE.parent / "examples" / "agc"
sys.path.insert(0, str(AGC))
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(AGC), os.environ.get("PYTHONPATH")) if p)

import analysis  # noqa: E402
import benchmark as agc  # noqa: E402
import generate  # noqa: E402
import harness  # noqa: E402


class HolderWatch:
    """Copies every job's holder hash (task -> "attempt|worker...") every ``every``
    seconds while a run goes on: the client deletes a job's keys once it has the result."""

    def __init__(self, redis_url: str, every: float = 0.5) -> None:
        import redis

        self.redis = redis.Redis.from_url(redis_url)
        self.every = every
        self.holders: dict[str, dict[bytes, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HolderWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.redis.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for key in self.redis.scan_iter("hq:job:*:holder"):
                self.holders.setdefault(key.decode(), {}).update(self.redis.hgetall(key))

    def files_per_worker(self, files: list[str]) -> dict[str, int]:
        """Distinct files per worker in the job with one chunk task per entry of ``files``
        (task i read files[i])."""
        opened: dict[str, set[str]] = defaultdict(set)
        for holders in self.holders.values():
            chunks = {t: h for t, h in holders.items() if t.isdigit()}  # (not merges)
            if len(chunks) == len(files):
                for task, holder in chunks.items():
                    opened[holder.decode().split("|")[1]].add(files[int(task)])
        return {w: len(f) for w, f in sorted(opened.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small-chunks", action="store_true")
    p.add_argument("--files-per-sample", type=int, default=None)
    p.add_argument("--events-per-file", type=int, default=None)
    p.add_argument("--chunksize", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=2015)
    args = p.parse_args(argv)
    small = args.small_chunks
    files = args.files_per_sample or (2 if small else 4)
    events = args.events_per_file or (10_000 if small else 100_000)
    chunksize = args.chunksize or (100 if small else 10_000)

    from coffea_hq import Client, HQExecutor, LocalCluster, executor

    inputs = generate.generate(files, events, args.seed, args.cache_dir, jobs=2)
    fileset = analysis.construct_fileset(inputs)
    n_files = sum(len(d["files"]) for d in fileset.values())
    print(f"{n_files} files, chunksize {chunksize:,}, {args.workers} workers x 1 slot")
    original = executor._file_of
    walls: dict[str, list[float]] = {"locality": [], "none": []}
    opened: dict[str, list[dict[str, int]]] = {"locality": [], "none": []}
    names: list[str] = []  # each chunk's file, in the order the executor saw them
    mode = "locality"

    def recording(item: Any) -> str | None:
        name = original(item)
        names.append(name or "")
        return name if mode == "locality" else None

    executor._file_of = recording
    try:
        with (
            LocalCluster(workers=args.workers, slots=1) as cluster,
            Client(cluster.url) as client,
        ):
            hq = HQExecutor(client=client, status=False)
            agc.run_once(hq, fileset, chunksize, maxchunks=2)  # warm up
            for _ in range(args.repeats):
                for mode in ("none", "locality"):
                    names.clear()
                    with HolderWatch(cluster.redis_url or "") as watch:
                        _, _, wall = agc.run_once(hq, fileset, chunksize)
                    walls[mode].append(wall)
                    chunks = names[n_files:]  # (the first call pre-processes each file)
                    counts = watch.files_per_worker(chunks)
                    opened[mode].append(counts)
                    print(f"  {mode:<9} {wall:7.2f} s  files per worker {counts}", flush=True)
    finally:
        executor._file_of = original
        harness.stop_leftovers()
    for mode in ("none", "locality"):
        per_worker = [sum(o.values()) / max(len(o), 1) for o in opened[mode]]
        print(
            f"{mode:<9} median {statistics.median(walls[mode]):7.2f} s, files opened per "
            f"worker (mean over workers, median over runs) {statistics.median(per_worker):.1f}"
        )
    ratio = statistics.median(walls["locality"]) / statistics.median(walls["none"])
    print(f"wall ratio locality / none: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
