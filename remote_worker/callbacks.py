"""A TrainerCallback that turns the Trainer's progress into events (jobs.events) in events.jsonl.

It also asks the Trainer for a checkpoint every `save_every_minutes`, stops it cleanly at the
job's deadline, and renames each finished `checkpoint-N` to `step-N` (jobs.layout: a
`step-N` folder is always complete), with a sha256 manifest, keeping the newest few.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from jobs.events import Checkpoint, Eval, EventWriter, Phase, Started, Step
from jobs.manifest import write_manifest

KEEP_CHECKPOINTS = 2
DEADLINE_MARGIN_S = 120  # stop this long before the deadline, to leave time to save


class EventCallback(TrainerCallback):
    def __init__(
        self,
        events: EventWriter,
        started: dict,
        save_every_minutes: float = 0,
        deadline_unix: float | None = None,
    ):
        self.events = events
        self.started = started  # the Started fields the Trainer does not know
        self.save_every_s = save_every_minutes * 60
        self.deadline_unix = deadline_unix
        self.cuda = False
        self.last_loss: float | None = None
        self.stopped_at_deadline = False

    # -- the run --------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.last_save = self.last_t = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen
        self.cuda = args.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.events.emit(Started(total_steps=state.max_steps, **self.started))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # eval metrics and the final summary come here too
            return
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        self.last_loss = float(logs["loss"])
        grad_norm = logs.get("grad_norm")
        self.events.emit(
            Step(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                loss=self.last_loss,
                lr=float(logs.get("learning_rate", 0.0)),
                grad_norm=None if grad_norm is None else float(grad_norm),
                tokens=int(tokens),
                tokens_per_s=(tokens - self.last_tokens) / max(now - self.last_t, 1e-9),
                elapsed_s=now - self.t0,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None,
            )
        )
        self.last_t, self.last_tokens = now, tokens

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if self.save_every_s and now - self.last_save >= self.save_every_s:
            control.should_save = True
        late = self.deadline_unix and time.time() >= self.deadline_unix - DEADLINE_MARGIN_S
        if late and not self.stopped_at_deadline:
            self.stopped_at_deadline = True
            control.should_training_stop = True
            self.events.emit(Phase(phase="training", message=f"deadline reached at step {state.global_step}"))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.events.emit(Eval(step=state.global_step, eval_loss=float(metrics["eval_loss"])))

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        root = Path(args.output_dir)
        written = root / f"checkpoint-{state.global_step}"
        if not written.is_dir():
            return
        final = root / f"step-{state.global_step}"
        shutil.rmtree(final, ignore_errors=True)
        sha = write_manifest(written)
        written.rename(final)  # a step-N folder exists only once it is complete
        self.events.emit(Checkpoint(step=state.global_step, path=str(final), adapter_sha256=sha))
        old = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-KEEP_CHECKPOINTS]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
