"""The micro-batch size and gradient checkpointing, chosen by measuring them on the card before training.

On CUDA, for every shape that `train.micro_batch_tokens` and `train.gradient_checkpointing` leave
open (`candidates`), the worker runs forward and backward passes of one full micro-batch: the
longest training sequences, filled to the micro-batch size as every training row is. It measures
peak memory and speed, then trains with the fastest shape that fits with headroom (`choose`).
Nothing is learned: there is no optimizer step, and the gradients are dropped.

Why measure rather than guess (docs/benchmarks.md, random Qwen2.5-7B, nf4, all-linear r=16):
- On an H100 or H200, checkpointing off at 8,192 tokens ran 15,824 tokens/s in 42.7 GB, against
  about 11,600 tokens/s in 12.1 GB with checkpointing on at 16,384 tokens.
- On a 24 GB card, only checkpointing on fits; which size is fastest depends on the card.
What fits depends on the model, the LoRA targets, max_length and the card. The speed of each
shape depends on the card too.

Partial checkpointing uses the whole card: a shape may checkpoint only its first `layers` decoder layers,
as many as memory requires (a 40 GB card trained 7B on rows of ~6k tokens with every layer checkpointed
in 12 GB of its 40, because none checkpointed needed 46: shared/anchors.md §6). On CUDA, with
`gradient_checkpointing = "auto"`, jobs.memory (the model `autodl-run plan` uses) predicts for each size
the fewest checkpointed layers that fit; those shapes join the candidates, shapes predicted to need far
more than the card has are not run, and what is predicted fastest is measured first (`guide`). The
measurement decides.

A shape given in full (both settings fixed) is still run once: if it does not fit, the job fails
now, naming the settings to change, rather than hours into a paid run.

`AUTODL_RUN_GPU_MEMORY_GB` caps the memory the worker may use, enforced by torch's allocator.
Use it to share a card, or to check on a large card what a smaller one would choose.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobs import memory
from jobs.spec import TrainSpec
from remote_worker import WorkerError

# Timed passes a shape gets on the GPU; the fastest counts (as timeit takes the best of its repeats). With
# one, a 2026-11-30 run on an H200 ranked 7B's 8,192 tokens with 15 checkpointed layers (13,443 tokens/s)
# over 4,096 with none (13,044); timed over 12 optimizer steps in the next run, the second was 11% faster
# (docs/benchmarks.md, "The fused MLP").
TIMED_PASSES = 3
SIZES = memory.SIZES  # tokens tried when micro_batch_tokens = 0 (at least max_length)
BUDGET_S = 90.0  # stop timing more shapes after this, once one fits
HEADROOM = memory.HEADROOM  # of the usable memory, kept free: fragmentation, evaluation, saving
MIN_HEADROOM_BYTES = memory.MIN_HEADROOM_BYTES
PRUNE_OVER = 1.3  # a shape predicted to need this much more than the limit is not run
ENV_MEMORY_CAP = "AUTODL_RUN_GPU_MEMORY_GB"


class DoesNotFit(WorkerError):
    """No micro-batch shape the spec allows fits in the GPU's memory."""


@dataclass(frozen=True)
class Shape:
    micro_batch_tokens: int
    checkpointing: bool
    layers: int | None = None  # with checkpointing: only the first `layers` decoder layers (None: all)

    def label(self) -> str:
        if self.checkpointing and self.layers is not None:
            return f"{self.micro_batch_tokens:,} tokens, checkpointing {self.layers} layers"
        return f"{self.micro_batch_tokens:,} tokens, checkpointing {'on' if self.checkpointing else 'off'}"

    @property
    def checkpointed(self) -> float:
        """How many layers recompute: 0 off, `layers` partial, infinity for all (whatever their number)."""
        if not self.checkpointing:
            return 0
        return float("inf") if self.layers is None else self.layers


@dataclass
class Trial:
    shape: Shape
    tokens: int = 0  # real tokens in the measured row
    peak_bytes: int | None = None  # peak allocated in the pass, weights included
    seconds: float | None = None  # one timed forward+backward; None when not timed
    oom: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Choice:
    shape: Shape
    trials: list[Trial]
    note: str  # what was measured and chosen, for the `calibrating` event


def candidates(train: TrainSpec, max_length: int) -> list[Shape]:
    """The shapes to measure, checkpointing off first, larger micro-batches first."""
    sizes = memory.sizes_for(max_length, train.micro_batch_tokens)
    modes = {"on": [True], "off": [False], "auto": [False, True]}[train.gradient_checkpointing]
    return [Shape(t, c) for c in modes for t in sizes]


def to_memory_shape(shape: Shape, layers: int) -> memory.Shape:
    k = 0 if not shape.checkpointing else (layers if shape.layers is None else shape.layers)
    return memory.Shape(shape.micro_batch_tokens, k)


