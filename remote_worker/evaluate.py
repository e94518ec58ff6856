"""`python -m remote_worker.evaluate`: the base and the tuned model side by side on held-out prompts.

Prompts: the eval split of the prepared dataset (`--data DIR`: its eval.jsonl, else train.jsonl's last
records), or a prompts file (`--prompts`: jsonl of {"messages": [...]}, {"prompt", "reference"} or
{"instruction", "input", "output"}; or a text file, one prompt a line). Each prompt is rendered with
the adapter's chat template; both models answer it greedily in batches (left padding, one model in
memory: the base is the PeftModel with its adapter switched off). Where a record has a reference (its
last assistant turn), the held-out loss on the reference's tokens, exact match and ROUGE-L
(rouge-score; CJK text split by character, which its own tokenizer drops) are reported per model.

Writes into `--out`: eval.json (jobs.protocol.EvalResult), eval.md, manifest.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from jobs.layout import EVAL_JSON, EVAL_MD
from jobs.manifest import write_manifest
from jobs.protocol import EvalResult, EvalSample, EvalScores, dump_model
from remote_worker import DataError, WorkerError
from remote_worker import tuned as tuned_mod

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"[a-z0-9]+")


class _Tokens:
    """rouge-score's tokenizer keeps [a-z0-9] only: Chinese answers would score 0. Words plus CJK characters."""

    def tokenize(self, text: str) -> list[str]:
        text = text.lower()
        return [m.group(0) for m in re.finditer(rf"{_CJK.pattern}|{_WORD.pattern}", text)]


# --- prompts ---------------------------------------------------------------------------------------------


def _record(obj: dict) -> tuple[list[dict], str | None] | None:
    """(messages up to the answer, the reference answer or None) of one record; None for a text record."""
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
        if msgs[-1]["role"] == "assistant":
            return msgs[:-1], msgs[-1]["content"]
        return msgs, None
    if isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}], obj.get("reference") or obj.get("completion")
    if isinstance(obj.get("instruction"), str):
        text = obj["instruction"] + (("\n" + obj["input"]) if obj.get("input") else "")
        return [{"role": "user", "content": text}], obj.get("output")
    return None


def read_prompts(source: Path, limit: int) -> list[tuple[list[dict], str | None]]:
    out: list[tuple[list[dict], str | None]] = []
    lines = source.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if source.suffix in (".jsonl", ".json"):
            try:
                rec = _record(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(f"{source}:{n}: not a prompt record ({exc})",
                                hint='one JSON object a line: {"prompt": ..., "reference": ...} or {"messages": [...]}') from None  # fmt: skip
            if rec is not None:
                out.append(rec)
        else:
            out.append(([{"role": "user", "content": line.strip()}], None))
        if len(out) >= limit:
            break
    return out


def split_prompts(data_dir: Path, limit: int) -> tuple[list[tuple[list[dict], str | None]], str]:
    for name in ("eval.jsonl", "train.jsonl"):  # jobs' canonical dataset file names (architecture.md)
        path = data_dir / name
        if path.is_file() and path.stat().st_size:
            return read_prompts(path, limit), name
    raise DataError(f"no eval.jsonl or train.jsonl in {data_dir}", hint="give a prompts file with --prompts")


# --- generation and loss ----------------------------------------------------------------------------------


def generate(t: tuned_mod.Tuned, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    tok = t.tokenizer
    tok.padding_side = "left"  # a decoder-only model continues the last token: pad on the left
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(t.device) for k, v in enc.items()}
        with torch.no_grad():
            gen = t.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=t.stop_ids,
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        outs += [tok.decode(row, skip_special_tokens=True).strip() for row in gen[:, enc["input_ids"].shape[1] :]]
    return outs


def reference_loss(t: tuned_mod.Tuned, items: list[tuple[str, str]]) -> float | None:
    """Mean cross-entropy over the reference answers' tokens (prompt tokens masked), as in training."""
    import torch

    tok, total, count = t.tokenizer, 0.0, 0
    for prompt, reference in items:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(reference + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a], device=t.device)
        labels = ids.clone()
        labels[:, : len(p)] = -100
        with torch.no_grad():
            loss = t.model(input_ids=ids, labels=labels).loss
        total += loss.item() * len(a)
        count += len(a)
    return total / count if count else None


def exact(answer: str, reference: str) -> bool:
    return " ".join(answer.split()) == " ".join(reference.split())


# --- the command ------------------------------------------------------------------------------------------


