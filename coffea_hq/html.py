"""HTML summaries for Jupyter (``_repr_html_``): a LocalCluster, a Client, a Job.

Each asks the server once, briefly (:data:`ASK_FOR` seconds at most: a notebook cell must
not hang on a server that is gone), and says so when it cannot.
"""

from __future__ import annotations

import asyncio
from html import escape
from typing import TYPE_CHECKING, Any

import msgspec

from . import protocol

if TYPE_CHECKING:
    from .client import Client, Job
    from .local import LocalCluster

__all__ = ["ASK_FOR", "client_html", "cluster_html", "job_html"]

ASK_FOR = 2.0  # seconds a summary waits for the server

_STYLE = "border-collapse:collapse;text-align:left"
_CELL = "padding:1px 8px"


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    """``rows`` of (label, cell HTML, already escaped) under a bold ``title``."""
    body = "".join(
        f'<tr><th style="{_CELL}">{escape(k)}</th><td style="{_CELL}">{v}</td></tr>'
        for k, v in rows
    )
    return f'<div><strong>{escape(title)}</strong><table style="{_STYLE}">{body}</table></div>'


def _link(url: str) -> str:
    return f'<a href="{escape(url, quote=True)}" target="_blank">{escape(url)}</a>'


def _bar(done: int, total: int) -> str:
    share = done / total if total else 1.0
    percent = f"{100 * share:.0f}%"
    return (
        f'<progress value="{done}" max="{max(total, 1)}" style="width:12em"></progress> '
        f"{done}/{total} ({percent})"
    )


def _ask(client: Client) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """The server's queue and workers, or why not (within ASK_FOR seconds)."""

    async def both() -> tuple[Any, Any]:
        return await asyncio.gather(client.api.queue(), client.api.workers())

    try:
        queue, workers = client.run(asyncio.wait_for(both(), ASK_FOR))
    except TimeoutError:
        return f"the server does not answer (within {ASK_FOR:g} s)"
    except Exception as e:  # a summary shows what it can, whatever went wrong
        return f"the server does not answer ({type(e).__name__}: {e})"[:300]
    return msgspec.to_builtins(queue), msgspec.to_builtins(workers)


def _server_rows(client: Client) -> list[tuple[str, str]]:
    rows = [
        ("server", _link(client.url)),
        ("dashboard", _link(client.url.rstrip("/") + protocol.DASHBOARD)),
        ("metrics", _link(client.url + protocol.METRICS)),
    ]
    got = _ask(client)
    if isinstance(got, str):
        return [*rows, ("state", escape(got))]
    queue, workers = got
    slots = sum(int(w.get("slots", 0)) for w in workers.values())
    busy = sum(int((w.get("stats") or {}).get("busy_slots") or 0) for w in workers.values())
    counters = queue.get("counters", {})
    return [
        *rows,
        ("workers", f"{len(workers)} ({busy}/{slots} slots busy)"),
        ("queue", f"{queue['queued']} queued, {queue['running']} running, {queue['jobs']} jobs"),
        ("tasks", f"{counters.get('tasks_ok', 0)} ok, {counters.get('tasks_failed', 0)} failed"),
    ]


def client_html(client: Client) -> str:
    """A Client: its server, the workers and the queue."""
    return _table("coffea-hq Client", _server_rows(client))


def cluster_html(cluster: LocalCluster) -> str:
    """A LocalCluster: its server, the workers it runs and the queue."""
    from .client import Client

    started = [("started", f"{len(cluster.workers)} worker(s) × {cluster.slots} slot(s)")]
    try:
        with Client(cluster.url, retry_for=ASK_FOR) as client:
            rows = _server_rows(client)
    except Exception as e:  # (a cluster not started, or stopped)
        rows = [("server", escape(f"{cluster.url or '-'}: {type(e).__name__}: {e}"[:300]))]
    return _table("coffea-hq LocalCluster", rows[:1] + started + rows[1:])


def job_html(job: Job) -> str:
    """A Job: its id, state and progress (the server's, else what this client received)."""
    rows = [("job", escape(job.id)), ("server", _link(job.client.url))]
    try:
        summary = msgspec.to_builtins(
            job.client.run(asyncio.wait_for(job.client.api.get_job(job.id), ASK_FOR))
        )
    except Exception:  # finished and collected (deleted), or the server is gone
        summary = None
    if summary is not None:
        total = summary["total"] if summary["total"] is not None else summary["submitted"]
        finished = int(summary["done"]) + int(summary["failed"])
        rows += [
            ("state", escape(str(summary["state"]))),
            ("progress", _bar(finished, total)),
            ("failed", str(summary["failed"])),
            ("requeued", str(summary.get("requeued", 0))),
        ]
        if summary.get("label"):
            rows.insert(1, ("label", escape(summary["label"])))
        if summary.get("reason"):
            rows.append(("reason", escape(summary["reason"])))
    else:
        received = job.received
        rows += [
            ("state", "collected" if received == len(job) else "unknown (not on the server)"),
            ("progress", _bar(received, len(job))),
        ]
    return _table("coffea-hq Job", rows)
