#!/usr/bin/env python3
"""QLoRA training-speed bench (issue 4): the seed's recipe, a reference Transformers+PEFT stack,
TRL SFTTrainer, Unsloth and our candidate recipe, side by side on the same random-weight model and
the same synthetic token data. See bench/README.md.

Subcommands (each runs in its own process; `suite` starts the others as subprocesses):
  make     --arch 7b|0.5b|tiny --dir DIR          random-weight Qwen2.5-shaped model + tiny tokenizer
  env                                               card, versions, measured bf16 matmul rate
  recipe   --name seed|reference|trl|unsloth|ours  one recipe, one process: all-linear, then q,v (and extras)
  sweep    --dir DIR --base '{...}' --variants '[{...}, ...]'   ours-style variants in one process (manual loop)
  quality  --dir DIR --name reference|ours ...     loss curve on a learnable synthetic task (small model)
  suite    --phase A|B|C|all --out $OUT             the bench, time-boxed to one device call a phase:
           A = env, model, ours, reference, ours sweep, TRL; B = seed, quality guard; C = Unsloth, bf16 base,
           TRL q,v, Liger off, no expandable_segments, torch.compile

Every measurement prints a line `RESULT {json}` and is appended to --results (jsonl).
Throughput = non-pad tokens / wall seconds over the timed optimizer steps (warm-up steps excluded),
with torch.cuda.synchronize() at each step boundary.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import subprocess
import sys
import time
import traceback

ARCH = {
    # Qwen2.5-7B: 7.62 B parameters, untied embeddings
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False),
    # Qwen2.5-0.5B: 0.49 B parameters, tied embeddings
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False),
}
PEAK_TFLOPS_DEFAULT = 790.0  # dense bf16 matmul rate an H100/H200 reaches (8192^3 measured 769-798 here)
FIRST_DATA_ID = 1000          # data token ids start here; ids below are the tiny tokenizer's
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, flush=True)


def dev():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def param_count(arch: dict) -> int:
    h, i, L, V = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    hd = h // arch["num_attention_heads"]
    kv = arch["num_key_value_heads"] * hd
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (+bias), k, v (+bias), o
    mlp = 3 * h * i
    layer = attn + mlp + 2 * h
    emb = V * h * (1 if arch["tie_word_embeddings"] else 2)
    return L * layer + emb + h


def arch_of(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    return {k: c[k] for k in ARCH["7b"]}


# --------------------------------------------------------------------------------------------- data
def gen_lengths(n: int, seed: int, max_len: int = 2048, median: float = 200.0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.75 + math.log(median))  # alpaca-like lognormal
    return [int(min(max(16, v), max_len)) for v in x.tolist()], g


def gen_sequences(n_tokens: int, vocab: int, seed: int = 0, task: str = "random", max_len: int = 2048):
    """Sequences until n_tokens are covered. task=random: uniform ids (speed runs);
    task=pattern: a fixed random successor map over 256 ids, followed with p=0.9 (learnable; loss floor ~1.1 nats)."""
    import torch
    lens, g = gen_lengths(max(64, n_tokens // 150), seed, max_len)
    out, tot, i = [], 0, 0
    if task == "pattern":
        gp = torch.Generator().manual_seed(1234)  # the task itself does not depend on the data seed
        ids = torch.randperm(vocab - FIRST_DATA_ID - 1, generator=gp)[:256] + FIRST_DATA_ID
        succ = torch.randperm(256, generator=gp)
    while tot < n_tokens:
        L = lens[i % len(lens)]
        i += 1
        if task == "random":
            s = torch.randint(FIRST_DATA_ID, vocab - 1, (L,), generator=g)
        else:
            rnd = torch.randint(0, 256, (L,), generator=g)
            keep = torch.rand(L, generator=g) < 0.9
            st = torch.empty(L, dtype=torch.long)
            st[0] = rnd[0]
            r, k = rnd.tolist(), keep.tolist()
            sl = succ.tolist()
            cur = r[0]
            seq = [cur]
            for t in range(1, L):
                cur = sl[cur] if k[t] else r[t]
                seq.append(cur)
            s = ids[torch.tensor(seq)]
        out.append(s)
        tot += L
    return out


def pack(seqs, budget: int):
    """Greedy, in order: fill micro-batches up to `budget` tokens (no sequence is split)."""
    groups, cur, n = [], [], 0
    for s in seqs:
        if cur and n + len(s) > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += len(s)
    if cur:
        groups.append(cur)
    return groups


def packed_item(group, varlen: bool = False):
    import torch
    x = torch.cat(group)[None]
    lab = x.clone()
    lens = [len(s) for s in group]
    starts = torch.cumsum(torch.tensor([0] + lens[:-1]), 0)
    lab[0, starts] = -100  # a sequence's first token is never predicted from the previous sequence
    item = {"input_ids": x, "labels": lab, "position_ids": torch.cat([torch.arange(n) for n in lens])[None]}
    if varlen:
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        item.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    return item


def micro_batches(vocab, budget, n_micro, seed=0, varlen=False, task="random"):
    seqs = gen_sequences(int(budget * n_micro * 1.05) + 4096, vocab, seed, task)
    groups = pack(seqs, budget)
    while len(groups) < n_micro:
        groups = groups + groups
    return [packed_item(g, varlen) for g in groups[:n_micro]]


class ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_one(feats):
    return feats[0]


# ------------------------------------------------------------------------------- attention: varlen
_VARLEN = {"impl": None, "mode": "unset"}


def _sdpa_loop(q, k, v, cu):
    """Reference/fallback: one causal SDPA call per packed sequence. q: (T, H, D)."""
    import torch
    import torch.nn.functional as F
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                           v[s:e].transpose(0, 1)[None], is_causal=True,
                                           enable_gqa=k.shape[1] != q.shape[1])
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


def _make_varlen_impl():
    """Flash-attention varlen through PyTorch itself (torch.nn.attention.varlen, torch >= 2.9): no flash-attn
    package needed. The signature moved between torch versions, so adapt to what is there."""
    from torch.nn.attention.varlen import varlen_attn
    sig = inspect.signature(varlen_attn).parameters

    def impl(q, k, v, cu, max_len):
        kw = {}
        if "is_causal" in sig:
            kw["is_causal"] = True
        elif "window_size" in sig:
            kw["window_size"] = (-1, 0)
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in sig:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k = k.repeat_interleave(rep, 1)
                v = v.repeat_interleave(rep, 1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return impl


def setup_varlen(device=None):
    """Pick the varlen implementation and check it against per-sequence SDPA (forward and gradients)."""
    import torch
    if _VARLEN["mode"] != "unset":
        return _VARLEN["mode"]
    device = device or dev()
    mode, impl = "sdpa_loop", None
    if device == "cuda":
        try:
            impl = _make_varlen_impl()
            torch.manual_seed(0)
            lens = [5, 130, 37, 300]
            cu = torch.tensor([0] + lens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
            T, H, Hk, D = sum(lens), 28, 4, 128
            q = torch.randn(T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(T, Hk, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(T, Hk, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            go = torch.randn(T, H, D, device=device, dtype=torch.bfloat16)
            o1 = impl(q, k, v, cu, max(lens))
            g1 = torch.autograd.grad(o1, (q, k, v), go)
            o2 = _sdpa_loop(q.float(), k.float(), v.float(), cu)
            g2 = torch.autograd.grad(o2, (q, k, v), go.float())
            errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip((o1, *g1), (o2, *g2))]
            log(f"varlen check rel.err out/dq/dk/dv = {[round(e, 5) for e in errs]}")
            if max(errs) < 2e-2:
                mode = "torch_varlen_flash"
            else:
                impl = None
        except Exception as e:  # noqa: BLE001
            log(f"varlen flash unavailable ({type(e).__name__}: {e}); falling back to per-sequence SDPA")
            impl = None
    _VARLEN.update(impl=impl, mode=mode)
    return mode


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, **kwargs):
    """transformers AttentionInterface function: (B=1, H, S, D) in, (B, S, H, D) out."""
    import torch.nn.functional as F
    cu = kwargs.get("cu_seq_lens_q")
    B, H, S, D = query.shape
    if cu is None or B != 1:
        o = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                           enable_gqa=key.shape[1] != H)
        return o.transpose(1, 2), None
    q = query.transpose(1, 2).reshape(S, H, D)
    k = key.transpose(1, 2).reshape(S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(S, value.shape[1], D)
    if _VARLEN["impl"] is not None:
        o = _VARLEN["impl"](q, k, v, cu, int(kwargs.get("max_length_q")))
    else:
        o = _sdpa_loop(q, k, v, cu)
    return o.view(1, S, H, D), None


def register_varlen():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register("qlora_varlen", varlen_attention_forward)
    try:
        AttentionMaskInterface.register("qlora_varlen", lambda *a, **k: None)
    except Exception:  # noqa: BLE001
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["qlora_varlen"] = lambda *a, **k: None


def set_attn(model, name):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(name)
    except Exception:  # noqa: BLE001
        base.config._attn_implementation_internal = name
    if base.config._attn_implementation != name:
        base.config._attn_implementation_internal = name


# ------------------------------------------------------------------------------------ fused LoRA
_FUSED = {"on": False, "patched": False, "calls": 0}


def _dequant(w, qs):
    if qs is None:
        return w
    import bitsandbytes.functional as BF
    return BF.dequantize_4bit(w, qs)


def _make_fused_fn():
    import torch

    class LoraLinearFn(torch.autograd.Function):
        """y = x W^T (+ b) + s (x A^T) B^T with W dequantized on the fly (nf4) or used as is (bf16 base).
        One LoRA add fused into the base GEMM's output (addmm, beta=1) instead of clone + mul + add;
        backward: dX = dY W + s (dY B) A in one addmm; W is dequantized again, never stored."""

        @staticmethod
        def forward(ctx, x, w, qs, bias, A, B, s):
            x2 = x.reshape(-1, x.shape[-1])
            W = _dequant(w, qs)
            xa = x2 @ A.t()
            y = torch.addmm(bias, x2, W.t()) if bias is not None else x2 @ W.t()
            y.addmm_(xa, B.t(), alpha=s)
            ctx.save_for_backward(x, xa, A, B, w if qs is None else None)
            ctx.qs, ctx.s, ctx.w4 = qs, s, (w if qs is not None else None)
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, gy):
            x, xa, A, B, wf = ctx.saved_tensors
            s = ctx.s
            W = _dequant(ctx.w4, ctx.qs) if ctx.qs is not None else wf
            g2 = gy.reshape(-1, gy.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gb = g2 @ B  # (T, r)
            dx = g2 @ W
            dx.addmm_(gb, A, alpha=s)
            dA = (gb.t() @ x2).mul_(s)
            dB = (g2.t() @ xa).mul_(s)
            return dx.view(*x.shape), None, None, None, dA, dB, None

    return LoraLinearFn


def patch_fused_lora():
    """Replace PEFT's LoRA forward for bnb Linear4bit and plain Linear layers by the fused function when the
    layer is plain LoRA (one adapter, no dropout, no DoRA/variants, no lora bias); otherwise PEFT's own path."""
    if _FUSED["patched"]:
        return
    import torch
    import torch.nn as nn
    from peft.tuners.lora import layer as lora_layer
    fn = _make_fused_fn()
    classes = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb
        if hasattr(lora_bnb, "Linear4bit"):
            classes.append(lora_bnb.Linear4bit)
    except Exception:  # noqa: BLE001
        pass

    def make(orig):
        def forward(self, x, *args, **kwargs):
            if not _FUSED["on"] or self.disable_adapters or self.merged or args or kwargs:
                return orig(self, x, *args, **kwargs)
            act = self.active_adapters
            if len(act) != 1 or act[0] not in self.lora_A or act[0] in getattr(self, "lora_variant", {}):
                return orig(self, x, *args, **kwargs)
            name = act[0]
            if not isinstance(self.lora_dropout[name], nn.Identity) or self.lora_B[name].bias is not None:
                return orig(self, x, *args, **kwargs)
            base = self.base_layer
            w = base.weight
            qs = getattr(w, "quant_state", None)
            dt = qs.dtype if qs is not None else w.dtype
            if dt not in (torch.bfloat16, torch.float16) or w.requires_grad:
                return orig(self, x, *args, **kwargs)
            A = self.lora_A[name].weight.to(dt)
            B = self.lora_B[name].weight.to(dt)
            bias = base.bias.to(dt) if base.bias is not None else None
            _FUSED["calls"] += 1
            return fn.apply(x.to(dt), w.data if qs is not None else w, qs, bias, A, B, float(self.scaling[name]))
        return forward

    for c in classes:
        c.forward = make(c.forward)
    _FUSED["patched"] = True


