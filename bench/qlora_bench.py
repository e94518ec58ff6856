#!/usr/bin/env python3
"""QLoRA training-speed bench (issue 4): the seed's recipe, a reference Transformers+PEFT stack,
TRL SFTTrainer, Unsloth and our candidate recipe, side by side on the same random-weight model and
the same synthetic token data. See bench/README.md.

"ours" is the worker itself (remote_worker): `recipe --name ours` runs its entry point on a job.json over
synthetic pre-tokenized data and reads tokens/s and memory from its events.jsonl; the sweep, the profile and
the quality guard build the model, LoRA and micro-batches with the worker's own functions.

Subcommands (each runs in its own process; `suite` starts the others as subprocesses):
  make     --arch 7b|0.5b|tiny --dir DIR          random-weight Qwen2.5-shaped model + tiny tokenizer
  env                                               card, versions, measured bf16 matmul rate
  recipe   --name seed|reference|trl|unsloth|ours  one recipe, one process: all-linear, then q,v (and extras)
  sweep    --dir DIR --base '{...}' --variants '[{...}, ...]'   ours-style variants in one process (manual loop)
  quality  --dir DIR --name reference|ours ...     loss curve on a learnable synthetic task (small model)
  worker   --job JOB_JSON                           the worker's entry point in this process, + memory peaks
  smoke    [--out DIR]                              CPU dry run on the tiny model of everything phase W runs
  suite    --phase W|Q|K|A|B|C|all --out $OUT           the bench, time-boxed to one device call a phase:
           W = env, model, ours (the worker: all-linear, q,v, 2,048 tokens, an eval check), reference, ours sweep
               (+ Unsloth with --unsloth); Q = quality guard: ours and reference (dropout 0), seeds 42 and 43,
               ours with Liger, fused LoRA or varlen attention off; K = the worker's calibrated micro-batch and
               checkpointing on this card, and capped to 80 GB and 24 GB (AUTODL_RUN_GPU_MEMORY_GB);
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the worker (remote_worker, jobs) is imported from this checkout
    sys.path.insert(0, REPO)

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
    """In order, next-fit into micro-batches of `budget` tokens (no sequence is split): the worker's packer."""
    from jobs import packing
    return [[seqs[i] for i in g] for g in packing.pack([len(s) for s in seqs], budget)]


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


# --------------------------------------------------------------- ours = the worker's own code
# Our candidate is remote_worker itself. `recipe --name ours` runs the worker's entry point
# (remote_worker.__main__.main) on a job.json over synthetic pre-tokenized data and reads
# events.jsonl; the sweep, the profile and the quality guard build the model, the LoRA and the
# micro-batches with the worker's own functions (remote_worker.recipe / .fast / .data). Nothing of
# the candidate (varlen attention, fused LoRA, Liger, model preparation) is implemented here.
OURS_TARGETS = {"all": "all-linear", "qv": ["q_proj", "v_proj"]}


def worker_modules():
    """(remote_worker.data, remote_worker.fast, remote_worker.recipe); imported late (torch, pydantic)."""
    try:
        import pydantic  # noqa: F401
    except ImportError as e:
        raise SystemExit("the worker needs pydantic: extract .whl/worker_deps.tgz into PYTHONPATH "
                         "(bench/README.md)") from e
    from remote_worker import data as wdata
    from remote_worker import fast
    from remote_worker import recipe as wrecipe
    return wdata, fast, wrecipe