def guide(
    shapes: Sequence[Shape], arch: memory.Arch, setup: memory.Setup, usable_bytes: int | None, mode: str = "auto"
) -> list[Shape]:
    """The shapes to measure on a card of `usable_bytes`, as jobs.memory predicts them: with "auto"
    checkpointing, each size also gets the partial shape with the fewest checkpointed layers predicted to
    fit; shapes predicted to need over PRUNE_OVER x the limit are dropped (the least-memory one is kept);
    those predicted to fit first, fastest first. Unchanged where memory is unknown (the CPU)."""
    if usable_bytes is None or not shapes:
        return list(shapes)
    out = list(shapes)
    card = usable_bytes + memory.DEFAULT.context_bytes  # usable_limit takes a card's whole memory
    if mode == "auto":
        for t in dict.fromkeys(s.micro_batch_tokens for s in shapes):
            k = memory.fewest_checkpointed(arch, setup, t, card, range(arch.layers))
            if k is not None and k > 0:  # 0: off fits, and off is among the shapes already
                out.append(Shape(t, True, k))
    limit = memory.usable_limit(card)

    def need(s: Shape) -> float:
        return memory.estimate(arch, setup, to_memory_shape(s, arch.layers)).allocated

    smallest = min(out, key=need)
    out = [s for s in out if s == smallest or need(s) <= limit * PRUNE_OVER]
    def speed(s: Shape) -> float:
        return memory.tokens_per_s(arch, setup, to_memory_shape(s, arch.layers), 1000.0, 4e12)

    return sorted(out, key=lambda s: (need(s) > limit, -speed(s)))


def choose(
    shapes: Sequence[Shape],
    measure: Callable[[Shape, bool], Trial],
    usable_bytes: int | None,
    state_bytes: int = 0,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> Choice:
    """The fastest shape whose peak plus `state_bytes` (the optimizer's) fits `usable_bytes`.

    `measure(shape, timed)` runs the passes and returns a Trial (oom=True when it ran out of memory).
    A shape is skipped without a run when a shape already found to fit is at least as large and
    checkpoints fewer layers (that one is faster). With one shape only, memory alone
    decides: the headroom applies to choices, not to what the user fixed.
    """
    headroom = 0 if usable_bytes is None else max(MIN_HEADROOM_BYTES, int(usable_bytes * HEADROOM))
    limit = None if usable_bytes is None else usable_bytes - headroom
    only = len(shapes) == 1
    t0 = clock()
    trials: list[Trial] = []
    fitting: list[Trial] = []
    for shape in shapes:
        if fitting and clock() - t0 > budget_s:
            break
        if any(
            f.shape.checkpointed < shape.checkpointed and f.shape.micro_batch_tokens >= shape.micro_batch_tokens
            for f in fitting
        ):
            continue
        trial = measure(shape, not only)
        trials.append(trial)
        if trial.oom:
            continue
        if only or limit is None or (trial.peak_bytes or 0) + state_bytes <= limit:
            fitting.append(trial)
    if not fitting:
        raise DoesNotFit(_nothing_fits(shapes, trials, usable_bytes, state_bytes), hint=_hint(shapes))
    best = fitting[0] if only else max(fitting, key=lambda t: t.tokens_per_s)
    return Choice(best.shape, trials, _note(best, trials, usable_bytes, state_bytes))


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def _trial_text(t: Trial, state_bytes: int) -> str:
    if t.oom:
        return f"{t.shape.label()}: out of memory"
    speed = f", {t.tokens_per_s:,.0f} tokens/s" if t.seconds else ""
    return f"{t.shape.label()}: {_gb((t.peak_bytes or 0) + state_bytes)}{speed}"


def _note(best: Trial, trials: list[Trial], usable: int | None, state_bytes: int) -> str:
    tried = "; ".join(_trial_text(t, state_bytes) for t in trials)
    return f"{best.shape.label()} (of {_gb(usable)} usable). Measured: {tried}"


def _nothing_fits(shapes, trials, usable, state_bytes) -> str:
    tried = "; ".join(_trial_text(t, state_bytes) for t in trials) or "nothing"
    what = (
        f"{shapes[0].label()} does not fit"
        if len(shapes) == 1
        else f"none of the {len(shapes)} micro-batch shapes fits"
    )
    return f"{what} in the GPU's memory ({_gb(usable)} usable). Measured: {tried}"


def _hint(shapes: Sequence[Shape]) -> str:
    if len(shapes) == 1:
        return (
            'set train.micro_batch_tokens = 0 and train.gradient_checkpointing = "auto" to let the worker '
            'choose, or a smaller micro_batch_tokens, or gradient_checkpointing = "on"'
        )
    return "lower data.max_length or lora.r, target fewer modules, or rent a GPU with more memory"


# --- on the GPU ---------------------------------------------------------------------------------


def usable_memory() -> int | None:
    """Bytes torch may use on the current GPU: what is free plus what it holds, under the cap if set."""
    import torch

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    usable = free + torch.cuda.memory_reserved()
    cap = os.environ.get(ENV_MEMORY_CAP)
    if cap:
        cap_bytes = int(float(cap) * 1e9)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
        usable = min(usable, cap_bytes)
    return usable


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_checkpointing(model) -> bool:
    base = _base(model)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def decoder_layers(model) -> list:
    """The layers transformers can checkpoint (its GradientCheckpointingLayer), in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in _base(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpointed_layers(model) -> int | None:
    """How many decoder layers recompute when only some do (partial checkpointing); None when all or none
    do (what set_checkpointing's `layers` takes back)."""
    flags = [getattr(layer, "gradient_checkpointing", False) is True for layer in decoder_layers(model)]
    return sum(flags) if any(flags) and not all(flags) else None


def set_checkpointing(model, on: bool, layers: int | None = None) -> None:
    """Non-reentrant gradient checkpointing on (with input grads, which it needs) or off; with `layers`,
    only the first `layers` decoder layers are checkpointed (partial checkpointing: the others keep their
    activations, and recompute nothing).

    transformers >= 5.2x names it activation checkpointing and warns on the old names.
    """
    base = _base(model)
    # transformers keeps the handles of the latest input-grad hooks only, and some of its enable paths
    # add them too: drop the current ones first, so switching back and forth never stacks hooks.
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    if not on:
        if is_checkpointing(base):
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
        return
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(base, "_require_grads_hook", None) is None:
        base.enable_input_require_grads()
    if layers is not None:
        for i, layer in enumerate(decoder_layers(base)):
            layer.gradient_checkpointing = i < layers


def worst_row(sequences, tokens: int, build_row: Callable) -> tuple[dict, int]:
    """The costliest row training will see: `tokens` tokens of the longest sequences, filled like
    every training row, or the longest sequence alone when it is longer (it gets a row of its own)."""
    ordered = sorted(sequences, key=lambda s: len(s.ids), reverse=True)
    if len(ordered[0].ids) >= tokens:
        return build_row(ordered[:1]), len(ordered[0].ids)
    chosen, used = [], 0
    for s in ordered:
        if used + len(s.ids) <= tokens:
            chosen.append(s)
            used += len(s.ids)
        if used == tokens:
            break
    return build_row(chosen), used


def measurer(model, sequences, build_row: Callable, dtype) -> Callable[[Shape, bool], Trial]:
    """`measure` for `choose`: forward+backward of the worst row of each shape on this model."""
    import torch

    device = next(p.device for p in model.parameters())
    cuda = device.type == "cuda"
    ordered = sorted(
        sequences, key=lambda s: len(s.ids), reverse=True
    )  # once: worst_row's sort is then linear

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def passes(row: dict) -> None:  # under autocast like the Trainer's bf16/fp16 steps
        with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            loss = model(**row).loss
        loss.backward()
        del loss

    def measure(shape: Shape, timed: bool) -> Trial:
        set_checkpointing(model, shape.checkpointing, shape.layers)
        row, real = worst_row(
            ordered, shape.micro_batch_tokens, lambda seqs: build_row(seqs, shape.micro_batch_tokens)
        )
        row = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in row.items()}
        trial = Trial(shape, tokens=real)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            passes(row)  # the first pass of a shape also warms up kernels and allocator
            sync()
            trial.peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
            if timed:
                times = []
                for _ in range(TIMED_PASSES if cuda else 1):
                    model.zero_grad(set_to_none=True)
                    t = time.perf_counter()
                    passes(row)
                    sync()
                    times.append(time.perf_counter() - t)
                trial.seconds = min(times)
        except torch.cuda.OutOfMemoryError:
            trial.oom = True
        except RuntimeError as exc:  # some kernels report it as a plain RuntimeError
            if "out of memory" not in str(exc).lower():
                raise
            trial.oom = True
        finally:
            model.zero_grad(set_to_none=True)
            del row
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return trial

    return measure


def optimizer_state_bytes(model) -> int:
    """AdamW's two fp32 moments for every trainable parameter."""
    return sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)


