"""Varlen flash attention from PyTorch itself (`torch.nn.attention.varlen`), as a transformers attention.

Packed rows (remote_worker.data) hold several sequences end to end. transformers' SDPA turns
their `position_ids` into a dense block-diagonal mask and runs attention over the whole
T x T square; FlashAttention's varlen kernel takes the sequence boundaries (`cu_seq_lens`)
instead and skips the blocks between sequences. PyTorch >= 2.9 ships that kernel, so no
flash-attn build is needed. Measured on an H100 (random Qwen2.5-7B, nf4, packed 16k-token
micro-batches; docs/benchmarks.md): 11,658 tokens/s with it against 4,543 with SDPA's mask.

- Registered with transformers as `ATTN_NAME`. The name must not contain "flash":
  transformers treats every such name as the flash-attn package and checks for it.
- No mask function is registered, so transformers builds no mask for it at all.
- The packed row carries `cu_seq_lens_q/k` (int32, sequence starts plus the total) and
  `max_length_q/k` (remote_worker.data); when they are absent, they are derived from
  `position_ids` (which restart at 0 for each sequence).
- `self_check` runs the kernel once at start-up, forward and backward, against causal SDPA
  run per sequence in fp32, with the model's own head counts, head size and dtype. The recipe
  uses this path only when the check passes (fast.choose); otherwise it uses SDPA.
- The signature moved between torch versions (2.11: causal is `window_size=(-1, 0)`, no
  `enable_gqa`; 2.13: `enable_gqa`), so each variant found is checked, first passing wins.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

ATTN_NAME = "autodl_varlen"
CHECK_LENGTHS = (1, 5, 130, 37, 300)  # a 1-token sequence too: a row's filler can be that short
CHECK_TOLERANCE = 2e-2  # relative L2 error; bf16 gave <= 3.4e-3 on an H100 (2026-11-28)

_STATE: dict = {"impl": None, "note": "not checked"}
_DERIVED: dict = {}  # the last position_ids tensor seen and the cu_seq_lens derived from it


def available() -> str | None:
    """None when torch has the varlen kernel API, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an old torch, or a broken build
        return f"torch.nn.attention.varlen is missing ({type(exc).__name__})"
    return None


