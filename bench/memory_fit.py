#!/usr/bin/env python3
"""The memory-model bench (issue 14): measure the worker's calibration grid on the GPU, fit jobs.memory's
constants to it, and re-measure the worker's throughput with memory capped to a smaller card's.

    python bench/memory_fit.py --out DIR [--archs 0.5b,7b,14b] [--budget_s 540]     the GPU run
    python bench/memory_fit.py --out DIR --archs 7b,14b --capped_only --budget_s 230  the capped runs only
    python bench/memory_fit.py --smoke --out DIR                                    the same on the CPU, tiny
    python bench/memory_fit.py --fit DIR_OR_JSONL [...] [--write constants.json]    fit (CPU, offline)

The GPU run, one process an architecture (memory is given back between them), each time-boxed:
1. a random-weight model built from tests/fixtures/configs/ (Qwen2.5 0.5B, 7B, 14B), saved with
   bench/qlora_bench.py's tokenizer and loaded by the worker's own functions (recipe.build_model: nf4 with
   double quant, all-linear LoRA r=16, fused LoRA, Liger and varlen attention where they import);
2. capped runs, first (they are what issue 14 re-measures; see 3.), then the grid: for short rows (alpaca-like, median 200 tokens) and, for 7B, rows of ~6k tokens (max_length
   8192): every (micro-batch tokens, checkpointed layers) case run by the calibration's own measurer
   (remote_worker.calibrate.measurer: a warm-up pass, then one timed forward+backward of the worst row),
   peak allocated + AdamW state, tokens/s, and the seconds the case took. Row kind "grid";
3. capped runs (AUTODL_RUN_GPU_MEMORY_GB, enforced by torch.cuda.set_per_process_memory_fraction): the
   worker's calibration (guided by jobs.memory, partial checkpointing) chooses a shape on the capped card,
   then a few optimizer steps with that shape are timed (bench/qlora_bench.py's manual_run). Row kind
   "capped": 7B long rows at 40 GB, 7B short rows at 24 GB, 14B short rows at 24 GB.

Every row carries jobs.memory's prediction at the time it was written, and `case_s`. `--fit` fits the
constants (least squares: activations from peaks; efficiency, recompute cost and per-pass cost from times)
and prints predicted against measured for every grid row and, for caps of 24/40/48/80 GB, whether each
shape fits (measured: peak <= cap) against what the model says.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.join(REPO, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import qlora_bench as qb  # noqa: E402  (its helpers: tokenizer, sequences, worker spec, manual loop, memory)

from jobs import memory  # noqa: E402

CONFIGS = os.path.join(REPO, "tests", "fixtures", "configs")
ARCH_FILES = {"0.5b": "qwen2.5-0.5b.json", "7b": "qwen2.5-7b.json", "14b": "qwen2.5-14b.json"}
TINY = dict(qb.ARCH["tiny"], num_hidden_layers=4)
CAPS = (24, 40, 48, 80)
# (arch, rows, cap GB): the capped worker runs
CAPPED = (("7b", "long", 40), ("7b", "short", 24), ("14b", "short", 24))
H200 = dict(tflops=989.0, bandwidth=4.8e12)  # jobs.cards' H200 figures: the card the grid ran on
PAD, EOS = 999, 998


def grid_cases(arch: str, layers: int, rows: str, smoke: bool) -> list[tuple[int, int]]:
    """(micro-batch tokens, checkpointed layers) to measure: small on purpose (the run is time-boxed)."""
    if smoke:
        return [(t, k) for t in (128, 256) for k in (0, layers // 2, layers)]
    sizes = (8192, 16384) if rows == "long" else (4096, 8192, 16384)
    ks = (0, layers // 4, layers // 2, layers) if arch != "0.5b" else (0, layers)
    return [(t, k) for t in sizes for k in ks]


def row_lengths(rows: str, smoke: bool, vocab: int):
    """(max_length, a generator of rows) for a row kind. Every id is below `vocab`, the architecture's
    vocab_size: an id at or past it indexes past the embedding (on CUDA a device-side assert, "vectorized
    gather kernel index out of bounds": the 2026-11-30 run's every 0.5b case, its vocab 151,936 under the
    152,000 these generators used to draw from)."""
    top = vocab - 1  # qlora_bench.gen_sequences draws from [FIRST_DATA_ID, vocab - 1)
    if smoke:
        return 2048, (lambda n, seed: qb.gen_sequences(n, min(2048, top), seed, max_len=100))
    if rows == "long":
        return 8192, (lambda n, seed: long_sequences(n, seed, top))
    return 2048, (lambda n, seed: qb.gen_sequences(n, top, seed, max_len=2048))


def long_sequences(n_tokens: int, seed: int, vocab: int):
    """Rows of about 6k tokens (5,000-7,000, uniform): the anchors' long-row case (max_length 8192); ids
    below `vocab` - 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out, tot = [], 0
    while tot < n_tokens:
        n = int(torch.randint(5000, 7001, (1,), generator=g))
        out.append(torch.randint(qb.FIRST_DATA_ID, vocab - 1, (n,), generator=g))
        tot += n
    return out


def make_model(cfg: dict, out_dir: str) -> float:
    """A random-weight Qwen2 of `cfg`, bf16, saved with qlora_bench's tokenizer; returns seconds."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    t = time.time()
    if os.path.exists(os.path.join(out_dir, "made.json")):
        return 0.0
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings")  # fmt: skip
    config = Qwen2Config(**{k: cfg[k] for k in keys}, rope_theta=1e6, rms_norm_eps=1e-6, pad_token_id=PAD,
                         eos_token_id=EOS, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(qb.dev()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    qb.save_tokenizer(out_dir)
    with open(os.path.join(out_dir, "made.json"), "w") as f:
        json.dump({"params": sum(p.numel() for p in model.parameters())}, f)
    del model
    return time.time() - t


def load_worker_model(model_dir: str, max_length: int, smoke: bool, fused_mlp_on: bool = True):
    """The model as the worker builds it (recipe.build_model), and what the calibration needs beside it;
    with `fused_mlp_on` False, the MLPs take their own forward (the worker before 2026-11-30 night)."""
    from remote_worker import calibrate, fast, recipe
    from remote_worker.fast import fused_mlp
    from remote_worker.probe import probe

    spec = qb.ours_spec(model_dir, {"ckpt": None}, tokens=0, max_length=max_length)
    if smoke:
        spec = spec.model_copy(update={"quant": spec.quant.model_copy(update={"bits": 16})})
    machine = probe("auto")
    paths = fast.choose(model_dir, spec, machine)
    model, _ = recipe.build_model(model_dir, spec, machine, paths)
    if not fused_mlp_on:
        fused_mlp.set_enabled(model, False)
        paths.fused_mlp = False
    print(f"fused_lora: {paths.fused_lora}; fused MLP {'on' if paths.fused_mlp else 'off'}", flush=True)
    setup = recipe.memory_setup(spec, paths)
    return model, spec, machine, paths, setup, calibrate


def emit(row: dict, out: str) -> None:
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
        f.write(line + "\n")


def predicted(arch: memory.Arch, setup: memory.Setup, tokens: int, k: int, card=H200) -> dict:
    shape = memory.Shape(tokens, k)
    return {"pred_peak_gb": round(memory.estimate(arch, setup, shape).allocated / 1e9, 3),
            "pred_tokens_per_s": round(memory.tokens_per_s(arch, setup, shape, card["tflops"], card["bandwidth"]))}


def run_arch(name: str, out: str, smoke: bool, budget_s: float, keep: bool, capped_only: bool = False,
             fused_mlp_on: bool = True, only: str = "") -> None:
    """Grid and capped runs of one architecture, in this process."""
    import numpy as np
    import torch

    from remote_worker import data

    t_end = time.time() + budget_s
    cfg = dict(TINY) if smoke else json.load(open(os.path.join(CONFIGS, ARCH_FILES[name])))
    arch = memory.Arch.from_config(cfg)
    model_dir = os.path.join(os.environ.get("BENCH_MODELS", "/tmp/memfit_models"), name)
    made_s = make_model(cfg, model_dir)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    kinds = ["short", "long"] if (name == "7b" or smoke) else ["short"]
    t0 = time.time()
    longest = max(row_lengths(r, smoke, arch.vocab)[0] for r in kinds)
    model, spec, machine, paths, setup, calibrate = load_worker_model(model_dir, longest, smoke, fused_mlp_on)
    load_s = time.time() - t0
    for rows in kinds:
        max_length, gen = row_lengths(rows, smoke, arch.vocab)
        cases = grid_cases(name, arch.layers, rows, smoke)
        # the capped runs time 15 micro-batches of up to 16,384 tokens: enough rows that best-fit packing fills
        # them as it fills a real dataset's (with 3x the largest size, the 2026-11-30 evening run's 8,192-token
        # micro-batches held about 7,000 tokens: a handful of bins, the last ones part-empty)
        pool = max(t for t, _ in cases) * CAPPED_POOL
        seqs = [data.Seq(s.numpy(), np.ones(len(s), np.uint8)) for s in gen(pool, 0)]
        setup_r = dataclasses.replace(setup, mean_seq=sum(len(s.ids) for s in seqs) / len(seqs))

        def build_row(chosen, tokens, paths=paths):
            return data.micro_batch(chosen, True, PAD, pad_to=tokens, varlen=paths.varlen_batches)

        for a, r, cap in CAPPED if not smoke else (("tiny", "short", None),):
            if a != (name if not smoke else "tiny") or r != rows or (only and f"{a}:{r}:{cap}" not in only.split(",")):
                continue
            if time.time() > t_end - 60:
                emit({"kind": "skipped", "arch": name, "rows": rows, "cap_gb": cap}, out)
                continue
            emit(capped_run(model, seqs, build_row, machine, setup_r, calibrate, name, rows, cap, card,
                             paths.varlen_batches), out)
        if capped_only:
            continue
        measure = calibrate.measurer(model, seqs, build_row, machine.torch_dtype)
        state = calibrate.optimizer_state_bytes(model)
        for tokens, k in cases:
            if time.time() > t_end - 20:
                emit({"kind": "skipped", "arch": name, "rows": rows, "tokens": tokens, "checkpointed": k}, out)
                continue
            tc = time.time()
            shape = calibrate.Shape(tokens, k > 0, None if k in (0, arch.layers) else k)
            try:
                trial = measure(shape, True)
                err = None
            except Exception as exc:  # noqa: BLE001  (a bench row says what went wrong)
                trial, err = None, f"{type(exc).__name__}: {exc}"[:300]
            row = {"kind": "grid", "arch": name, "rows": rows, "card": card, "layers": arch.layers,
                   "tokens": tokens, "checkpointed": k, "real_tokens": trial.tokens if trial else None,
                   "oom": bool(trial and trial.oom), "error": err,
                   "peak_gb": round((trial.peak_bytes + state) / 1e9, 3) if trial and trial.peak_bytes else None,
                   "seconds": trial.seconds if trial else None,
                   "tokens_per_s": round(trial.tokens_per_s) if trial and trial.seconds else None,
                   "mean_seq": round(setup_r.mean_seq), "fused_loss": setup_r.fused_loss, "bits": setup_r.bits,
                   "fused_mlp": setup_r.fused_mlp,
                   "case_s": round(time.time() - tc, 2), "make_s": round(made_s, 1), "load_s": round(load_s, 1),
                   **predicted(arch, setup_r, tokens, k)}  # fmt: skip
            emit(row, out)
    if not keep and not smoke:
        shutil.rmtree(model_dir, ignore_errors=True)


CAPPED_POOL = 16  # rows for the capped runs: this many times the grid's largest micro-batch, in tokens
TIME_ALL = {"on": False}  # --time_all: also time every shape the calibration measured that fit
CAPPED_WARMUP, CAPPED_STEPS = 3, 12  # ragged rows (a pad_multiple) meet each new length in the warm-up too
PAD_VARIANTS = (0, 1024, 256)  # 0: every row filled to the micro-batch (the worker before 2026-11-30 evening)


def timed_fill(items: list[dict], warmup: int, steps: int) -> float:
    """Real (non-pad) tokens over all tokens of the micro-batches qlora_bench.manual_run times: the items
    after the warm-up ones, taken in order and round again. (The 2026-11-30 run took the warm-up item's
    fill alone: 0.65 for the 7B long rows, where the timed ones and the grid's fullest row differ.)"""
    timed = [items[i % len(items)] for i in range(warmup, warmup + steps)]
    real = sum(int((it["input_ids"] != PAD).sum()) for it in timed)
    return real / sum(it["input_ids"].numel() for it in timed)


def capped_run(model, seqs, build_row, machine, setup, calibrate, name, rows, cap, card, varlen=False) -> dict:
    """The worker's calibration on a card of `cap` GB (guided, partial checkpointing), then timed steps."""
    import torch

    from remote_worker import data

    tc = time.time()
    if cap:
        os.environ[calibrate.ENV_MEMORY_CAP] = str(cap)
    calibrate.BUDGET_S = 40.0  # the bench's time box; the worker's own budget is 90 s
    sizes = memory.sizes_for(8192 if rows == "long" else 2048) if cap else [256, 128]
    shapes = [calibrate.Shape(t, c) for c in (False, True) for t in sizes]
    row = {"kind": "capped", "arch": name, "rows": rows, "card": card, "cap_gb": cap, "fused_mlp": setup.fused_mlp}
    try:
        choice = calibrate.calibrate(model, shapes, seqs, build_row, machine.torch_dtype, setup=setup, mode="auto")
        shape = choice.shape
        variants = []
        for multiple in PAD_VARIANTS:  # how packed rows are filled (remote_worker.data.padded_length)
            mb = data.MicroBatches(seqs, shape.micro_batch_tokens, True, PAD, seed=0,
                                   pad_to=shape.micro_batch_tokens if cap else 0, pad_multiple=multiple)  # fmt: skip
            mb.varlen = varlen  # as FastPaths.configure sets it for the worker's own batches
            items = [mb[i] for i in range(min(len(mb), CAPPED_WARMUP + CAPPED_STEPS))]
            res = qb.manual_run(model, items, steps=CAPPED_STEPS, warmup=CAPPED_WARMUP)
            real = timed_fill(items, CAPPED_WARMUP, CAPPED_STEPS)
            variants.append(dict(pad_multiple=multiple, tokens_per_s=round(res["tok_per_s"] * real),
                                 padded_tokens_per_s=res["tok_per_s"], fill=round(real, 4),
                                 step_s=res.get("step_s")))  # fmt: skip
        worker = next(v for v in variants if v["pad_multiple"] == data.PAD_MULTIPLE)
        if TIME_ALL["on"]:  # after the chosen shape's own peak is read (time_trials resets it)
            chosen_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            row["timed_trials"] = time_trials(model, seqs, choice, calibrate, varlen, cap)
            calibrate.set_checkpointing(model, shape.checkpointing, shape.layers)
            row["chosen_peak_gb"] = round(chosen_peak / 1e9, 3) if chosen_peak else None
        row.update(chosen_tokens=shape.micro_batch_tokens, chosen_checkpointed=shape.layers if shape.layers is not None
                   else (0 if not shape.checkpointing else "all"), note=choice.note,
                   tokens_per_s=worker["tokens_per_s"], padded_tokens_per_s=worker["padded_tokens_per_s"],
                   fill=worker["fill"], step_s=worker["step_s"], pad_multiple=data.PAD_MULTIPLE,
                   pad_variants=variants,
                   peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None,
                   trials=[{"shape": t.shape.label(), "peak_gb": round(t.peak_bytes / 1e9, 3) if t.peak_bytes else None,
                            "tokens_per_s": round(t.tokens_per_s), "oom": t.oom} for t in choice.trials])  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    finally:
        os.environ.pop(calibrate.ENV_MEMORY_CAP, None)
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(1.0)
    row["case_s"] = round(time.time() - tc, 2)
    return row


def time_trials(model, seqs, choice, calibrate, varlen: bool, cap) -> list[dict]:
    """Each shape the calibration measured that fit, timed as the chosen one is (its trial is one forward
    and backward of the fullest row; this is CAPPED_STEPS optimizer steps): whether the choice was right."""
    import torch

    from remote_worker import data

    out = []
    for t in choice.trials:
        if t.oom:
            continue
        s = t.shape
        calibrate.set_checkpointing(model, s.checkpointing, s.layers)
        mb = data.MicroBatches(seqs, s.micro_batch_tokens, True, PAD, seed=0, pad_to=s.micro_batch_tokens if cap else 0,
                               pad_multiple=data.PAD_MULTIPLE)  # fmt: skip
        mb.varlen = varlen
        items = [mb[i] for i in range(min(len(mb), CAPPED_WARMUP + CAPPED_STEPS))]
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        res = qb.manual_run(model, items, steps=CAPPED_STEPS, warmup=CAPPED_WARMUP)
        real = timed_fill(items, CAPPED_WARMUP, CAPPED_STEPS)
        out.append(dict(shape=s.label(), trial_tokens_per_s=round(t.tokens_per_s), tokens_per_s=round(res["tok_per_s"] * real),
                        fill=round(real, 4), mean_tokens=round(sum(it["input_ids"].numel() for it in items) / len(items)),
                        peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None))  # fmt: skip
        print(f"timed {s.label()}: {out[-1]}", flush=True)
    return out


# --- the fit (CPU, offline) -------------------------------------------------------------------------


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        files = sorted(glob.glob(os.path.join(p, "**", "*.jsonl"), recursive=True)) if os.path.isdir(p) else [p]
        for f in files:
            with open(f) as fh:
                rows += [json.loads(x) for x in fh if x.strip()]
    return rows


def arch_for(row: dict) -> memory.Arch:
    if row["arch"] in ARCH_FILES:
        return memory.Arch.from_config(json.load(open(os.path.join(CONFIGS, ARCH_FILES[row["arch"]]))))
    return memory.Arch.from_config(TINY)


def setup_for(row: dict) -> memory.Setup:
    return memory.Setup(bits=row.get("bits", 4), fused_loss=row.get("fused_loss", True),
                        mean_seq=row.get("mean_seq", 512), fused_mlp=row.get("fused_mlp", False))  # fmt: skip


def usable_gb(cap_gb: float) -> float:
    """What the calibration accepts on a card capped to `cap_gb` (remote_worker.calibrate.choose: the
    usable memory, here the cap, less its headroom); the model's side is jobs.memory.fits with the same
    usable memory (guide's rule: card = usable + context)."""
    cap = cap_gb * 1e9
    return (cap - max(memory.MIN_HEADROOM_BYTES, cap * memory.HEADROOM)) / 1e9


def grid_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "grid" and not r.get("oom") and not r.get("error")]


