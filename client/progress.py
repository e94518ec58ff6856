"""The fold of a job's events into where it stands: step, loss, ETA, elapsed time, spend.

A domain object, no rendering: the live panel and `status` (client.views) read it. The strings it
keeps came from the instance; they are sanitised where they are shown, not here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jobs import events as ev

WARNINGS_KEPT = 3  # the panel shows the latest few; the whole list is in events.jsonl


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
    warnings: list[ev.Warn] = field(default_factory=list)  # the latest WARNINGS_KEPT, oldest first

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

    def apply(self, e: ev.Event) -> None:
        # Several `failed` in a row are one run's end: the ranks' own, then torchrun's (which rank died)
        same_end = isinstance(e, ev.Failed) and self.failed is not None and self._run_ended
        new_run = not same_end and (
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
        elif isinstance(e, ev.Warn):
            self.warnings = [*self.warnings, e][-WARNINGS_KEPT:]

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
            "rank_peak_mem_gb": s.rank_peak_mem_gb if s else None,  # each rank's, with several GPUs
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
            "warnings": [{"source": w.source, "message": w.message} for w in self.warnings],
        }