def _variants() -> list[tuple[str, Callable]]:
    """Ways to call varlen_attn causally with grouped KV heads, for the installed torch."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal: dict = {}
    if "is_causal" in params:
        causal["is_causal"] = True
    elif "window_size" in params:
        causal["window_size"] = (-1, 0)
    else:
        return []
    with_scale = "scale" in params

    def make(native_gqa: bool) -> Callable:
        def impl(q, k, v, cu, max_len, scale=None):
            kw = dict(causal)
            if with_scale and scale is not None:
                kw["scale"] = scale
            if k.shape[1] != q.shape[1]:
                if native_gqa:
                    kw["enable_gqa"] = True
                else:
                    rep = q.shape[1] // k.shape[1]
                    k = k.repeat_interleave(rep, 1)
                    v = v.repeat_interleave(rep, 1)
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

        return impl

    found = []
    if "enable_gqa" in params:
        found.append(("native GQA", make(True)))
    found.append(("repeated KV heads", make(False)))
    return found


def sdpa_per_sequence(q, k, v, cu, scale=None):
    """Causal SDPA run on each packed sequence alone. q: (T, H, D), k and v: (T, Hk, D)."""
    import torch
    import torch.nn.functional as F

    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
            is_causal=True, scale=scale,
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


def _relative_errors(impl, heads, kv_heads, head_dim, dtype, device) -> list[float]:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor((0, *CHECK_LENGTHS), dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    total = sum(CHECK_LENGTHS)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q = rand(total, heads, head_dim).requires_grad_()
    k = rand(total, kv_heads, head_dim).requires_grad_()
    v = rand(total, kv_heads, head_dim).requires_grad_()
    grad_out = rand(total, heads, head_dim)
    out = impl(q, k, v, cu, max(CHECK_LENGTHS))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = sdpa_per_sequence(q.float(), k.float(), v.float(), cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
    return [
        ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
        for a, b in zip((out, *grads), (ref, *ref_grads), strict=True)
    ]


def self_check(heads: int, kv_heads: int, head_dim: int, dtype, device: str = "cuda") -> str | None:
    """Pick a working varlen call for these shapes; None when one passed, else why none did.

    The chosen call is what `attention_forward` uses afterwards; `note()` says which and its errors.
    """
    _STATE.update(impl=None, note="not checked")
    reason = available()
    if reason:
        _STATE["note"] = reason
        return reason
    if device != "cuda":
        _STATE["note"] = "the flash varlen kernel runs on CUDA only"
        return _STATE["note"]
    return pick(_variants(), heads, kv_heads, head_dim, dtype, device)


def pick(variants, heads: int, kv_heads: int, head_dim: int, dtype, device: str) -> str | None:
    """The first of (name, impl) that matches per-sequence SDPA becomes the active call."""
    _STATE.update(impl=None, note="not checked")
    failures = []
    for name, impl in variants:
        try:
            errors = _relative_errors(impl, heads, kv_heads, head_dim, dtype, device)
        except Exception as exc:  # noqa: BLE001 - unsupported dtype, head size, arch...
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        shown = "/".join(f"{e:.1e}" for e in errors)
        if max(errors) < CHECK_TOLERANCE:
            _STATE.update(impl=impl, note=f"{name}, relative error out/dq/dk/dv {shown}")
            return None
        failures.append(f"{name}: mismatch against per-sequence SDPA, relative error {shown}")
    _STATE["note"] = "; ".join(failures) or "no causal variant of varlen_attn in this torch"
    return _STATE["note"]


def note() -> str:
    return _STATE["note"]


def cu_seq_lens_from_positions(position_ids):
    """(cu_seq_lens int32, max length) of a packed row from its position_ids (1, T)."""
    import torch

    cached = _DERIVED.get("positions")
    if cached is position_ids:  # the same tensor (every layer, and the recompute, see it): reuse
        return _DERIVED["cu"], _DERIVED["max"]
    row = position_ids[0]
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([row.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    _DERIVED.update(positions=position_ids, cu=cu, max=max_len)  # holds the tensor: no id reuse
    return cu, max_len


def attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, sliding_window=None, **kwargs
):
    """transformers attention function: query (1, H, T, D), key/value (1, Hk, T, D) -> (1, T, H, D), None."""
    import torch.nn.functional as F

    if sliding_window is not None:
        raise ValueError("the varlen attention path has no sliding window; use train.attention = \"sdpa\"")
    if dropout:
        raise ValueError("the varlen attention path has no attention dropout; use train.attention = \"sdpa\"")
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None and batch == 1 and kwargs.get("position_ids") is not None:
        cu, max_len = cu_seq_lens_from_positions(kwargs["position_ids"])
    if cu is None or batch != 1:  # one sequence a row (right-padded): plain causal attention is exact
        if kv_heads != heads:
            key = key.repeat_interleave(heads // kv_heads, 1)
            value = value.repeat_interleave(heads // kv_heads, 1)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2), None
    q = query.transpose(1, 2).reshape(length, heads, head_dim)
    k = key.transpose(1, 2).reshape(length, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(length, kv_heads, head_dim)
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    impl = _STATE["impl"]
    if impl is not None:
        out = impl(q, k, v, cu, int(max_len), scaling)
    else:  # not checked or not on CUDA (tests on the CPU): the reference, same result, slower
        out = sdpa_per_sequence(q, k, v, cu, scaling)
    return out.reshape(1, length, heads, head_dim), None


def register() -> str:
    """Register the attention function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, attention_forward)
    return ATTN_NAME


def unsupported_by(config) -> str | None:
    """Why a model's attention cannot go through this path (None: it can)."""
    if config is None:
        return "the model config could not be read"
    layer_types = getattr(config, "layer_types", None) or []
    # Qwen2/3 configs carry a sliding_window but switch it off with use_sliding_window = False.
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if "sliding_attention" in layer_types or windowed:
        return "the model uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits"
    if getattr(config, "attention_dropout", 0.0):
        return "the model has attention dropout"
    return None


def head_shape(config) -> tuple[int, int, int]:
    """(heads, kv heads, head size) from a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim
