"""What `eval` and `export` show: the scores side by side, a few answers, where the files are, the checks."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.views.text import shown

SAMPLES_SHOWN = 5


def _num(v: float | None, pct: bool = False) -> str:
    return "—" if v is None else (f"{v:.0%}" if pct else f"{v:.4f}")


def _cut(text: str | None, n: int = 160) -> str:
    text = shown(" ".join((text or "").split()))
    return escape(text if len(text) <= n else text[: n - 1] + "…")


def evaluated(result, console: Console) -> None:
    """`result`: client.lifecycle.evaluate.Evaluated."""
    r = result.result
    console.print(f"[green]✓[/] eval of {escape(result.job_id)} ({escape(result.where)}), verified → "
                  f"{escape(str(result.folder))}")  # fmt: skip
    console.print(f"{len(r.samples)} prompts from {_cut(r.prompts_from)}; base {_cut(r.base_model)}; {r.seconds:.0f} s")
    t = Table("", "base", "tuned")
    t.add_row("held-out loss", _num(r.base.loss), _num(r.tuned.loss))
    t.add_row("exact match", _num(r.base.exact_match, True), _num(r.tuned.exact_match, True))
    t.add_row("ROUGE-L", _num(r.base.rouge_l), _num(r.tuned.rouge_l))
    console.print(t)
    s = Table("prompt", "reference", "base", "tuned", show_lines=True)
    for x in r.samples[:SAMPLES_SHOWN]:
        s.add_row(_cut(x.prompt), _cut(x.reference), _cut(x.base), _cut(x.tuned))
    console.print(s)
    console.print(f"all of them side by side: {escape(str(result.folder / 'eval.md'))}")


def exported(result, console: Console) -> None:
    """`result`: client.lifecycle.export.Exported."""
    e = result.record
    console.print(f"[green]✓[/] {escape(result.task)} of {escape(result.job_id)} ({escape(result.where)}), "
                  f"verified → {escape(str(result.folder))}")  # fmt: skip
    if e.merge_check:
        m = e.merge_check
        console.print(f"merged onto the {escape(e.merged_onto)} weights of {_cut(e.base_model)}; logits vs base + adapter: "
                      f"max |diff| {m.max_abs_diff:.3g} ({m.dtype}, tolerance {m.tolerance:g}); the adapter moves "
                      f"them by up to {m.lora_effect:.3g}")  # fmt: skip
    if e.gguf_check:
        g = e.gguf_check
        console.print(f"GGUF {escape(g.qtype)} read back: worst tensor {escape(g.weight_tensor)} off by {g.weight_rel_l2:.3g} "
                      f"(tolerance {g.weight_tolerance:g}); relative logit error {g.rel_l2:.3g}, "
                      f"same top token {g.top1_agree:.0%}")  # fmt: skip
    console.print("files: " + ", ".join(escape(f) for f in e.files))
    if e.kind == "merged":
        console.print(f'load it with: AutoModelForCausalLM.from_pretrained("{escape(str(result.folder))}")')
    elif e.kind == "ollama":
        console.print(f"then: cd {escape(str(result.folder))} && ollama create {escape(result.job_id)} -f Modelfile")
