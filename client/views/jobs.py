"""The job verbs' results for a person: submit, status, ls, fetch, cancel, recover.

What the instance wrote (phase, errors, paths there, the guard's line) goes through
client.views.text.shown and rich's escape: no control character reaches the terminal, no markup renders.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from client.ledger import JobRecord
from client.views.render import fmt_duration
from client.views.text import print_table, shown

if TYPE_CHECKING:
    from client.lifecycle.fetch import Fetched
    from client.lifecycle.pipeline import StepResult


def _safe(text: object) -> str:
    return escape(shown(text))


def job_id(job: str, console: Console) -> None:
    console.print(f"[bold]{escape(job)}[/]")


def done(job: str, where: str, console: Console) -> None:
    console.print(f"[green]✓[/] {escape(job)} done; {_safe(where)}")


def status(info: dict[str, Any], console: Console) -> None:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("job", escape(info["id"]))
    t.add_row("instance", escape(info["instance"]))
    t.add_row("state", escape(info["state"]))
    t.add_row("phase", _safe(info["phase"]))
    if info["total_steps"]:
        t.add_row("step", f"{info['step']}/{info['total_steps']}")
    if info["loss"] is not None:
        t.add_row("loss", f"{info['loss']:.4f}")
    if info["tokens_per_s"]:
        t.add_row("tokens/s", f"{info['tokens_per_s']:,.0f}")
    t.add_row("elapsed", fmt_duration(info["elapsed_s"]))
    if info["state"] == "running":
        t.add_row("ETA", fmt_duration(info["eta_s"]))
    if info["spent"] is not None:
        t.add_row("spend", f"{info['spent']:.2f} {info['currency']} (projected {info['projected']:.2f})")
    if info["error"]:
        t.add_row("error", _safe(f"{info['error']['error_class']}: {info['error']['message']}"))
    if info.get("checkpoint"):
        t.add_row("checkpoint", _safe(f"step {info['checkpoint']['step']}: {info['checkpoint']['path']}"))
    if info["fetched_to"]:
        t.add_row("fetched to", escape(info["fetched_to"]))
    if info.get("guard"):
        t.add_row("guard", _safe(info["guard"]))
    if info.get("warning"):
        t.add_row("warning", _safe(info["warning"]))
    if info.get("report"):
        t.add_row("report", escape(info["report"]) + " (from the laptop's record: the instance was not asked)")
    print_table(console, t)


def jobs(records: Sequence[JobRecord], console: Console) -> None:
    if not records:
        console.print("no jobs yet; submit one with `autodl-run submit job.toml`")
        return
    t = Table("instance", "state", Column("submitted", no_wrap=True), "fetched")
    # The id is what people copy into the next command: never cut it short.
    t.columns.insert(
        0, Column("job", no_wrap=True, overflow="fold", min_width=max(len(r.id) for r in records))
    )
    for r in records:
        t.add_row(
            escape(r.id), escape(r.spec.instance.describe()), escape(r.state),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.submitted_at)), "yes" if r.fetched_to else "",
        )  # fmt: skip
    print_table(console, t)


def fetched(result: Fetched, load_snippet: str, console: Console) -> None:
    """`load_snippet`: how to load the adapter (client.lifecycle.fetch.LOAD_SNIPPET, filled in)."""
    if result.checkpoint:
        c = result.checkpoint
        console.print(f"[green]✓[/] checkpoint step-{c.step} verified, whole → {escape(str(c.path))}")
    if result.adapter:
        digest, dest = result.manifest_sha256 or "", str(result.adapter)
        console.print(
            f"[green]✓[/] adapter verified (manifest sha256 {escape(digest[:16])}…) → {escape(dest)}"
        )
        load_with(load_snippet, console)
    if result.report:
        console.print(f"[green]✓[/] record and run report → {escape(str(result.report))}")
    elif result.record:
        console.print(f"record → {escape(str(result.record))}")


def load_with(load_snippet: str, console: Console) -> None:
    console.print("Load it with:")
    console.print(escape(load_snippet))


def cancelled(job: str, state: str, console: Console) -> None:
    if state == "cancelled":
        console.print(f"cancelled {escape(job)}")
    else:
        console.print(f"{escape(job)} ended as {escape(state)} before it could be cancelled")


def nodes_cancelled(job: str, nodes: list, console: Console, err_console: Console) -> None:
    """A multi-node job's other nodes (client.lifecycle.cancel.NodeCancel): one line each; one not
    reached goes to stderr with what to do."""
    for node in nodes:
        if node.error is None:
            console.print(escape(node.describe()))
            continue
        err_console.print(f"[yellow]warning:[/] {escape(node.describe())}")
        hint = node.error.hint or "check that it is up and that `ssh` reaches it"
        err_console.print(f"  hint: {escape(hint)}, then `autodl-run cancel {escape(job)}` again (its ranks also "
                          "stop when node 0's do, or at the gloo/NCCL timeout when they cannot tell)")


def recovered(result: dict[str, Any], console: Console, err_console: Console) -> None:
    for job in result["added"]:
        console.print(f"[green]✓[/] added {escape(job)}")
    for why in result["skipped"]:
        err_console.print(f"[yellow]skipped[/] {_safe(why)}")
    console.print(f"{len(result['added'])} job(s) added, {len(result['known'])} known already, "
                  f"{len(result['skipped'])} skipped")  # fmt: skip


def ledger_repaired(aside: Path | None, kept: int, console: Console) -> None:
    if aside is None:
        console.print("there was no ledger: started a fresh one")
        return
    console.print(f"moved the damaged ledger to {escape(str(aside))}; the fresh one keeps {kept} job(s)")
    console.print("add back the jobs each instance knows: autodl-run recover JOB.toml")


def step(result: StepResult, console: Console) -> None:
    """A finished lifecycle step (client.lifecycle.pipeline.StepResult): ✓ name, seconds, its detail."""
    console.print(f"[green]✓[/] {escape(result.name):<8} {result.seconds:6.2f}s")
    if result.detail:
        console.print(f"  {escape(shown(result.detail))}")


def removed(result: dict[str, Any], console: Console) -> None:
    for folder in result["folders"]:
        console.print(f"deleted {escape(folder)}")
    for job in result["removed"]:
        console.print(f"[green]✓[/] removed {escape(job)}")