def arch_of(model) -> memory.Arch | None:
    """jobs.memory's view of the model (None when its config is not a decoder jobs.memory knows)."""
    try:
        return memory.Arch.from_config(_base(model).config.to_dict())
    except (ValueError, TypeError, AttributeError):
        return None


def calibrate(
    model, shapes: Sequence[Shape], sequences, build_row: Callable, dtype,
    setup: memory.Setup | None = None, mode: str = "auto",
) -> Choice:  # fmt: skip
    """Measure the shapes the spec leaves open, leave the model set up for the best one.

    On the GPU memory and speed decide; elsewhere (tests) memory is not known and speed alone does.
    With `setup` (the job's bits, LoRA and loss head), the shapes are first guided by jobs.memory (`guide`).
    """
    import torch

    cuda = next(p.device for p in model.parameters()).type == "cuda"
    was_training = model.training
    model.train()
    usable = usable_memory() if cuda else None
    arch = arch_of(model) if setup is not None else None
    if arch is not None and setup is not None:
        lengths = [len(s.ids) for s in sequences]
        if lengths:
            setup = dataclasses.replace(setup, mean_seq=sum(lengths) / len(lengths))
        shapes = guide(shapes, arch, setup, usable, mode)
    choice = choose(shapes, measurer(model, sequences, build_row, dtype), usable, optimizer_state_bytes(model))
    set_checkpointing(model, choice.shape.checkpointing, choice.shape.layers)
    model.train(was_training)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return choice