# --------------------------------------------------------------------------------------- loading
def load_model(model_dir, *, quant="nf4", compute=None, attn="sdpa", device=None, seed_style=False):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    device = device or dev()
    compute = compute or (torch.bfloat16 if device == "cuda" else torch.float32)
    kw = dict(attn_implementation=attn, device_map={"": 0 if device == "cuda" else "cpu"})
    if seed_style:  # the seed: load_in_4bit=True and nothing else (fp4, fp32 compute; dtype from the checkpoint)
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
    elif quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        kw["dtype"] = compute
    else:  # bf16 base, no quantization
        kw["dtype"] = compute
    t = time.time()
    m = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    m.config.use_cache = False
    log(f"loaded {quant if not seed_style else 'seed-fp4'} in {time.time() - t:.1f}s")
    return m


def lora_config(targets, dropout, task=True):
    from peft import LoraConfig
    kw = dict(r=16, lora_alpha=32, target_modules=targets, lora_dropout=dropout)
    if task:
        kw["task_type"] = "CAUSAL_LM"
    return LoraConfig(**kw)


def set_dropout(model, p):
    import torch.nn as nn
    from peft.tuners.lora.layer import LoraLayer
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            for k in list(mod.lora_dropout.keys()):
                mod.lora_dropout[k] = nn.Dropout(p) if p > 0 else nn.Identity()


