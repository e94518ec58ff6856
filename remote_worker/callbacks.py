"""A TrainerCallback that turns the Trainer's progress into events (jobs.events) in events.jsonl.

It also decides when to save and when to stop:
- a checkpoint every `save_every_minutes` (on top of the Trainer's `save_steps`);
- a checkpoint and a stop when a signal, the deadline or max_hours says so (remote_worker.stopping);
- each finished `checkpoint-N` becomes a complete `step-N` with its adapter folder and manifests
  (remote_worker.checkpoints), announced by a `checkpoint` event; the newest two are kept.

And it keeps the job's record beside the events (jobs.layout RECORD_*): the Trainer's state at each
save and at the end, every evaluation's metrics. `guard_trackers` wraps transformers' own tracker
integrations (TensorBoard always; SwanLab, W&B from `[track]`) so that one that fails warns (a `warning`
event and a line in the log) and is switched off, never stopping the training.

More than one process (remote_worker.distributed): every rank runs this callback at the same
points; only rank 0's writer reaches events.jsonl (the others write to /dev/null). The stop and
the timer's save are agreed each step (stopping.agree); a checkpoint is finalized by rank 0 alone,
once every rank has written its part (a barrier before and after). The Trainer already sums the
tokens seen over the ranks, so tokens/s is the aggregate; peak memory is gathered from each rank.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from jobs import autodl
from jobs.events import Checkpoint, Eval, EventWriter, Phase, Started, Step, Warn
from jobs.layout import JobPaths, tensorboard_dir
from jobs.protocol import EvalPoint, EvalResults, dump_model
from jobs.spec import JobSpec
from remote_worker import checkpoints, distributed, stopping
from remote_worker.stopping import Stopper


class EventCallback(TrainerCallback):
    def __init__(
        self,
        events: EventWriter,
        started: dict,
        stopper: Stopper,
        save_every_minutes: float = 0,
        batch_shape: tuple | None = None,
        job_dir: str | Path | None = None,
    ):
        self.paths = JobPaths(str(job_dir)) if job_dir is not None else None  # where the record goes
        self.evals = EvalResults(results=[])
        self.events = events
        self.started = started  # the Started fields the Trainer does not know
        self.save_every_s = save_every_minutes * 60
        self.stopper = stopper
        # (micro_batch_tokens, checkpointing, world_size, grad_accum, checkpointed layers): saved with every checkpoint
        self.batch_shape = batch_shape
        self.world = distributed.world()
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
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        ranks = None
        if self.world.multi:  # on_log runs on every rank at the same step: a collective is safe here
            ranks = [round(x, 3) for x in distributed.gather(peak or 0.0)]
            peak = max(ranks) if self.cuda else None
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
                peak_mem_gb=peak,
                rank_peak_mem_gb=ranks if self.cuda else None,
            )
        )
        self.last_t, self.last_tokens = now, tokens

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        self.stopper.note_step(now - self.last_step_end)
        self.last_step_end = self.save_from = now
        timer = bool(self.save_every_s and now - self.last_save >= self.save_every_s and not control.should_save)
        checking = self.stop_reason is None and state.global_step < state.max_steps
        reason, timer = stopping.agree(self.stopper.check() if checking else None, timer, distributed.most)
        self._timer_save = timer and not control.should_save
        if self._timer_save:
            control.should_save = True
        if checking:
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
        if metrics and self.paths is not None and self.world.main:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            self.evals.results.append(EvalPoint(step=state.global_step, metrics=numbers))
            _write_atomic(self.paths.eval_results, dump_model(self.evals))

    def on_train_end(self, args, state, control, **kwargs):
        self._save_state(state)

    def _save_state(self, state) -> None:
        if self.paths is not None and self.world.main:
            try:
                tmp = self.paths.trainer_state + ".tmp"
                state.save_to_json(tmp)
                os.replace(tmp, self.paths.trainer_state)
            except OSError as exc:  # the record is a convenience: a full disk stops the job elsewhere
                print(f"could not write the trainer state: {exc}", file=sys.stderr, flush=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        root = Path(args.output_dir)
        written = root / f"checkpoint-{state.global_step}"
        if self.world.multi:
            distributed.barrier()  # every rank's part (its RNG state) is in checkpoint-N
            if not self.world.main:
                sizes = distributed.agree(None)
                self.last_save = time.monotonic()
                if sizes is not None:
                    self.stopper.note_save(*sizes)
                distributed.barrier()
                return
        if not written.is_dir():
            if self.world.multi:
                distributed.agree(None)
                distributed.barrier()
            return
        if self.batch_shape is not None:
            checkpoints.write_batch_shape(written, *self.batch_shape)
        done = checkpoints.finalize(written, state.global_step)
        self.last_save = now = time.monotonic()
        save_s = now - self.save_from
        self.stopper.note_save(done.bytes, done.adapter_bytes, save_s)
        self.last_checkpoint = done
        if self.world.multi:  # the others estimate the deadline's margin from the same measurement
            distributed.agree((done.bytes, done.adapter_bytes, save_s))
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
        self._save_state(state)
        if self.world.multi:
            distributed.barrier()


def _write_atomic(path: str, text: str) -> None:
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as exc:
        print(f"could not write {path}: {exc}", file=sys.stderr, flush=True)


# --- trackers: transformers' own integrations, each unable to stop the training ----------------------

TRACKER_MODULES = {"tensorboard": "tensorboard", "swanlab": "swanlab", "wandb": "wandb"}
_EVENTS = (
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate", "on_predict",
    "on_save", "on_log", "on_prediction_step", "on_push_begin",
)  # fmt: skip


def on_autodl() -> bool:
    return any(os.path.exists(f) for f in autodl.MARKER_FILES) or any(v in os.environ for v in autodl.ENV_VARS)


def trackers(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(what the Trainer reports to, what is asked for but not installed here): TensorBoard always."""
    wanted = ["tensorboard", *dict.fromkeys(spec.track.report_to)]
    have = [t for t in wanted if importlib.util.find_spec(TRACKER_MODULES[t]) is not None]
    return have, [t for t in wanted if t not in have]