def ours_spec(model_dir, opts, *, targets="all", steps=7, tokens=16384, max_length=2048, name="bench-ours"):
    """The JobSpec of our candidate. opts: attn varlen|sdpa|flash_attention_2, liger, fused, dropout, ckpt,
    base nf4|bf16, seed, lr. Unset keys are the worker's defaults (attention/liger auto, fused LoRA on)."""
    from jobs.spec import JobSpec
    attn = {"varlen": "auto", "sdpa": "sdpa", "flash_varlen": "flash_varlen",
            "flash_attention_2": "flash_attention_2"}[opts.get("attn", "varlen")]
    train = dict(max_steps=max(1, int(steps)), learning_rate=float(opts.get("lr", 2e-4)), lr_scheduler="constant",
                 warmup_ratio=0.0, micro_batch_tokens=int(tokens), logging_steps=1, save_every_minutes=0,
                 seed=int(opts.get("seed", 42)), attention=attn, liger="auto" if opts.get("liger", True) else "off",
                 fused_lora=bool(opts.get("fused", True)),
                 gradient_checkpointing={True: "on", False: "off"}.get(opts.get("ckpt"), "auto"))
    lora = dict(r=16, alpha=32, dropout=float(opts.get("dropout", 0.0)), target_modules=OURS_TARGETS[targets])
    return JobSpec.model_validate(dict(
        name=name, model={"name_or_path": model_dir}, data={"train": "train.jsonl", "max_length": max_length},
        lora=lora, quant={"bits": 16 if opts.get("base") == "bf16" else 4}, train=train))


def set_attn(model, name):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(name)
    except Exception:  # noqa: BLE001
        base.config._attn_implementation_internal = name
    if base.config._attn_implementation != name:
        base.config._attn_implementation_internal = name


def write_dataset(data_dir, model_dir, vocab, train_tokens, eval_tokens=0, seed=0, task="random", max_len=2048):
    """A canonical prepared dataset (jobs.layout) of synthetic pre-tokenized sequences: the worker uses the
    ids because the manifest's tokenizer fingerprint is its tokenizer's. Every token is trained."""
    from jobs import tokenize
    _, _, wrecipe = worker_modules()
    tok = wrecipe.load_tokenizer(model_dir, ours_spec(model_dir, {}))
    os.makedirs(data_dir, exist_ok=True)
    counts = {}
    for split, n, s in (("train", train_tokens, seed), ("eval", eval_tokens, seed + 1)):
        if not n:
            continue
        seqs = gen_sequences(n, vocab, s, task, max_len)
        counts[split] = tokenize.write_tokenized(
            data_dir, split, (tokenize.Encoded(x.tolist(), [1] * len(x)) for x in seqs))
        with open(os.path.join(data_dir, f"{split}.jsonl"), "w") as f:  # present, never read (ids are used)
            f.writelines('{"text": "synthetic pre-tokenized sequence"}\n' for _ in seqs)
    from jobs.layout import DATASET_MANIFEST
    from jobs.protocol import DatasetManifest, dump_model
    manifest = DatasetManifest(format_version=1, digest="synthetic", tokens=counts,
                               tokenizer_fingerprint=tokenize.tokenizer_fingerprint(tok),
                               report={"synthetic": counts, "task": task})
    with open(os.path.join(data_dir, DATASET_MANIFEST), "w") as f:
        f.write(dump_model(manifest))
    return counts


def read_events(job_dir):
    from jobs import events as ev
    from jobs.layout import JobPaths
    with open(JobPaths(job_dir).events) as f:
        return [ev.parse(x) for x in f if x.strip()]


def worker_result(job_dir, warm):
    """Throughput and memory of a worker run, from its events.jsonl (and the peaks `worker` wrote)."""
    evs = read_events(job_dir)
    res = {}
    started = next((e for e in evs if e.type == "started"), None)
    if started is not None:
        s = started.model_dump()
        res.update({k: s.get(k) for k in ("attention", "attention_note", "liger", "fused_lora", "micro_batch_tokens",
                                          "grad_accum", "gradient_checkpointing", "train_tokens", "train_sequences",
                                          "trainable_params", "total_steps", "device", "dtype", "quant",
                                          "calibration")})
    cal = [e for e in evs if e.type == "phase" and e.phase == "calibrating"]
    if len(cal) >= 2:
        res["calibration_s"] = round(cal[-1].t - cal[0].t, 1)
    failed = [e for e in evs if e.type == "failed"]
    if failed:
        res["error"] = f"worker failed: {failed[-1].error_class}: {failed[-1].message}"[:600]
    steps = [e for e in evs if e.type == "step"]
    if len(steps) > warm:
        t0, k0 = (steps[warm - 1].elapsed_s, steps[warm - 1].tokens) if warm else (0.0, 0)
        last = steps[-1]
        secs = last.elapsed_s - t0
        ts = [t0] + [e.elapsed_s for e in steps[warm:]]
        res.update(tokens=last.tokens - k0, seconds=round(secs, 3), tok_per_s=round((last.tokens - k0) / secs, 1),
                   step_s=[round(b - a, 3) for a, b in zip(ts[:-1], ts[1:])], timed_steps=len(steps) - warm,
                   last_loss=steps[-1].loss, losses=[round(e.loss, 4) for e in steps])
        peaks = [e.peak_mem_gb for e in steps if e.peak_mem_gb is not None]
        if peaks:
            res["peak_alloc_gb"] = round(max(peaks), 2)
    elif "error" not in res:
        res["error"] = f"only {len(steps)} step events (warm-up {warm})"
    evals = [e.eval_loss for e in evs if e.type == "eval"]
    if evals:
        res["eval_losses"] = [round(x, 4) for x in evals]
    res["done"] = any(e.type == "done" for e in evs)
    peaks_path = os.path.join(job_dir, "bench_peaks.json")
    if os.path.exists(peaks_path):
        with open(peaks_path) as f:
            res.update(json.load(f))  # torch's peaks after the run: allocated and reserved
    return res


