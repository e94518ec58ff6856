"""Fused LoRA forward and backward for PEFT's `lora.Linear` and `lora.bnb.Linear4bit`.

PEFT computes a LoRA layer as `base(x)`, a defensive `clone()` (4-bit), then
`+ lora_B(lora_A(dropout(x))) * scaling`: three extra passes over the (tokens x out) output.
Here one autograd function does

    forward:  y = x W^T (+ b);  y += s (x A^T) B^T          (one addmm into y)
    backward: dx = dy W + s (dy B) A;  dA = s (dy B)^T x;  dB = s (dy)^T (x A^T)

with W dequantized on the fly for nf4 (and again in backward; never stored). Measured on an
H100 (random Qwen2.5-7B, nf4, all-linear r=16, 16k-token micro-batches): 11,658 tokens/s
against 10,452 with PEFT's own forward (docs/benchmarks.md).

Only PEFT's forward is replaced: the modules, their parameters, state dicts and
`save_pretrained` stay PEFT's. A layer takes the fused path only when it is plain LoRA:
one active adapter, no dropout, no DoRA or other variant, no LoRA bias, a frozen base bias, a plain `nn.Linear`
(not fan_in_fan_out) or a bnb 4-bit base, not merged, adapters enabled. Anything else, at
any call, goes through PEFT's forward unchanged.

`enable(model)` marks the eligible layers and then checks one of them against PEFT's formula,
forward and gradients; on a mismatch or an error it unmarks them all (PEFT's path is used).
"""

from __future__ import annotations

FLAG = "_autodl_fused_lora"
TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}  # relative error of the check

_PATCHED: list = []


def _dequantize(weight, quant_state, dtype):
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(weight, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


def _function():
    import torch

    class LoraLinearFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, quant_state, bias, lora_a, lora_b, scaling):
            with torch.autocast(x.device.type, enabled=False):  # everything is cast to one dtype already
                x2 = x.reshape(-1, x.shape[-1])
                w = _dequantize(weight, quant_state, x.dtype)
                xa = x2 @ lora_a.t()
                y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
                y.addmm_(xa, lora_b.t(), alpha=scaling)
            ctx.save_for_backward(x, xa, lora_a, lora_b)
            ctx.weight, ctx.quant_state, ctx.scaling = weight, quant_state, scaling
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad_y):
            x, xa, lora_a, lora_b = ctx.saved_tensors
            s = ctx.scaling
            with torch.autocast(grad_y.device.type, enabled=False):
                g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(x.dtype)
                x2 = x.reshape(-1, x.shape[-1])
                gb = g2 @ lora_b  # (tokens, r)
                dx = None
                if ctx.needs_input_grad[0]:
                    dx = g2 @ _dequantize(ctx.weight, ctx.quant_state, x.dtype)
                    dx.addmm_(gb, lora_a, alpha=s)
                    dx = dx.view(*x.shape)
                da = (gb.t() @ x2).mul_(s) if ctx.needs_input_grad[4] else None
                db = (g2.t() @ xa).mul_(s) if ctx.needs_input_grad[5] else None
            return dx, None, None, None, da, db, None

    return LoraLinearFn


_FN: list = []


def fused_apply(x, weight, quant_state, bias, lora_a, lora_b, scaling: float):
    if not _FN:
        _FN.append(_function())
    return _FN[0].apply(x, weight, quant_state, bias, lora_a, lora_b, scaling)


def _plain_base(layer) -> bool:
    import torch.nn as nn

    base = layer.base_layer
    if type(base) is nn.Linear:
        return not getattr(layer, "fan_in_fan_out", False)
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        return False
    return type(base) is bnb.nn.Linear4bit


def _operands(layer, x):
    """(x, weight, quant_state, bias, A, B, scaling) in the compute dtype, or None: use PEFT's path."""
    import torch
    import torch.nn as nn

    if layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None:
        return None
    if lora_b.bias is not None or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.base_layer
    weight = base.weight
    if weight.requires_grad or (base.bias is not None and base.bias.requires_grad):  # the function trains A, B only
        return None
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        dtype = getattr(base, "compute_dtype", None) or quant_state.dtype
        weight = weight.data
    else:
        dtype = weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if torch.is_autocast_enabled(x.device.type):  # the dtype autocast would compute the base in
        dtype = torch.get_autocast_dtype(x.device.type)
    bias = base.bias.to(dtype) if base.bias is not None else None
    return (
        x.to(dtype), weight, quant_state, bias, lora_a.weight.to(dtype), lora_b.weight.to(dtype),
        float(layer.scaling[name]),
    )


def _wrap(original):
    def forward(self, x, *args, **kwargs):
        if getattr(self, FLAG, False) and not args and not kwargs:
            operands = _operands(self, x)
            if operands is not None:
                return fused_apply(*operands)
        return original(self, x, *args, **kwargs)

    forward._autodl_original = original
    return forward