class GuardedTracker(TrainerCallback):
    """One tracker integration; the first exception it raises is a warning, and it is switched off."""

    def __init__(self, inner: TrainerCallback, name: str, events: EventWriter, start=None):
        self.inner, self.name, self.events = inner, name, events
        self.start = start  # called before the tracker's first on_train_begin, under the same guard
        self.failed = False

    def _call(self, event: str, *args, **kwargs):
        if self.failed:
            return None
        try:
            if event == "on_train_begin" and self.start is not None:
                self.start, start = None, self.start
                start()
            return getattr(self.inner, event)(*args, **kwargs)
        except Exception as exc:  # a tracker never stops the training
            self.failed = True
            warn(self.events, self.name, f"{self.name} failed in {event} and is off for this run: "
                 f"{type(exc).__name__}: {str(exc)[:500]}")  # fmt: skip
            return None


for _name in _EVENTS:
    setattr(GuardedTracker, _name, lambda self, *a, _e=_name, **k: self._call(_e, *a, **k))


def warn(events: EventWriter, source: str, message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
    events.emit(Warn(source=source, message=message))


def guard_trackers(trainer, events: EventWriter, spec: JobSpec, job_id: str, job_dir: str) -> str:
    """Wrap the Trainer's tracker callbacks (GuardedTracker), point TensorBoard at its folder, set the
    trackers' project and mode, and on AutoDL route their uploads through network_turbo. Call it once
    the model is loaded: the proxy is set in this process from here on, so the model download never
    goes through it. Returns the TensorBoard folder."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    _, missing = trackers(spec)
    for tracker in missing:
        warn(events, tracker, f"{tracker} is not installed on the instance: nothing is reported to it")
    tb_dir = tensorboard_dir(job_dir, job_id, on_autodl())
    paths = JobPaths(job_dir)
    project = spec.track.project or spec.name
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("WANDB_DIR", job_dir)  # its local files in the job folder, not the worker's cwd
    local = spec.track.swanlab_mode == "local"
    kinds = {cls: name for name, cls in INTEGRATION_TO_CALLBACK.items()}
    handler = trainer.callback_handler
    for i, cb in enumerate(handler.callbacks):
        name = kinds.get(type(cb))
        if name is None:
            continue
        start = None
        if name == "tensorboard":
            cb.logging_dir = tb_dir
        elif name == "swanlab":  # its integration passes the project only from SWANLAB_PROJECT, which swanlab
            # itself parses as a setting of another shape, and swanlab 0.10's get_run() raises where the
            # integration expects None: start the run here, the integration then joins it
            start = functools.partial(_start_swanlab, project, job_id, paths.swanlog, local)
        handler.callbacks[i] = GuardedTracker(cb, name, events, start)
    if spec.track.report_to and spec.track.network_turbo:
        turbo_for_trackers(events)
    return tb_dir


def _start_swanlab(project: str, job_id: str, log_dir: str, local: bool) -> None:
    import swanlab

    try:
        if swanlab.get_run() is not None:
            return
    except RuntimeError:  # swanlab 0.10 raises where transformers' integration expects None
        pass
    # its files in the job folder in both modes: by default SwanLab writes them into the worker's cwd
    extra = {"mode": "local"} if local else {}
    swanlab.init(project=project, name=job_id, log_dir=log_dir, **extra)


PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def turbo_for_trackers(events: EventWriter, script: str = autodl.NETWORK_TURBO) -> dict[str, str]:
    """The proxy variables AutoDL's network_turbo sets, into this process's environment (the trackers run
    in it, W&B's service inherits it); the model was loaded before, the prefetch process never sees them."""
    if not os.path.isfile(script):
        return {}
    try:
        out = subprocess.run(
            ["bash", "-c", '. "$1" >/dev/null 2>&1; env -0', "turbo", script],
            capture_output=True, timeout=30, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        warn(events, "network_turbo", f"could not read {script}: {exc}")
        return {}
    found = {}
    for item in out.split(b"\0"):
        key, _, value = item.decode(errors="replace").partition("=")
        if key in PROXY_VARS and value and os.environ.get(key) != value:
            found[key] = value
    os.environ.update(found)
    print(f"tracker uploads go through {script} ({', '.join(sorted(found)) or 'it set no proxy'})",
          file=sys.stderr, flush=True)  # fmt: skip
    return found