def _die_with_parent():
    """A worker started by a recipe process dies with it (the suite kills recipes at their time limit;
    an orphaned worker would keep the GPU busy under the next measurement). Linux only."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def run_worker_job(model_dir, root, *, targets, tokens, steps, warm, opts, vocab, timeout=300):
    """Write data + job.json, run the worker on it (`worker` subcommand, a process of its own), read its events."""
    from jobs.spec import WorkerJob
    max_len = int(opts.get("max_len", 2048))
    budget = tokens or (16384 if dev() == "cuda" else max_len)  # only to size the data (the largest shape tried)
    train_tokens = int(budget * (steps + warm + 1) * 1.1) + 4096
    data_dir = os.path.join(root, f"data-{train_tokens}-{max_len}-{int(bool(opts.get('eval')))}")
    from jobs.layout import DATASET_MANIFEST, JobPaths
    from jobs.protocol import DatasetManifest, read_model
    if not os.path.exists(os.path.join(data_dir, DATASET_MANIFEST)):
        write_dataset(data_dir, model_dir, vocab, train_tokens, eval_tokens=budget if opts.get("eval") else 0,
                      max_len=max_len)
    job_id = f"ours-{targets}-{tokens}-{int(time.time() * 1000) % 10**9}"
    job_dir = os.path.join(root, job_id)
    spec = ours_spec(model_dir, opts, targets=targets, steps=steps + warm, tokens=tokens, max_length=max_len)
    job = WorkerJob(job_id=job_id, spec=spec, data_dir=data_dir, job_dir=job_dir)
    os.makedirs(job_dir, exist_ok=True)
    job_json = JobPaths(job_dir).spec
    with open(job_json, "w") as f:
        f.write(job.model_dump_json(indent=1))
    log(f"worker job {job_json}")
    env = dict(os.environ)
    if opts.get("gpu_gb"):  # the memory of a smaller card, enforced by torch (remote_worker.calibrate)
        env["AUTODL_RUN_GPU_MEMORY_GB"] = str(opts["gpu_gb"])
    try:
        rc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", "--job", job_json],
                            timeout=timeout, preexec_fn=_die_with_parent, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res = worker_result(job_dir, warm) if os.path.exists(JobPaths(job_dir).events) else {
        "error": "the worker wrote no events"}
    with open(os.path.join(data_dir, DATASET_MANIFEST), "rb") as f:
        made = read_model(DatasetManifest, f.read(), data_dir).report["synthetic"]["train"]["tokens"]
    if res.get("train_tokens") is not None and res["train_tokens"] != made:  # it re-tokenized the jsonl
        res["error"] = f"the worker trained on {res['train_tokens']} tokens, not the {made} synthetic ones"
    res.update(worker_rc=rc, job_dir=job_dir)
    if rc != 0 and "error" not in res:
        res["error"] = f"worker exit code {rc}"
    return res


def cmd_worker(a):
    """The worker's own entry point, in this process, then torch's memory peaks next to its events."""
    from remote_worker.__main__ import main as worker_main
    rc = worker_main([a.job])  # sets PYTORCH_CUDA_ALLOC_CONF before torch is imported, as on an instance
    with open(a.job) as f:
        job_dir = json.load(f)["job_dir"]
    with open(os.path.join(job_dir, "bench_peaks.json"), "w") as f:
        # reset by the worker's callback at train begin: the peaks of training (and evaluation)
        json.dump(dict(mem_peaks(), alloc_conf_in_worker=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")), f)
    raise SystemExit(rc)


class Ours:
    """Our candidate built in this process by the worker's own functions, as recipe.run does it
    (set_seed -> probe -> fast.choose -> recipe.build_model), for the sweep, the profile and the quality guard."""

    def __init__(self, model_dir, opts):
        from transformers import set_seed

        from remote_worker.probe import probe
        self.wdata, fast, self.wrecipe = worker_modules()
        self.opts = dict(opts)
        self.spec = ours_spec(model_dir, self.opts, targets=self.opts.get("targets", "all"))
        set_seed(self.spec.train.seed)  # first, as recipe.run does: LoRA's initial weights follow it
        self.machine = probe("auto")
        self.paths = fast.choose(model_dir, self.spec, self.machine)
        self.model, _ = self.wrecipe.build_model(model_dir, self.spec, self.machine, self.paths)
        log(f"ours (worker functions): {self.status()}")

    def status(self):
        from remote_worker import calibrate
        from remote_worker.fast import fused_lora
        marked = sum(bool(getattr(x, fused_lora.FLAG, False)) for x in self.model.modules())
        return dict(self.paths.started_fields(), gradient_checkpointing=calibrate.is_checkpointing(self.model),
                    fused_layers_now=marked)

    def batches(self, vocab, budget, n_micro, seed=0, task="random"):
        """The bench's sequence stream, packed in order as before, each row made by remote_worker.data."""
        import numpy as np
        seqs = gen_sequences(int(budget * n_micro * 1.05) + 4096, vocab, seed, task)
        groups = pack(seqs, budget)
        while len(groups) < n_micro:
            groups = groups + groups
        seq = self.wdata.Seq
        return [self.wdata.packed_row([seq(s.numpy(), np.ones(len(s), np.uint8)) for s in g],
                                      varlen=self.paths.varlen_batches) for g in groups[:n_micro]]

    def apply_variant(self, v):
        """In-process toggles for the sweep (Liger and the base are fixed at load: use --base for them)."""
        from remote_worker.fast import fused_lora
        m = self.model
        if "dropout" in v:
            set_dropout(m, v["dropout"])  # a dropout layer leaves the fused path by itself
        if "fused" in v:
            fused_lora.set_enabled(m, bool(v["fused"]))
        if "attn" in v:
            set_attn(m, self.paths.attn_implementation if v["attn"] == "varlen" else v["attn"])
        if "ckpt" in v:
            from remote_worker import calibrate
            calibrate.set_checkpointing(m, bool(v["ckpt"]))


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
        return run_ours(a, record, ntargets, V, steps, warm, extra)

    if name in ("trl", "unsloth"):
        return run_sft(a, name, info, common, ntargets, V, steps, warm, extra)
    raise SystemExit(f"unknown recipe {name}")


