#!/usr/bin/env python3
"""After-training bench (issue 15): eval and export of a random-weight Qwen2.5-7B-shaped model + LoRA.

Steps, each in its own process (so its peak memory is its own), each a JSON row in --out/rows.jsonl:
  make     the model (bench/qlora_bench.py's `make`, bf16) with a byte-level BPE tokenizer and a ChatML
           template (the GGUF writer needs one), and an all-linear r=16 LoRA adapter with non-zero B
  eval     remote_worker.evaluate: base and tuned, N prompts, greedy, batched with left padding
  merged   remote_worker.export --merged: merge onto the 16-bit base, check against PEFT, save safetensors
  gguf     remote_worker.export --gguf q8_0: merge, check, write GGUF q8_0, read it back and check
  gguf-T   the same for type T (gguf-f16, gguf-q4_0, ...)
Each row: step, seconds, phases_s (export steps: load, merge, metadata, convert, quantize, write, check), peak GPU memory (allocated, reserved), peak RSS, sizes, the checks' numbers.

  python bench/export_bench.py --out DIR [--arch 7b] [--steps make,eval,merged,gguf] [--work DIR]
      (a --work folder is kept: a second call can run `--steps gguf` on the same model and adapter)
  python bench/export_bench.py --smoke --out DIR      the tiny model on the CPU, every step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPTS = [
    "Explain what a LoRA adapter is in two sentences.", "Translate to Chinese: the weather is nice today.",
    "Write a haiku about renting GPUs by the hour.", "What is the capital of France?",
    "List three uses of a hash function.", "Summarize: the quick brown fox jumps over the lazy dog.",
    "Why does left padding matter for batched generation?", "用一句话介绍你自己。",
]  # fmt: skip


def peaks() -> dict:
    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    except ImportError:
        pass
    return out


def size_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 2)


def bpe_tokenizer(model_dir: Path) -> None:
    """A byte-level BPE with ChatML specials (the GGUF writer supports byte-level BPE vocabularies)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(PROMPTS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHATML
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / f).unlink(missing_ok=True)
    fast.save_pretrained(model_dir)


def step_make(a) -> dict:
    import qlora_bench as qb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from remote_worker import checkpoints

    work = Path(a.work)
    model_dir, adapter = work / "model", work / "lora"
    t0 = time.monotonic()
    qb.ARCH["tiny"]["vocab_size"] = 1000
    qb.cmd_make(argparse.Namespace(arch=a.arch, dir=str(model_dir)))
    bpe_tokenizer(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(eos_token_id=2, pad_token_id=0)  # the BPE's <|im_end|> and <|endoftext|>
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    t_model = time.monotonic() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                device_map={"": device})  # fmt: skip
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # a trained adapter is non-zero: the merge check needs an effect to see
    shutil.rmtree(adapter, ignore_errors=True)
    peft.save_pretrained(adapter)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter)
    checkpoints.make_portable(adapter, str(model_dir), str(model_dir))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "reference": p}) + "\n" for p in PROMPTS * 4))
    return {"model_s": round(t_model, 1), "model_gb": size_gb(model_dir), "adapter_mb": round(size_gb(adapter) * 1e3, 1)}


def step_eval(a) -> dict:
    from remote_worker import evaluate

    work = Path(a.work)
    r = evaluate.evaluate(work / "lora", work / "eval", prompts=work / "prompts.jsonl",
                          max_new_tokens=a.max_new_tokens, limit=a.prompts, batch_size=a.batch_size)  # fmt: skip
    new_tokens = a.max_new_tokens * len(r.samples) * 2
    return {"prompts": len(r.samples), "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size,
            "device": r.device, "tuned_loss": r.tuned.loss, "base_loss": r.base.loss,
            "upper_bound_new_tokens": new_tokens}  # fmt: skip


def step_export(a, kind: str, qtype: str = "") -> dict:
    from remote_worker import export

    work = Path(a.work)
    out = work / f"export-{kind}{qtype}"
    rec = export.export(work / "lora", out, kind, qtype)
    row = {"kind": kind, "qtype": qtype, "out_gb": size_gb(out), "phases_s": rec.phases,
           "merge_check": rec.merge_check.model_dump()}  # fmt: skip
    if rec.gguf_check:
        row["gguf_check"] = rec.gguf_check.model_dump()
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)  # the device's disk: 64 GB
    return row


def run_step(a) -> int:
    t0 = time.monotonic()
    try:
        if a.step == "make":
            row = step_make(a)
        elif a.step == "eval":
            row = step_eval(a)
        elif a.step == "merged":
            row = step_export(a, "merged")
        elif a.step == "gguf" or a.step.startswith("gguf-"):
            row = step_export(a, "gguf", a.step.partition("-")[2] or "q8_0")
        else:
            raise SystemExit(f"unknown step {a.step}")
        row.update(ok=True)
    except Exception as exc:  # noqa: BLE001 - a row says what failed; the next step still runs
        import traceback

        traceback.print_exc()
        row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    row = {"step": a.step, "arch": a.arch, "seconds": round(time.monotonic() - t0, 1), **row, **peaks()}
    print("RESULT " + json.dumps(row), flush=True)
    with open(Path(a.out) / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0 if row["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="where the model and exports go (default: OUT/work)")
    ap.add_argument("--arch", default="7b", choices=("7b", "0.5b", "tiny"))
    ap.add_argument("--steps", default="make,eval,merged,gguf")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the exported files")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # one step, in this process
    a = ap.parse_args()
    if a.smoke:
        a.arch, a.prompts, a.max_new_tokens = "tiny", 4, 8
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    own_work = a.work is None  # a --work folder is kept for a later call (--steps gguf)
    a.work = a.work or str(Path(a.out) / "work")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.step:
        return run_step(a)
    rc = 0
    for step in a.steps.split(","):
        argv = [sys.executable, __file__, "--out", a.out, "--work", a.work, "--arch", a.arch, "--step", step,
                "--prompts", str(a.prompts), "--max-new-tokens", str(a.max_new_tokens),
                "--batch-size", str(a.batch_size)] + (["--keep"] if a.keep else [])  # fmt: skip
        rc |= subprocess.call(argv)
    if own_work and not a.keep:
        shutil.rmtree(Path(a.work), ignore_errors=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