def fit(rows: list[dict], card=H200, base: memory.Constants = memory.DEFAULT) -> memory.Constants:
    """Least squares on relative errors (every row weighs alike, small peaks as much as large ones).

    Memory: measured peak - weights - LoRA = act_h, act_kv, act_i (non-checkpointed layers), ckpt_h
    (checkpointed ones), transient_layers (one layer at the current per-token size, when any is
    checkpointed) and token_h, times their features (the loss head at its set constants aside). Time: the measured seconds of the whole row
    (micro_batch_tokens, padding included) = a·F_base + b·F_recompute + e·F_attention + c·D, where
    a = 1/(rate·efficiency), b = recompute_cost·a, e = attn_cost·a, c = 1/(bandwidth·bw_efficiency)
    (D: bytes of nf4 layer passes)."""
    import numpy as np

    grid = grid_rows(rows)
    out = base
    mem = [r for r in grid if r.get("peak_gb")]
    for _ in range(8 if len(mem) >= 6 else 0):  # transient_layers multiplies a full layer at the current act_*
        X, y = [], []
        for r in mem:
            a, s, t, k = arch_for(r), setup_for(r), r["tokens"], r["checkpointed"]
            free = memory.estimate(a, s, memory.Shape(t, 0), replace(out, token_h=0.0))
            n = a.layers - k
            full = memory.layer_activation_bytes(a, t, out, 2, s.fused_mlp) if k else 0.0
            # a fused-MLP row kept fused_mlp_i fewer values an intermediate unit (known by construction):
            # add them back, so that act_i stays the unfused layer's figure
            unkept = n * t * a.intermediate * 2 * out.fused_mlp_i if s.fused_mlp else 0.0
            w = 1.0 / (r["peak_gb"] * 1e9)
            X.append([w * v for v in (n * t * a.hidden * 2, n * t * a.kv_dim * 2, n * t * a.intermediate * 2,
                                      k * t * a.hidden * 2, full, t * a.hidden)])  # fmt: skip
            y.append(w * (r["peak_gb"] * 1e9 + unkept - free.weights - free.lora - free.loss_head))
        coef = nnls(np.array(X), np.array(y))
        out = replace(out, act_h=coef[0], act_kv=coef[1], act_i=coef[2], ckpt_h=coef[3],
                      transient_layers=coef[4], token_h=coef[5])  # fmt: skip
    timed = [r for r in grid if r.get("seconds")]
    # rows the CPU's launch floor decides (measured well over the GPU work predicted) fit the floor, the
    # others the GPU constants; two rounds, since which rows are which depends on the GPU constants
    for _ in range(2):
        bound = [r for r in timed if r["seconds"] > LAUNCH_BOUND * gpu_pred(r, out, card)]
        out = fit_gpu([r for r in timed if r not in bound], out, card)
        out = fit_launch(bound, out)
    return out


