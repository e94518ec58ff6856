"""The laptop's long steps (client.activity) for a person: a live bar in a terminal, one line each when piped.

In a terminal each activity is a row of a rich Progress (what, bar, count and rate, the latest note)
while it runs, and leaves its summary line when it ends. Piped (a log file, CI), nothing is drawn
while it runs and the summary line is the only output: one line per activity. Text that came from
the instance (pip's lines) goes through client.views.text.shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from client import activity
from client.activity import Activity
from client.views.text import shown


def _amount(n: float, unit: str) -> str:
    if unit == "bytes":
        for limit, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if n >= limit:
                return f"{n / limit:.1f} {suffix}"
        return f"{n:.0f} B"
    return f"{n:,.0f} {unit}".rstrip()


def _rate(a: Activity) -> float | None:
    if a.rate is not None:
        return a.rate
    return a.done / a.seconds if a.seconds > 0 and a.unit else None


def counts(a: Activity) -> str:
    """`1.2 GB of 3.4 GB, 40.1 MB/s` / `12,000 rows, 30,000 rows/s` / `` (no unit)."""
    if not a.unit:
        return ""
    text = _amount(a.done, a.unit) + (f" of {_amount(a.total, a.unit)}" if a.total else "")
    rate = _rate(a)
    return text + (f", {_amount(rate, a.unit)}/s" if rate else "")


def summary(a: Activity) -> str:
    """The line an activity leaves when it ends."""
    how = "done" if a.ok else "stopped"
    what = f"{a.what}: {how} in {a.seconds:.1f}s"
    if a.unit and a.ok:
        rate = _rate(a)
        what = f"{a.what}: {_amount(a.done, a.unit)} in {a.seconds:.1f}s" + (
            f" ({_amount(rate, a.unit)}/s)" if rate else ""
        )
    return what


class ProgressView:
    """The sink client.activity reports to (see the module docstring)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[int, TaskID] = {}

    def __call__(self, a: Activity) -> None:
        if a.kind == "end":
            self._end(a)
        elif self.live:
            self._draw(a)

    def _draw(self, a: Activity) -> None:
        if self.progress is None:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                console=self.console, transient=True,
            )  # fmt: skip
            self.progress.start()
        tally, note = counts(a), shown(a.note)[:60]
        if a.id not in self.tasks:
            self.tasks[a.id] = self.progress.add_task(shown(a.what), total=a.total or None, counts=tally, note=note)
        self.progress.update(self.tasks[a.id], completed=a.done, total=a.total or None, counts=tally, note=note)

    def _end(self, a: Activity) -> None:
        task = self.tasks.pop(a.id, None)
        if self.progress is not None and task is not None:
            self.progress.remove_task(task)
            if not self.tasks:
                self.close()
        line = Text(shown(summary(a)))
        line.stylize("dim")
        self.console.print(Text("  ") + line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.tasks.clear()


@contextmanager
def showing(console: Console) -> Iterator[ProgressView]:
    """Show the activities of this context on `console` (the CLI wraps its long commands in it)."""
    view = ProgressView(console)
    try:
        with activity.reporting(view):
            yield view
    finally:
        view.close()
