"""The smallest coffea-hq demo: a toy Monte Carlo spread over a local cluster.

    python examples/quickstart.py

Starts an embedded Valkey, an hq-server and two hq-workers on this machine, fills a
histogram of a Breit-Wigner "Z peak" in 2,000 chunks, and prints what it measured.
"""

from __future__ import annotations

import math
import random
import time

from coffea_hq import Client, LocalCluster

BINS = 40
LOW, HIGH = 70.0, 110.0


def chunk(seed: int, events: int = 2_000) -> list[int]:
    """One work item: a histogram of `events` invariant masses near the Z pole."""
    rng = random.Random(seed)
    counts = [0] * BINS
    for _ in range(events):
        # Breit-Wigner (Cauchy) line shape, smeared by a 2 GeV detector resolution.
        mass = 91.19 + 2.495 / 2 * math.tan(math.pi * (rng.random() - 0.5)) + rng.gauss(0, 2.0)
        if LOW <= mass < HIGH:
            counts[int((mass - LOW) / (HIGH - LOW) * BINS)] += 1
    return counts


def main() -> None:
    n_chunks = 2_000
    with LocalCluster(workers=2) as cluster, Client(cluster.url) as client:
        print(f"cluster up at {cluster.url}")
        start = time.perf_counter()
        total = [0] * BINS
        for _, counts in client.map(chunk, range(n_chunks)).as_completed():
            total = [a + b for a, b in zip(total, counts, strict=True)]
        elapsed = time.perf_counter() - start
    peak = max(range(BINS), key=total.__getitem__)
    print(
        f"{n_chunks} chunks, {sum(total):,} events in the window, {elapsed:.2f} s "
        f"({n_chunks / elapsed:,.0f} chunks/s)"
    )
    edge = LOW + peak * (HIGH - LOW) / BINS
    print(f"peak bin: {edge:.0f}-{edge + (HIGH - LOW) / BINS:.0f} GeV")
    width = max(total)
    for i in range(0, BINS, 2):
        print(f"{LOW + i * (HIGH - LOW) / BINS:6.1f} {'#' * (60 * total[i] // width)}")


if __name__ == "__main__":
    main()
