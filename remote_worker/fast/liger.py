"""Liger kernels (liger-kernel, Triton): RMSNorm, RoPE, SwiGLU and fused linear cross-entropy.

They patch transformers' modeling code for the model type, so they are applied before the
model is built. The fused linear cross-entropy computes the loss from the last hidden states
chunk by chunk and never materialises the logits: for 16k tokens and a 152k vocabulary those
would be 4.9 GB in bf16, 9.8 GB once upcast for the loss. Part of the measured recipe of
docs/benchmarks.md (ours: 12.1 GB allocated at 16k tokens).

In eval mode Liger's forward does build the full logits unless it is given `skip_logits=True`
(transformers' Trainer passes that only with its own `use_liger_kernel`). The recipe sets it
on every eval micro-batch when the fused cross-entropy is on (`FastPaths.configure`), so an
evaluation costs no more memory than a training step.

`train.liger`: "auto" applies them on CUDA when liger-kernel imports and has kernels for the
model type; "on" does the same but fails the job when it cannot; "off" never. On the CPU
they are always off (Triton kernels).
"""

from __future__ import annotations

import inspect

from remote_worker import WorkerError

KERNELS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
PIP = "liger-kernel"


def _apply_function(model_type: str):
    """Liger's apply function for this model type, or None. Raises ImportError without liger-kernel."""
    from liger_kernel.transformers import monkey_patch

    return monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def apply(setting: str, device: str, config) -> tuple[str, bool]:
    """Apply the kernels when `setting` and the machine allow; (line for `started`, fused CE on)."""
    if setting == "off":
        return "off: train.liger = \"off\"", False
    if device != "cuda":
        return "off: Liger's Triton kernels need CUDA", False
    model_type = getattr(config, "model_type", None)
    try:
        fn = _apply_function(model_type) if model_type else None
    except Exception as exc:  # noqa: BLE001 - not installed, or a triton that does not import
        why = f"liger-kernel does not import ({type(exc).__name__}: {str(exc)[:120]})"
        if setting == "on":
            raise WorkerError(
                f'train.liger = "on" but {why}',
                hint=f"install it on the instance (`python -m pip install {PIP}`) or set train.liger = \"auto\"",
            ) from exc
        return f"off: {why}", False
    if fn is None:
        why = f"liger-kernel has no kernels for model type {model_type!r}"
        if setting == "on":
            raise WorkerError(f'train.liger = "on" but {why}', hint='set train.liger = "auto" or "off"')
        return f"off: {why}", False
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in KERNELS.items() if k in accepted}
    try:
        fn(**kwargs)
    except Exception as exc:  # noqa: BLE001
        if setting == "on":
            raise
        return f"failed part-way, some kernels may be patched ({type(exc).__name__}: {str(exc)[:120]})", False
    names = [k for k, v in kwargs.items() if v]
    return f"on ({', '.join(names)})", bool(kwargs.get("fused_linear_cross_entropy"))
