"""The dataset for a person: `check`'s summary, `prepare`'s report, and `--show N` examples.

Examples are shown exactly as the model sees them (its chat template, special tokens
included), trained tokens in green, the prompt dim; when the output is not a terminal, trained
tokens are marked [[like this]] instead. Without a tokenizer on the laptop they are shown in
plain ChatML, only as an illustration of what is trained.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from client.dataset.prepare import GPU_MICRO_BATCH
from jobs import tokenize

TRAINED, PROMPT = "bold green", "dim"
INVALID_SHOWN = 10


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def check_summary(job_file: str, name: str, instance: str, report: dict, console: Console) -> None:
    """`autodl-run check`: the spec and the dataset are usable."""
    console.print(f"[green]✓[/] {escape(job_file)}: job `{escape(name)}` on {escape(instance)}")
    console.print(
        f"[green]✓[/] dataset: {report['records_out']:,} records ok"
        + (f", {len(report['invalid'])} skipped as invalid" if report.get("invalid") else "")
    )
    if report.get("template"):
        console.print(Text(f"  format: {report['template']['format']}"))
    elif report.get("tokenizer_reason"):
        console.print(Text(f"  not tokenized: {report['tokenizer_reason']}", style="dim"))
    if report.get("duplicates_removed"):
        console.print(f"  {report['duplicates_removed']:,} duplicate(s) removed (data.dedupe)")
    ov = report.get("overlong") or {}
    if ov.get("count"):
        est = " (estimated from characters)" if ov.get("estimated") else ""
        given = ov.get("action")
        action = {"drop": "dropped", "truncate": "truncated", "fail": "refused"}.get(given, given) if given else given
        console.print(f"[yellow]![/] {ov['count']:,} record(s) over max_length {ov['max_length']:,}{est}: "
                      f"{action} at prepare (data.overlong = \"{given}\")")  # fmt: skip
    _render_warnings(report, console)


def _render_warnings(report: dict, console: Console) -> None:
    for w in report.get("warnings") or []:
        console.print(Text(f"  warning: {w}", style="yellow"))


def render_report(report: dict, console: Console) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for f in report.get("files", []):
        extra = f", {f['invalid']:,} invalid" if f.get("invalid") else ""
        extra += f", {f['duplicates']:,} duplicates" if f.get("duplicates") else ""
        t.add_row(f"{f['split']} file", Text(f"{f['file']}  {f['format'] or '?'} · {f['rows']:,} rows{extra}"))
    t.add_row("records", f"{_n(report['records_in'])} read → {_n(report['records_out'])} kept "
                         f"({_n(report['train_records'])} train, {_n(report['eval_records'])} eval)")
    if report.get("invalid_count"):
        t.add_row("invalid", Text(f"{report['invalid_count']:,} skipped (data.on_error = \"skip\")", style="yellow"))
    t.add_row("duplicates", f"{_n(report['duplicates_removed'])} removed")
    ov = report["overlong"]
    est = " (estimated from characters)" if ov.get("estimated") else ""
    style = "yellow" if ov["count"] else ""
    action = {"drop": "dropped", "truncate": "truncated", "fail": "fail"}[ov["action"]]
    t.add_row("overlong", Text(f"{ov['count']:,} over max_length {ov['max_length']:,}{est} → {action}", style=style))
    tok = report.get("tokens")
    if tok:
        t.add_row("tokens", f"p50 {tok['p50']:,} · p90 {tok['p90']:,} · p99 {tok['p99']:,} · max {tok['max']:,}")
        t.add_row("per epoch", Text.assemble(
            (f"{tok['trained_total']:,} trained", TRAINED), f" · {tok['prompt_total']:,} prompt tokens"))
        if tok.get("packing_efficiency") is not None:
            gpu = tok.get("packing_efficiency_gpu")
            t.add_row("packing", f"{tok['packing_efficiency']:.1%} at {ov['max_length']:,} tokens"
                                 + (f", {gpu:.1%} at {max(ov['max_length'], GPU_MICRO_BATCH):,} (GPU)" if gpu else ""))
        tz = report.get("tokenizer") or {}
        t.add_row("tokenizer", Text(f"{tz.get('name')} ({tz.get('source')}, {str(tz.get('fingerprint'))[:12]})"))
    else:
        c = report["chars"]
        t.add_row("tokens", Text(f"no tokenizer: {report.get('tokenizer_reason')}", style="yellow"))
        t.add_row("estimate", f"~{c['est_tokens_total']:,} tokens in all (4 bytes a token); characters a "
                              f"record p50 {c['p50']:,} · p90 {c['p90']:,} · max {c['max']:,}")
    if report.get("digest"):
        reused = " (reused: inputs unchanged)" if report.get("reused") else ""
        t.add_row("output", Text(f"{report['output']}{reused}"))
    console.print(Panel(t, title="dataset", expand=False), soft_wrap=False)  # the CLI soft-wraps by default
    if report.get("template"):
        console.print(Text(f"  format: {report['template']['format']}"))
    _render_invalid(report, console)
    _render_warnings(report, console)


def _render_invalid(report: dict, console: Console) -> None:
    bad = report.get("invalid") or []
    for p in bad[:INVALID_SHOWN]:
        where = f"{p['file']}:{p['line']}" if p.get("line") else p["file"]
        field = f" {p['field']}:" if p.get("field") else ""
        console.print(Text(f"  skipped {where}:{field} {p['reason']}", style="yellow"))
    more = report.get("invalid_count", len(bad)) - min(len(bad), INVALID_SHOWN)
    if more > 0:
        console.print(Text(f"  ... and {more:,} more", style="yellow"))


def _records(source: Any, n: int) -> list[dict]:
    if isinstance(source, (list, tuple)):
        return list(source[:n])
    path = Path(getattr(source, "dir", source)) / "train.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, n)]


def render_examples(prepared_or_records: Any, tokenizer: Any, n: int, console: Console,
                    template_text: bool | None = None) -> None:
    """Print the first `n` train records as the model sees them, trained tokens highlighted
    (marked [[...]] when the console is not a terminal). tokenizer None: the one the Prepared
    was made with, if any; template_text None: as the Prepared's spec said."""
    if tokenizer is None:
        tokenizer = getattr(prepared_or_records, "tokenizer", None)
    if template_text is None:
        spec = (getattr(prepared_or_records, "report", None) or {}).get("spec") or {}
        template_text = bool(spec.get("train_template_text"))
    for k, rec in enumerate(_records(prepared_or_records, n), 1):
        if tokenizer is not None:
            pieces, total, trained = tokenize.explain(tokenizer, rec, template_text)
            title = f"example {k} · {total:,} tokens, {trained:,} trained"
        else:
            pieces = _plain(rec)
            title = f"example {k} · no tokenizer: plain ChatML, not the model's template"
        if not console.is_terminal:
            console.print(Text(f"--- {title} (trained tokens in [[...]])"))
            console.print(Text(tokenize.bracketed(pieces)), soft_wrap=True)
            continue
        body = Text()
        for s, is_trained in pieces:
            body.append(s, style=TRAINED if is_trained else PROMPT)
        console.print(Panel(body, title=title, title_align="left"), soft_wrap=False)
    if console.is_terminal:
        console.print(Text.assemble("legend: ", ("trained tokens", TRAINED), " · ", ("prompt (not trained)", PROMPT)))


def _plain(rec: dict) -> list[tuple[str, bool]]:
    if "messages" not in rec:
        return [(rec["text"], True)]
    text, spans = tokenize.render_chatml(rec["messages"])
    pieces, cut = [], 0
    for s, e in spans:
        pieces += [(text[cut:s], False), (text[s:e], True)]
        cut = e
    pieces.append((text[cut:], False))
    return [p for p in pieces if p[0]]