def run_ours(a, record, ntargets, V, steps, warm, extra):
    """Ours = the worker: one `python -m remote_worker`-equivalent run per target set (a process each, so the
    memory peaks don't mix), timed from its events.jsonl. opts: tokens (0 = the worker's default: measured on CUDA), caps (more runs with
    AUTODL_RUN_GPU_MEMORY_GB at each value),
    profile24 (one more run at 2,048 tokens), profile (one step under torch.profiler, built in-process from the
    worker's functions), eval (an eval split, to exercise evaluation), max_len, and ours_spec's switches."""
    root = extra.get("root") or os.path.join(os.environ.get("OUT") or "/tmp", "qb_worker_jobs")
    tokens = int(extra.get("tokens", 0))
    runs = [(t, tokens, {}, {}) for t in ntargets]
    for cap in extra.get("caps", []):  # the worker's own choice (tokens 0, checkpointing auto) on a card of cap GB
        runs.append(("all", 0, {"kind": f"card_{cap}gb"}, {"gpu_gb": cap}))
    if extra.get("profile24"):
        runs.append(("all", 2048, {"kind": "profile_24gb"}, {}))
    if extra.get("eval_check"):  # an eval split: with Liger on, eval must not build the logits (skip_logits)
        runs.append(("all", tokens, {"kind": "eval_check"}, {"eval": True}))
    for t, tok, kw, more in runs:
        res = run_worker_job(a.dir, root, targets=t, tokens=tok, steps=steps, warm=warm, opts=dict(extra, **more),
                             vocab=V)
        record(t, res, opts=extra, notes="the worker itself: remote_worker.__main__.main(its job file) on synthetic "
               "pre-tokenized data, Trainer; rows padded to the micro-batch on CUDA; non-pad tokens counted", **kw)
    if extra.get("profile"):
        ours = Ours(a.dir, dict(extra, targets="all"))
        tok = tokens or 16384
        res = manual_run(ours.model, ours.batches(V, tok, 3), steps=1, warmup=1, profile=True)
        record("all", res, micro_batch_tokens=tok, kind="profile", status=ours.status(), opts=extra,
               notes="one step under torch.profiler (manual loop), model built by the worker's functions")


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
    ours = Ours(a.dir, base)
    m = ours.model
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
            cache[tok] = ours.batches(V, tok, a.steps + a.warmup)
        try:
            if cfg.get("compile") and not getattr(m, "_qb_compiled", False):
                for layer in m.get_base_model().model.layers:
                    layer.compile(dynamic=True)
                m._qb_compiled = True
            ours.apply_variant(cfg)
            res = manual_run(m, cache[tok], steps=a.steps, warmup=a.warmup, optim=cfg.get("optim", "adamw_torch_fused"))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}"[:400])
            if "out of memory" in str(e).lower():
                res["oom"] = True
        mem_reset()
        r = dict(recipe="ours-sweep", date=time.strftime("%Y-%m-%d %H:%M:%S"), variant=v, config=cfg,
                 status=ours.status(), micro_batch_tokens=tok,
                 attention=ours.paths.attention if cfg.get("attn", "varlen") == "varlen" else cfg.get("attn"),
                 warmup_steps=a.warmup, loop="manual", built_by="remote_worker functions")
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
        ours = Ours(a.dir, dict(opts, targets="all", seed=a.seed))
        m, vmode = ours.model, ours.paths.attention
        items = ours.batches(V, tok, a.steps, seed=7, task="pattern")
    else:
        m = load_model(a.dir, quant="nf4", attn="sdpa")
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        set_seed(a.seed)
        m = get_peft_model(m, lora_config(ALL_LINEAR, float(opts.get("dropout", 0.05))))
        vmode = "sdpa_packed_mask"
        items = micro_batches(V, tok, a.steps, seed=7, varlen=False, task="pattern")
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
             first_loss=losses[0], final_loss_mean10=round(sum(losses[-10:]) / len(losses[-10:]), 4), losses=losses,
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
        _, fast, _ = worker_modules()
        problem = fast.varlen.self_check(28, 4, 128, torch.bfloat16, "cuda")  # Qwen2.5-7B's heads
        info["varlen_attention"] = "flash_varlen" if problem is None else "sdpa"
        info["varlen_check"] = fast.varlen.note()
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
              "--results", res, "--opts", json.dumps({"tokens": 16384, "profile24": True, "profile": True})], 330, ours_env),
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
    if ph == "W":  # the worker itself, with the reference on the same card (one device call)
        plan += [
            (["env", "--results", res], 90, None),
            make7,
            # no ours_env: the worker's own __main__ must set expandable_segments (recorded as alloc_conf_in_worker)
            (["recipe", "--name", "ours", "--dir", model, "--targets", "both", "--steps", S, "--warmup", W,
              "--results", res, "--opts", json.dumps({"tokens": 0, "profile24": True, "eval_check": True})], 360, None),
            (["recipe", "--name", "reference", "--dir", model, "--targets", "all", "--steps", S, "--warmup", W,
              "--results", res, "--opts", json.dumps({"tokens": 8192})], 150, None),
            (["sweep", "--dir", model, "--steps", "3", "--warmup", "2", "--results", res, "--budget_s", "110",
              "--base", json.dumps({"tokens": 16384}),
              "--variants", json.dumps([{}, {"fused": False}, {"attn": "sdpa"}])], 190, ours_env),
        ]
    if ph == "W" and a.unsloth:  # whatever budget phase W leaves
        plan += [(["recipe", "--name", "unsloth", "--dir", model, "--targets", "all", "--steps", S, "--warmup", W,
                   "--results", res], 240, uns_env)]
    if ph == "Q":  # the quality guard again, like for like (dropout 0), two seeds, and ours with one piece off
        small = a.q_dir
        plan += [(["make", "--arch", a.q_arch, "--dir", small], 120, None)]
        for name, seed, label, opts in (("ours", 42, "ours", {}),
                                        ("reference", 42, "reference, dropout 0", {"dropout": 0.0}),
                                        ("ours", 43, "ours, LoRA seed 43", {}),
                                        ("reference", 43, "reference, dropout 0, LoRA seed 43", {"dropout": 0.0}),
                                        ("ours", 42, "ours, Liger off", {"liger": False}),
                                        ("ours", 42, "ours, fused LoRA off", {"fused": False}),
                                        ("ours", 42, "ours, SDPA packed mask", {"attn": "sdpa"})):
            plan += [(["quality", "--name", name, "--dir", small, "--seed", str(seed), "--label", label,
                       "--steps", str(a.q_steps), "--lr", "1e-3", "--results", res, "--opts", json.dumps(opts)], 150,
                      ours_env if name == "ours" else None)]
    if ph == "K":  # the worker's calibrated shape on this card and on 80 GB and 24 GB of it
        plan += [make7,
                 (["recipe", "--name", "ours", "--dir", model, "--targets", "all", "--steps", S, "--warmup", W,
                   "--results", res, "--opts", json.dumps({"tokens": 0, "caps": [80, 24]})], 330, None)]
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


