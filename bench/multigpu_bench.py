#!/usr/bin/env python3
"""More than one GPU (issue 16): the worker itself under torchrun, on random-weight models.

  ddp   Qwen2.5-7B architecture, nf4, all-linear LoRA r=16, the worker's defaults (calibrated shape):
        one GPU, then two (data-parallel); scaling = tokens/s on two / tokens/s on one (target >= 1.8).
  fsdp  Qwen2.5-32B architecture, FSDP-QLoRA on two GPUs, memory capped per GPU
        (AUTODL_RUN_GPU_MEMORY_GB, default 48): loads (4-bit weights in a bf16 container, sharded),
        trains some steps, checkpoints, then a second run resumes from the checkpoint and finishes.

Random weights: `make` builds the model on the GPU in bf16 (no CPU init) and writes safetensors;
the worker quantizes them to nf4 while loading, as it does a real model. --smoke runs the same code
on the CPU with gloo and a tiny architecture (bf16 base instead of nf4: bitsandbytes does not shard
on the CPU).

  python bench/multigpu_bench.py suite --out $OUT [--phase ddp|fsdp|all] [--smoke] [--budget_s 540]

Rows (JSON, one a line) go to $OUT/results.jsonl, each run's events.jsonl and worker.log to
$OUT/<phase>/<run>/; the models, data and job folders (checkpoints) stay under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import qlora_bench as qb  # noqa: E402  (the 7B/tiny architectures, the tokenizer, data and event readers)

from jobs.layout import DATASET_MANIFEST  # noqa: E402

ARCH = dict(qb.ARCH)
# Qwen2.5-32B: 32.8 B parameters
ARCH["32b"] = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                   num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
                   tie_word_embeddings=False)  # fmt: skip


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make(arch: str, out_dir: str, device: str) -> float:
    """A random-weight Qwen2-shaped model in bf16, built directly on `device`, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if os.path.exists(os.path.join(out_dir, "made.json")):
        return 0.0
    t0 = time.time()
    cfg = Qwen2Config(**ARCH[arch], rope_theta=1e6, rms_norm_eps=1e-6, pad_token_id=999, eos_token_id=998,
                      bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="10GB")
    qb.save_tokenizer(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "made.json"), "w") as f:
        json.dump({"arch": arch}, f)
    return time.time() - t0


def job(model_dir: str, data_dir: str, job_dir: str, *, gpus: int, steps: int, smoke: bool, **train) -> str:
    from jobs.layout import JobPaths
    from jobs.spec import JobSpec, WorkerJob

    spec = JobSpec.model_validate({
        "name": "multigpu-bench",
        "model": {"name_or_path": model_dir},
        "data": {"train": "train.jsonl", "max_length": 256 if smoke else 2048},
        "lora": {"r": 16, "alpha": 32},
        "quant": {"bits": 16 if smoke else 4},
        "train": {"max_steps": steps, "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_every_minutes": 0,
                  "logging_steps": 1, "gpus": gpus, "device": "cpu" if smoke else "auto",
                  **({"micro_batch_tokens": 512} if smoke else {}), **train},
    })  # fmt: skip
    os.makedirs(job_dir, exist_ok=True)
    worker_job = WorkerJob(job_id=os.path.basename(job_dir), spec=spec, data_dir=data_dir, job_dir=job_dir)
    path = JobPaths(job_dir).spec
    with open(path, "w") as f:
        f.write(worker_job.model_dump_json(indent=1))
    return path


def run_worker(job_json: str, gpus: int, timeout: float, env: dict | None = None) -> tuple[int | str, float]:
    """The worker as an instance runs it (client.remote.launcher.worker_argv): alone, or under torchrun."""
    worker = ["-m", "remote_worker", job_json]
    argv = [sys.executable, *worker] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(gpus), "--max-restarts", "0", *worker]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **(env or {})}  # fmt: skip
    from jobs.layout import JobPaths

    log_path = JobPaths(os.path.dirname(job_json)).log
    t0 = time.time()
    with open(log_path, "ab") as out:
        try:
            rc: int | str = subprocess.run(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                           timeout=max(10, timeout), preexec_fn=qb._die_with_parent).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t0


def result(job_dir: str, warm: int) -> dict:
    res = qb.worker_result(job_dir, warm)
    evs = qb.read_events(job_dir)
    started = [e for e in evs if e.type == "started"]
    if started:
        s = started[-1].model_dump()
        res.update(world_size=s.get("world_size"), distributed=s.get("distributed"),
                   resumed_from_step=s.get("resumed_from_step"))  # fmt: skip
    ranks = [e.rank_peak_mem_gb for e in evs if e.type == "step" and getattr(e, "rank_peak_mem_gb", None)]
    if ranks:
        res["rank_peak_mem_gb"] = [round(max(r[i] for r in ranks), 2) for i in range(len(ranks[0]))]
    res["checkpoints"] = [(e.step, e.reason) for e in evs if e.type == "checkpoint"]
    res.pop("losses", None)
    res.pop("step_s", None)
    return res


