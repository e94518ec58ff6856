"""prepare(): dedupe, split, overlong, tokens, content addressing, report and rendering."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest_dataset import FIXTURES, JOB, spec, tiny_tokenizer
from rich.console import Console

from client.dataset import check, prepare
from client.errors import DatasetError
from client.views.dataset import render_examples, render_report
from jobs.layout import DATASET_MANIFEST
from jobs.tokenize import encode, load_tokenized, tokenizer_fingerprint

REPORT_KEYS = {
    "records_in",
    "records_out",
    "duplicates_removed",
    "invalid",
    "overlong",
    "train_records",
    "eval_records",
    "tokens",
    "chars",
    "tokenizer",
    "output",
    "digest",
    "files",
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def many(n: int) -> list[dict]:
    return [{"instruction": f"question {i}", "output": "answer " * (1 + i % 7)} for i in range(n)]


def test_dedupe(tmp_path):
    r = prepare(spec(train="dupes.jsonl"), JOB, tmp_path, tokenizer=None).report
    assert (r["records_in"], r["duplicates_removed"], r["records_out"]) == (4, 2, 2)
    r = prepare(spec(train="dupes.jsonl", dedupe=False), JOB, tmp_path, tokenizer=None).report
    assert (r["duplicates_removed"], r["records_out"]) == (0, 4)


def test_split_is_deterministic(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", many(100))
    a = prepare(spec(train=str(data), eval_fraction=0.1, seed=1), JOB, tmp_path / "a", tokenizer=None)
    b = prepare(spec(train=str(data), eval_fraction=0.1, seed=1), JOB, tmp_path / "b", tokenizer=None)
    c = prepare(spec(train=str(data), eval_fraction=0.1, seed=2), JOB, tmp_path / "c", tokenizer=None)
    assert (a.report["train_records"], a.report["eval_records"]) == (90, 10)
    assert a.digest == b.digest
    assert lines(a.dir / "eval.jsonl") == lines(b.dir / "eval.jsonl")
    assert lines(a.dir / "eval.jsonl") != lines(c.dir / "eval.jsonl")
    everything = lines(a.dir / "train.jsonl") + lines(a.dir / "eval.jsonl")
    assert sorted(map(json.dumps, everything)) == sorted(
        map(json.dumps, lines(c.dir / "train.jsonl") + lines(c.dir / "eval.jsonl"))
    )
    assert len(everything) == 100
    tiny = write_rows(tmp_path / "t.jsonl", many(3))
    r = check(spec(train=str(tiny), eval_fraction=0.01), JOB)
    assert (r["train_records"], r["eval_records"]) == (2, 1)  # at least one eval record


def test_eval_files_without_train_duplicates(tmp_path):
    r = prepare(
        spec(train="alpaca.jsonl", eval="dupes.jsonl", eval_fraction=0.5), JOB, tmp_path, tokenizer=None
    ).report
    assert r["eval_source"] == "data.eval"
    assert (r["train_records"], r["eval_records"]) == (3, 1)  # only Italy is not already in train
    assert r["duplicates_removed"] == 3


def test_content_address_and_reuse(tmp_path):
    out = tmp_path / "prepared"
    first = prepare(spec(train="bom_crlf.jsonl"), JOB, out, tokenizer=None)
    again = prepare(spec(train="bom_crlf.jsonl"), JOB, out, tokenizer=None)
    assert (first.reused, again.reused) == (False, True)
    assert (again.dir, again.digest) == (first.dir, first.digest)
    assert first.dir.name == first.digest and len(first.digest) == 64
    assert again.report["records_out"] == 2
    # the same content from other bytes: same folder; a field that matters: another one
    lf = write_rows(
        tmp_path / "lf.jsonl",
        [
            {"instruction": "What is the capital of France?", "output": "Paris."},
            {"instruction": "Translate to Chinese", "input": "hello", "output": "你好。"},
        ],
    )
    same = prepare(spec(train=str(lf)), JOB, out, tokenizer=None)
    assert (same.digest, same.reused) == (first.digest, False)
    other = prepare(spec(train=str(lf), max_length=512), JOB, out, tokenizer=None)
    assert other.digest != first.digest
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        {first.digest, other.digest}
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    manifest = json.loads((first.dir / DATASET_MANIFEST).read_text())
    assert manifest["digest"] == first.digest and manifest["counts"] == {"train": 2, "eval": 0}
    assert manifest["tokenizer_fingerprint"] is None


def test_failure_leaves_nothing_half_written(tmp_path):
    with pytest.raises(DatasetError):
        prepare(spec(train="bad_order.jsonl"), JOB, tmp_path / "out", tokenizer=None)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_report_with_tokenizer(tmp_path, tok):
    p = prepare(spec(train="alpaca.jsonl", max_length=256), JOB, tmp_path, tokenizer=tok)
    r = p.report
    assert REPORT_KEYS <= set(r)
    recs = lines(p.dir / "train.jsonl")
    encs = [encode(tok, x, 256, "keep") for x in recs]
    lengths = sorted(e.full_length for e in encs)
    assert r["tokens"]["max"] == lengths[-1] and r["tokens"]["p50"] == lengths[1]
    assert r["tokens"]["trained_total"] == sum(sum(e.mask[1:]) for e in encs)
    assert r["tokens"]["prompt_total"] == sum(len(e.mask) - sum(e.mask[1:]) for e in encs)
    assert 0 < r["tokens"]["packing_efficiency"] <= 1
    assert r["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert r["output"] == str(p.dir / "train.jsonl") and r["digest"] == p.digest
    ids, offsets, mask = load_tokenized(p.dir, "train")
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == [
        e.input_ids for e in encs
    ]
    assert mask.tolist() == [m for e in encs for m in e.mask]
    manifest = json.loads((p.dir / DATASET_MANIFEST).read_text())
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert manifest["tokens"]["train"]["sequences"] == 3


def test_report_without_tokenizer(tmp_path):
    r = prepare(spec(train="text.jsonl"), JOB, tmp_path, tokenizer="auto").report
    assert REPORT_KEYS <= set(r)
    assert r["tokens"] is None and r["tokenizer"] is None
    assert "not in the local Hugging Face cache" in r["tokenizer_reason"]
    assert r["chars"]["max"] == len("The quick brown fox jumps over the lazy dog.")
    assert r["overlong"] == {
        "count": 0,
        "action": "drop",
        "max_length": 2048,
        "estimated": True,
        "dropped": 0,
        "truncated": 0,
    }
    assert not (Path(r["dir"]) / "tokens").exists()


def overlong_data(tmp_path: Path) -> tuple[Path, int]:
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "long " * 40, "output": "answer " * 5},
        {"instruction": "q", "output": "long answer " * 40},
    ]
    return write_rows(tmp_path / "o.jsonl", rows), 48


def test_overlong_drop(tmp_path, tok):
    data, limit = overlong_data(tmp_path)
    p = prepare(spec(train=str(data), max_length=limit), JOB, tmp_path / "out", tokenizer=tok)
    assert p.report["overlong"] == {
        "count": 2,
        "action": "drop",
        "max_length": limit,
        "estimated": False,
        "dropped": 2,
        "truncated": 0,
    }
    assert p.report["records_out"] == 1
    assert lines(p.dir / "train.jsonl") == [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]}
    ]
    assert p.report["tokens"]["max"] > limit  # lengths are measured before dropping


def test_overlong_truncate(tmp_path, tok):
    data, limit = overlong_data(tmp_path)
    p = prepare(
        spec(train=str(data), max_length=limit, overlong="truncate"), JOB, tmp_path / "out", tokenizer=tok
    )
    # the long prompt leaves nothing to train once cut: dropped; the long answer is cut
    assert p.report["overlong"]["count"] == 2
    assert (p.report["overlong"]["truncated"], p.report["overlong"]["dropped"]) == (1, 1)
    ids, offsets, mask = load_tokenized(p.dir, "train")
    assert np.diff(offsets).tolist()[1] == limit
    assert len(lines(p.dir / "train.jsonl")) == 2


def test_overlong_fail(tmp_path, tok):
    data, limit = overlong_data(tmp_path)
    with pytest.raises(DatasetError) as e:
        prepare(
            spec(train=str(data), max_length=limit, overlong="fail"), JOB, tmp_path / "out", tokenizer=tok
        )
    got = [(p.file, p.line) for p in e.value.problems]
    assert got == [(str(data), 2), (str(data), 3)]
    assert f"over data.max_length = {limit}" in e.value.problems[0].message
    assert "data.overlong" in e.value.hint
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_template_error_is_located(tmp_path, tok):
    from tinymodel import load_tokenizer

    t = load_tokenizer(tok.name_or_path)
    t.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DatasetError) as e:
        prepare(spec(train="alpaca.jsonl"), JOB, tmp_path, tokenizer=t)
    assert str(e.value.problems[0]).startswith(
        "alpaca.jsonl:3: messages[0].role: the chat template refuses a system turn: no system role"
    )


def test_tokenizer_discovery(tmp_path, tok):
    base = spec(train="text.jsonl")
    by_path = base.model_copy(update={"model": base.model.model_copy(update={"tokenizer": tok.name_or_path})})
    r = prepare(by_path, JOB, tmp_path, tokenizer="auto").report
    assert r["tokenizer"]["source"] == "model.tokenizer" and r["tokens"]["max"] > 0
    r = prepare(spec(model=tok.name_or_path, train="text.jsonl"), JOB, tmp_path, tokenizer="auto").report
    assert r["tokenizer"]["source"] == "model.name_or_path"
    missing = base.model_copy(update={"model": base.model.model_copy(update={"tokenizer": "no/such/dir"})})
    with pytest.raises(DatasetError) as e:
        prepare(missing, JOB, tmp_path, tokenizer="auto")
    assert (
        str(e.value.problems[0])
        == f"{FIXTURES / 'no/such/dir'}: model.tokenizer: {FIXTURES / 'no/such/dir'} does not exist"
    )


def test_render_report_and_examples(tmp_path, tok):
    p = prepare(spec(train="alpaca.jsonl", max_length=256), JOB, tmp_path, tokenizer=tok)
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system="standard")
    render_report(p.report, console)
    render_examples(p, None, 2, console)
    text = out.getvalue()
    assert "3 read → 3 kept (3 train, 0 eval)" in text
    assert "over max_length 256" in text
    assert "p50 " in text and "trained" in text
    assert "example 1 · " in text and "example 3" not in text
    assert "\x1b[1;32mParis.<|im_end|>" in text  # trained: bold green
    assert "\x1b[2m<|im_start|>system" in text  # prompt: dim
    out2 = io.StringIO()
    render_examples([{"text": "just text"}], None, 5, Console(file=out2, width=100))
    assert "no tokenizer" in out2.getvalue() and "just text" in out2.getvalue()


def test_skip_report_renders_the_invalid_rows(tmp_path):
    p = prepare(spec(train="bad_missing.jsonl", on_error="skip"), JOB, tmp_path, tokenizer=None)
    out = io.StringIO()
    render_report(p.report, Console(file=out, width=200))
    text = out.getvalue()
    assert "2 skipped" in text
    assert "skipped bad_missing.jsonl:2: output: missing field" in text
    assert "no tokenizer: no tokenizer was asked for" in text


def test_examples_wrap_on_a_soft_wrapping_console(tmp_path, tok):
    rows = [{"instruction": "Who keeps the lighthouse?", "output": "Captain Mira Okonkwo, who has tended its lamp since 1987."}]
    p = prepare(spec(train=str(write_rows(tmp_path / "l.jsonl", rows))), JOB, tmp_path / "o", tokenizer=tok)
    out = io.StringIO()
    render_examples(p, None, 1, Console(file=out, width=40, soft_wrap=True))  # like the CLI's console
    assert "1987.<|im_end|>" in out.getvalue()