def cmd_smoke(a):
    """CPU dry run on the tiny model of what phase W runs on a GPU (and the quality guard), small and fast:
    the worker on synthetic pre-tokenized data (both target sets, an eval split), ours built in-process and swept,
    the reference and the seed recipes. Exit code 1 if any row has an error or is missing."""
    import tempfile
    out = a.out or tempfile.mkdtemp(prefix="qb_smoke_")
    os.makedirs(out, exist_ok=True)
    model, res, lg = os.path.join(out, "tiny"), os.path.join(out, "results.jsonl"), os.path.join(out, "log.txt")
    env = {"OUT": out, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    small = {"tokens": 512, "max_len": 256}
    plan = [
        (["make", "--arch", "tiny", "--dir", model], 120),
        (["recipe", "--name", "ours", "--dir", model, "--targets", "both", "--steps", "2", "--warmup", "1",
          "--results", res, "--opts", json.dumps(dict(small, eval_check=True, profile=True))], 400),
        (["sweep", "--dir", model, "--steps", "1", "--warmup", "1", "--results", res, "--budget_s", "200",
          "--base", json.dumps({"tokens": 512}),
          "--variants", json.dumps([{}, {"fused": False}, {"attn": "sdpa"}, {"dropout": 0.05}, {"ckpt": False}])], 300),
        (["quality", "--name", "ours", "--dir", model, "--steps", "3", "--results", res,
          "--opts", json.dumps({"tokens": 512})], 200),
        (["quality", "--name", "reference", "--dir", model, "--steps", "3", "--results", res,
          "--opts", json.dumps({"tokens": 512})], 200),
        (["recipe", "--name", "reference", "--dir", model, "--targets", "all", "--steps", "2", "--warmup", "1",
          "--results", res, "--opts", json.dumps({"tokens": 512})], 200),
        (["recipe", "--name", "seed", "--dir", model, "--targets", "qv", "--steps", "1", "--warmup", "1",
          "--results", res], 300),
    ]
    t_end = time.time() + a.budget_s
    for args, tmo in plan:
        _sub(args, lg, max(30, min(tmo, t_end - time.time())), env)
    summarize(res)
    rows = [json.loads(x) for x in open(res) if x.strip()] if os.path.exists(res) else []
    expected = {("ours", "all", None): 1, ("ours", "qv", None): 1, ("ours", "all", "eval_check"): 1,
                ("ours", "all", "profile"): 1, ("ours-sweep", "all", None): 5, ("quality-ours", None, None): 1,
                ("quality-reference", None, None): 1, ("reference", "all", None): 1, ("seed", "qv", None): 1}
    got = {}
    for r in rows:
        key = (r.get("recipe"), r.get("targets", "all" if r.get("recipe") == "ours-sweep" else None), r.get("kind"))
        got[key] = got.get(key, 0) + 1
    errors = [f"{r.get('recipe')} {r.get('targets')} {r.get('kind', '')}: {r['error']}" for r in rows if r.get("error")]
    missing = [f"{k}: {got.get(k, 0)} of {n}" for k, n in expected.items() if got.get(k, 0) < n]
    worker_rows = [r for r in rows if r.get("recipe") == "ours" and r.get("kind") != "profile"]
    for r in worker_rows:
        if not (r.get("done") and r.get("tok_per_s") and str(r.get("fused_lora", "")).startswith("on")):
            errors.append(f"ours {r.get('targets')} {r.get('kind', '')}: done={r.get('done')} "
                          f"tok/s={r.get('tok_per_s')} fused_lora={r.get('fused_lora')}")
    log(f"\nsmoke: {len(rows)} rows in {res}")
    for line in errors + [f"missing {m}" for m in missing]:
        log("SMOKE FAIL " + line)
    if errors or missing:
        raise SystemExit(1)
    log("SMOKE OK: every piece ran on the tiny model (CPU); worker paths: " + "; ".join(
        f"{r['targets']}/{r.get('kind', 'train')}: attention {r.get('attention')}, liger {r.get('liger')}, "
        f"fused_lora {r.get('fused_lora')}" for r in worker_rows))


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
    u.add_argument("--phase", default="all", choices=["W", "Q", "K", "A", "B", "C", "all"])
    u.add_argument("--unsloth", action="store_true", help="phase W: try Unsloth with the budget left")
    u.add_argument("--out")
    u.add_argument("--model_dir", default="/tmp/qb_7b")
    u.add_argument("--arch", default="7b", choices=list(ARCH))
    u.add_argument("--q_dir", default="/tmp/qb_05b")
    u.add_argument("--q_arch", default="0.5b", choices=list(ARCH))
    u.add_argument("--steps", type=int, default=5)
    u.add_argument("--warmup", type=int, default=2)
    u.add_argument("--q_steps", type=int, default=100)
    u.add_argument("--budget_s", type=float, default=560)
    w = sp.add_parser("worker")
    w.add_argument("--job", required=True)
    k = sp.add_parser("smoke")
    k.add_argument("--out")
    k.add_argument("--budget_s", type=float, default=900)
    a = p.parse_args()
    {"make": cmd_make, "env": cmd_env, "recipe": cmd_recipe, "sweep": cmd_sweep, "quality": cmd_quality,
     "suite": cmd_suite, "worker": cmd_worker, "smoke": cmd_smoke}[a.cmd](a)


if __name__ == "__main__":
    main()