def targets_of(name):
    return ALL_LINEAR if name == "all" else ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------------- measuring
class TokenCounter:
    """Counts non-pad tokens of every top-level forward (a forward pre-hook on the model Trainer calls)."""

    def __init__(self, model, pad_id=None):
        self.n = 0
        self.pad = pad_id
        self.h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        am = kwargs.get("attention_mask")
        if am is not None and am.dim() == 2:
            self.n += int(am.sum())
        elif self.pad is not None and ids.dim() == 2 and ids.shape[0] > 1:
            self.n += int((ids != self.pad).sum())
        else:
            self.n += ids.numel()

    def remove(self):
        self.h.remove()


def make_timing_callback(counter, warmup):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.marks = []  # (time, tokens seen) at train begin and at each optimizer step end
            self.losses = []
            self.counter = counter

        def on_train_begin(self, args, state, control, **kw):
            sync()
            self.marks.append((time.perf_counter(), self.counter.n))

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.marks.append((time.perf_counter(), self.counter.n))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

        def summary(self):
            m = self.marks[warmup:]
            if len(m) < 2:
                return None
            secs = m[-1][0] - m[0][0]
            toks = m[-1][1] - m[0][1]
            steps = [b[0] - a[0] for a, b in zip(m[:-1], m[1:])]
            return dict(tokens=toks, seconds=round(secs, 3), tok_per_s=round(toks / secs, 1),
                        step_s=[round(s, 3) for s in steps], timed_steps=len(steps))

    return Timing()


def mem_reset():
    import torch
    gc.collect()
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def mem_peaks():
    import torch
    if not torch.cuda.is_available():
        return {}
    return dict(peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2))


def emit(res, path):
    line = json.dumps(res)
    log("RESULT " + line)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def base_info(args, model_dir):
    import torch
    arch = arch_of(model_dir)
    n = param_count(arch)
    return dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", n_params=n, arch=args_arch_name(arch),
                peak_tflops=float(os.environ.get("PEAK_TFLOPS", PEAK_TFLOPS_DEFAULT)),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))


def args_arch_name(arch):
    for k, v in ARCH.items():
        if v["hidden_size"] == arch["hidden_size"] and v["num_hidden_layers"] == arch["num_hidden_layers"]:
            return k
    return "custom"


def finish(res, info):
    if res.get("tok_per_s"):
        res["mfu_4N"] = round(res["tok_per_s"] * 4 * info["n_params"] / (info["peak_tflops"] * 1e12), 4)
    res.update(info)
    return res


def trainer_args(out_dir, steps, ga=1, lr=2e-4, optim=None, fp16=False, bf16=True, seed=42):
    from transformers import TrainingArguments
    kw = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=ga,
              learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], fp16=fp16, bf16=bf16,
              remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=seed,
              lr_scheduler_type="constant")
    if optim:
        kw["optim"] = optim
    if dev() == "cpu":  # local dry runs only
        kw["use_cpu"] = True
    return TrainingArguments(**kw)


def run_trainer(model, items, *, steps, warmup, ga=1, optim=None, fp16=False, bf16=True, pad_id=None):
    from transformers import Trainer
    counter = TokenCounter(model, pad_id)
    cb = make_timing_callback(counter, warmup)
    tr = Trainer(model=model, args=trainer_args("/tmp/qb_trainer", steps, ga, optim=optim, fp16=fp16, bf16=bf16),
                 train_dataset=ListDataset(items), data_collator=collate_one, callbacks=[cb])
    mem_reset()
    tr.train()
    s = cb.summary() or {}
    s.update(mem_peaks())
    s["last_loss"] = cb.losses[-1] if cb.losses else None
    counter.remove()
    del tr
    return s


