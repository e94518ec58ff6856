"""The run report: `record/report.md` and its PNG plots, from the record on the laptop (client.record).

Everything comes from the laptop's copy, so it opens offline once the instance is gone: the events
(parsed line by line with jobs.events, what does not parse skipped and counted), the evaluations
and the notes of the record fetch. Plots (matplotlib, the Agg backend: no display needed): loss
(with the eval loss), learning rate, tokens/s and peak GPU memory, each only when the run has it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from client.ledger import JobRecord
from client.views.text import shown
from jobs import events as ev
from jobs.layout import LocalCopy


@dataclass
class Run:
    """What the events of a run say, folded for the report."""

    steps: list[ev.Step] = field(default_factory=list)
    evals: list[ev.Eval] = field(default_factory=list)
    warnings: list[ev.Warn] = field(default_factory=list)
    started: ev.Started | None = None
    done: ev.Done | None = None
    failed: ev.Failed | None = None
    skipped: int = 0


def read_events(path: Path) -> Run:
    run = Run()
    if not path.is_file():
        return run
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            e = ev.parse_or_none(line.rstrip(b"\n"))
            if e is None:
                run.skipped += 1
            elif isinstance(e, ev.Step):
                run.steps.append(e)
            elif isinstance(e, ev.Eval):
                run.evals.append(e)
            elif isinstance(e, ev.Warn):
                run.warnings.append(e)
            elif isinstance(e, ev.Started):
                run.started = run.started or e
            elif isinstance(e, ev.Done):
                run.done, run.failed = e, None
            elif isinstance(e, ev.Failed):
                run.failed = e
    return run


def _plot(path: Path, title: str, ylabel: str, series: list[tuple[str, list[float], list[float]]]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(label, xs, ys) for label, xs, ys in series if xs]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        for label, xs, ys in series:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return True


PLOTS = (
    ("loss.png", "loss", "loss"),
    ("lr.png", "learning rate", "lr"),
    ("tokens_per_s.png", "throughput", "tokens/s"),
    ("memory.png", "peak GPU memory", "GiB"),
)


def write_report(record: JobRecord, copy: LocalCopy, notes: list[str] | None = None) -> Path:
    """Write `record/report.md` and `record/plots/*.png`; returns the report's path."""
    run = read_events(copy.record_file("events"))
    copy.plots.mkdir(parents=True, exist_ok=True)
    xs: list[float] = [s.step for s in run.steps]
    data: dict[str, list[tuple[str, list[float], list[float]]]] = {
        "loss": [("train", xs, [s.loss for s in run.steps]),
                 ("eval", [e.step for e in run.evals], [e.eval_loss for e in run.evals])],
        "lr": [("lr", xs, [s.lr for s in run.steps])],
        "tokens/s": [("tokens/s", xs, [s.tokens_per_s for s in run.steps])],
        "GiB": [("peak", [s.step for s in run.steps if s.peak_mem_gb is not None],
                 [s.peak_mem_gb for s in run.steps if s.peak_mem_gb is not None])],
    }  # fmt: skip
    images = []
    for name, title, key in PLOTS:
        png = copy.plots / name
        if _plot(png, title, key, data[key]):
            images.append((title, png))
        else:
            png.unlink(missing_ok=True)
    copy.report.write_text(_markdown(record, copy, run, images, notes or []), encoding="utf-8")
    return copy.report


def _markdown(record: JobRecord, copy: LocalCopy, run: Run, images: list, notes: list[str]) -> str:
    s = record.spec
    rows = [("job", record.id), ("model", s.model.name_or_path), ("instance", s.instance.describe())]
    if run.done:
        outcome = "done" + (f" (stopped early: {run.done.stopped})" if run.done.stopped else "")
    elif run.failed:
        outcome = f"failed: {run.failed.error_class}: {run.failed.message}"
    else:
        outcome = record.state
    rows.append(("outcome", outcome))
    if run.started:
        st = run.started
        rows += [("device", f"{st.device} ({st.dtype}, {st.quant}, attention {st.attention})"),
                 ("trainable", f"{st.trainable_params:,} of {st.total_params:,} params"),
                 ("data", f"{st.train_sequences:,} sequences, {st.train_tokens:,} tokens")]  # fmt: skip
    if run.steps:
        last = run.steps[-1]
        rows += [("steps", f"{last.step} of {last.total_steps}"), ("final loss", f"{last.loss:.4f}"),
                 ("tokens/s (median)", f"{statistics.median(x.tokens_per_s for x in run.steps):,.0f}"),
                 ("elapsed", f"{last.elapsed_s:,.0f} s")]  # fmt: skip
        mems = [x.peak_mem_gb for x in run.steps if x.peak_mem_gb is not None]
        if mems:
            rows.append(("peak memory", f"{max(mems):.1f} GiB"))
    if run.evals:
        rows.append(("eval loss", ", ".join(f"{e.eval_loss:.4f} @ {e.step}" for e in run.evals[-5:])))
    out = [f"# Run report: {_md(record.id)}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_md(v)} |" for k, v in rows]
    out.append("")
    if run.warnings:
        out += ["## Warnings", ""] + [f"- {_md(w.source)}: {_md(w.message)}" for w in run.warnings] + [""]
    if run.skipped or notes:
        out += ["## What the record could not keep", ""]
        out += [f"- skipped {run.skipped} unreadable event line(s)"] if run.skipped else []
        out += [f"- {_md(n)}" for n in notes] + [""]
    for title, png in images:
        out += [f"## {title.capitalize()}", "", f"![{title}]({png.relative_to(copy.record).as_posix()})", ""]
    out += ["## Files", "", "Everything here came from the instance and opens offline:", ""]
    for p in sorted(copy.record.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p != copy.report:
            out.append(f"- `{p.relative_to(copy.record).as_posix()}` ({p.stat().st_size:,} bytes)")
    if copy.tensorboard.is_dir():
        out += ["", f"TensorBoard: `tensorboard --logdir {copy.tensorboard}`"]
    return "\n".join(out) + "\n"


def _md(text: object) -> str:
    """Instance text for a Markdown table: control characters escaped, no table or HTML breaking out."""
    return shown(text).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")[:2000]