def emit(out: str, row: dict) -> None:
    row = {"t": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    print("RESULT " + json.dumps(row), flush=True)
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def keep_logs(a, job_dir: str, name: str) -> None:
    """events.jsonl and worker.log of a run into $OUT (the checkpoints stay under --work)."""
    from jobs.layout import JobPaths

    dest = os.path.join(a.out, name)
    os.makedirs(dest, exist_ok=True)
    for path in (JobPaths(job_dir).events, JobPaths(job_dir).log):
        if os.path.exists(path):
            shutil.copy(path, dest)


def phase_ddp(a, left) -> None:
    root = os.path.join(a.work, "ddp")
    model_dir = os.path.join(a.models, "tiny" if a.smoke else "7b")
    made_s = make("tiny" if a.smoke else "7b", model_dir, "cpu" if a.smoke else "cuda")
    steps, warm = (4, 1) if a.smoke else (a.steps, 3)
    data_dir = os.path.join(root, "data")
    budget = 512 if a.smoke else 16384
    if not os.path.exists(os.path.join(data_dir, DATASET_MANIFEST)):
        vocab = ARCH["tiny" if a.smoke else "7b"]["vocab_size"]
        # enough for two GPUs' steps (each takes a micro-batch a step) and the calibration
        qb.write_dataset(data_dir, model_dir, vocab, int(budget * (steps + warm + 2) * 2 * 1.2),
                         max_len=256 if a.smoke else 2048)  # fmt: skip
    rows = {}
    for gpus in (1, 2):
        job_dir = os.path.join(root, f"gpus-{gpus}")
        shutil.rmtree(job_dir, ignore_errors=True)
        path = job(model_dir, data_dir, job_dir, gpus=gpus, steps=steps + warm, smoke=a.smoke)
        rc, wall = run_worker(path, gpus, left())
        rows[gpus] = res = result(job_dir, warm)
        keep_logs(a, job_dir, f"ddp/gpus-{gpus}")
        emit(a.out, {"bench": "ddp", "arch": "tiny" if a.smoke else "7b", "gpus": gpus, "worker_rc": rc,
                     "wall_s": round(wall, 1), "make_s": round(made_s, 1), **res})  # fmt: skip
    one, two = rows[1].get("tok_per_s"), rows[2].get("tok_per_s")
    emit(a.out, {"bench": "ddp-scaling", "tok_per_s_1": one, "tok_per_s_2": two,
                 "scaling": round(two / one, 3) if one and two else None, "target": 1.8})  # fmt: skip


def phase_fsdp(a, left) -> None:
    root = os.path.join(a.work, "fsdp")
    arch = "tiny" if a.smoke else "32b"
    model_dir = os.path.join(a.models, arch)
    made_s = make(arch, model_dir, "cpu" if a.smoke else "cuda")
    data_dir = os.path.join(root, "data")
    budget = 512 if a.smoke else 16384
    first, total = (2, 4) if a.smoke else (3, 5)
    if not os.path.exists(os.path.join(data_dir, DATASET_MANIFEST)):
        qb.write_dataset(data_dir, model_dir, ARCH[arch]["vocab_size"], int(budget * (total + 2) * 2 * 1.2),
                         max_len=256 if a.smoke else 2048)  # fmt: skip
    job_dir = os.path.join(root, "job")
    shutil.rmtree(job_dir, ignore_errors=True)
    env = {} if a.smoke else {"AUTODL_RUN_GPU_MEMORY_GB": str(a.cap_gb)}
    # run 1: `first` steps, a checkpoint at the end (save_steps); run 2: the same job to `total` steps, resumed
    for run, steps in ((1, first), (2, total)):
        path = job(model_dir, data_dir, job_dir, gpus=2, steps=steps, smoke=a.smoke, distributed="fsdp",
                   save_steps=first)  # fmt: skip
        rc, wall = run_worker(path, 2, left(), env)
        res = result(job_dir, 0)
        keep_logs(a, job_dir, f"fsdp/run-{run}")
        emit(a.out, {"bench": "fsdp", "arch": arch, "run": run, "cap_gb": None if a.smoke else a.cap_gb,
                     "worker_rc": rc, "wall_s": round(wall, 1), "make_s": round(made_s, 1), **res})  # fmt: skip
        made_s = 0.0
        if rc != 0:
            break


def cmd_suite(a) -> int:
    os.makedirs(a.out, exist_ok=True)
    a.models = os.path.join(a.work, "models")
    end = time.time() + a.budget_s

    def left() -> float:
        return end - time.time()

    phases = {"ddp": phase_ddp, "fsdp": phase_fsdp}
    for name in (["ddp", "fsdp"] if a.phase == "all" else [a.phase]):
        if left() < 30:
            emit(a.out, {"bench": name, "error": "no time left in --budget_s"})
            continue
        try:
            phases[name](a, left)
        except Exception as exc:  # noqa: BLE001  a row says what failed; the other phase still runs
            emit(a.out, {"bench": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
    rows = [json.loads(x) for x in open(os.path.join(a.out, "results.jsonl")) if x.strip()]
    bad = [r for r in rows if r.get("error") or r.get("worker_rc") not in (None, 0)]
    for r in bad:
        log(f"FAIL {r.get('bench')}: rc={r.get('worker_rc')} {r.get('error', '')}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("suite")
    s.add_argument("--out", required=True)
    s.add_argument("--work", default="/tmp/multigpu-bench", help="models, data and job folders (7B+32B: ~80 GB)")
    s.add_argument("--phase", choices=("ddp", "fsdp", "all"), default="all")
    s.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny architecture")
    s.add_argument("--steps", type=int, default=12, help="timed steps of each ddp run (after 3 warm-up steps)")
    s.add_argument("--cap_gb", type=float, default=48.0, help="memory per GPU for fsdp")
    s.add_argument("--budget_s", type=float, default=540.0)
    a = ap.parse_args()
    if a.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    return cmd_suite(a)


if __name__ == "__main__":
    raise SystemExit(main())
