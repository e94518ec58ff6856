"""A TrainerCallback that turns the Trainer's progress into events (jobs.events) in events.jsonl.

It also decides when to save and when to stop:
- a checkpoint every `save_every_minutes` (on top of the Trainer's `save_steps`);
- a checkpoint and a stop when a signal, the deadline or max_hours says so (remote_worker.stopping);
- each finished `checkpoint-N` becomes a complete `step-N` with its adapter folder and manifests
  (remote_worker.checkpoints), announced by a `checkpoint` event; the newest two are kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from jobs.events import Checkpoint, Eval, EventWriter, Phase, Started, Step
from remote_worker import checkpoints
from remote_worker.stopping import Stopper


class EventCallback(TrainerCallback):
    def __init__(
        self,
        events: EventWriter,
        started: dict,
        stopper: Stopper,
        save_every_minutes: float = 0,
        batch_shape: tuple[int, bool, int | None] | None = None,
    ):
        self.events = events
        self.started = started  # the Started fields the Trainer does not know
        self.save_every_s = save_every_minutes * 60
        self.stopper = stopper
        self.batch_shape = batch_shape  # (micro_batch_tokens, checkpointing, layers), saved with every checkpoint
        self.cuda = False
        self.last_loss: float | None = None
        self.stop_reason: str | None = None  # "signal", "deadline", "max_hours": stopped before the end
        self.resumed_from_step = 0
        self.last_checkpoint: checkpoints.Finalized | None = None
        self._timer_save = False

    # -- the run --------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.last_save = self.last_t = self.last_step_end = self.save_from = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen
        self.resumed_from_step = state.global_step  # the Trainer restored its state before this call
        self.cuda = args.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.events.emit(
            Started(total_steps=state.max_steps, resumed_from_step=state.global_step, **self.started)
        )

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
        self.stopper.note_step(now - self.last_step_end)
        self.last_step_end = self.save_from = now
        self._timer_save = False
        if self.save_every_s and now - self.last_save >= self.save_every_s and not control.should_save:
            control.should_save = self._timer_save = True
        if self.stop_reason is None and state.global_step < state.max_steps:
            reason = self.stopper.check()
            if reason:
                self.stop_reason = reason
                control.should_save = True  # a checkpoint to resume from
                control.should_training_stop = True
                self.events.emit(
                    Phase(phase="stopping", message=self.stopper.describe(reason, state.global_step))
                )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.save_from = time.monotonic()  # a save right after an evaluation is timed from here
        if metrics and "eval_loss" in metrics:
            self.events.emit(Eval(step=state.global_step, eval_loss=float(metrics["eval_loss"])))

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        root = Path(args.output_dir)
        written = root / f"checkpoint-{state.global_step}"
        if not written.is_dir():
            return
        if self.batch_shape is not None:
            checkpoints.write_batch_shape(written, *self.batch_shape)
        done = checkpoints.finalize(written, state.global_step)
        self.last_save = now = time.monotonic()
        save_s = now - self.save_from
        self.stopper.note_save(done.bytes, done.adapter_bytes, save_s)
        self.last_checkpoint = done
        if self.stop_reason:
            reason = self.stop_reason
        else:
            reason = "timer" if self._timer_save else "steps"
        self.events.emit(
            Checkpoint(
                step=done.step,
                path=str(done.path),
                adapter_sha256=done.manifest_sha256,
                adapter_path=str(done.adapter_path),
                adapter_manifest_sha256=done.adapter_manifest_sha256,
                bytes=done.bytes,
                adapter_bytes=done.adapter_bytes,
                save_s=round(save_s, 3),
                reason=reason,
            )
        )
        checkpoints.rotate(root)
