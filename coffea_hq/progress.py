"""The progress display of a run: coffea's look, plus a status line for what goes wrong.

Columns as coffea's ``rich_bar`` (description, percent, bar, done/total, elapsed <
remaining, speed), but the numbers and times never wrap or lose digits: in a narrow
terminal (80 columns) the bar and then the description give way. Under the bars a status
line says what the bars cannot: tasks retried after their worker died or hung, tasks
that crashed their subprocess, and "waiting for a worker" while nobody takes the work.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

__all__ = ["RunProgress", "status_text"]


def _fixed(justify: Any = "left") -> Column:
    return Column(no_wrap=True, overflow="ignore", justify=justify)


class _Speed(ProgressColumn):
    """Items per second, with the task's ``unit``."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "items")
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{speed:.1f}"
        return Text(f"{shown} {unit}/s", style="progress.data.speed")


class RunProgress(Progress):
    """coffea's progress bars that keep their numbers whole, with :attr:`status` below."""

    def __init__(self, console: Console | None = None, **kwargs: Any) -> None:
        self.status = ""  # read by the first render, inside Progress.__init__
        super().__init__(
            TextColumn(
                "[bold blue]{task.description}",
                justify="right",
                table_column=Column(no_wrap=True, overflow="ellipsis"),
            ),
            TextColumn("[progress.percentage]{task.percentage:>3.0f}%", table_column=_fixed()),
            BarColumn(bar_width=None, table_column=Column(ratio=1)),
            TextColumn(
                "[bold blue][progress.completed]{task.completed}/{task.total}",
                justify="right",
                table_column=_fixed("right"),
            ),
            TextColumn("[", table_column=_fixed()),
            TimeElapsedColumn(table_column=_fixed()),
            TextColumn("<", table_column=_fixed()),
            TimeRemainingColumn(table_column=_fixed()),
            TextColumn("|", table_column=_fixed()),
            _Speed(table_column=_fixed()),
            TextColumn("]", table_column=_fixed()),
            auto_refresh=False,
            console=console,
            **kwargs,
        )

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.status:
            line = Table.grid()
            line.add_column(no_wrap=True, overflow="ellipsis")
            line.add_row(Text(self.status, style="yellow"))
            yield line


def status_text(*, retried: int = 0, crashed: int = 0, waiting: bool = False) -> str:
    """The status line: what went wrong so far, and whether the work waits for a worker."""
    said = []
    if waiting:
        said.append("waiting for a worker")
    if crashed:
        said.append(f"{crashed} crashed")
    if retried:
        said.append(f"{retried} retried (worker crashed, died or hung)")
    return " · ".join(said)
