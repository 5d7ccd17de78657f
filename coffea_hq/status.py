"""``coffea-hq status``: the queue, its workers and its jobs in a terminal (rich).

Everything comes from the server's JSON routes (``GET QUEUE``, ``GET WORKERS``,
``GET JOBS``; admin routes under ``hq-server --auth``), so it shows what every replica
shows. Tasks per second are measured between two heartbeats of a worker seen by two
refreshes (``--watch``); a single look shows each worker's average over its life.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .client import Client

__all__ = ["Snapshot", "render", "snapshot", "watch"]


@dataclass(frozen=True)
class Snapshot:
    """One look at a server: its queue, live workers and unfinished jobs."""

    url: str
    taken: float  # time.monotonic()
    health: dict[str, Any]
    queue: dict[str, Any]
    workers: dict[str, Any]
    jobs: list[dict[str, Any]]


def snapshot(client: Client) -> Snapshot:
    """Read the server's queue, workers and jobs (four requests)."""
    return Snapshot(
        client.url,
        time.monotonic(),
        client.health(),
        client.queue(),
        msgspec.to_builtins(client.workers()),  # (WorkerInfo structs)
        client.jobs(),
    )


def size(n: float) -> str:
    """Bytes for people: 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # (not reached)


def _finished(stats: dict[str, Any]) -> int:
    return int(stats.get("done", 0)) + int(stats.get("failed", 0))


def _rate(worker: str, info: dict[str, Any], before: Snapshot | None) -> float:
    """Tasks per second between the worker's heartbeat in ``before`` and its latest one
    (else its average over its life): heartbeats are what carry its counts."""
    stats = info.get("stats") or {}
    then = before.workers.get(worker) if before is not None else None
    if then is not None and float(info.get("seen", 0)) > float(then.get("seen", 0)):
        done = _finished(stats) - _finished(then.get("stats") or {})
        return max(0, done) / (float(info["seen"]) - float(then["seen"]))
    uptime = float(stats.get("uptime") or 0)
    return _finished(stats) / uptime if uptime > 0 else 0.0


def _queue_line(s: Snapshot) -> Text:
    q, c = s.queue, s.queue.get("counters", {})
    text = Text()
    text.append(f"{s.url}", style="bold")
    text.append(f"  v{s.health.get('version', '?')}  store {s.health.get('store', '?')}\n")
    text.append(f"queued {q['queued']}  running {q['running']}  ", style="bold")
    text.append(f"jobs {q['jobs']}  workers {q['workers']}\n")
    text.append(
        f"tasks ok {c.get('tasks_ok', 0)}  failed {c.get('tasks_failed', 0)}  "
        f"requeued {c.get('requeued', 0)}  merges {c.get('merges_ok', 0)}"
    )
    return text


def _workers_table(now: Snapshot, before: Snapshot | None) -> Table:
    table = Table(title="workers", title_justify="left", expand=True, pad_edge=False)
    for name, justify in [
        ("worker", "left"),
        ("host", "left"),
        ("busy", "right"),
        ("RSS", "right"),
        ("tasks/s", "right"),
        ("done", "right"),
        ("failed", "right"),
    ]:
        table.add_column(name, justify=justify, no_wrap=name != "host", overflow="ellipsis")  # type: ignore[arg-type]
    for worker, info in sorted(now.workers.items()):
        stats = info.get("stats") or {}
        rss = sum(b for b in stats.get("slot_rss_bytes") or [] if isinstance(b, int | float))
        table.add_row(
            worker,
            str(info.get("host", "")),
            f"{int(stats.get('busy_slots') or 0)}/{info.get('slots', 0)}",
            size(rss),
            f"{_rate(worker, info, before):.2f}",
            str(stats.get("done", 0)),
            str(stats.get("failed", 0)),
        )
    if not now.workers:
        table.add_row("(none)", "", "", "", "", "", "")
    return table


def _jobs_table(s: Snapshot) -> Table:
    table = Table(title="jobs", title_justify="left", expand=True, pad_edge=False)
    table.add_column("job", no_wrap=True, overflow="ellipsis", max_width=22)
    table.add_column("label", overflow="ellipsis", max_width=12)
    table.add_column("progress", min_width=10, ratio=1)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("failed", justify="right")
    table.add_column("requeued", justify="right")
    for job in s.jobs:
        total = job.get("total")
        of = total if total is not None else job.get("submitted", 0)
        done = int(job.get("done", 0)) + int(job.get("failed", 0))
        table.add_row(
            job["job"],
            job.get("label", ""),
            ProgressBar(total=max(of, 1), completed=min(done, max(of, 1))),
            f"{done}/{of}{'' if total is not None else '+'}",
            str(job.get("failed", 0)),
            str(job.get("requeued", 0)),
        )
    if not s.jobs:
        table.add_row("(no unfinished jobs)", "", "", "", "", "")
    return table


def render(now: Snapshot, before: Snapshot | None = None) -> RenderableType:
    """The whole picture of ``now`` (rates against ``before``, if given)."""
    return Group(_queue_line(now), _workers_table(now, before), _jobs_table(now))


def watch(
    client: Client,
    console: Console | None = None,
    every: float = 1.0,
    refreshes: int | None = None,
) -> None:
    """Redraw the picture every ``every`` seconds until Ctrl-C (or ``refreshes`` times)."""
    before = snapshot(client)
    with Live(render(before), console=console, auto_refresh=False) as live:
        n = 1
        while refreshes is None or n < refreshes:
            time.sleep(every)
            now = snapshot(client)
            live.update(render(now, before), refresh=True)
            before, n = now, n + 1