# ------------------------------------------------------------------------------ manual train loop
def manual_run(model, items, *, steps, warmup, ga=1, optim="adamw_torch_fused", lr=2e-4, amp=None, profile=None):
    """Plain loop (used by the sweep and the profiler). Returns throughput/memory/loss."""
    import torch
    d = dev()
    params = [p for p in model.parameters() if p.requires_grad]
    if optim in ("paged_adamw_8bit", "adamw_8bit"):
        import bitsandbytes as bnb
        opt = (bnb.optim.PagedAdamW8bit if optim.startswith("paged") else bnb.optim.AdamW8bit)(params, lr=lr)
    else:
        opt = torch.optim.AdamW(params, lr=lr, fused=(optim == "adamw_torch_fused" and d == "cuda"))
    amp = amp or torch.bfloat16
    mem_reset()
    it = iter(items * (1 + ((warmup + steps) * ga) // max(1, len(items))))
    times, toks, losses = [], 0, []
    for step in range(warmup + steps):
        sync()
        t = time.perf_counter()
        n = 0
        for _ in range(ga):
            b = next(it)
            b = {k: (v.to(d, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
            with torch.autocast(d, dtype=amp):
                out = model(**b)
            (out.loss / ga).backward()
            n += b["input_ids"].numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t)
            toks += n
            losses.append(float(out.loss))
    res = dict(tokens=toks, seconds=round(sum(times), 3), tok_per_s=round(toks / sum(times), 1),
               step_s=[round(x, 3) for x in times], timed_steps=len(times), last_loss=round(losses[-1], 4))
    res.update(mem_peaks())
    if profile:
        res["profile"] = profile_step(model, items[0], opt, params, amp)
    del opt
    return res


def _dev_us(e, self_only=True):
    names = (("self_device_time_total", "self_cuda_time_total") if self_only else ()) + \
        ("device_time_total", "cuda_time_total")
    for n in names:
        v = getattr(e, n, None)
        if v:
            return float(v)
    return 0.0


def classify_kernel(name):
    low = name.lower()
    if "dequant" in low:
        return "dequantize"
    if any(s in low for s in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(s in low for s in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "splitk", "gemv")):
        return "matmul"
    return "other"


def profile_step(model, batch, opt, params, amp):
    """One training step under torch.profiler. GPU kernel time split into dequantize / base matmul / LoRA matmul /
    attention / other (elementwise, norms, rope, loss, optimizer). LoRA matmuls are the aten mm/addmm calls that
    have a rank-16 dimension (their kernels are counted under matmul, then moved)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    d = dev()
    b = {k: (v.to(d) if torch.is_tensor(v) else v) for k, v in batch.items()}
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if d == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        t = time.perf_counter()
        with torch.autocast(d, dtype=amp):
            out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        wall = time.perf_counter() - t
    cats = dict(dequantize=0.0, matmul=0.0, attention=0.0, other=0.0)
    kernels = {}
    total = 0.0
    cuda_type = getattr(torch.autograd.DeviceType, "CUDA", None)
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != cuda_type:
            continue
        us = _dev_us(e)
        total += us
        kernels[e.key[:100]] = kernels.get(e.key[:100], 0.0) + us
        cats[classify_kernel(e.key)] += us
    ops = {}
    lora = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if getattr(e, "device_type", None) == cuda_type:
            continue
        us = _dev_us(e)
        if us <= 0:
            continue
        ops[e.key] = ops.get(e.key, 0.0) + us
        if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
            shp = str(e.input_shapes)
            if ", 16]" in shp or "[16, " in shp:
                lora += us
    lora = min(lora, cats["matmul"])
    split = dict(dequantize=cats["dequantize"], matmul_base=cats["matmul"] - lora, matmul_lora=lora,
                 attention=cats["attention"], other=cats["other"])
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return dict(wall_ms=round(wall * 1e3, 1), gpu_kernel_ms=round(total / 1e3, 1),
                split_ms={k: round(v / 1e3, 1) for k, v in split.items()},
                split_pct={k: round(100 * v / total, 1) for k, v in split.items()} if total else {},
                top_kernels=[(k, round(v / 1e3, 2)) for k, v in top],
                top_ops=[(k, round(v / 1e3, 2)) for k, v in top_ops])


# ------------------------------------------------------------------------------------ the recipes
OURS_DEFAULTS = dict(tokens=16384, dropout=0.0, fused=True, attn="varlen", ckpt=True, optim="adamw_torch_fused",
                     liger=True, base="nf4")
_STATUS = {}


def apply_liger():
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
        _STATUS["liger"] = "on"
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        _STATUS["liger"] = f"failed: {type(e).__name__}: {e}"[:200]


def build_ours(model_dir, opts):
    """Our candidate: nf4+dq (or bf16 base), bf16 non-quantized params (no fp32 upcast), Liger kernels, varlen
    flash attention over packed sequences, fused LoRA, non-reentrant checkpointing, dropout 0."""
    from peft import get_peft_model
    if opts.get("liger", True):
        apply_liger()
    else:
        _STATUS["liger"] = "off"
    try:
        register_varlen()
        vmode = setup_varlen()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        vmode = f"failed: {e}"[:100]
        opts = dict(opts, attn="sdpa")
    m = load_model(model_dir, quant=opts.get("base", "nf4"), attn="sdpa")
    if opts.get("attn", "varlen") != "sdpa":
        set_attn(m, "qlora_varlen" if opts.get("attn", "varlen") == "varlen" else opts["attn"])
    for p in m.parameters():
        p.requires_grad_(False)
    if opts.get("upcast"):
        from peft import prepare_model_for_kbit_training
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    if opts.get("ckpt", True):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from transformers import set_seed
    set_seed(int(opts.get("seed", 42)))
    m = get_peft_model(m, lora_config(targets_of(opts.get("targets", "all")), opts.get("dropout", 0.0)))
    try:
        patch_fused_lora()
        _FUSED["on"] = bool(opts.get("fused", True))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        _STATUS["fused"] = f"failed: {e}"[:200]
    m.train()
    _STATUS["attention"] = vmode
    return m, vmode


def apply_variant(model, v):
    """In-process toggles for the sweep."""
    if "dropout" in v:
        set_dropout(model, v["dropout"])
    if "fused" in v:
        _FUSED["on"] = bool(v["fused"])
    if "attn" in v:
        set_attn(model, "qlora_varlen" if v["attn"] == "varlen" else v["attn"])
    if "ckpt" in v:
        base = model.get_base_model()
        if v["ckpt"]:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()


def retarget(model, targets, dropout):
    """Swap the adapters for another target set, reusing the loaded base (memory peaks are reset)."""
    from peft import get_peft_model
    base = model.unload()
    del model
    gc.collect()
    m = get_peft_model(base, lora_config(targets_of(targets), dropout))
    m.train()
    return m


def cmd_recipe(a):
    info = base_info(a, a.dir)
    arch = arch_of(a.dir)
    V = arch["vocab_size"]
    steps, warm = a.steps, a.warmup
    extra = json.loads(a.opts or "{}")
    name = a.name
    common = dict(recipe=name, date=time.strftime("%Y-%m-%d %H:%M:%S"), warmup_steps=warm)
    ntargets = ["all", "qv"] if a.targets == "both" else [a.targets]

    def record(targets, res, **kw):
        r = dict(common, targets=targets, **kw)
        r.update(res)
        emit(finish(r, info), a.results)

    if name == "seed":
        from peft import get_peft_model
        m = load_model(a.dir, seed_style=True, attn="sdpa")  # flash_attention_2 is not installable: sdpa
        seqs = gen_sequences(16 * (steps + warm) * 260, V, 0)
        items = [{"input_ids": s[None], "labels": s[None].clone()} for s in seqs]
        for t in ntargets:
            m2 = get_peft_model(m, lora_config(targets_of(t), 0.05, task=False))
            try:
                res = run_trainer(m2, items, steps=steps + warm, warmup=warm, ga=16, fp16=True, bf16=False)
                record(t, res, micro_batch="1 sequence", ga=16, notes="fp4 (bnb default), fp32 compute, fp16 autocast, no grad-ckpt, dropout 0.05, sdpa")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                record(t, {}, error=f"{type(e).__name__}: {e}"[:400])
            m = m2.unload()
            del m2
            gc.collect()
        return

    if name == "reference":
        from peft import get_peft_model, prepare_model_for_kbit_training
        m = load_model(a.dir, quant="nf4", attn="sdpa")
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        tok = int(extra.get("tokens", 8192))
        items = micro_batches(V, tok, steps + warm, varlen=False)
        m = get_peft_model(m, lora_config(targets_of(ntargets[0]), 0.05))
        for j, t in enumerate(ntargets):
            if j:
                m = retarget(m, t, 0.05)
            res = run_trainer(m, items, steps=steps + warm, warmup=warm)
            record(t, res, micro_batch_tokens=tok, notes="nf4+dq, bf16, prepare_model_for_kbit_training, grad-ckpt, "
                   "padding-free packing (position_ids, sdpa packed mask), dropout 0.05, Trainer")
        if extra.get("profile24"):
            m = retarget(m, "all", 0.05)
            items2 = micro_batches(V, 2048, steps + warm, varlen=False)
            res = run_trainer(m, items2, steps=steps + warm, warmup=warm)
            record("all", res, micro_batch_tokens=2048, kind="profile_24gb", notes="reference at 2048-token micro-batches")
        if extra.get("profile"):
            m = retarget(m, "all", 0.05)
            res = manual_run(m, items[:3], steps=1, warmup=1, profile=True)
            record("all", res, micro_batch_tokens=tok, kind="profile", notes="one step under torch.profiler (manual loop)")
        return

    if name == "ours":
        opts = dict(extra)
        tok = int(opts.get("tokens", 16384))
        opts["targets"] = ntargets[0]
        m, vmode = build_ours(a.dir, opts)
        items = micro_batches(V, tok, steps + warm, varlen=True)
        for j, t in enumerate(ntargets):
            if j:
                m = retarget(m, t, opts.get("dropout", 0.0))
            res = run_trainer(m, items, steps=steps + warm, warmup=warm, optim=opts.get("optim", "adamw_torch_fused"))
            record(t, res, micro_batch_tokens=tok, attention=vmode, opts=opts, fused_calls=_FUSED["calls"],
                   status=dict(_STATUS), notes="Trainer; ours")
        if opts.get("profile24"):
            m = retarget(m, "all", opts.get("dropout", 0.0))
            for tk in (2048,):
                items2 = micro_batches(V, tk, steps + warm, varlen=True)
                res = run_trainer(m, items2, steps=steps + warm, warmup=warm)
                record("all", res, micro_batch_tokens=tk, kind="profile_24gb", attention=vmode, opts=opts)
        if opts.get("profile"):
            m = retarget(m, "all", opts.get("dropout", 0.0))
            res = manual_run(m, items[:3], steps=1, warmup=1, profile=True)
            record("all", res, micro_batch_tokens=tok, kind="profile", attention=vmode, opts=opts)
        return

    if name in ("trl", "unsloth"):
        return run_sft(a, name, info, common, ntargets, V, steps, warm, extra)
    raise SystemExit(f"unknown recipe {name}")


def run_sft(a, name, info, common, ntargets, V, steps, warm, extra):
    import torch
    if name == "unsloth":
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        try:
            import unsloth  # noqa: F401  (must come before transformers/trl/peft)
            from unsloth import FastLanguageModel
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit(finish(dict(common, targets=ntargets[0], error=f"import unsloth: {type(e).__name__}: {e}"[:600]), info),
                 a.results)
            return
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    tok_n = int(extra.get("tokens", 8192))
    seqs = gen_sequences(int(tok_n * (steps + warm) * 1.3) + 8192, V, 0)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in seqs]})
    tok = AutoTokenizer.from_pretrained(a.dir)
    cfg = dict(output_dir="/tmp/qb_sft", max_steps=steps + warm, per_device_train_batch_size=1, learning_rate=2e-4,
               logging_steps=1, save_strategy="no", report_to=[], bf16=True, max_length=tok_n, packing=True,
               padding_free=True, gradient_checkpointing=True, disable_tqdm=True, lr_scheduler_type="constant",
               dataset_num_proc=None, seed=42)
    if dev() == "cpu":
        cfg["use_cpu"] = True
    for t in ntargets:
        try:
            if name == "unsloth":
                model, _ = FastLanguageModel.from_pretrained(model_name=a.dir, max_seq_length=tok_n,
                                                             dtype=torch.bfloat16, load_in_4bit=True)
                model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                                         target_modules=targets_of(t), bias="none",
                                                         use_gradient_checkpointing="unsloth", random_state=42)
                peft_cfg = None
                note = "Unsloth FastLanguageModel nf4, r=16, dropout 0, unsloth grad-ckpt, TRL SFTTrainer packing"
            else:
                model = load_model(a.dir, quant="nf4", attn="sdpa")
                peft_cfg = lora_config(targets_of(t), 0.05)
                note = "TRL SFTTrainer, packing=True (bfd, padding_free), grad-ckpt, nf4+dq, dropout 0.05, sdpa"
            counter = TokenCounter(model, tok.pad_token_id)
            cb = make_timing_callback(counter, warm)
            kw = dict(model=model, args=SFTConfig(**cfg), train_dataset=ds, processing_class=tok, callbacks=[cb])
            if peft_cfg is not None:
                kw["peft_config"] = peft_cfg
            tr = SFTTrainer(**kw)
            if tr.model is not model:  # TRL wrapped the model in PEFT: count at the model Trainer calls
                counter.remove()
                counter = TokenCounter(tr.model, tok.pad_token_id)
                cb.counter = counter
            mem_reset()
            tr.train()
            res = cb.summary() or {}
            res.update(mem_peaks())
            res["last_loss"] = cb.losses[-1] if cb.losses else None
            r = dict(common, targets=t, micro_batch_tokens=tok_n, notes=note)
            r.update(res)
            emit(finish(r, info), a.results)
            counter.remove()
            del tr, model
            gc.collect()
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = dict(common, targets=t, micro_batch_tokens=tok_n, error=f"{type(e).__name__}: {e}"[:600])
            emit(finish(r, info), a.results)
            if name == "unsloth":
                return


# ------------------------------------------------------------------------------------------ sweep
def cmd_sweep(a):
    """Load our candidate once; measure variants (in-process toggles) with a manual loop."""
    info = base_info(a, a.dir)
    V = arch_of(a.dir)["vocab_size"]
    base = json.loads(a.base or "{}")
    variants = json.loads(a.variants)
    m, vmode = build_ours(a.dir, base)
    cache = {}
    deadline = time.time() + a.budget_s
    for v in variants:
        if time.time() > deadline:
            log(f"sweep: out of time, skipping {v}")
            continue
        cfg = dict(OURS_DEFAULTS)
        cfg.update(base)
        cfg.update(v)
        tok = int(cfg["tokens"])
        if tok not in cache:
            cache.clear()
            cache[tok] = micro_batches(V, tok, a.steps + a.warmup, varlen=True)
        try:
            if cfg.get("compile") and not getattr(m, "_qb_compiled", False):
                for layer in m.get_base_model().model.layers:
                    layer.compile(dynamic=True)
                m._qb_compiled = True
            apply_variant(m, cfg)
            res = manual_run(m, cache[tok], steps=a.steps, warmup=a.warmup, optim=cfg.get("optim", "adamw_torch_fused"))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}"[:400])
            if "out of memory" in str(e).lower():
                res["oom"] = True
        mem_reset()
        r = dict(recipe="ours-sweep", date=time.strftime("%Y-%m-%d %H:%M:%S"), variant=v, config=cfg, status=dict(_STATUS),
                 micro_batch_tokens=tok, attention=vmode if cfg.get("attn", "varlen") == "varlen" else cfg.get("attn"),
                 warmup_steps=a.warmup, loop="manual")
        r.update(res)
        emit(finish(r, info), a.results)


# ---------------------------------------------------------------------------------------- quality
def cmd_quality(a):
    """Loss curve on the learnable pattern task; same data order and seed for every recipe."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    arch = arch_of(a.dir)
    V = arch["vocab_size"]
    opts = json.loads(a.opts or "{}")
    tok = int(opts.get("tokens", 4096))
    set_seed(a.seed)
    if a.name == "ours":
        m, vmode = build_ours(a.dir, dict(opts, targets="all", seed=a.seed))
        varlen = True
    else:
        m = load_model(a.dir, quant="nf4", attn="sdpa")
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        set_seed(a.seed)
        m = get_peft_model(m, lora_config(ALL_LINEAR, float(opts.get("dropout", 0.05))))
        vmode, varlen = "sdpa_packed_mask", False
    items = micro_batches(V, tok, a.steps, seed=7, varlen=varlen, task="pattern")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, fused=dev() == "cuda")
    losses = []
    t0 = time.time()
    m.train()
    d = dev()
    for step, b in enumerate(items):
        b = {k: (v.to(d) if torch.is_tensor(v) else v) for k, v in b.items()}
        with torch.autocast(d, dtype=torch.bfloat16):
            out = m(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(out.loss), 5))
    r = dict(recipe=f"quality-{a.name}", label=a.label or a.name, seed=a.seed, lr=a.lr, tokens_per_step=tok,
             steps=a.steps, attention=vmode, opts=opts, arch=args_arch_name(arch), seconds=round(time.time() - t0, 1),
             first_loss=losses[0], final_loss_mean10=round(sum(losses[-10:]) / 10, 4), losses=losses,
             gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    emit(r, a.results)


# ------------------------------------------------------------------------------------------- make
def save_tokenizer(model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(996)}
    vocab.update({"<unk>": 996, "<|im_start|>": 997, "<|im_end|>": 998, "<|endoftext|>": 999})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.save_pretrained(model_dir)


def cmd_make(a):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    if os.path.exists(os.path.join(a.dir, "config.json")) and os.path.exists(os.path.join(a.dir, "made.json")):
        log(f"model already at {a.dir}")
        return
    cfg = Qwen2Config(**ARCH[a.arch], rope_theta=1e6, rms_norm_eps=1e-6, pad_token_id=999, eos_token_id=998,
                      bos_token_id=None)
    t = time.time()
    torch.manual_seed(0)
    with torch.device(dev()):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in m.parameters())
    t1 = time.time()
    m.save_pretrained(a.dir, max_shard_size="5GB")
    save_tokenizer(a.dir)
    with open(os.path.join(a.dir, "made.json"), "w") as f:
        json.dump(dict(arch=a.arch, params=n, analytic=param_count(ARCH[a.arch])), f)
    log(f"made {a.arch}: {n / 1e9:.3f}B params (analytic {param_count(ARCH[a.arch]) / 1e9:.3f}B); "
        f"init {t1 - t:.0f}s, save {time.time() - t1:.0f}s")


def cmd_env(a):
    import torch
    info = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=sys.version.split()[0], torch=torch.__version__,
                cuda=torch.version.cuda)
    from importlib import metadata
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "liger_kernel", "triton",
                "unsloth", "unsloth_zoo", "xformers", "flash_attn"):
        try:
            info[mod] = metadata.version(mod.replace("_", "-")) if mod != "liger_kernel" else metadata.version("liger_kernel")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), sms=p.multi_processor_count,
                    mem_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
        n = 8192
        x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            x @ y
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            x @ y
        e1.record()
        torch.cuda.synchronize()
        info["matmul_bf16_8192_tflops"] = round(2 * n**3 * 20 / (e0.elapsed_time(e1) / 1e3) / 1e12, 1)
        info["varlen_attention"] = setup_varlen()
        try:
            from torch.nn.attention.varlen import varlen_attn
            info["varlen_attn_signature"] = str(inspect.signature(varlen_attn))[:300]
        except Exception as e:  # noqa: BLE001
            info["varlen_attn_signature"] = f"missing ({e})"
    info["argv"] = " ".join(sys.argv)
    emit(dict(kind="env", **info), a.results)


