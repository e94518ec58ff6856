"""One autograd function for a SwiGLU MLP whose three linears are plain LoRA layers.

    forward:  g = x Wg^T + s (x Ag^T) Bg^T;   u = likewise with Wu;   h = silu(g) * u;
              y = h Wd^T + s (h Ad^T) Bd^T
    saved:    x, g, u and the rank-r products (x Ag^T, x Au^T, h Ad^T) - not h
    backward: h is recomputed from g and u, used for down_proj's LoRA gradient and freed; then
              SwiGLU's backward, then gate and up, as fused_lora.py does one linear.

Unfused, the layer keeps g and u (for SwiGLU's backward) and h as well (down_proj's LoRA needs its
input for dA). h is `tokens x intermediate` 16-bit values a layer: for Qwen2.5-7B (intermediate 18,944)
at 4,096 tokens, 155 MB of a layer's ~650 MB (docs/benchmarks.md), i.e. a quarter of what a
non-checkpointed layer keeps, for one elementwise kernel in the backward. Unsloth's LoRA_MLP
(unsloth/kernels/fast_lora.py) makes the same trade.

On CUDA with liger-kernel the SwiGLU forward and backward are Liger's Triton kernels (the backward
writes dg and du over g and u, which are not needed after it); elsewhere torch's ops, with the same
rounding (silu in float32, rounded, then the product in the compute dtype).

`enable(model)` marks MLPs whose gate_proj, up_proj and down_proj are all on fused_lora's path and
whose activation is SiLU, checks one against the module's own forward (output and gradients), and
unmarks them all on a mismatch. A marked MLP falls back to its own forward at any call where one of
its layers cannot take the fused path (adapters disabled, merged, ...).
"""

from __future__ import annotations

from remote_worker.fast import fused_lora

FLAG = "_autodl_fused_mlp"
_PATCHED: list = []
_FN: list = []


def _swiglu_kernels(device_type: str):
    """(forward(g, u) -> h, backward(g, u, dh) -> (dg, du) overwriting g and u) for this device."""
    if device_type == "cuda":
        try:
            from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

            return (lambda g, u: swiglu_forward(g, u)[2]), swiglu_backward
        except Exception:  # noqa: BLE001 - no liger-kernel or no triton: torch's ops below
            pass
    import torch
    import torch.nn.functional as F

    def forward(g, u):
        return F.silu(g) * u

    def backward(g, u, dh):
        gf = g.float()
        sig = torch.sigmoid(gf)
        silu = gf * sig
        du = (dh.float() * silu).to(g.dtype)
        dg = (dh.float() * u.float() * (silu * (1 - sig) + sig)).to(g.dtype)
        return dg, du

    return forward, backward


def _linear(x2, weight, quant_state, bias, lora_a, lora_b, s):
    """(x W^T + b + s (x A^T) B^T, x A^T) for 2-D x."""
    import torch

    w = fused_lora._dequantize(weight, quant_state, x2.dtype)
    xa = x2 @ lora_a.t()
    y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
    y.addmm_(xa, lora_b.t(), alpha=s)
    return y, xa


def _input_grad(dx, grad, weight, quant_state, gb, lora_a, s):
    """dx (+)= grad W + s (grad B) A."""
    w = fused_lora._dequantize(weight, quant_state, grad.dtype)
    dx = grad @ w if dx is None else dx.addmm_(grad, w)
    return dx.addmm_(gb, lora_a, alpha=s)


def _function():
    import torch

    class LoraMlpFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, wg, qg, bg, ag, bbg, sg, wu, qu, bu, au, bbu, su, wd, qd, bd, ad, bbd, sd):
            with torch.autocast(x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1])
                g, xag = _linear(x2, wg, qg, bg, ag, bbg, sg)
                u, xau = _linear(x2, wu, qu, bu, au, bbu, su)
                h = _swiglu_kernels(x.device.type)[0](g, u)
                y, had = _linear(h, wd, qd, bd, ad, bbd, sd)
                del h
            ctx.save_for_backward(x, g, u, xag, xau, had, ag, bbg, au, bbu, ad, bbd)
            ctx.frozen = (wg, qg, wu, qu, wd, qd)
            ctx.scalings = (sg, su, sd)
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad_y):
            x, g, u, xag, xau, had, ag, bbg, au, bbu, ad, bbd = ctx.saved_tensors
            wg, qg, wu, qu, wd, qd = ctx.frozen
            sg, su, sd = ctx.scalings
            need = ctx.needs_input_grad
            swiglu_forward, swiglu_backward = _swiglu_kernels(x.device.type)
            with torch.autocast(grad_y.device.type, enabled=False):
                dy = grad_y.reshape(-1, grad_y.shape[-1]).to(x.dtype).contiguous()
                x2 = x.reshape(-1, x.shape[-1])
                # down_proj: its LoRA gradient needs h, recomputed here and freed at once
                gbd = dy @ bbd
                h = swiglu_forward(g, u)
                dad = (gbd.t() @ h).mul_(sd) if need[16] else None
                del h
                dbd = (dy.t() @ had).mul_(sd) if need[17] else None
                dh = _input_grad(None, dy, wd, qd, gbd, ad, sd)
                dg, du = swiglu_backward(g, u, dh)  # may overwrite g and u: neither is used again
                del dh
                gbg, gbu = dg @ bbg, du @ bbu
                dx = None
                if need[0]:
                    dx = _input_grad(None, dg, wg, qg, gbg, ag, sg)
                    dx = _input_grad(dx, du, wu, qu, gbu, au, su).view(*x.shape)
                dag = (gbg.t() @ x2).mul_(sg) if need[4] else None
                dbg = (dg.t() @ xag).mul_(sg) if need[5] else None
                dau = (gbu.t() @ x2).mul_(su) if need[10] else None
                dbu = (du.t() @ xau).mul_(su) if need[11] else None
            return (dx, None, None, None, dag, dbg, None, None, None, None, dau, dbu, None,
                    None, None, None, dad, dbd, None)  # fmt: skip

    return LoraMlpFn


def fused_mlp_apply(x, gate: tuple, up: tuple, down: tuple):
    """y of the MLP; gate/up/down are fused_lora._operands' (weight, quant_state, bias, A, B, scaling)."""
    if not _FN:
        _FN.append(_function())
    return _FN[0].apply(x, *gate, *up, *down)


def _operands(mlp, x):
    """The three layers' operands in one dtype, or None: use the module's own forward."""
    ops = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp, name)
        if not getattr(layer, fused_lora.FLAG, False):
            return None
        found = fused_lora._operands(layer, x)
        if found is None:
            return None
        ops.append(found)
    dtypes = {ops[0][0].dtype, *(op[4].dtype for op in ops)}
    if len(dtypes) != 1:
        return None
    return ops[0][0], *(op[1:] for op in ops)


def _wrap(original):
    def forward(self, x, *args, **kwargs):
        if getattr(self, FLAG, False) and not args and not kwargs:
            found = _operands(self, x)
            if found is not None:
                x_, gate, up, down = found
                return fused_mlp_apply(x_, gate, up, down)
        return original(self, x, *args, **kwargs)

    forward._autodl_original = original
    return forward


def _is_silu(mlp) -> bool:
    import torch.nn as nn

    act = getattr(mlp, "act_fn", None)
    if act is None:  # Liger's SwiGLU MLP has no act_fn: it refuses anything but silu when it is built
        return type(mlp).__name__ == "LigerSwiGLUMLP"
    if isinstance(act, nn.SiLU):
        return True
    return type(act).__name__ in {"SiLUActivation", "SiLU"}


def ineligible(mlp) -> str | None:
    """Why an MLP cannot take the fused path (None: it can)."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "not a gate/up/down MLP"
    if not _is_silu(mlp):
        return "its activation is not SiLU"
    if getattr(getattr(mlp, "config", None), "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if not all(getattr(getattr(mlp, n), fused_lora.FLAG, False) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gate_proj, up_proj and down_proj are not all fused LoRA layers"
    return None


def mlps(model) -> list:
    """Modules with gate_proj, up_proj and down_proj children (the decoder layers' MLPs)."""
    return [m for m in model.modules() if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))]


def set_enabled(model, on: bool) -> int:
    n = 0
    for mlp in mlps(model):
        cls = type(mlp)
        if on and not hasattr(cls.forward, "_autodl_original"):
            cls.forward = _wrap(cls.forward)
            _PATCHED.append(cls)
        marked = on and ineligible(mlp) is None
        setattr(mlp, FLAG, marked)
        n += marked
    return n


def check(mlp) -> str | None:
    """The MLP fused and through its own forward on random input; None if output and gradients agree.

    PEFT starts every B at zero, which would zero LoRA's share of the output and of dx and dA in both
    runs: the check runs with random B (the layers' own are put back after), as fused_lora.check does."""
    import torch

    gate = mlp.gate_proj
    x_ref = fused_lora._operands(gate, torch.zeros(1, device=gate.base_layer.weight.device))
    if x_ref is None:
        return "its layers cannot take the fused path"
    dtype, device = x_ref[4].dtype, x_ref[4].device
    fan_in = x_ref[4].shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 5, fan_in, generator=g, device=device, dtype=dtype, requires_grad=True)
    if _operands(mlp, x) is None:
        return "its layers cannot take the fused path"
    params = [p for p in mlp.parameters() if p.requires_grad]
    bs = [getattr(mlp, n).lora_B[getattr(mlp, n).active_adapters[0]].weight for n in ("gate_proj", "up_proj", "down_proj")]
    kept = [b.detach().clone() for b in bs]
    try:
        with torch.no_grad():
            for b in bs:
                b.copy_(torch.randn(b.shape, generator=g, device=device) / b.shape[1] ** 0.5)
        with torch.autocast(device.type, enabled=False):
            fused = mlp(x)
            grad_y = torch.randn(fused.shape, generator=g, device=device, dtype=dtype)
            fused_grads = torch.autograd.grad(fused, (x, *params), grad_y)
            setattr(mlp, FLAG, False)
            try:
                ref = mlp(x)
                ref_grads = torch.autograd.grad(ref, (x, *params), grad_y)
            finally:
                setattr(mlp, FLAG, True)
    finally:
        with torch.no_grad():
            for b, k in zip(bs, kept, strict=True):
                b.copy_(k)
    errors = [
        ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
        for a, b in zip((fused, *fused_grads), (ref, *ref_grads), strict=True)
    ]
    limit = fused_lora.TOLERANCE.get(str(dtype).removeprefix("torch."), 3e-2)
    if max(errors) > limit:
        return f"mismatch against the MLP's own forward, worst relative error {max(errors):.1e}"
    return None


def enable(model) -> str:
    """Fuse the eligible MLPs after a check; a line for the `started` event. Call after fused_lora.enable."""
    return fused_lora.checked_enable(lambda on: set_enabled(model, on), mlps(model), FLAG, ineligible,
                                     check, "MLPs", "no gate/up/down MLPs")  # fmt: skip
