"""Turn the event stream into what a person reads: a live panel on a terminal, plain lines otherwise.

Every string an event carries came from the instance: it goes through client.views.text.shown
and into the panel as rich `Text`, so no escape sequence reaches the terminal and no markup renders.
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from client.progress import Progress  # re-exported: client.lifecycle.tail reads it from here
from client.views.text import shown
from jobs import events as ev


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def step_line(e: ev.Step, p: Progress | None = None) -> str:
    """With the job's Progress (fed up to `e`), the elapsed time is the job's (Progress.elapsed_s, what
    `status` and the panel show) and the ETA follows; without, the worker's own training time."""
    mem = f"  mem {e.peak_mem_gb:.1f}GB" if e.peak_mem_gb is not None else ""
    if mem and e.rank_peak_mem_gb and len(e.rank_peak_mem_gb) > 1:  # several GPUs: each rank's peak
        mem += f" (ranks {'/'.join(f'{g:.1f}' for g in e.rank_peak_mem_gb)})"
    when = fmt_duration(e.elapsed_s)
    if p is not None:
        when = f"elapsed {fmt_duration(p.elapsed_s(e.t))}  ETA {fmt_duration(p.eta_s)}"
    return f"step {e.step}/{e.total_steps}  loss {e.loss:.4f}  lr {e.lr:.2e}  {e.tokens_per_s:,.0f} tok/s  {when}{mem}"


def event_line(e, p: Progress | None = None) -> str | None:
    """One plain line per event (for pipes, logs and CI); the event's strings with their control
    characters escaped (client.views.text). Print it as text, not markup. `p`: the job's Progress, fed
    up to `e`, for the job's elapsed time and ETA."""
    if isinstance(e, ev.Step):
        return step_line(e, p)
    if isinstance(e, ev.Phase):
        return f"[{shown(e.phase)}] {shown(e.message)}".rstrip()
    if isinstance(e, ev.Started):
        return (
            f"started: {e.total_steps} steps on {shown(e.device)} ({shown(e.dtype)}, {shown(e.quant)}, "
            f"attention {shown(e.attention)}), "
            f"{e.trainable_params:,} trainable of {e.total_params:,} params, "
            f"{e.train_sequences:,} sequences / {e.train_tokens:,} tokens, "
            f"micro-batch {e.micro_batch_tokens} tokens x {e.grad_accum}, "
            f"checkpointing {'on' if e.gradient_checkpointing else 'off'}"
            + (f", on {e.world_size} processes ({shown(e.distributed)}): {e.world_size * e.grad_accum} micro-batches "
               "a step" if e.world_size > 1 else "")  # fmt: skip
            + (f", resumed at step {e.resumed_from_step}" if e.resumed_from_step else "")
        )
    if isinstance(e, ev.Eval):
        return f"eval at step {e.step}: loss {e.eval_loss:.4f}"
    if isinstance(e, ev.Checkpoint):
        why = f" ({shown(e.reason)})" if e.reason and e.reason not in ("steps", "timer") else ""
        size = f", {e.bytes / 2**20:.1f} MiB in {e.save_s:.1f}s" if e.bytes else ""
        return f"checkpoint at step {e.step}{why}: {shown(e.path)}{size}"
    if isinstance(e, ev.Done):
        loss = f", final loss {e.final_loss:.4f}" if e.final_loss is not None else ""
        early = (
            f" (stopped early: {shown(e.stopped)}, {e.steps} of {e.total_steps} steps; resumable)"
            if e.stopped
            else ""
        )
        took = fmt_duration(p.elapsed_s(e.t) if p is not None else e.elapsed_s)
        return f"done: {e.steps} steps in {took}{loss}{early}; adapter at {shown(e.adapter_path)}"
    if isinstance(e, ev.Warn):
        return warn_line(e)
    if isinstance(e, ev.Failed):
        return f"FAILED: {shown(e.error_class)}: {shown(e.message)}" + (
            f"\n  hint: {shown(e.hint)}" if e.hint else ""
        )
    return None


SOURCE_CHARS = 40
WARN_CHARS = 300  # a warning's message in the panel; the whole of it is in the event line and the record


def warn_line(e: ev.Warn, limit: int | None = None) -> str:
    """`warning (swanlab): ...`: the worker's text escaped (client.views.text), cut to `limit` characters."""
    text, source = shown(e.message), shown(e.source)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    if limit is not None and len(source) > SOURCE_CHARS:  # the instance names it: bounded like the message
        source = source[: SOURCE_CHARS - 1] + "…"
    return f"warning ({source or 'worker'}): {text}"


def panel(p: Progress, state: str, note: str = "", now: float | None = None) -> Panel:
    s = p.last
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("phase", Text(shown(p.phase)))
    if p.total_steps:
        step = s.step if s else 0
        bar = ProgressBar(total=p.total_steps, completed=step, width=40)
        table.add_row("step", Group(Text(f"{step}/{p.total_steps}"), bar))
    if s:
        table.add_row(
            "loss", f"{s.loss:.4f}" + (f"   eval {p.eval_loss:.4f}" if p.eval_loss is not None else "")
        )
        table.add_row("lr", f"{s.lr:.2e}")
        table.add_row("tokens/s", f"{s.tokens_per_s:,.0f}")
        if s.peak_mem_gb is not None:
            ranks = s.rank_peak_mem_gb if s.rank_peak_mem_gb and len(s.rank_peak_mem_gb) > 1 else None
            each = f" (ranks {', '.join(f'{g:.1f}' for g in ranks)} GB)" if ranks else ""
            table.add_row("GPU memory", f"{s.peak_mem_gb:.1f} GB peak{each}")
    table.add_row("elapsed", fmt_duration(p.elapsed_s(now)))
    table.add_row("ETA", fmt_duration(p.eta_s))
    spend = p.spend(now)
    if spend:
        table.add_row("spend", f"{spend[0]:.2f} {p.currency} so far, ~{spend[1]:.2f} {p.currency} projected")
    if p.checkpoint:
        table.add_row("checkpoint", f"step {p.checkpoint.step}")
    if p.laptop:
        table.add_row("on the laptop", Text(shown(p.laptop)))
    if p.guard:
        table.add_row("guard", Text(shown(p.guard)))
    if p.failed:
        table.add_row("error", Text(shown(f"{p.failed.error_class}: {p.failed.message}"), style="red"))
        if p.failed.hint:
            table.add_row("hint", Text(shown(p.failed.hint)))
    if p.warning:
        table.add_row("warning", Text(shown(p.warning), style="yellow"))
    for w in p.warnings:
        table.add_row("warned", Text(warn_line(w, WARN_CHARS), style="yellow"))
    if note:
        table.add_row("", Text(shown(note), style="yellow"))
    return Panel(table, title=escape(f"{p.job_id} [{state}]"), expand=False)
