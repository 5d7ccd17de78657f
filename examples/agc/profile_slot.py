"""Where an HQ worker slot's time goes on the AGC analysis.

    python examples/agc/profile_slot.py                      # 2 workers, files kept open
    python examples/agc/profile_slot.py --keep-files-open 0  # coffea's open-per-chunk

Runs the analysis once with ``HQExecutor`` on a ``LocalCluster`` (warmed up first), with
every chunk run under ``cProfile`` inside its slot subprocess; adds the profiles of all
slots and prints the share of the slots' task time spent inside the processor's
``process()`` and outside it (opening files, building NanoEvents, unpickling the processor,
pickling the output), by the functions that cost most.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
)

import analysis  # noqa: E402
import generate  # noqa: E402


class Profiled:
    """``function`` run under cProfile in the slot subprocess; stats dumped per process."""

    def __init__(self, function: Callable[..., Any], outdir: str) -> None:
        self.function = function
        self.outdir = outdir

    def __call__(self, *args: Any) -> Any:
        profile = _profile()
        profile.enable()
        try:
            return self.function(*args)
        finally:
            profile.disable()
            profile.dump_stats(os.path.join(self.outdir, f"slot-{os.getpid()}.prof"))


_PROFILE: cProfile.Profile | None = None


def _profile() -> cProfile.Profile:
    global _PROFILE
    if _PROFILE is None:
        _PROFILE = cProfile.Profile()
    return _PROFILE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    generate.add_run_arguments(p)
    p.add_argument("--keep-files-open", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from coffea_hq import Client, HQExecutor, LocalCluster
    from coffea_hq import executor as hq_executor

    inputs = generate.generate(args.files_per_sample, args.events_per_file, jobs=2)
    fileset = analysis.construct_fileset(inputs)
    outdir = tempfile.mkdtemp(prefix="agc-profile-")
    with LocalCluster(workers=args.workers, slots=1) as cluster, Client(cluster.url) as client:
        executor = HQExecutor(client=client, status=False, keep_files_open=args.keep_files_open)
        runner = processor.Runner(
            executor=executor, schema=NanoAODSchema, chunksize=args.chunksize, savemetrics=True
        )
        runner(fileset, processor_instance=analysis.TtbarAnalysis())  # warm up
        # Unprofiled: coffea's processtime (inside process()) against the chunks' wall
        # time in their slots (HQExecutor's chunk_walltime).
        executor.savemetrics = True
        start = time.perf_counter()
        _, metrics = runner(fileset, processor_instance=analysis.TtbarAnalysis())
        wall = time.perf_counter() - start
        inside, task = float(metrics["processtime"]), float(metrics["chunk_walltime"])
        cpu = float(metrics["chunk_cputime"])
        print(
            f"{metrics['chunks']} chunks in {wall:.1f} s on {args.workers} workers "
            f"(keep_files_open={args.keep_files_open}): chunks ran {task:.1f} s in their "
            f"slots, {inside:.1f} s of it inside process() ({inside / task:.0%}); outside: "
            f"{task - inside:.1f} s ({1 - inside / task:.0%}); "
            f"busy {task / wall / args.workers:.0%}; CPU {cpu:.1f} s, "
            f"{cpu / int(metrics['chunks']) * 1e3:.0f} ms per chunk"
        )
        real_ship = hq_executor.ship_code

        def ship_profiled(function: Any, *rest: Any) -> Any:
            shipped, registered = real_ship(function, *rest)
            return Profiled(shipped, outdir), registered

        hq_executor.ship_code = ship_profiled  # type: ignore[assignment]
        try:
            runner(fileset, processor_instance=analysis.TtbarAnalysis())
        finally:
            hq_executor.ship_code = real_ship
    files = sorted(str(f) for f in Path(outdir).glob("slot-*.prof"))
    stats = pstats.Stats(*files, stream=sys.stdout)
    # (The processor is unpickled for every chunk, so its own functions' entries overwrite
    # each other in a profile: read process() from coffea's metrics above, not here.)
    print("\nprofiled (cProfile inflates Python-heavy code), by cumulative time:")
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