# ------------------------------------------------------------------------------------------ suite
def _sub(args, log_path, timeout, env=None):
    import threading
    cmd = [sys.executable, os.path.abspath(__file__)] + args
    log(f"\n=== {' '.join(args)} (timeout {timeout:.0f}s)")
    t = time.time()
    e = dict(os.environ)
    e.update(env or {})
    killed = []
    with open(log_path, "a") as lf:
        lf.write(f"\n=== {' '.join(args)}\n")
        lf.flush()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, text=True)
        timer = threading.Timer(timeout, lambda: (killed.append(1), p.kill()))
        timer.start()
        try:
            for line in p.stdout:
                lf.write(line)
                lf.flush()
                if line.startswith("RESULT") or "Error" in line or line.startswith(("loaded", "made", "varlen")):
                    print(line[:700], end="" if line.endswith("\n") else "\n", flush=True)
            p.wait()
        finally:
            timer.cancel()
    log(f"=== done in {time.time() - t:.0f}s rc={p.returncode}{' (killed at the time limit)' if killed else ''}")
    return p.returncode


def cmd_suite(a):
    out = a.out or os.environ.get("OUT", "/tmp/qb_out")
    os.makedirs(out, exist_ok=True)
    res = os.path.join(out, "results.jsonl")
    lg = os.path.join(out, "log.txt")
    t_end = time.time() + a.budget_s
    model = a.model_dir
    ours_env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    plan = []
    ph = a.phase
    S, W = str(a.steps), str(a.warmup)
    uns_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("SITE_UNS"), os.environ.get("PYTHONPATH")) if p)}
    make7 = (["make", "--arch", a.arch, "--dir", model], 240, None)
    if ph in ("A", "all"):
        plan += [
            (["env", "--results", res], 90, None),
            make7,
            (["recipe", "--name", "ours", "--dir", model, "--targets", "both", "--steps", S, "--warmup", W,
              "--results", res, "--opts", json.dumps({"tokens": 16384, "profile24": True, "profile": True})], 200, ours_env),
            (["recipe", "--name", "reference", "--dir", model, "--targets", "both", "--steps", S, "--warmup", W,
              "--results", res, "--opts", json.dumps({"tokens": 8192, "profile24": True, "profile": True})], 200, None),
            (["sweep", "--dir", model, "--steps", "3", "--warmup", "2", "--results", res, "--budget_s", "160",
              "--base", json.dumps({"tokens": 16384}),
              "--variants", json.dumps([{}, {"tokens": 8192}, {"tokens": 32768}, {"fused": False}, {"attn": "sdpa"},
                                        {"dropout": 0.05}, {"optim": "paged_adamw_8bit"},
                                        {"ckpt": False, "tokens": 8192}])], 230, ours_env),
            (["recipe", "--name", "trl", "--dir", model, "--targets", "all", "--steps", S, "--warmup", W,
              "--results", res], 200, None),
        ]
    if ph in ("B", "all"):
        small = a.q_dir
        plan += [make7,
                 (["recipe", "--name", "seed", "--dir", model, "--targets", "both", "--steps", "4", "--warmup", "2",
                   "--results", res], 150, None),
                 (["make", "--arch", a.q_arch, "--dir", small], 120, None)]
        for name, seed, label, opts in (("reference", 42, "reference (dropout 0.05)", {"dropout": 0.05}),
                                        ("ours", 42, "ours", {}),
                                        ("reference", 42, "reference, dropout 0", {"dropout": 0.0}),
                                        ("ours", 43, "ours, LoRA seed 43", {}),
                                        ("reference", 43, "reference, dropout 0, LoRA seed 43", {"dropout": 0.0})):
            plan += [(["quality", "--name", name, "--dir", small, "--seed", str(seed), "--label", label,
                       "--steps", str(a.q_steps), "--lr", "1e-3", "--results", res, "--opts", json.dumps(opts)], 180,
                      ours_env if name == "ours" else None)]
    if ph in ("C", "all"):  # the 2026-11-28 device budget ran out before these
        plan += [
            make7,
            (["recipe", "--name", "unsloth", "--dir", model, "--targets", "all", "--steps", S, "--warmup", W,
              "--results", res], 240, uns_env),
            (["sweep", "--dir", model, "--steps", "3", "--warmup", "2", "--results", res, "--budget_s", "100",
              "--base", json.dumps({"tokens": 16384, "base": "bf16"}),
              "--variants", json.dumps([{}, {"tokens": 32768}, {"ckpt": False, "tokens": 8192}])], 170, ours_env),
            (["recipe", "--name", "trl", "--dir", model, "--targets", "qv", "--steps", S, "--warmup", W,
              "--results", res], 150, None),
            (["sweep", "--dir", model, "--steps", "3", "--warmup", "2", "--results", res, "--budget_s", "90",
              "--base", json.dumps({"tokens": 16384, "liger": False}),
              "--variants", json.dumps([{}, {"fused": False}])], 150, ours_env),
            (["sweep", "--dir", model, "--steps", "3", "--warmup", "2", "--results", res, "--budget_s", "60",
              "--base", json.dumps({"tokens": 16384}), "--variants", json.dumps([{}])], 120, None),  # no expandable_segments
            (["sweep", "--dir", model, "--steps", "3", "--warmup", "3", "--results", res, "--budget_s", "150",
              "--base", json.dumps({"tokens": 16384}), "--variants", json.dumps([{"compile": True}])], 200, ours_env),
        ]
    for args, tmo, env in plan:
        left = t_end - time.time()
        if left < 40:
            log(f"suite: out of time, skipping {args[:3]}")
            continue
        _sub(args, lg, min(tmo, left - 10), env)
    summarize(res)


