"""`autodl-run doctor`: the report as a table of checks, each failure with its fix.

The details quote the instance (its OS name, paths, versions, GPU names): shown as data, their
control characters escaped (client.views.text), never as markup."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.instances.doctor import DoctorReport
from client.views.text import print_table, shown

_MARKS = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]", "info": "[dim]–[/]"}


def _safe(text: str) -> str:
    return escape(shown(text))


def render(report: DoctorReport, console: Console) -> None:
    table = Table(title=_safe(f"{report.target} ({report.where})"), title_justify="left", show_lines=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("found")
    table.add_column("fix")
    for c in report.checks:
        table.add_row(_MARKS[c.status], _safe(c.name), _safe(c.detail), _safe(c.hint))
    print_table(console, table)
    fails = len(report.failed)
    if fails:
        console.print(f"[red]{fails} problem{'s' if fails > 1 else ''}[/]: see the fix column")
    else:
        console.print("[green]ready to train[/]")