LAUNCH_BOUND = 1.5  # a row is launch-bound when it took this many times the predicted GPU seconds


def gpu_pred(r: dict, c: memory.Constants, card=H200) -> float:
    a, s = arch_for(r), setup_for(r)
    return memory.gpu_seconds(a, s, memory.Shape(r["tokens"], r["checkpointed"]), card["tflops"], card["bandwidth"], c)


def fit_launch(rows: list[dict], c: memory.Constants) -> memory.Constants:
    """launch_layer_s and launch_recompute_s from launch-bound rows: seconds = layers·d + k·r (relative)."""
    import numpy as np

    if len({r["checkpointed"] > 0 for r in rows}) < 2:  # both kinds are needed to separate d from r
        return c
    X = [[arch_for(r).layers / r["seconds"], r["checkpointed"] / r["seconds"]] for r in rows]
    d, rc = nnls(np.array(X), np.ones(len(rows)))
    return replace(c, launch_layer_s=float(d), launch_recompute_s=float(rc))


def fit_gpu(timed: list[dict], out: memory.Constants, card=H200) -> memory.Constants:
    import numpy as np

    if len(timed) >= 4:
        X, y = [], []
        unit = replace(out, recompute_cost=0.0, attn_cost=0.0)
        for r in timed:
            a, s, t, k = arch_for(r), setup_for(r), r["tokens"], r["checkpointed"]
            shape = memory.Shape(t, k)
            f0 = memory.flops_per_token(a, s, shape, unit) * t
            f1 = k * 2.0 * a.layer_params * t
            fa = memory.attention_flops(a, s, shape) * t
            d = (2 * a.layers + k) * a.layer_params * (memory.NF4_BYTES + 2) if s.bits == 4 else 0.0
            w = 1.0 / r["seconds"]
            X.append([w * f0, w * f1, w * fa, w * d])
            y.append(1.0)  # seconds / seconds: the padded row's time, in relative terms
        a_, b_, e_, c_ = nnls(np.array(X), np.array(y))
        rate = card["tflops"] * 1e12
        out = replace(out, efficiency=1 / (a_ * rate) if a_ else out.efficiency,
                      recompute_cost=b_ / a_ if a_ else out.recompute_cost,
                      attn_cost=e_ / a_ if a_ else out.attn_cost,
                      bw_efficiency=1 / (c_ * card["bandwidth"]) if c_ else out.bw_efficiency)  # fmt: skip
    return out