def lora_classes() -> list:
    from peft.tuners.lora import layer as lora_layer

    classes = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            classes.append(lora_bnb.Linear4bit)
    except Exception:  # noqa: BLE001 - bitsandbytes absent or broken: plain Linear only
        pass
    return classes


def install() -> None:
    """Wrap PEFT's forwards once per process. Unmarked layers run PEFT's forward unchanged."""
    for cls in lora_classes():
        if not hasattr(cls.forward, "_autodl_original"):
            cls.forward = _wrap(cls.forward)
            _PATCHED.append(cls)


def ineligible(layer) -> str | None:
    """Why a LoRA layer cannot take the fused path (None: it can), judged from its set-up."""
    import torch.nn as nn

    if len(layer.lora_A) != 1:
        return "several adapters"
    name = next(iter(layer.lora_A))
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return "DoRA or another LoRA variant"
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return "lora dropout > 0"
    if layer.lora_B[name].bias is not None:
        return "a LoRA bias"
    if not _plain_base(layer):
        return f"a {type(layer.base_layer).__name__} base layer"
    if any(p.requires_grad for p in layer.base_layer.parameters()):
        return "a trainable base weight or bias"
    return None


def set_enabled(model, on: bool) -> int:
    """Mark (or unmark) the eligible LoRA layers; returns how many are marked."""
    install()
    classes = tuple(lora_classes())
    n = 0
    for module in model.modules():
        if isinstance(module, classes):
            marked = on and ineligible(module) is None
            setattr(module, FLAG, marked)
            n += marked
    return n


def check(layer) -> str | None:
    """Run one layer fused and through PEFT's formula with random A and B; None if they agree."""
    import torch

    base = layer.base_layer
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    dtype = (getattr(base, "compute_dtype", None) or quant_state.dtype) if quant_state is not None else weight.dtype
    device = weight.device
    name = next(iter(layer.lora_A))
    r, fan_in = layer.lora_A[name].weight.shape
    fan_out = layer.lora_B[name].weight.shape[0]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 7, fan_in, generator=g, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, fan_in, generator=g, device=device) / fan_in**0.5).requires_grad_()
    b = (torch.randn(fan_out, r, generator=g, device=device) / r**0.5).requires_grad_()
    grad_y = torch.randn(2, 7, fan_out, generator=g, device=device, dtype=dtype)
    s = float(layer.scaling[name])
    bias = base.bias.to(dtype) if base.bias is not None else None
    with torch.autocast(device.type, enabled=False):
        fused = fused_apply(x, weight.data if quant_state is not None else weight, quant_state, bias,
                            a.to(dtype), b.to(dtype), s)
        fused_grads = torch.autograd.grad(fused, (x, a, b), grad_y)
        ref = base(x) + (x @ a.to(dtype).t()) @ b.to(dtype).t() * s  # PEFT's formula on its base layer
        ref_grads = torch.autograd.grad(ref, (x, a, b), grad_y)
    errors = [
        ((u.float() - v.float()).norm() / v.float().norm().clamp_min(1e-12)).item()
        for u, v in zip((fused, *fused_grads), (ref, *ref_grads), strict=True)
    ]
    limit = TOLERANCE.get(str(dtype).removeprefix("torch."), 3e-2)
    if max(errors) > limit:
        return "mismatch against PEFT's formula, relative error y/dx/dA/dB " + "/".join(f"{e:.1e}" for e in errors)
    return None


def checked_enable(mark, modules: list, flag: str, ineligible, check, unit: str, none: str) -> str:
    """Mark the eligible `modules` (`mark(on) -> how many`), check the first marked one and unmark them all
    when it fails; the line for the `started` event. Shared by fused LoRA and the fused MLP."""
    try:
        marked = mark(True)
    except Exception as exc:  # noqa: BLE001 - a PEFT without these classes: its own path
        return f"off: {type(exc).__name__}: {str(exc)[:120]}"
    if not marked:
        reasons = sorted({ineligible(m) or "" for m in modules} - {""})
        return "off: " + (", ".join(reasons) if reasons else none)
    first = next(m for m in modules if getattr(m, flag, False))
    try:
        problem = check(first)
    except Exception as exc:  # noqa: BLE001 - e.g. a bitsandbytes build without this dequantize
        problem = f"{type(exc).__name__}: {str(exc)[:160]}"
    if problem:
        mark(False)
        return f"off: {problem}"
    return f"on ({marked} of {len(modules)} {unit})"


def enable(model) -> str:
    """Turn the fused path on where it applies, after a check; returns a line for the `started` event."""
    try:
        classes = tuple(lora_classes())
    except Exception as exc:  # noqa: BLE001 - a PEFT without these classes: its own path
        return f"off: {type(exc).__name__}: {str(exc)[:120]}"
    layers = [m for m in model.modules() if isinstance(m, classes)]
    return checked_enable(lambda on: set_enabled(model, on), layers, FLAG, ineligible, check,
                          "LoRA layers", "no LoRA linear layers")  # fmt: skip
