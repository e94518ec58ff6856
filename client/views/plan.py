"""`autodl-run plan` for a person: one row a card (memory, shape, speed, time, CNY, fits), then the verdict."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.plan import Plan


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m = int(round(seconds / 60))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


def render(plan: Plan, console: Console) -> None:
    a, s, t = plan.arch, plan.setup, plan.tokens
    console.print(
        f"{escape(plan.model)}: {a.params / 1e9:.2f} B parameters, {a.layers} layers "
        f"(config from {escape(plan.config_from)}); {'nf4' if s.bits == 4 else '16-bit'}, LoRA r={s.r}; "
        f"{t.total:,} training tokens ({t.source}), "
        + (f"{t.max_steps:,} steps" if t.max_steps else f"{t.epochs:g} epochs")
    )
    table = Table(show_edge=False, pad_edge=False)
    for col, just in (("card", "left"), ("GB", "right"), ("tokens, ckpt", "left"), ("peak", "right"),
                      ("fits", "left"), ("tok/s", "right"), ("train", "right"), ("total", "right"),
                      ("CNY", "right")):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    best = plan.cheapest
    for r in plan.rows:
        name = r.card.name + (f" x{r.gpus} {r.parallel}" if r.gpus > 1 else "")
        fits = "[green]yes[/]" if r.fits else "[red]no[/]"
        if r.fits and r.meets_deadline is False:
            fits = "[yellow]yes, late[/]"
        cny = "?" if r.cny is None else f"{r.cny:,.1f}"
        table.add_row(
            ("[bold]" if r is best else "") + escape(name) + ("[/]" if r is best else ""),
            f"{r.card.memory_gb:g}",
            f"{r.shape.micro_batch_tokens:,}, {r.shape.checkpointed}/{a.layers}",
            f"{r.estimate.peak / 1e9:.1f}", fits,
            f"{r.tokens_per_s:,.0f}" if r.fits else "-",
            duration(r.train_s) if r.fits else "-",
            duration(r.total_s) if r.fits else "-",
            cny if r.fits else "-",
        )
    console.print(table)
    console.print("[dim]GB: the card's memory; tokens, ckpt: the micro-batch and checkpointed layers the "
                  "calibration is predicted to choose; peak: predicted GB; train: training alone[/]")
    o = plan.overhead_s
    console.print(
        f"time and CNY include set-up {duration(o['setup'])}, model download {duration(o['download'])}, "
        f"loading {duration(o['load'])}, calibration {duration(o['calibrate'])} and the guard's idle grace "
        f"{duration(o['idle_grace'])} (the worst case: a fetch acknowledged sooner stops billing sooner)"
    )
    if best is not None:
        console.print(f"[green]cheapest that fits[/]: {escape(best.card.name)}, {duration(best.total_s)}, "
                      f"{best.cny:,.1f} CNY")
    elif plan.any_fits:
        console.print("[yellow]a card fits, but none both has a price and meets the deadline[/]")
    else:
        console.print("[red]no card fits[/]. Change: " + escape("; or ".join(plan.advice)))
    for note in plan.notes:
        console.print(f"[dim]note: {escape(note)}[/]")