def nnls(X, y):
    """Non-negative least squares, scaled per column (numpy only): lstsq, then drop negative columns."""
    import numpy as np

    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1
    Xs = X / scale
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(Xs[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active = [j for j, v in zip(active, sol) if v >= 0] if (sol >= 0).any() else []
    return coef / scale


def predict_row(r: dict, c: memory.Constants, card=H200) -> tuple[float, float]:
    """(allocated GB, real tokens/s) jobs.memory predicts for a grid row: the model's tokens/s is of the
    micro-batch (padding included), the row's of its real tokens."""
    a, s = arch_for(r), setup_for(r)
    shape = memory.Shape(r["tokens"], r["checkpointed"])
    fill = (r.get("real_tokens") or r["tokens"]) / r["tokens"]
    return (memory.estimate(a, s, shape, c).allocated / 1e9,
            memory.tokens_per_s(a, s, shape, card["tflops"], card["bandwidth"], c) * fill)  # fmt: skip


def fits_wrong(r: dict, c: memory.Constants) -> list[str]:
    """Caps where the model's fits/does-not-fit differs from the calibration's verdict on the measured
    peak, both under the calibration's rule (the usable memory less its headroom)."""
    if not (r.get("oom") or r.get("peak_gb")):
        return []
    a, s = arch_for(r), setup_for(r)
    shape = memory.Shape(r["tokens"], r["checkpointed"])
    wrong = []
    for cap in CAPS:
        measured = bool(r.get("peak_gb")) and not r.get("oom") and r["peak_gb"] <= usable_gb(cap)
        predicted = memory.fits(a, s, shape, cap * 1e9 + c.context_bytes, c)
        if measured != predicted:
            wrong.append(f"{r['arch']} {r['rows']} {r['tokens']}/{r['checkpointed']} at {cap} GB: measured "
                         f"{'fits' if measured else 'does not fit'} (limit {usable_gb(cap):.2f} GB), predicted "
                         f"the other")  # fmt: skip
    return wrong


def report(rows: list[dict], c: memory.Constants, card=H200) -> list[str]:
    """Predicted against measured, for every grid row; fits per cap; the capped runs."""
    lines = ["| arch | rows | tokens | ckpt | peak GB meas / pred | err | tokens/s meas / pred | err |",
             "|---|---|---|---|---|---|---|---|"]
    worst_mem = worst_speed = 0.0
    wrong: list[str] = []
    for r in (r for r in rows if r.get("kind") == "grid"):
        a = arch_for(r)
        pm, ps = predict_row(r, c, card)
        mm, ms = r.get("peak_gb"), r.get("tokens_per_s")
        em = (pm - mm) / mm if mm else None
        es = (ps - ms) / ms if ms else None
        if em is not None:
            worst_mem = max(worst_mem, abs(em))
        if es is not None:
            worst_speed = max(worst_speed, abs(es))
        meas = "OOM" if r.get("oom") else (f"{mm:.1f}" if mm else ("error" if r.get("error") else "-"))
        lines.append(f"| {r['arch']} | {r['rows']} | {r['tokens']:,} | {r['checkpointed']}/{a.layers} | {meas} / "
                     f"{pm:.1f} | {'' if em is None else f'{em:+.0%}'} | {f'{ms:,}' if ms else '-'} / {ps:,.0f} | "
                     f"{'' if es is None else f'{es:+.0%}'} |")  # fmt: skip
        wrong += fits_wrong(r, c)
    lines.append(f"\nworst peak error {worst_mem:.0%} (target 10%), worst tokens/s error {worst_speed:.0%} "
                 f"(target 20%); fits/does-not-fit wrong in {len(wrong)} case(s) over caps {CAPS} "
                 f"(the calibration's rule: peak <= cap - max(1 GB, {memory.HEADROOM:.0%}))")
    lines += [f"- {w}" for w in wrong]
    for r in (r for r in rows if r.get("kind") == "capped"):
        lines.append(f"capped {r['arch']} {r['rows']} at {r['cap_gb']} GB: {r.get('note') or r.get('error')}; "
                     f"{r.get('tokens_per_s')} tokens/s, peak {r.get('peak_gb')} GB, {r.get('case_s')} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="where rows.jsonl and log.txt go")
    p.add_argument("--archs", default="0.5b,7b,14b")
    p.add_argument("--budget_s", type=float, default=540.0, help="the whole GPU run")
    p.add_argument("--smoke", action="store_true", help="the GPU run on the CPU with a tiny 4-layer config")
    p.add_argument("--keep", action="store_true", help="keep the made models (default: removed after use)")
    p.add_argument("--capped_only", action="store_true", help="the capped runs only, not the grid")
    p.add_argument("--fit", nargs="+", metavar="ROWS", help="fit the constants to rows (folders or jsonl files)")
    p.add_argument("--write", help="with --fit: write the fitted constants here (JSON)")
    p.add_argument("--no_fused_mlp", action="store_true", help="MLPs unfused (A/B against the fused MLP)")
    p.add_argument("--only", default="", help="capped cases to run, e.g. 7b:short:24,14b:short:24 (default all)")
    p.add_argument("--time_all", action="store_true", help="capped runs: time every shape that fit, not only the choice")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one architecture
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # as the worker's __main__ sets it, before torch is imported (here or in the children)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if a.fit:
        rows = read_rows(a.fit)
        c = fit(rows)
        print("fitted constants (jobs.memory.Constants):")
        print(json.dumps(c.as_dict(), indent=1))
        print("\n".join(report(rows, c)))
        if a.write:
            with open(a.write, "w") as f:
                json.dump(c.as_dict(), f, indent=1)
        return 0
    if not a.out:
        p.error("--out is needed")
    os.makedirs(a.out, exist_ok=True)
    TIME_ALL["on"] = a.time_all
    if a.one:
        run_arch(a.one, a.out, a.smoke, max(30.0, a.until - time.time()), a.keep, a.capped_only,
                 not a.no_fused_mlp, a.only)
        return 0
    t_end = time.time() + a.budget_s
    archs = ["tiny"] if a.smoke else a.archs.split(",")
    share = {"0.5b": 0.12, "7b": 0.48, "14b": 0.40, "tiny": 1.0}
    for name in archs:
        left = t_end - time.time()
        if left < 40:
            emit({"kind": "skipped", "arch": name, "why": "out of time"}, a.out)
            continue
        rest = archs[archs.index(name):]
        mine = time.time() + left * share.get(name, 0.3) / sum(share.get(n, 0.3) for n in rest)
        args = [sys.executable, os.path.abspath(__file__), "--one", name, "--out", a.out, "--until", str(mine)]
        args += ["--smoke"] * a.smoke + ["--keep"] * a.keep + ["--capped_only"] * a.capped_only
        args += ["--no_fused_mlp"] * a.no_fused_mlp + ["--time_all"] * a.time_all + (["--only", a.only] if a.only else [])
        t = time.time()
        with open(os.path.join(a.out, "log.txt"), "a") as log:
            try:
                rc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, timeout=max(30, mine - time.time() + 30),
                                    preexec_fn=qb._die_with_parent).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = "timeout"
        emit({"kind": "arch_done", "arch": name, "rc": rc, "arch_s": round(time.time() - t, 1)}, a.out)
    rows = read_rows([os.path.join(a.out, "rows.jsonl")])
    print("\n".join(report(rows, memory.DEFAULT)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