def evaluate(adapter: Path, out: Path, *, data: Path | None = None, prompts: Path | None = None,
             base: str | None = None, max_new_tokens: int = 256, limit: int = 50, batch_size: int = 16,
             device: str = "auto") -> EvalResult:  # fmt: skip
    from rouge_score import rouge_scorer

    t0 = time.monotonic()
    if prompts is not None:
        records, source = read_prompts(prompts, limit), prompts.name
    elif data is not None:
        records, source = split_prompts(data, limit)
    else:
        raise DataError("nothing to evaluate on", hint="give --data (the prepared dataset) or --prompts")
    if not records:
        raise DataError(f"no prompts in {source}", hint="the eval split or the prompts file has no usable records")
    t = tuned_mod.load_tuned(adapter, base, device)
    texts = [tuned_mod.chat_prompt(t.tokenizer, msgs) for msgs, _ in records]
    refs = [r for _, r in records]
    tuned_out = generate(t, texts, max_new_tokens, batch_size)
    with_ref = [(p, r) for p, r in zip(texts, refs, strict=True) if r]
    tuned_loss = reference_loss(t, with_ref)
    with t.model.disable_adapter():
        base_out = generate(t, texts, max_new_tokens, batch_size)
        base_loss = reference_loss(t, with_ref)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokens())
    samples = []
    for (msgs, ref), b, u in zip(records, base_out, tuned_out, strict=True):
        s = EvalSample(prompt=msgs[-1]["content"] if msgs else "", reference=ref, base=b, tuned=u)
        if ref:
            s.base_rouge_l = scorer.score(ref, b)["rougeL"].fmeasure
            s.tuned_rouge_l = scorer.score(ref, u)["rougeL"].fmeasure
        samples.append(s)
    result = EvalResult(
        base_model=t.base, prompts_from=source, max_new_tokens=max_new_tokens, device=t.device,
        base=_scores(samples, "base", base_loss), tuned=_scores(samples, "tuned", tuned_loss), samples=samples,
    )  # fmt: skip
    result.seconds = time.monotonic() - t0
    write(result, out)
    return result


def _scores(samples: list[EvalSample], side: str, loss: float | None) -> EvalScores:
    scored = [s for s in samples if s.reference]
    if not scored:
        return EvalScores(loss=loss)
    em = sum(exact(getattr(s, side), s.reference or "") for s in scored) / len(scored)
    rl = sum(getattr(s, f"{side}_rouge_l") or 0.0 for s in scored) / len(scored)
    return EvalScores(loss=loss, exact_match=em, rouge_l=rl)


def markdown(r: EvalResult) -> str:
    def num(v: float | None, pct: bool = False) -> str:
        return "—" if v is None else (f"{v:.0%}" if pct else f"{v:.4f}")

    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|").replace("\n", "<br>")

    lines = [
        f"# Eval: base vs tuned ({r.base_model})", "",
        f"{len(r.samples)} prompts from {r.prompts_from}, greedy, at most {r.max_new_tokens} new tokens, on {r.device}.", "",
        "| | base | tuned |", "|---|---|---|",
        f"| held-out loss | {num(r.base.loss)} | {num(r.tuned.loss)} |",
        f"| exact match | {num(r.base.exact_match, True)} | {num(r.tuned.exact_match, True)} |",
        f"| ROUGE-L | {num(r.base.rouge_l)} | {num(r.tuned.rouge_l)} |", "",
        "| prompt | reference | base | tuned |", "|---|---|---|---|",
    ]  # fmt: skip
    lines += [f"| {cell(s.prompt)} | {cell(s.reference)} | {cell(s.base)} | {cell(s.tuned)} |" for s in r.samples]
    return "\n".join(lines) + "\n"


def write(result: EvalResult, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / EVAL_JSON).write_text(dump_model(result), encoding="utf-8")
    (tmp / EVAL_MD).write_text(markdown(result), encoding="utf-8")
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def at_end(job, events=None) -> None:
    """`[eval] at_end = true`: run it in the worker after training, into post/eval/result. A failure is
    written to the worker's log and never fails the job (its adapter is saved already). No events: the
    `done` event is the run's last (client.progress counts anything after it as a new run)."""
    from jobs.layout import JobPaths

    spec = job.spec.eval
    paths = JobPaths(job.job_dir)
    task = paths.post("eval")
    prompts = Path(task.post_prompts)
    print("eval at the end: base vs tuned on held-out prompts", flush=True)
    try:
        import gc

        import torch

        gc.collect()  # the training model is gone: give its memory back before loading the base again
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result = evaluate(Path(paths.adapter), Path(task.post_result), data=Path(job.data_dir),
                          prompts=prompts if prompts.is_file() else None, base=None,
                          max_new_tokens=spec.max_new_tokens, limit=spec.limit)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the adapter is safe; the eval can be run again
        print(f"eval at the end failed: {type(exc).__name__}: {exc}", flush=True)
        return
    t, b = result.tuned, result.base
    print(f"eval at the end: loss {b.loss} -> {t.loss}, ROUGE-L {b.rouge_l} -> {t.rouge_l}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m remote_worker.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", type=Path, help="the prepared dataset folder (its eval split)")
    ap.add_argument("--prompts", type=Path, help="a prompts file (jsonl or txt) instead")
    ap.add_argument("--base", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    a = ap.parse_args(argv)
    try:
        result = evaluate(a.adapter, a.out, data=a.data, prompts=a.prompts, base=a.base,
                          max_new_tokens=a.max_new_tokens, limit=a.limit, batch_size=a.batch_size, device=a.device)  # fmt: skip
    except WorkerError as exc:
        print(f"failed: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 1
    print(json.dumps({"base": result.base.model_dump(), "tuned": result.tuned.model_dump(), "seconds": result.seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