def summarize(path):
    if not os.path.exists(path):
        return
    rows = [json.loads(x) for x in open(path) if x.strip()]
    log("\n" + "=" * 100)
    for r in rows:
        if r.get("kind") == "env":
            log(f"ENV {r.get('gpu')} torch {r.get('torch')} tf {r.get('transformers')} peft {r.get('peft')} "
                f"bnb {r.get('bitsandbytes')} trl {r.get('trl')} liger {r.get('liger_kernel')} "
                f"matmul {r.get('matmul_bf16_8192_tflops')} TF/s varlen {r.get('varlen_attention')}")
    log(f"{'recipe':14} {'targets':4} {'tokens':>6} {'variant':34} {'tok/s':>8} {'MFU':>6} {'alloc':>6} {'resv':>6} note")
    for r in rows:
        if r.get("kind") == "env" or r.get("recipe", "").startswith("quality"):
            continue
        v = json.dumps(r.get("variant", r.get("kind", "")))[:34]
        log(f"{r.get('recipe', ''):14} {r.get('targets', 'all'):4} {str(r.get('micro_batch_tokens', r.get('micro_batch', ''))):>6} "
            f"{v:34} {r.get('tok_per_s', '-')!s:>8} {r.get('mfu_4N', '-')!s:>6} {r.get('peak_alloc_gb', '-')!s:>6} "
            f"{r.get('peak_reserved_gb', '-')!s:>6} {str(r.get('error', ''))[:60]}")
        if r.get("profile") and isinstance(r["profile"], dict):
            log(f"    profile: {r['profile'].get('split_ms')} wall {r['profile'].get('wall_ms')} ms")
    for r in rows:
        if r.get("recipe", "").startswith("quality"):
            log(f"{r['label']:28} first {r['first_loss']:.3f} final(mean last 10) {r['final_loss_mean10']:.4f} "
                f"({r['seconds']}s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)
    m = sp.add_parser("make")
    m.add_argument("--arch", default="7b", choices=list(ARCH))
    m.add_argument("--dir", required=True)
    e = sp.add_parser("env")
    e.add_argument("--results")
    r = sp.add_parser("recipe")
    r.add_argument("--name", required=True, choices=["seed", "reference", "trl", "unsloth", "ours"])
    r.add_argument("--dir", required=True)
    r.add_argument("--targets", default="both", choices=["all", "qv", "both"])
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--opts", default="{}")
    r.add_argument("--results")
    s = sp.add_parser("sweep")
    s.add_argument("--dir", required=True)
    s.add_argument("--base", default="{}")
    s.add_argument("--variants", required=True)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--budget_s", type=float, default=240)
    s.add_argument("--results")
    q = sp.add_parser("quality")
    q.add_argument("--name", required=True, choices=["reference", "ours"])
    q.add_argument("--dir", required=True)
    q.add_argument("--seed", type=int, default=42)
    q.add_argument("--label")
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--opts", default="{}")
    q.add_argument("--results")
    u = sp.add_parser("suite")
    u.add_argument("--phase", default="all", choices=["A", "B", "C", "all"])
    u.add_argument("--out")
    u.add_argument("--model_dir", default="/tmp/qb_7b")
    u.add_argument("--arch", default="7b", choices=list(ARCH))
    u.add_argument("--q_dir", default="/tmp/qb_05b")
    u.add_argument("--q_arch", default="0.5b", choices=list(ARCH))
    u.add_argument("--steps", type=int, default=5)
    u.add_argument("--warmup", type=int, default=2)
    u.add_argument("--q_steps", type=int, default=100)
    u.add_argument("--budget_s", type=float, default=560)
    a = p.parse_args()
    {"make": cmd_make, "env": cmd_env, "recipe": cmd_recipe, "sweep": cmd_sweep, "quality": cmd_quality,
     "suite": cmd_suite}[a.cmd](a)


if __name__ == "__main__":
    main()
