"""A slot process sends its results whole, even when a task's signal handler interrupts
the write (worker/pipe.py's write_blocking): a raw pipe write interrupted after part of a
large message returns the part, and the rest used to be dropped, which broke the framing
of every message after it."""

from __future__ import annotations

import signal
import sys

import cloudpickle
import pytest

from coffea_hq import Client, protocol

from .conftest import Processes
from .util import get_json

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIZE = 24 * 1024 * 1024


def big_result_under_a_timer(i: int) -> bytes:
    """A task that leaves a fast interval timer running (as a library's timeout might)
    and returns a result far larger than the pipe's buffer."""
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    return bytes([i]) * SIZE


# Spawned slot processes showed the lost bytes (the old code hung there); forked ones
# must send whole messages as well.
@pytest.mark.parametrize("how", [[], ["--no-zygote"]], ids=["forked", "spawned"])
def test_results_arrive_whole_when_a_signal_interrupts_the_write(
    server_url: str, processes: Processes, how: list[str]
) -> None:
    processes.worker(server_url, "--slots", "1", *how)
    before = get_json(server_url + protocol.QUEUE)["counters"]
    with Client(server_url) as client:
        results = client.map(big_result_under_a_timer, range(3)).result(timeout=60)
    assert [len(r) for r in results] == [SIZE] * 3
    assert [r[:1] + r[-1:] for r in results] == [bytes([i, i]) for i in range(3)]
    after = get_json(server_url + protocol.QUEUE)["counters"]
    for counter in ("requeued", "refused", "duplicates"):  # no slot process was lost
        assert after.get(counter, 0) == before.get(counter, 0), (counter, before, after)
