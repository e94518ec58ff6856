"""Turn the event stream into what a person reads: a live panel on a terminal, plain lines otherwise.

Every string an event carries came from the instance: it goes through client.views.text.shown
and into the panel as rich `Text`, so no escape sequence reaches the terminal and no markup renders.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from client.views.text import shown
from jobs import events as ev


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class Progress:
    """What the events so far say about the job; the view and `status` both read it.

    A job resumed on the same instance appends a new run to the same event file: each run starts
    with its `setup` phase. Elapsed time (and so the spend) adds up the runs, not the gaps between.
    """

    job_id: str
    price_per_hour: float | None = None
    currency: str = "CNY"
    phase: str = "waiting for the worker"
    last: ev.Step | None = None
    total_steps: int = 0
    started: ev.Started | None = None
    done: ev.Done | None = None
    failed: ev.Failed | None = None
    eval_loss: float | None = None
    checkpoint: ev.Checkpoint | None = None  # the newest
    runs: int = 0
    laptop: str = ""  # what the laptop holds: set by auto-fetch and the final fetch
    guard: str = ""  # what the instance's guard does (client.remote.guard.describe)
    _prior_s: float = 0.0  # the runs before this one
    _run_start: float | None = None
    _run_last: float | None = None
    _run_ended: bool = False
    skipped: int = 0  # event lines that were not events (unreadable, unknown, too long)
    problem: str = ""  # why the event file could not be read at all

    def feed(self, line: bytes) -> ev.Event | None:
        """Apply one line of the event file; a line that is not an event is counted, not raised."""
        e = ev.parse_or_none(line)
        if e is None:
            self.skipped += 1
        else:
            self.apply(e)
        return e

    @property
    def warning(self) -> str:
        """What could not be read, for a person (empty when everything could)."""
        notes = [self.problem] if self.problem else []
        if self.skipped:
            n = self.skipped
            notes.append(f"skipped {n} unreadable event line{'s' if n != 1 else ''}")
        return "; ".join(notes)

    def apply(self, e) -> None:
        new_run = (
            self._run_start is None or self._run_ended or (isinstance(e, ev.Phase) and e.phase == "setup")
        )
        if new_run:
            if self._run_start is not None and self._run_last is not None:
                self._prior_s += max(0.0, self._run_last - self._run_start)
            self._run_start, self._run_ended = e.t, False
            self.runs += 1
            if self.runs > 1:  # a resumed run: the outcome of the last one no longer stands
                self.done = self.failed = None
        self._run_last = e.t
        if isinstance(e, ev.Phase):
            self.phase = e.phase + (f": {e.message}" if e.message else "")
        elif isinstance(e, ev.Started):
            self.started, self.total_steps = e, e.total_steps
            self.phase = "training" + (
                f" (resumed at step {e.resumed_from_step})" if e.resumed_from_step else ""
            )
        elif isinstance(e, ev.Step):
            self.last, self.total_steps = e, e.total_steps
        elif isinstance(e, ev.Eval):
            self.eval_loss = e.eval_loss
        elif isinstance(e, ev.Checkpoint):
            self.checkpoint = e
        elif isinstance(e, ev.Done):
            self.done, self.phase, self._run_ended = e, "done", True
            if e.stopped:
                self.phase = f"done early ({e.stopped}): {e.steps}/{e.total_steps or self.total_steps} steps, resumable"
        elif isinstance(e, ev.Failed):
            self.failed, self.phase, self._run_ended = e, "failed", True

    @property
    def eta_s(self) -> float | None:
        s = self.last
        resumed = self.started.resumed_from_step if self.started else 0
        done_here = (s.step - resumed) if s else 0
        if not s or done_here <= 0 or s.elapsed_s <= 0:
            return None
        return s.elapsed_s / done_here * max(0, s.total_steps - s.step)

    def elapsed_s(self, now: float | None = None) -> float | None:
        if self._run_start is None:
            return None
        end = self._run_last if self._run_ended else (now or time.time())
        return max(0.0, self._prior_s + (end or self._run_start) - self._run_start)

    def spend(self, now: float | None = None) -> tuple[float, float] | None:
        """(spent so far, projected total) at `instance.price_per_hour`; None when no price is set."""
        elapsed = self.elapsed_s(now)
        if self.price_per_hour is None or elapsed is None:
            return None
        per_s = self.price_per_hour / 3600
        return elapsed * per_s, (elapsed + (self.eta_s or 0)) * per_s

    def as_dict(self) -> dict:
        s = self.last
        spend = self.spend()
        return {
            "phase": self.phase,
            "step": s.step if s else 0,
            "total_steps": self.total_steps,
            "loss": s.loss if s else None,
            "lr": s.lr if s else None,
            "tokens_per_s": s.tokens_per_s if s else None,
            "peak_mem_gb": s.peak_mem_gb if s else None,
            "elapsed_s": self.elapsed_s(),
            "eta_s": self.eta_s,
            "eval_loss": self.eval_loss,
            "spent": round(spend[0], 4) if spend else None,
            "projected": round(spend[1], 4) if spend else None,
            "currency": self.currency if spend else None,
            "error": self.failed.model_dump() if self.failed else None,
            "adapter": self.done.adapter_path if self.done else None,
            "stopped": self.done.stopped if self.done else None,
            "checkpoint": (
                {"step": self.checkpoint.step, "path": self.checkpoint.path} if self.checkpoint else None
            ),
            "runs": self.runs,
            "laptop": self.laptop or None,
            "guard": self.guard or None,
            "skipped_lines": self.skipped,
            "warning": self.warning or None,
        }


def step_line(e: ev.Step) -> str:
    mem = f"  mem {e.peak_mem_gb:.1f}GB" if e.peak_mem_gb is not None else ""
    return (
        f"step {e.step}/{e.total_steps}  loss {e.loss:.4f}  lr {e.lr:.2e}  "
        f"{e.tokens_per_s:,.0f} tok/s  {fmt_duration(e.elapsed_s)}{mem}"
    )


def event_line(e) -> str | None:
    """One plain line per event (for pipes, logs and CI); the event's strings with their control
    characters escaped (client.views.text). Print it as text, not markup."""
    if isinstance(e, ev.Step):
        return step_line(e)
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
        return (
            f"done: {e.steps} steps in {fmt_duration(e.elapsed_s)}{loss}{early}; adapter at {shown(e.adapter_path)}"
        )
    if isinstance(e, ev.Failed):
        return f"FAILED: {shown(e.error_class)}: {shown(e.message)}" + (
            f"\n  hint: {shown(e.hint)}" if e.hint else ""
        )
    return None


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
            table.add_row("GPU memory", f"{s.peak_mem_gb:.1f} GB peak")
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
    if note:
        table.add_row("", Text(shown(note), style="yellow"))
    return Panel(table, title=escape(f"{p.job_id} [{state}]"), expand=False)
